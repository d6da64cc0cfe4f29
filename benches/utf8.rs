//! Text validation: `Utf8Validator::feed` on a whole message and on the same message fed in
//! 1 KiB pieces (which cut code points), against `std::str::from_utf8` on the whole.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use herald::proto::Utf8Validator;

const SIZES: [usize; 3] = [128, 1024, 64 * 1024];
const PIECE: usize = 1024;

/// `len` bytes (give or take a code point) of repeated `sample`.
fn text(sample: &str, len: usize) -> Vec<u8> {
    let mut out = String::with_capacity(len + 4);
    for c in sample.chars().cycle() {
        if out.len() + c.len_utf8() > len {
            break;
        }
        out.push(c);
    }
    out.into_bytes()
}

fn validate(c: &mut Criterion) {
    let samples = [
        (
            "ascii",
            r#"{"type":"publish","channel":"news","data":{"text":"hello, world"}} "#,
        ),
        // 1-, 2-, 3- and 4-byte sequences: Latin, Cyrillic, Greek, CJK, emoji.
        (
            "mixed",
            "naïve café Привет мир Γειά σου 你好世界 こんにちは 🎉🚀 ok ",
        ),
    ];
    let mut group = c.benchmark_group("utf8");
    for (kind, sample) in samples {
        for size in SIZES {
            let bytes = text(sample, size);
            group.throughput(Throughput::Bytes(bytes.len() as u64));
            group.bench_function(BenchmarkId::new(format!("{kind}/feed_whole"), size), |b| {
                b.iter(|| {
                    let mut validator = Utf8Validator::new();
                    validator.feed(black_box(&bytes)).unwrap();
                    validator.finish().unwrap();
                });
            });
            if bytes.len() > PIECE {
                group.bench_function(
                    BenchmarkId::new(format!("{kind}/feed_1KiB_pieces"), size),
                    |b| {
                        b.iter(|| {
                            let mut validator = Utf8Validator::new();
                            for piece in black_box(&bytes).chunks(PIECE) {
                                validator.feed(piece).unwrap();
                            }
                            validator.finish().unwrap();
                        });
                    },
                );
            }
            group.bench_function(
                BenchmarkId::new(format!("{kind}/std_from_utf8"), size),
                |b| {
                    b.iter(|| std::str::from_utf8(black_box(&bytes)).unwrap().len());
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
    targets = validate
}
criterion_main!(benches);
