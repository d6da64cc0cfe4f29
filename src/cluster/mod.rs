//! Optional multi-node fan-out on Redis (`--redis URL`). Owns the node's link to Redis;
//! never touches a client socket, and no shard ever waits on it.
//!
//! Shards hand their cluster work (subscribe, unsubscribe, publish) to the [`Bridge`]
//! through a queue, as they hand work to each other. A thread of its own (one small tokio
//! runtime) talks to Redis and answers through the shards' [`Post`] with the same
//! envelopes a home shard sends: `Subscribed`, `HistoryGap`, `Ack`, `Conflict`, `Refused`
//! and `Broadcast`, the last one encoded once per node and shared by every shard. What to do
//! about each channel is decided without IO by the state machine in `node.rs`; `redis.rs`
//! performs its commands and `publish.rs` orders publishes.
//!
//! In Redis each channel has (keys share one hash tag, so Redis Cluster keeps them in
//! one slot):
//! - `herald:{C}:meta`, a hash with the channel's `epoch` and latest `seq`;
//! - `herald:{C}:stream`, its history, entry id `SEQ-0`, trimmed to its namespace's history
//!   size and expiring its TTL after the last publish (never, for a `latest` namespace);
//! - `herald:{C}`, the pub/sub channel a publish is announced on (and, from
//!   `presence.rs`, the channel's joins and leaves);
//! - the channel's presence entries (`presence.rs`).
//!
//! Outside every channel's slot, `users.rs` keeps each node's connections per user for
//! the cluster-wide `--max-connections-per-user`.
//!
//! One Lua script orders a publish: it checks the publisher's `expect_seq`, assigns the
//! next `seq`, appends to the stream and publishes, atomically, so the sequence, the
//! history and the fan-out cannot disagree and a conditional write cannot be lost.
//! The publisher is acknowledged only after the script has returned.
//!
//! Nothing here grows with what clients send: the queues from the shards refuse past
//! their bounds (a publish is answered `unavailable` / 503, a subscribe `unavailable`),
//! every stream read is bounded by the history size, the per-channel state is held
//! only for channels this node's clients hold (plus a bounded memory of recent publishes),
//! and what Redis sends the shards is held within `--redis-buffer-bytes` (`redis.rs`,
//! `inflow.rs`).

mod inflow;
mod node;
pub mod presence;
mod publish;
mod redis;
pub mod roster;
mod script;
mod sharded;
pub mod users;

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::compression::CompressionPolicies;
use crate::hub::{ChannelName, HistoryPolicy};
use crate::shard::{ConnRef, Context, Post};
use roster::{Ask, AskQueue};
use users::{UserAsk, UserQueue};

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
        /// How much of the replay to send with the answer (0: none yet); the shard asks
        /// for the rest with `Replay` as its connection drains.
        max_replay_bytes: usize,
    },
    /// The next chunk of a replay for a subscription `Subscribe` counted: the messages
    /// of `epoch` after `since`, up to `max_bytes` (at least one). Answered as `Subscribe`
    /// is; never counted.
    Replay {
        channel: ChannelName,
        shard: usize,
        conn: ConnRef,
        ticket: u32,
        since: u64,
        epoch: Box<str>,
        id: Option<u64>,
        max_bytes: usize,
    },
    /// Release one subscription counted by `Subscribe`.
    Unsubscribe { channel: ChannelName, shard: usize },
    /// Order and store `data`, then answer `Ack` (or `Refused` when Redis cannot).
    Publish {
        channel: ChannelName,
        data: Bytes,
        /// Stored only if the channel's last seq is still this (checked in the script).
        expect_seq: Option<u64>,
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
    /// Times the node stopped reading Redis until a shard took its backlog.
    backlog_waits: AtomicU64,
    /// The largest backlog of Redis traffic one shard had not taken, in bytes.
    backlog_peak: AtomicU64,
    /// Times pushes from Redis were dropped past `--redis-buffer-bytes`.
    push_overflows: AtomicU64,
    /// The masters serving slots (1 for one Redis) and how many of them answered the
    /// last probe (both 0 before the first).
    masters: AtomicU64,
    masters_answering: AtomicU64,
    presence_writes: AtomicU64,
    presence_failures: AtomicU64,
    /// Upgrades the cluster-wide per-user limit admitted, refused, and decided on the
    /// node-local count because Redis did not answer (`users.rs`).
    user_admissions: AtomicU64,
    user_refusals: AtomicU64,
    user_failures: AtomicU64,
}

impl Link {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The masters serving slots (1 for one Redis), and how many answered the last
    /// probe; `None` before the first probe.
    pub fn masters(&self) -> Option<(u64, u64)> {
        let known = self.masters.load(Ordering::Relaxed);
        (known > 0).then(|| (known, self.masters_answering.load(Ordering::Relaxed)))
    }

