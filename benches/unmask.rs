//! `apply_mask` against a byte-at-a-time reference, on aligned and unaligned payloads.
//!
//! The word loop in `proto::mask` earns its place only if it beats the loop a reader would
//! write first; an unaligned start (offset 1) exercises its byte-wise head and tail.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use herald::proto::apply_mask;

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const SIZES: [usize; 6] = [16, 125, 1024, 4096, 16 * 1024, 64 * 1024];

/// The obvious loop: one byte, one XOR, one modulo.
fn reference(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= mask[(offset + i) % 4];
    }
}

fn unmask(c: &mut Criterion) {
    let mut group = c.benchmark_group("unmask");
    for size in SIZES {
        // Room to start the payload on an 8-byte boundary or one byte past it.
        let mut storage: Vec<u8> = (0..size + 16).map(|i| i as u8).collect();
        let aligned_start = storage.as_ptr().align_offset(8);
        group.throughput(Throughput::Bytes(size as u64));
        for (alignment, start) in [("aligned", aligned_start), ("unaligned", aligned_start + 1)] {
            let payload = start..start + size;
            group.bench_function(
                BenchmarkId::new(format!("apply_mask/{alignment}"), size),
                |b| b.iter(|| apply_mask(black_box(&mut storage[payload.clone()]), MASK, 0)),
            );
            group.bench_function(
                BenchmarkId::new(format!("bytewise/{alignment}"), size),
                |b| b.iter(|| reference(black_box(&mut storage[payload.clone()]), MASK, 0)),
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
    targets = unmask
}
criterion_main!(benches);
