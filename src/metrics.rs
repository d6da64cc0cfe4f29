//! Counters per shard, merged only when scraped.
//!
//! Each shard counts in plain integers on its own thread and copies them into its
//! [`ShardMetrics`] (relaxed atomic stores on its own cache line) once per loop turn; a
//! scrape on any shard sums every shard's line. Nothing on the per-message path touches
//! shared memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where a connection is in its life, for the `transport` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Reading an HTTP request (before an upgrade, or between keep-alive requests).
    Http,
    WebSocket,
    Sse,
    Poll,
}

pub const TRANSPORTS: [(Transport, &str); 4] = [
    (Transport::Http, "http"),
    (Transport::WebSocket, "websocket"),
    (Transport::Sse, "sse"),
    (Transport::Poll, "poll"),
];

/// Statuses a refused request can get, for `herald_rejected_requests_total{status}`.
pub const REJECT_STATUSES: [u16; 13] = [
    400, 401, 403, 404, 405, 408, 409, 411, 413, 426, 429, 431, 503,
];

/// Upper bounds (µs) of the publish→flush latency histogram buckets; +Inf is implied.
pub const LATENCY_BUCKETS_US: [u64; 13] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// One shard's counters, as the shard itself keeps them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counters {
    pub connections: [u64; 4],
    pub subscriptions: u64,
    pub channels_homed: u64,
    pub accepted_total: u64,
    pub messages_in_total: u64,
    pub publishes_total: u64,
    pub messages_out_total: u64,
    pub bytes_out_total: u64,
    pub deliveries_total: u64,
    pub slow_consumer_closes_total: u64,
    /// Messages a slow consumer's policy shed (announced with a gap notice).
    pub messages_shed_total: u64,
    pub rejected_total: [u64; REJECT_STATUSES.len()],
    pub busy_ns_total: u64,
    pub loop_turns_total: u64,
    pub publish_flush_buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
    pub publish_flush_sum_us: u64,
    /// Frames sent compressed (a shared frame counts once per subscriber it went to).
    pub compressed_frames_total: u64,
    /// Plain frame bytes minus compressed frame bytes over those frames.
    pub compression_saved_bytes_total: u64,
    /// Time spent compressing (shared frames once, per-connection frames each).
    pub deflate_ns_total: u64,
    /// Time spent decoding client messages that were compressed, inflating included.
    pub inflate_ns_total: u64,
    /// The most bytes one connection of the shard has had queued for sending (how close
    /// clients came to `--outbound-queue-bytes`).
    pub outbound_queue_peak_bytes: u64,
}

impl Counters {
    pub fn count_rejected(&mut self, status: u16) {
        if let Some(i) = REJECT_STATUSES.iter().position(|&s| s == status) {
            self.rejected_total[i] += 1;
        }
    }

    /// One frame sent compressed instead of plain, and the time compressing it took here.
    pub fn count_compressed(&mut self, plain_len: usize, compressed_len: usize, ns: u64) {
        self.compressed_frames_total += 1;
        self.compression_saved_bytes_total += plain_len.saturating_sub(compressed_len) as u64;
        self.deflate_ns_total += ns;
    }

    pub fn observe_publish_flush(&mut self, latency: Duration) {
        let us = latency.as_micros() as u64;
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.publish_flush_buckets[bucket] += 1;
        self.publish_flush_sum_us += us;
    }

