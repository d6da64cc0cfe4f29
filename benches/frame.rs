//! Reading client frames: the header parser alone, then the whole read path
//! (`Connection::poll_event`: header, unmask in place, UTF-8 for text, message out) on one
//! masked frame per buffer, and on one buffer holding many small frames.

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use herald::proto::{Connection, DecoderLimits, Event, FrameHeader, OpCode, encode_client_frame};

const MASK: [u8; 4] = [0x9a, 0x11, 0x4c, 0xe3];
/// 125 B is the largest 7-bit length, 1 KiB and 16 KiB take the 16-bit length, 64 KiB the
/// 64-bit one.
const SIZES: [usize; 5] = [16, 125, 1024, 16 * 1024, 64 * 1024];
/// Frames in the many-small-frames buffer.
const SMALL_FRAMES: usize = 1000;

/// Printable ASCII, so the same bytes are a valid text and binary payload.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| b' ' + (i % 95) as u8).collect()
}

fn header_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_header_parse");
    group.throughput(Throughput::Elements(1));
    for size in SIZES {
        let frame = encode_client_frame(OpCode::Binary, true, &payload(size), MASK);
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| FrameHeader::parse(black_box(&frame)).unwrap().unwrap());
        });
    }
    group.finish();
}

fn poll_event(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_poll_event");
    for size in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        for (name, opcode) in [("text", OpCode::Text), ("binary", OpCode::Binary)] {
            let frame = encode_client_frame(opcode, true, &payload(size), MASK);
            let mut conn = Connection::new(DecoderLimits::default());
            let event = conn.poll_event(&mut BytesMut::from(&frame[..]));
            assert!(
                matches!(&event, Some(Event::Message { payload, .. }) if payload.len() == size),
                "{event:?}"
            );
            group.bench_function(BenchmarkId::new(name, size), |b| {
                b.iter_batched(
                    || BytesMut::from(&frame[..]),
                    |mut buf| (conn.poll_event(&mut buf), buf),
                    BatchSize::SmallInput,
                );
            });
        }
    }
    group.finish();
}

fn poll_event_many_small(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_poll_event_batch");
    group.throughput(Throughput::Elements(SMALL_FRAMES as u64));
    for size in [16, 125] {
        for (name, opcode) in [("text", OpCode::Text), ("binary", OpCode::Binary)] {
            let frame = encode_client_frame(opcode, true, &payload(size), MASK);
            let stream = frame.repeat(SMALL_FRAMES);
            let mut conn = Connection::new(DecoderLimits::default());
            let mut buf = BytesMut::from(&stream[..]);
            assert_eq!(
                std::iter::from_fn(|| conn.poll_event(&mut buf)).count(),
                SMALL_FRAMES
            );
            group.bench_function(
                BenchmarkId::new(format!("{SMALL_FRAMES}x{name}"), size),
                |b| {
                    b.iter_batched(
                        || BytesMut::from(&stream[..]),
                        |mut buf| {
                            while let Some(event) = conn.poll_event(&mut buf) {
                                black_box(event);
                            }
                            buf
                        },
                        BatchSize::SmallInput,
                    );
                },
            );
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = header_parse, poll_event, poll_event_many_small
}
criterion_main!(benches);
