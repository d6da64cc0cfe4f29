//! Publishing: the message frame encoded once, then one publish fanned out to 10,000
//! subscribers through real shards driven in memory (no sockets), on 1 and on 2 shards.
//!
//! The fan-out clients are byte buffers, as in the shard's own tests: each is accepted, sends
//! its upgrade request and a subscribe frame, and its outbox is emptied as if a socket had
//! written it. One measured publish is the publisher's frame read, the home ordering it, the
//! mailbox hop, and every subscriber's outbox getting the shared frame.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use herald::Config;
use herald::hub::home_of;
use herald::proto::pubsub::encode_message;
use herald::proto::{ClientHandshake, OpCode, encode_client_frame};
use herald::shard::{Context, Inbox, Post, Shard, Wake};

const SUBSCRIBERS: usize = 10_000;
const PEER: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const MASK: [u8; 4] = [1, 2, 3, 4];

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

struct NoWake;

impl Wake for NoWake {
    fn wake(&self) {}
}

/// Shards stepped by hand, as a backend would step them, with one publisher connection.
struct Cluster {
    shards: Vec<Shard>,
    inboxes: Vec<Inbox>,
    post: Arc<Post>,
    now: Instant,
    /// The publisher's shard and key.
    publisher: (usize, usize),
    /// The publisher's masked publish frame.
    publish: Vec<u8>,
    /// Publishes so far, to check that every one reached every subscriber.
    published: u64,
}

impl Cluster {
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
        let ctx = Arc::new(
            Context::new(config, shards, SystemTime::now()).expect("a valid configuration"),
        );
        let now = Instant::now();
        let wakers = (0..shards)
            .map(|_| Arc::new(NoWake) as Arc<dyn Wake>)
            .collect();
        let (post, receivers) = Post::new(wakers);
        let mut cluster = Self {
            shards: (0..shards)
                .map(|id| Shard::new(id, shards, ctx.clone(), now))
                .collect(),
            inboxes: receivers
                .into_iter()
                .enumerate()
                .map(|(id, rx)| Inbox::new(id, rx, post.clone()))
                .collect(),
            post,
            now,
            publisher: (0, 0),
            publish: Vec::new(),
            published: 0,
        };
        let channel = (0..)
            .map(|i| format!("bench.{i}"))
            .find(|c| home_of(c, shards) == 0)
            .expect("some name is homed on shard 0");
        let subscribe = format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#);
        let subscribe = encode_client_frame(OpCode::Text, true, subscribe.as_bytes(), MASK);
        for i in 0..subscribers {
            let key = cluster.connect(i % shards);
            cluster.write(i % shards, key, &subscribe);
        }
        cluster.publisher = (0, cluster.connect(0));
        let publish = format!(
            r#"{{"type":"publish","channel":"{channel}","data":{{"price":1.0842,"sym":"EURUSD"}}}}"#
        );
        cluster.publish = encode_client_frame(OpCode::Text, true, publish.as_bytes(), MASK);
        cluster.settle();
        cluster.drain();
        cluster
    }

    fn connect(&mut self, shard: usize) -> usize {
        let key = self.shards[shard]
            .accept(self.now, PEER)
            .expect("room for a client");
        let upgrade = ClientHandshake::new("/ws", "x", *b"the sample nonce").encode();
        self.write(shard, key, &upgrade);
        key
    }

    fn write(&mut self, shard: usize, key: usize, bytes: &[u8]) {
        let shard = &mut self.shards[shard];
        shard.read_buffer(key).extend_from_slice(bytes);
        shard.handle_read(key, self.now);
    }

    /// Moves envelopes between shards until every mailbox is quiet (two rounds suffice
    /// for publish -> home -> subscribers' shards).
    fn settle(&mut self) {
        for _ in 0..2 {
            for (shard, inbox) in self.shards.iter_mut().zip(&self.inboxes) {
                shard.handle_inbox(inbox, self.now);
                self.post.deliver(shard.id(), shard.take_outgoing());
            }
        }
    }

    /// Empties every dirty connection's outbox, as if each socket took all of it, and ends
    /// each shard's turn; returns the bytes "written".
    fn drain(&mut self) -> usize {
        let mut written = 0;
        for shard in &mut self.shards {
            while let Some(key) = shard.poll_dirty() {
                let outbox = shard.outbox(key);
                let len = outbox.len_bytes();
                outbox.advance(len);
                written += len;
            }
            shard.end_turn(Duration::ZERO, self.now);
        }
        written
    }

    /// One publish from the publisher to every subscriber's outbox.
    fn publish_once(&mut self) {
        let (shard, key) = self.publisher;
        let frame = std::mem::take(&mut self.publish);
        self.write(shard, key, &frame);
        self.publish = frame;
        self.settle();
        self.published += 1;
    }

    /// Fails unless every publish so far reached every subscriber exactly once.
    fn check_deliveries(&self) {
        let delivered: u64 = self
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
        let mut cluster = Cluster::new(shards, SUBSCRIBERS);
        // Check once, before measuring, that a publish reaches every subscriber.
        cluster.publish_once();
        cluster.check_deliveries();
        assert!(cluster.drain() > SUBSCRIBERS * 40);

        let name = format!("{shards}_shard{}", if shards == 1 { "" } else { "s" });
        // Publish and deliver only; the outboxes are emptied outside the clock.
        group.bench_function(BenchmarkId::new("deliver", &name), |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    cluster.publish_once();
                    elapsed += start.elapsed();
                    cluster.drain();
                }
                elapsed
            });
        });
        // The shard's whole share of a turn without syscalls: deliver, then walk the dirty
        // list and empty each outbox as a fully successful writev would.
        group.bench_function(BenchmarkId::new("deliver_and_drain", &name), |b| {
            b.iter(|| {
                cluster.publish_once();
                cluster.drain()
            });
        });
        // No publish was refused (rate limit) or lost on the way.
        cluster.check_deliveries();
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