    fn fields(&self) -> impl Iterator<Item = u64> + '_ {
        self.connections
            .iter()
            .copied()
            .chain([
                self.subscriptions,
                self.channels_homed,
                self.accepted_total,
                self.messages_in_total,
                self.publishes_total,
                self.messages_out_total,
                self.bytes_out_total,
                self.deliveries_total,
                self.slow_consumer_closes_total,
                self.messages_shed_total,
                self.busy_ns_total,
                self.loop_turns_total,
                self.publish_flush_sum_us,
                self.compressed_frames_total,
                self.compression_saved_bytes_total,
                self.deflate_ns_total,
                self.inflate_ns_total,
                self.outbound_queue_peak_bytes,
            ])
            .chain(self.rejected_total.iter().copied())
            .chain(self.publish_flush_buckets.iter().copied())
    }

    fn fields_mut(&mut self) -> impl Iterator<Item = &mut u64> + '_ {
        self.connections
            .iter_mut()
            .chain([
                &mut self.subscriptions,
                &mut self.channels_homed,
                &mut self.accepted_total,
                &mut self.messages_in_total,
                &mut self.publishes_total,
                &mut self.messages_out_total,
                &mut self.bytes_out_total,
                &mut self.deliveries_total,
                &mut self.slow_consumer_closes_total,
                &mut self.messages_shed_total,
                &mut self.busy_ns_total,
                &mut self.loop_turns_total,
                &mut self.publish_flush_sum_us,
                &mut self.compressed_frames_total,
                &mut self.compression_saved_bytes_total,
                &mut self.deflate_ns_total,
                &mut self.inflate_ns_total,
                &mut self.outbound_queue_peak_bytes,
            ])
            .chain(self.rejected_total.iter_mut())
            .chain(self.publish_flush_buckets.iter_mut())
    }
}

const FIELDS: usize = 4 + 18 + REJECT_STATUSES.len() + LATENCY_BUCKETS_US.len() + 1;

/// One shard's published copy of its [`Counters`], on cache lines of its own.
#[repr(align(128))]
pub struct ShardMetrics {
    fields: [AtomicU64; FIELDS],
}

impl ShardMetrics {
    fn new() -> Self {
        Self {
            fields: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Called by the owning shard once per loop turn.
    pub fn store(&self, counters: &Counters) {
        for (slot, value) in self.fields.iter().zip(counters.fields()) {
            slot.store(value, Ordering::Relaxed);
        }
    }

    fn load_into(&self, counters: &mut Counters) {
        for (slot, value) in self.fields.iter().zip(counters.fields_mut()) {
            *value += slot.load(Ordering::Relaxed);
        }
    }
}

/// Every shard's metrics, shared by all shards.
pub struct Registry {
    shards: Box<[ShardMetrics]>,
    started: Instant,
}

/// The sum over shards, plus what a scrape reports per shard.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub total: Counters,
    pub per_shard: Vec<Counters>,
    pub uptime: Duration,
}

/// Times work the shard does itself (deflate, inflate) for the compression counters: the one
/// clock the sans-IO core reads, because what it measures happens inside it.
pub struct Stopwatch(Instant);

impl Stopwatch {
    #[must_use]
    pub fn start() -> Self {
        Self(Instant::now())
    }

    pub fn elapsed_ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

impl Registry {
    pub fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards).map(|_| ShardMetrics::new()).collect(),
            started: Instant::now(),
        }
    }

    pub fn shard(&self, id: usize) -> &ShardMetrics {
        &self.shards[id]
    }

    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let mut total = Counters::default();
        let mut per_shard = Vec::with_capacity(self.shards.len());
        for shard in self.shards.iter() {
            let mut counters = Counters::default();
            shard.load_into(&mut counters);
            shard.load_into(&mut total);
            per_shard.push(counters);
        }
        Snapshot {
            total,
            per_shard,
            uptime: now.saturating_duration_since(self.started),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_sums_every_shard() {
        let registry = Registry::new(2);
        let mut a = Counters {
            deliveries_total: 5,
            connections: [0, 2, 0, 0],
            ..Counters::default()
        };
        a.count_rejected(431);
        a.observe_publish_flush(Duration::from_micros(70));
        let mut b = a.clone();
        b.deliveries_total = 7;
        registry.shard(0).store(&a);
        registry.shard(1).store(&b);
        let snap = registry.snapshot(Instant::now());
        assert_eq!(snap.total.deliveries_total, 12);
        assert_eq!(snap.total.connections[1], 4);
        let at_431 = REJECT_STATUSES.iter().position(|&s| s == 431).unwrap();
        assert_eq!(snap.total.rejected_total[at_431], 2);
        assert_eq!(snap.total.publish_flush_buckets[1], 2);
        assert_eq!(snap.per_shard[1].deliveries_total, 7);
    }
}
