//! permessage-deflate on a 1 KiB JSON message, the three ways Herald can send it: the
//! shared compressor (window 15, reset after every message: what a `shared` channel's home
//! does once per publish), a connection's own compressor keeping its window (what
//! `per-connection` does once per subscriber), and inflating one message as a client does.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use herald::proto::deflate::{Compressor, CompressorSettings, Inflater};
use herald::proto::frame::{FrameHeader, OpCode};

/// A price-feed message of about 1 KiB; `tick` changes a few digits between messages.
fn message(tick: u32) -> Vec<u8> {
    let quotes: Vec<String> = (0..12)
        .map(|j| {
            format!(
                r#"{{"symbol":"SYM{j:02}","bid":{}.{:02},"ask":{}.{:02},"volume":{}}}"#,
                100 + j,
                (tick * 7 + j) % 100,
                101 + j,
                (tick * 3 + j) % 100,
                1000 * j + tick
            )
        })
        .collect();
    format!(
        r#"{{"type":"message","channel":"prices","seq":{tick},"data":{{"tick":{tick},"quotes":[{}]}}}}"#,
        quotes.join(",")
    )
    .into_bytes()
}

fn deflate(c: &mut Criterion) {
    let messages: Vec<Vec<u8>> = (0..64).map(message).collect();
    let mut group = c.benchmark_group("deflate_1k_json");
    group.throughput(Throughput::Bytes(messages[0].len() as u64));

    let mut shared = Compressor::new(CompressorSettings::SHARED, true);
    let mut i = 0;
    group.bench_function("shared_compress_once", |b| {
        b.iter(|| {
            i = (i + 1) % messages.len();
            black_box(shared.encode_frame(OpCode::Text, black_box(&messages[i])))
        });
    });

    let mut own = Compressor::new(CompressorSettings::PER_CONNECTION, false);
    group.bench_function("per_connection_compress", |b| {
        b.iter(|| {
            i = (i + 1) % messages.len();
            black_box(own.encode_frame(OpCode::Text, black_box(&messages[i])))
        });
    });

    let frame =
        Compressor::new(CompressorSettings::SHARED, true).encode_frame(OpCode::Text, &messages[0]);
    let (_, len) = FrameHeader::parse(&frame).unwrap().unwrap();
    let compressed = &frame[len..];
    let mut inflater = Inflater::default();
    group.bench_function("inflate", |b| {
        b.iter(|| black_box(inflater.inflate(black_box(compressed), 1 << 20).unwrap()));
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = deflate
}
criterion_main!(benches);
