//! Publishing: the message frame encoded once, then one publish fanned out to 10,000
//! subscribers through real shards driven in memory (no sockets), on 1 and on 2 shards.
//!
//! The fan-out clients are byte buffers, as in the shard's own tests: each is accepted, sends
//! its upgrade request and a subscribe frame, and its outbox is emptied as if a socket had
//! written it. One measured publish is the publisher's frame read, the home ordering it, the
//! mailbox hop, and every subscriber's outbox getting the shared frame.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use herald::Config;
use herald::proto::pubsub::encode_message;
use herald::shard::harness::{Client, Cluster, homed_on};

const SUBSCRIBERS: usize = 10_000;

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("broadcast_encode_message");
    for size in [64, 1024, 16 * 1024] {
        let data = format!("\"{}\"", "x".repeat(size - 2));
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| encode_message(black_box("market.eurusd"), black_box(42), data.as_bytes()));
        });
    }
    group.finish();
}

/// Shards stepped in memory by the harness the shard's tests use, with one publisher.
struct Bench {
    node: Cluster,
    publisher: Client,
    /// The publisher's publish, as JSON.
    publish: String,
    /// Publishes so far, to check that every one reached every subscriber.
    published: u64,
}

impl Bench {
    /// `subscribers` clients spread round-robin over `shards`, all on one channel homed on
    /// shard 0, plus a publisher on shard 0.
    fn new(shards: usize, subscribers: usize) -> Self {
        // Every client comes from one address, all at once, and the clock stands still:
        // lift the per-address, accept-rate and message-rate limits.
        let config = Config {
            max_connections_per_ip: usize::MAX,
            accept_rate: 1_000_000,
            max_messages_per_second: 1_000_000_000,
            ..Config::default()
        };
        let mut node = Cluster::new(shards, config);
        let channel = homed_on(0, shards);
        let subscribe = format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#);
        for i in 0..subscribers {
            let client = node.connect(i % shards, "/ws");
            node.send(client, &subscribe);
        }
        let publisher = node.connect(0, "/ws");
        node.settle();
        node.flush_all();
        Self {
            node,
            publisher,
            publish: format!(
                r#"{{"type":"publish","channel":"{channel}","data":{{"price":1.0842,"sym":"EURUSD"}}}}"#
            ),
            published: 0,
        }
    }

    /// One publish from the publisher to every subscriber's outbox.
    fn publish_once(&mut self) {
        self.node.send(self.publisher, &self.publish);
        self.node.settle();
        self.published += 1;
    }

    /// Fails unless every publish so far reached every subscriber exactly once.
    fn check_deliveries(&self) {
        let delivered: u64 = self
            .node
            .shards
            .iter()
            .map(|s| s.counters().deliveries_total)
            .sum();
        assert_eq!(delivered, self.published * SUBSCRIBERS as u64);
    }
}

fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("broadcast_fan_out");
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    for shards in [1, 2] {
        let mut bench = Bench::new(shards, SUBSCRIBERS);
        // Check once, before measuring, that a publish reaches every subscriber.
        bench.publish_once();
        bench.check_deliveries();
        assert!(bench.node.flush_all() > SUBSCRIBERS * 40);

        let name = format!("{shards}_shard{}", if shards == 1 { "" } else { "s" });
        // Publish and deliver only; the outboxes are emptied outside the clock.
        group.bench_function(BenchmarkId::new("deliver", &name), |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    bench.publish_once();
                    elapsed += start.elapsed();
                    bench.node.flush_all();
                }
                elapsed
            });
        });
        // The shard's whole share of a turn without syscalls: deliver, then walk the dirty
        // list and empty each outbox as a fully successful writev would.
        group.bench_function(BenchmarkId::new("deliver_and_drain", &name), |b| {
            b.iter(|| {
                bench.publish_once();
                bench.node.flush_all()
            });
        });
        // No publish was refused (rate limit) or lost on the way.
        bench.check_deliveries();
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = encode, fan_out
}
criterion_main!(benches);
