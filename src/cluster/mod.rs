//! Optional multi-node fan-out on Redis (`--redis URL`). Owns the node's link to Redis;
//! never touches a client socket, and no shard ever waits on it.
//!
//! Shards hand their cluster work (subscribe, unsubscribe, publish) to the [`Bridge`]
//! through a queue, as they hand work to each other. A thread of its own (one small tokio
//! runtime) talks to Redis and answers through the shards' [`Post`] with the same
//! envelopes a home shard sends: `Subscribed`, `HistoryGap`, `Ack`, `Refused` and
//! `Broadcast`, the last one encoded once per node and shared by every shard.
//!
//! In Redis each channel has (keys share one hash tag, so Redis Cluster keeps them in
//! one slot):
//! - `herald:{C}:meta`, a hash with the channel's `epoch` and latest `seq`;
//! - `herald:{C}:stream`, its history, entry id `SEQ-0`, trimmed to `--history-size`;
//! - `herald:{C}`, the pub/sub channel a publish is announced on.
//!
//! One Lua script orders a publish: it assigns the next `seq`, appends to the stream and
//! publishes, atomically, so the sequence, the history and the fan-out cannot disagree.
//! The publisher is acknowledged only after the script has returned.

mod redis;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::compression::CompressionPolicies;
use crate::hub::{ChannelName, HistoryLimits};
use crate::shard::{ConnRef, Post};

/// What a shard asks of the cluster.
#[derive(Debug)]
pub enum Request {
    /// Count a subscription of `shard`'s connection `conn`, and answer it with
    /// `Subscribed` (after replaying what followed `since`) or `HistoryGap`. Exactly one
    /// `Unsubscribe` must follow, whatever the answer.
    Subscribe {
        channel: ChannelName,
        shard: usize,
        conn: ConnRef,
        ticket: u32,
        since: Option<u64>,
        epoch: Option<Box<str>>,
        id: Option<u64>,
    },
    /// Release one subscription counted by `Subscribe`.
    Unsubscribe { channel: ChannelName, shard: usize },
    /// Order and store `data`, then answer `Ack` (or `Refused` when Redis cannot).
    Publish {
        channel: ChannelName,
        data: Bytes,
        shard: usize,
        conn: ConnRef,
        id: Option<u64>,
    },
}

/// The state of the node's Redis link, shared with `/healthz` and `/metrics`.
#[derive(Debug, Default)]
pub struct Link {
    up: AtomicBool,
    reconnects: AtomicU64,
    publishes: AtomicU64,
    publish_failures: AtomicU64,
    history_reads: AtomicU64,
    epoch_changes: AtomicU64,
}

impl Link {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The link's lines of `/metrics` (Prometheus text).
    pub fn prometheus(&self) -> String {
        let lines = [
            (
                "herald_redis_up",
                "gauge",
                "1 while the Redis link (commands and pub/sub) is up.",
                u64::from(self.is_up()),
            ),
            (
                "herald_redis_reconnects_total",
                "counter",
                "Times the Redis link was established again after a loss.",
                self.reconnects.load(Ordering::Relaxed),
            ),
            (
                "herald_redis_publishes_total",
                "counter",
                "Publishes stored in Redis and acknowledged.",
                self.publishes.load(Ordering::Relaxed),
            ),
            (
                "herald_redis_publish_failures_total",
                "counter",
                "Publishes refused because Redis could not store them.",
                self.publish_failures.load(Ordering::Relaxed),
            ),
            (
                "herald_redis_history_reads_total",
                "counter",
                "Reads of a channel's Redis stream (recovery and catch-up).",
                self.history_reads.load(Ordering::Relaxed),
            ),
            (
                "herald_redis_epoch_changes_total",
                "counter",
                "Channels found rolled back or evicted in Redis: a new epoch began.",
                self.epoch_changes.load(Ordering::Relaxed),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in lines {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
        out
    }
}

/// The shards' handle on the cluster.
pub struct Bridge {
    requests: mpsc::UnboundedSender<Request>,
    publishes: mpsc::UnboundedSender<Request>,
    pub link: Arc<Link>,
}

/// The cluster side before its thread runs: it needs the shards' [`Post`], which exists
/// only once the shards do.
pub struct Idle {
    client: ::redis::Client,
    requests: mpsc::UnboundedReceiver<Request>,
    publishes: mpsc::UnboundedReceiver<Request>,
    history: HistoryLimits,
    compression: CompressionPolicies,
    link: Arc<Link>,
}

impl Bridge {
    /// Checks the URL; nothing connects until [`Idle::spawn`].
    pub fn new(
        url: &str,
        history: HistoryLimits,
        compression: CompressionPolicies,
    ) -> Result<(Self, Idle), String> {
        let client = ::redis::Client::open(url).map_err(|e| format!("redis URL {url:?}: {e}"))?;
        let (requests_tx, requests) = mpsc::unbounded_channel();
        let (publishes_tx, publishes) = mpsc::unbounded_channel();
        let link = Arc::new(Link::default());
        Ok((
            Self {
                requests: requests_tx,
                publishes: publishes_tx,
                link: link.clone(),
            },
            Idle {
                client,
                requests,
                publishes,
                history,
                compression,
                link,
            },
        ))
    }

    /// Queues `request`; publishes go to their own queue so that a history read never
    /// holds one up.
    pub fn send(&self, request: Request) {
        let queue = match request {
            Request::Publish { .. } => &self.publishes,
            _ => &self.requests,
        };
        // The cluster thread lives as long as the process; if it is gone, nothing is
        // left to answer and the requester's own timeouts apply.
        let _ = queue.send(request);
    }
}

impl Idle {
    /// Starts the cluster thread; it connects (and reconnects, with backoff) by itself.
    pub fn spawn(self, post: Arc<Post>) -> io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("herald-cluster".into())
            .spawn(move || runtime.block_on(redis::run(self, post)))?;
        Ok(())
    }
}