    fn set_masters(&self, known: u64, answering: u64) {
        self.masters.store(known, Ordering::Relaxed);
        self.masters_answering.store(answering, Ordering::Relaxed);
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
            (
                "herald_redis_backlog_waits_total",
                "counter",
                "Times the node stopped reading Redis until a shard took its backlog.",
                self.backlog_waits.load(Ordering::Relaxed),
            ),
            (
                "herald_redis_backlog_peak_bytes",
                "gauge",
                "Largest backlog of Redis messages one shard had not taken yet, in bytes.",
                self.backlog_peak.load(Ordering::Relaxed),
            ),
            (
                "herald_redis_push_overflows_total",
                "counter",
                "Times Redis pushes were dropped past --redis-buffer-bytes (channels caught up from their streams).",
                self.push_overflows.load(Ordering::Relaxed),
            ),
            (
                "herald_redis_presence_writes_total",
                "counter",
                "Joins and leaves recorded in Redis (presence, join/leave events).",
                self.presence_writes.load(Ordering::Relaxed),
            ),
            (
                "herald_redis_presence_failures_total",
                "counter",
                "Presence writes (joins, leaves, refreshes) Redis did not take; rewritten on the next refresh.",
                self.presence_failures.load(Ordering::Relaxed),
            ),
            (
                "herald_redis_user_admissions_total",
                "counter",
                "Connections admitted by the cluster-wide --max-connections-per-user check in Redis.",
                self.user_admissions.load(Ordering::Relaxed),
            ),
            (
                "herald_redis_user_refusals_total",
                "counter",
                "Connections refused (429) because the user's connections on the live nodes reached --max-connections-per-user.",
                self.user_refusals.load(Ordering::Relaxed),
            ),
            (
                "herald_redis_user_failures_total",
                "counter",
                "Per-user admissions Redis did not answer, decided on this node's count alone.",
                self.user_failures.load(Ordering::Relaxed),
            ),
        ];
        let masters = [
            (
                "herald_redis_masters",
                "gauge",
                "Redis masters serving slots (1 for one Redis), as the last probe found them (0 before it).",
                self.masters.load(Ordering::Relaxed),
            ),
            (
                "herald_redis_masters_answering",
                "gauge",
                "Redis masters that answered the last probe's PING in time.",
                self.masters_answering.load(Ordering::Relaxed),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in lines.into_iter().chain(masters) {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
        out
    }
}

/// Most subscribes waiting for the cluster thread; a reconnecting crowd of this many
/// clients is queued, not refused.
const MAX_QUEUED_SUBSCRIBES: usize = 16 * 1024;
/// Most publishes waiting for the cluster thread (32 pipelined round trips)...
const MAX_QUEUED_PUBLISHES: usize = 16 * 1024;
/// ...and most bytes of data among them.
const MAX_QUEUED_PUBLISH_BYTES: usize = 32 * 1024 * 1024;

/// What a refused request is told: the cluster thread has too much queued already.
pub const BUSY: &str = "the cluster link is saturated; not queued, retry";

/// The cluster thread's queue was full: the request was not queued (answer it [`BUSY`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// A queue from the shards to the cluster thread that refuses past its bounds instead of
/// growing. An `Unsubscribe` is always taken, and counts against no bound: each one
/// follows a `Subscribe` the queue took, so there are never more of them than
/// subscriptions the node holds, and losing one would leak that subscription.
struct Queue {
    state: Mutex<Queued>,
    ready: Notify,
    max_requests: usize,
    max_bytes: usize,
}

#[derive(Default)]
struct Queued {
    requests: VecDeque<Request>,
    /// Queued requests that count against `max_requests` (all but unsubscribes).
    counted: usize,
    /// Bytes of publish data queued.
    bytes: usize,
}

/// Whether `request` counts against a queue's bound, and its bytes.
fn weight(request: &Request) -> (usize, usize) {
    match request {
        Request::Subscribe { .. } | Request::Replay { .. } => (1, 0),
        Request::Unsubscribe { .. } => (0, 0),
        Request::Publish { data, .. } => (1, data.len()),
    }
}

impl Queue {
    fn new(max_requests: usize, max_bytes: usize) -> Self {
        Self {
            state: Mutex::new(Queued::default()),
            ready: Notify::new(),
            max_requests,
            max_bytes,
        }
    }

    fn push(&self, request: Request) -> Result<(), Busy> {
        let (counted, bytes) = weight(&request);
        {
            let mut queued = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if counted > 0
                && (queued.counted >= self.max_requests || queued.bytes + bytes > self.max_bytes)
            {
                return Err(Busy);
            }
            queued.counted += counted;
            queued.bytes += bytes;
            queued.requests.push_back(request);
        }
        // One consumer: if it is not waiting, the permit makes its next wait return.
        self.ready.notify_one();
        Ok(())
    }

    /// Moves up to `max` requests into `out`, waiting while there is none. Cancel-safe:
    /// a request is taken only when this returns.
    async fn recv_many(&self, out: &mut Vec<Request>, max: usize) {
        loop {
            {
                let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let queued = &mut *guard;
                if !queued.requests.is_empty() {
                    let take = queued.requests.len().min(max);
                    for request in queued.requests.drain(..take) {
                        let (counted, bytes) = weight(&request);
                        queued.counted -= counted;
                        queued.bytes -= bytes;
                        out.push(request);
                    }
                    return;
                }
            }
            self.ready.notified().await;
        }
    }

    /// The next request, waiting while there is none. Cancel-safe like `recv_many`.
    async fn recv(&self) -> Request {
        let mut one = Vec::with_capacity(1);
        self.recv_many(&mut one, 1).await;
        one.pop().expect("recv_many returns at least one request")
    }
}

/// The shards' handle on the cluster.
pub struct Bridge {
    requests: Arc<Queue>,
    publishes: Arc<Queue>,
    asks: Arc<AskQueue>,
    users: Arc<UserQueue>,
    pub link: Arc<Link>,
}

/// The cluster side before its thread runs: it needs the shards' [`Post`], which exists
/// only once the shards do.
pub struct Idle {
    backend: redis::Backend,
    requests: Arc<Queue>,
    publishes: Arc<Queue>,
    asks: Arc<AskQueue>,
    users: Arc<UserQueue>,
    history: HistoryPolicy,
    ack_replicas: u32,
    /// Redis traffic held per shard, and announcements read ahead (`--redis-buffer-bytes`).
    buffer_bytes: usize,
    compression: CompressionPolicies,
    link: Arc<Link>,
}

impl Bridge {
    /// Checks the URL (`redis://...` for one Redis, `redis+cluster://HOST:PORT,...` for a
    /// Redis Cluster); nothing connects until [`Idle::spawn`].
    pub fn new(
        url: &str,
        history: HistoryPolicy,
        ack_replicas: u32,
        buffer_bytes: usize,
        compression: CompressionPolicies,
    ) -> Result<(Self, Idle), String> {
        let backend = match sharded::seeds(url) {
            Some(seeds) => redis::Backend::Sharded(sharded::Sharded::new(seeds, buffer_bytes)?),
            None => redis::Backend::single(url, buffer_bytes)?,
        };
        let requests = Arc::new(Queue::new(MAX_QUEUED_SUBSCRIBES, usize::MAX));
        let publishes = Arc::new(Queue::new(MAX_QUEUED_PUBLISHES, MAX_QUEUED_PUBLISH_BYTES));
        let link = Arc::new(Link::default());
        let asks = Arc::new(AskQueue::new());
        let users = Arc::new(UserQueue::new());
        Ok((
            Self {
                requests: requests.clone(),
                publishes: publishes.clone(),
                asks: asks.clone(),
                users: users.clone(),
                link: link.clone(),
            },
            Idle {
                backend,
                requests,
                publishes,
                asks,
                users,
                history,
                ack_replicas,
                buffer_bytes,
                compression,
                link,
            },
        ))
    }

    /// Queues a `Subscribe` or a `Publish`, or refuses it when its queue is full: the
    /// shard then answers it [`BUSY`] itself, and a refused `Subscribe` needs no
    /// `Unsubscribe`. Publishes go to their own queue so that a history read never holds
    /// one up.
    pub fn send(&self, request: Request) -> Result<(), Busy> {
        match request {
            Request::Publish { .. } => self.publishes.push(request),
            _ => self.requests.push(request),
        }
    }

    /// Queues the `Unsubscribe` that follows a queued `Subscribe`; never refused.
    pub fn unsubscribe(&self, channel: ChannelName, shard: usize) {
        let queued = self.requests.push(Request::Unsubscribe { channel, shard });
        debug_assert_eq!(queued, Ok(()), "an unsubscribe counts against no bound");
    }

    /// Hands the roster (presence, the cluster-wide server API) a join, a leave, a part
    /// of an order, or a question or order; only the last two are ever refused
    /// ([`Busy`]: answer them [`BUSY`]).
    pub fn ask(&self, ask: Ask) -> Result<(), Busy> {
        self.asks.push(ask).map_err(|_| Busy)
    }

    /// Asks the cluster to admit a connection of `user` against the per-user limit over
    /// every live node; `shard`'s `conn` is answered with one `Admitted`. Refused
    /// ([`Busy`]) past [`users::MAX_QUEUED_ADMISSIONS`] waiting.
    pub fn admit_user(&self, user: Arc<str>, shard: usize, conn: ConnRef) -> Result<(), Busy> {
        let ask = UserAsk::Admit { user, shard, conn };
        self.users.push(ask).map_err(|_| Busy)
    }

    /// Takes this node out of the cluster-wide per-user count once its shards have
    /// drained, so its users may reconnect elsewhere at once; waits for Redis up to
    /// `limit` (past it, the node's entry lapses by itself).
    pub fn leave_user_count(&self, limit: std::time::Duration) {
        let (done, left) = std::sync::mpsc::sync_channel(1);
        if self.users.push(UserAsk::Leave { done }).is_ok() {
            let _ = left.recv_timeout(limit);
        }
    }

    /// Gives back the place of a connection whose admission [`users::Verdict::counts`];
    /// never refused.
    pub fn release_user(&self, user: Arc<str>) {
        let taken = self.users.push(UserAsk::Release { user });
        debug_assert!(taken.is_ok(), "a release counts against no bound");
    }
}

impl Idle {
    /// Starts the cluster thread; it connects (and reconnects, with backoff) by itself.
    /// `ctx` names the node (its epoch) and counts its connections for the registry.
    pub fn spawn(self, post: Arc<Post>, ctx: Arc<Context>) -> io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("herald-cluster".into())
            .spawn(move || runtime.block_on(redis::run(self, post, ctx)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONN: ConnRef = ConnRef {
        key: 0,
        generation: 0,
    };

    fn subscribe(channel: &str) -> Request {
        Request::Subscribe {
            channel: channel.into(),
            shard: 0,
            conn: CONN,
            ticket: 1,
            since: None,
            epoch: None,
            id: None,
            max_replay_bytes: 0,
        }
    }

    fn unsubscribe(channel: &str) -> Request {
        Request::Unsubscribe {
            channel: channel.into(),
            shard: 0,
        }
    }

    fn publish(bytes: usize) -> Request {
        Request::Publish {
            channel: "c".into(),
            data: Bytes::from(vec![b'1'; bytes]),
            expect_seq: None,
            shard: 0,
            conn: CONN,
            id: None,
        }
    }

    #[tokio::test]
    async fn a_full_queue_refuses_but_always_takes_unsubscribes_in_order() {
        let queue = Queue::new(3, usize::MAX);
        for channel in ["a", "b", "c"] {
            assert_eq!(queue.push(subscribe(channel)), Ok(()));
        }
        assert_eq!(queue.push(subscribe("d")), Err(Busy));
        for channel in ["a", "b", "c"] {
            assert_eq!(queue.push(unsubscribe(channel)), Ok(()));
        }
        assert_eq!(queue.push(subscribe("d")), Err(Busy));
        // Taking one subscribe makes room for one more, behind everything queued.
        assert!(
            matches!(queue.recv().await, Request::Subscribe { channel, .. } if &*channel == "a")
        );
        assert_eq!(queue.push(subscribe("d")), Ok(()));
        assert_eq!(queue.push(subscribe("e")), Err(Busy));
        let mut rest = Vec::new();
        queue.recv_many(&mut rest, 100).await;
        let order: Vec<String> = rest
            .iter()
            .map(|r| match r {
                Request::Subscribe { channel, .. } => format!("+{channel}"),
                Request::Unsubscribe { channel, .. } => format!("-{channel}"),
                Request::Publish { .. } | Request::Replay { .. } => unreachable!(),
            })
            .collect();
        assert_eq!(order, ["+b", "+c", "-a", "-b", "-c", "+d"]);
        let queued = queue.state.lock().unwrap();
        assert_eq!((queued.requests.len(), queued.counted), (0, 0));
    }

    #[tokio::test]
    async fn publishes_are_bounded_in_count_and_in_bytes() {
        let queue = Queue::new(4, 1000);
        assert_eq!(queue.push(publish(600)), Ok(()));
        assert_eq!(queue.push(publish(401)), Err(Busy));
        assert_eq!(queue.push(publish(400)), Ok(()));
        assert_eq!(queue.push(publish(0)), Ok(()));
        assert_eq!(queue.push(publish(0)), Ok(()));
        assert_eq!(queue.push(publish(0)), Err(Busy));
        let mut batch = Vec::new();
        queue.recv_many(&mut batch, 2).await;
        assert_eq!(batch.len(), 2);
        assert_eq!(queue.push(publish(1000)), Ok(()));
        assert_eq!(queue.push(publish(1)), Err(Busy));
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_request_pushed_later() {
        let queue = Arc::new(Queue::new(1, usize::MAX));
        let pusher = queue.clone();
        let waiting = tokio::spawn(async move { queue.recv().await });
        tokio::task::yield_now().await;
        pusher.push(subscribe("late")).unwrap();
        let request = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the receiver was not woken")
            .unwrap();
        assert!(matches!(request, Request::Subscribe { channel, .. } if &*channel == "late"));
    }
}
