//! The `/ws` JSON commands: `CommandParser::parse` on the small commands and on publishes
//! whose `data` is 64 B, 1 KiB and 16 KiB of JSON.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use herald::proto::pubsub::{Command, CommandParser};

/// A JSON array of small objects, `len` bytes long (padded inside the last string).
fn json_data(len: usize) -> String {
    let mut data = String::from("[");
    let mut i = 0;
    loop {
        let item = format!(
            r#"{{"id":{i},"price":{}.25,"sym":"AB{i}","ok":true}},"#,
            i * 7
        );
        // Room for the closing `{"pad":""}]`.
        if data.len() + item.len() + 11 > len {
            break;
        }
        data.push_str(&item);
        i += 1;
    }
    let pad = len.saturating_sub(data.len() + 11);
    data.push_str(&format!(r#"{{"pad":"{}"}}]"#, "x".repeat(pad)));
    data
}

fn parse(c: &mut Criterion) {
    let mut commands = vec![
        (
            "subscribe".to_owned(),
            r#"{"type":"subscribe","channel":"market.eurusd","since":41,"epoch":"k3j9x0","id":7}"#
                .to_owned(),
        ),
        ("ping".to_owned(), r#"{"type":"ping","id":8}"#.to_owned()),
    ];
    for size in [64, 1024, 16 * 1024] {
        let data = json_data(size);
        assert_eq!(data.len(), size);
        commands.push((
            format!("publish_{size}B"),
            format!(r#"{{"type":"publish","channel":"market.eurusd","data":{data},"id":9}}"#),
        ));
    }

    let mut parser = CommandParser::default();
    let mut group = c.benchmark_group("pubsub_json_parse");
    for (name, json) in commands {
        let payload = Bytes::from(json);
        assert!(parser.parse(&payload).is_ok(), "{name} must parse");
        if let Ok(Command::Publish { data, .. }) = parser.parse(&payload) {
            assert!(data.starts_with(b"["), "{name}: data is the array");
        }
        group.throughput(Throughput::Bytes(payload.len() as u64));
        group.bench_function(BenchmarkId::from_parameter(&name), |b| {
            b.iter(|| parser.parse(black_box(&payload)).unwrap());
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = parse
}
criterion_main!(benches);
