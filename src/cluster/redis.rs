//! The cluster thread's IO: the Redis link, and the driver that performs what the node's
//! state machine ([`Node`]) decides. The link is one Redis (one command connection, one
//! pub/sub connection, reconnected with backoff: any failure takes it down) or a Redis
//! Cluster (`sharded.rs`: a failure is the failing channel's alone, retried after
//! [`CHANNEL_RETRY`], while the crate follows the slot map).
//!
//! What Redis pushes (announcements, subscription changes) reaches the thread through a
//! queue bounded in bytes (`inflow.rs`), and the thread reads the next push only while
//! every shard holds less than `--redis-buffer-bytes` of what it sent them
//! ([`Post::remote_room`]): a shard that falls behind stops the node reading Redis, the
//! queue fills, and past it the node catches every channel up from its stream once the
//! shard has taken its backlog. The node's memory for Redis traffic is bounded by the
//! buffer times the shards plus one, and what is dropped meanwhile comes back from the
//! history.
//!
//! Two tasks share the thread. The publisher (`publish.rs`) pipelines every queued
//! publish into one round trip of the ordering script. The driver owns everything else:
//! it feeds the node one request or announcement at a time and performs the node's
//! actions until it is idle, so each of the node's steps sees Redis in the order it asked.
//! So that one step cannot hold the others for long, every stream read asks for at most
//! the history size (`COUNT`), and every reply is awaited at most [`REPLY_TIMEOUT`].

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use ::redis::aio::MultiplexedConnection;
use ::redis::{
    AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, RedisError, RedisResult, Value,
};
use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout};

use super::inflow::{Inflow, PushSender, inflow};
use super::node::{Action, Command, Node, Reply};
use super::publish::{Conn, Publisher, SEEN_PER_GENERATION, Seen};
use super::roster::{self, CONTROL, Fed, Feed, Roster};
use super::script::{
    META_SCRIPT, channel_of, meta_key, publish_script, pubsub_key, stream_entries, stream_key,
};
use super::sharded::{Sharded, start_over};
use super::users::Users;
use super::{Idle, Link, Queue};
use crate::compression::{CompressionPolicies, CompressionPolicy};
use crate::hub::{self, Broadcast, ChannelName};
use crate::proto::deflate::{Compressor, CompressorSettings};
use crate::shard::{Context, Envelope, Post};

/// Longest wait for one Redis reply: past it the link counts as lost (a hung Redis must
/// not hold publishes forever).
pub(super) const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an idle link is probed, so a silently dead pub/sub socket is noticed.
const PROBE_EVERY: Duration = Duration::from_secs(2);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// On a Redis Cluster, how long a channel whose command failed waits before it is
/// subscribed and caught up again (a failover takes a few of these).
const CHANNEL_RETRY: Duration = Duration::from_millis(250);

/// Sends envelopes to shards from outside them.
#[derive(Clone)]
pub(super) struct Shards {
    post: Arc<Post>,
}

impl Shards {
    pub(super) fn send(&self, shard: usize, envelope: Envelope) {
        self.post.send(shard, envelope);
    }

    pub(super) fn count(&self) -> usize {
        self.post.shards()
    }
}

/// One Redis's pub/sub side: a RESP3 connection whose pushes go through the bounded
/// inflow. Each connection's pushes carry its number, so the disconnection a dropped
/// connection reports after it was replaced is not taken for the new one's.
pub(super) struct SinglePushes {
    client: ::redis::Client,
    sender: PushSender,
    inflow: Inflow,
    current: Arc<AtomicU64>,
}

/// The command connection of one link, numbered so that a report about a link that has
/// already been replaced is recognised as stale.
pub(super) type Publishing = Option<(u64, Conn)>;

/// The Redis behind `--redis`.
pub(super) enum Backend {
    Single {
        client: ::redis::Client,
        pushes: SinglePushes,
        live: Option<Live>,
    },
    Sharded(Sharded),
}

impl Backend {
    /// One Redis at `url`; pushes read ahead hold at most `buffer_bytes`.
    pub(super) fn single(url: &str, buffer_bytes: usize) -> Result<Self, String> {
        let invalid = |e: RedisError| format!("redis URL {url:?}: {e}");
        let client = ::redis::Client::open(url).map_err(invalid)?;
        let info = client.get_connection_info().clone();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let pubsub = ::redis::Client::open(info.set_redis_settings(resp3)).map_err(invalid)?;
        let (sender, inflow) = inflow(buffer_bytes);
        Ok(Self::Single {
            client,
            pushes: SinglePushes {
                client: pubsub,
                sender,
                inflow,
                current: Arc::new(AtomicU64::new(0)),
            },
            live: None,
        })
    }

    fn is_up(&self) -> bool {
        match self {
            Self::Single { live, .. } => live.is_some(),
            Self::Sharded(sharded) => sharded.conn().is_some(),
        }
    }

    fn sharded(&self) -> bool {
        matches!(self, Self::Sharded(_))
    }
}

/// What arrived from Redis besides replies.
enum Incoming {
    Push(PushInfo),
    /// Pushes were dropped: every held channel catches up from its stream.
    Overflow,
    /// The pub/sub connection is gone.
    Closed,
}

/// Runs the cluster thread until the process ends.
pub(super) async fn run(idle: Idle, post: Arc<Post>, ctx: Arc<Context>) {
    let Idle {
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
    } = idle;
    let (conn_tx, conn_rx) = watch::channel(None);
    let roster_conn: watch::Receiver<Publishing> = conn_rx.clone();
    if ctx.config.max_connections_per_user > 0 {
        let users = Users::new(
            ctx.epoch.as_ref().into(),
            ctx.config.max_connections_per_user,
            link.clone(),
            Shards { post: post.clone() },
            conn_rx.clone(),
            users,
        );
        tokio::spawn(users.run());
    }
    let (broken, broken_rx) = watch::channel(0);
    let publisher = Publisher {
        conn: conn_rx,
        broken,
        shards: Shards { post: post.clone() },
        history: history.clone(),
        ack_replicas,
        link: link.clone(),
        seen: Seen::new(SEEN_PER_GENERATION),
        script: ::redis::Script::new(&publish_script(backend.sharded()))
            .get_hash()
            .to_string(),
        text: publish_script(backend.sharded()),
    };
    tokio::spawn(publisher.run(publishes));
    let (feed, fed) = roster::feed();
    let roster = Roster::new(
        ctx,
        link.clone(),
        Shards { post: post.clone() },
        roster_conn,
        asks,
        fed,
        backend.sharded(),
    );
    tokio::spawn(roster.run());
    let mut driver = Driver {
        backend,
        node: Node::new(post.shards(), history.default.size, link.clone()).with_history(history),
        shards: Shards { post },
        buffer_bytes,
        compression,
        shared_compressor: Compressor::new(CompressorSettings::SHARED, true),
        link,
        conn_tx,
        generation: 0,
        backoff: FIRST_BACKOFF,
        retry_at: Instant::now(),
        connected_before: false,
        retry: HashSet::new(),
        meta_script: ::redis::Script::new(META_SCRIPT).get_hash().to_string(),
        feed,
    };
    driver.run(requests, broken_rx).await;
}

/// The single Redis's two connections while up: commands, and pub/sub (RESP3).
pub(super) struct Live {
    conn: MultiplexedConnection,
    pubsub: MultiplexedConnection,
}

/// The link went down during a step; the caller stops and lets `run` reconnect.
struct Lost;

struct Driver {
    backend: Backend,
    node: Node,
    shards: Shards,
    /// The next push is read only while every shard's backlog is under this.
    buffer_bytes: usize,
    /// Shared-policy channels are compressed once per node, as a home shard does alone.
    compression: CompressionPolicies,
    shared_compressor: Compressor,
    link: Arc<Link>,
    conn_tx: watch::Sender<Publishing>,
    /// Counts links established, naming the current one.
    generation: u64,
    backoff: Duration,
    retry_at: Instant,
    connected_before: bool,
    /// On a Redis Cluster, the channels whose last command failed, made live again at
    /// `retry_at`.
    retry: HashSet<ChannelName>,
    meta_script: String,
    /// To the roster: orders between nodes, and this node's channel counts.
    feed: Feed,
}

impl Driver {
    async fn run(&mut self, requests: Arc<Queue>, mut broken: watch::Receiver<u64>) {
        let mut probe = tokio::time::interval(PROBE_EVERY);
        loop {
            let up = self.backend.is_up();
            let retrying = !self.retry.is_empty();
            let room = self.shards.post.remote_backlog() < self.buffer_bytes;
            let step = tokio::select! {
                request = requests.recv() => {
                    self.node.handle_request(request);
                    Ok(())
                }
                incoming = next_incoming(&mut self.backend), if room => self.incoming(incoming),
                () = self.shards.post.remote_room(self.buffer_bytes), if !room => {
                    Link::count(&self.link.backlog_waits);
                    Ok(())
                }
                () = sleep_until(self.retry_at), if !up => self.connect().await,
                () = sleep_until(self.retry_at), if up && retrying => {
                    for channel in std::mem::take(&mut self.retry) {
                        self.node.handle_channel_lost(&channel);
                    }
                    Ok(())
                }
                Ok(()) = broken.changed() => {
                    let generation = *broken.borrow_and_update();
                    if up && generation == self.generation { Err(Lost) } else { Ok(()) }
                }
                _ = probe.tick(), if up => self.probe().await,
            };
            let step = match step {
                Ok(()) => self.drive().await,
                Err(Lost) => Err(Lost),
            };
            if step.is_err() {
                self.lose_link();
            }
        }
    }

    fn incoming(&mut self, incoming: Incoming) -> Result<(), Lost> {
        match incoming {
            Incoming::Push(push) => {
                match &self.backend {
                    Backend::Sharded(sharded) => {
                        sharded.handle_push(push, &mut self.node, &self.feed);
                    }
                    Backend::Single { .. } => handle_single_push(push, &mut self.node, &self.feed),
                }
                Ok(())
            }
            Incoming::Overflow => {
                Link::count(&self.link.push_overflows);
                tracing::warn!("redis pushes overflowed; every channel caught up again");
                start_over(&mut self.node);
                Ok(())
            }
            Incoming::Closed => Err(Lost),
        }
    }

    /// Performs the node's actions until it is idle.
    async fn drive(&mut self) -> Result<(), Lost> {
        while let Some(action) = self.node.poll_action() {
            match action {
                Action::Send { shard, envelope } => self.shards.send(shard, envelope),
                Action::Broadcast {
                    channel,
                    seq,
                    frame,
                    shards,
                } => {
                    // A catch-up step can hold a history's worth of messages: each waits
                    // for room as the next announcement would.
                    if self.shards.post.remote_backlog() >= self.buffer_bytes {
                        Link::count(&self.link.backlog_waits);
                        self.shards.post.remote_room(self.buffer_bytes).await;
                    }
                    self.broadcast(channel, seq, frame, &shards);
                }
                Action::Event {
                    channel,
                    frame,
                    shards,
                } => {
                    for shard in shards {
                        let (channel, frame) = (channel.clone(), frame.clone());
                        self.shards.send(shard, Envelope::Event { channel, frame });
                    }
                }
                Action::Command(command) => match self.execute(command).await {
                    Ok(reply) => self.node.handle_reply(reply),
                    Err(Lost) => {
                        let failed = self.node.handle_failure();
                        if !self.backend.sharded() {
                            return Err(Lost);
                        }
                        if self.retry.is_empty() {
                            self.retry_at = Instant::now() + CHANNEL_RETRY;
                        }
                        self.retry.extend(failed);
                    }
                },
            }
        }
        Ok(())
    }

    async fn execute(&mut self, command: Command) -> Result<Reply, Lost> {
        match &self.backend {
            Backend::Single { live, .. } => {
                let live = live.as_ref().ok_or(Lost)?;
                let (mut conn, mut pubsub) = (live.conn.clone(), live.pubsub.clone());
                match command {
                    Command::Subscribe(names) => {
                        let keys: Vec<String> = names.iter().map(|c| pubsub_key(c)).collect();
                        bounded(pubsub.subscribe(keys)).await?;
                        Ok(Reply::Done)
                    }
                    Command::Unsubscribe(name) => {
                        bounded(pubsub.unsubscribe(pubsub_key(&name))).await?;
                        Ok(Reply::Done)
                    }
                    command => self.read(&mut conn, command).await,
                }
            }
            Backend::Sharded(sharded) => {
                let mut conn = sharded.conn().ok_or(Lost)?;
                match command {
                    Command::Subscribe(names) => {
                        // One SSUBSCRIBE per channel: the channels' slots differ.
                        for name in names {
                            bounded(conn.ssubscribe(pubsub_key(&name))).await?;
                        }
                        Ok(Reply::Done)
                    }
                    Command::Unsubscribe(name) => {
                        bounded(conn.sunsubscribe(pubsub_key(&name))).await?;
                        Ok(Reply::Done)
                    }
                    command => self.read(&mut conn, command).await,
                }
            }
        }
    }

    /// A read of a channel's state or history, on either link.
    async fn read(
        &self,
        conn: &mut impl ::redis::aio::ConnectionLike,
        command: Command,
    ) -> Result<Reply, Lost> {
        match command {
            Command::ReadMeta {
                channel,
                known_epoch,
                known_seq,
            } => {
                let fresh = hub::new_epoch(SystemTime::now());
                let (epoch, seq): (String, u64) = if self.backend.sharded() {
                    // With EVAL's fallback: a promoted replica may lack the script.
                    let script = ::redis::Script::new(META_SCRIPT);
                    let mut call = script.key(meta_key(&channel));
                    call.key(stream_key(&channel))
                        .arg(fresh)
                        .arg(&*known_epoch)
                        .arg(known_seq);
                    bounded(call.invoke_async(conn)).await?
                } else {
                    let mut cmd = ::redis::cmd("EVALSHA");
                    cmd.arg(&self.meta_script)
                        .arg(2)
                        .arg(meta_key(&channel))
                        .arg(stream_key(&channel))
                        .arg(fresh)
                        .arg(&*known_epoch)
                        .arg(known_seq);
                    bounded(cmd.query_async(conn)).await?
                };
                Ok(Reply::Meta {
                    epoch: epoch.into(),
                    seq,
                })
            }
            Command::ReadStream {
                channel,
                from,
                to,
                count,
            } => {
                Link::count(&self.link.history_reads);
                let mut cmd = ::redis::cmd("XREVRANGE");
                cmd.arg(stream_key(&channel))
                    .arg(format!("{to}-0"))
                    .arg(format!("{from}-0"))
                    .arg("COUNT")
                    .arg(count);
                let value = bounded(cmd.query_async::<Value>(conn)).await?;
                let mut entries = stream_entries(value);
                entries.reverse();
                Ok(Reply::Entries(entries))
            }
            Command::ReadOldest { channel } => {
                Link::count(&self.link.history_reads);
                let mut cmd = ::redis::cmd("XRANGE");
                cmd.arg(stream_key(&channel))
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(1);
                let value = bounded(cmd.query_async::<Value>(conn)).await?;
                Ok(Reply::Entries(stream_entries(value)))
            }
            Command::Subscribe(_) | Command::Unsubscribe(_) => {
                unreachable!("subscriptions are the link's, not reads")
            }
        }
    }

    /// One message (or notice) encoded once for every shard with subscribers.
    fn broadcast(&mut self, channel: ChannelName, seq: u64, frame: Bytes, shards: &[usize]) {
        let mut broadcast = Broadcast {
            channel,
            seq,
            frame,
            deflated: None,
            published_at: std::time::Instant::now(),
        };
        if self.compression.policy_for(&broadcast.channel) == CompressionPolicy::Shared {
            broadcast.compress_shared(&mut self.shared_compressor);
        }
        for &shard in shards {
            let backlog = self.shards.post.send_remote(shard, broadcast.clone());
            self.link
                .backlog_peak
                .fetch_max(backlog as u64, Ordering::Relaxed);
        }
    }

    /// Connects, loads the scripts, and makes every channel still held live again
    /// (resubscribing, then catching up from the streams).
    async fn connect(&mut self) -> Result<(), Lost> {
        let opened = match &mut self.backend {
            Backend::Single {
                client,
                pushes,
                live,
            } => open(client, pushes).await.map(|opened| {
                let conn = opened.conn.clone();
                *live = Some(opened);
                Conn::Single(conn)
            }),
            Backend::Sharded(sharded) => sharded.open().await.map(Conn::Sharded),
        };
        let conn = match opened {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?self.backoff, "cannot reach redis");
                self.retry_at = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                return Ok(());
            }
        };
        self.node.handle_link_up();
        self.drive().await?;
        self.backoff = FIRST_BACKOFF;
        self.link.up.store(true, Ordering::Release);
        if self.connected_before {
            Link::count(&self.link.reconnects);
        }
        self.connected_before = true;
        self.generation += 1;
        self.conn_tx.send_replace(Some((self.generation, conn)));
        tracing::info!(
            channels = self.node.channels().count(),
            "redis link up; every held channel resubscribed"
        );
        Ok(())
    }

    fn lose_link(&mut self) {
        match &mut self.backend {
            Backend::Single { live, pushes, .. } => {
                // Whatever the dropped connection still reports is stale from here on.
                pushes.current.fetch_add(1, Ordering::AcqRel);
                if live.take().is_some() {
                    tracing::warn!(
                        "redis link lost; local subscribers stay connected, reconnecting"
                    );
                }
            }
            Backend::Sharded(sharded) => sharded.close(),
        }
        self.link.up.store(false, Ordering::Release);
        self.conn_tx.send_replace(None);
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.retry.clear();
        self.node.handle_link_lost();
    }

    async fn probe(&mut self) -> Result<(), Lost> {
        let _ = self.feed.try_send(Fed::Counts(self.node.counts()));
        let live = match &mut self.backend {
            Backend::Single {
                live: Some(live), ..
            } => live,
            Backend::Single { live: None, .. } => return Ok(()),
            Backend::Sharded(sharded) => {
                if let Some(conn) = sharded.probe(&mut self.node, &self.link).await {
                    Link::count(&self.link.reconnects);
                    let generation = self.generation;
                    self.conn_tx
                        .send_replace(Some((generation, Conn::Sharded(conn))));
                }
                return Ok(());
            }
        };
        let (mut conn, mut pubsub) = (live.conn.clone(), live.pubsub.clone());
        let answered = async {
            bounded(::redis::cmd("PING").query_async::<Value>(&mut pubsub)).await?;
            bounded(::redis::cmd("PING").query_async::<String>(&mut conn)).await
        }
        .await;
        // One Redis is one master, answering or not.
        self.link.set_masters(1, u64::from(answered.is_ok()));
        answered.map(drop)
    }
}

/// Connects a single Redis's two connections and loads the scripts.
async fn open(client: &::redis::Client, pushes: &SinglePushes) -> RedisResult<Live> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(REPLY_TIMEOUT))
        .set_response_timeout(Some(REPLY_TIMEOUT));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    for script in [publish_script(false), META_SCRIPT.to_string()] {
        let _: String = ::redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(script)
            .query_async(&mut conn)
            .await?;
    }
    let number = pushes.current.load(Ordering::Acquire);
    let (current, sender) = (pushes.current.clone(), pushes.sender.clone());
    let config = config.set_push_sender(move |push: PushInfo| {
        if current.load(Ordering::Acquire) == number {
            sender.push(push);
        }
        Ok::<(), ()>(())
    });
    let pubsub = pushes
        .client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    // Orders between nodes arrive on a channel of their own.
    let mut subscribing = pubsub.clone();
    timeout(REPLY_TIMEOUT, subscribing.subscribe(CONTROL))
        .await
        .map_err(|_| RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))??;
    Ok(Live { conn, pubsub })
}

/// One push from a single Redis: an announcement, an order from another node, or a
/// disconnection (the link is lost; subscription confirmations need nothing).
fn handle_single_push(push: PushInfo, node: &mut Node, feed: &Feed) {
    if push.kind != PushKind::Message {
        return;
    }
    let mut data = push.data.into_iter();
    let (Some(Value::BulkString(key)), Some(Value::BulkString(payload))) =
        (data.next(), data.next())
    else {
        return;
    };
    let Ok(key) = std::str::from_utf8(&key) else {
        return;
    };
    if key == CONTROL {
        // Full, the order is dropped: its node counts this one as silent.
        let _ = feed.try_send(Fed::Control(Bytes::from(payload)));
    } else if let Some(channel) = channel_of(key) {
        node.handle_announcement(channel, Bytes::from(payload));
    }
}

/// Runs one Redis operation, bounded by [`REPLY_TIMEOUT`]; any failure loses the link.
async fn bounded<T>(op: impl Future<Output = RedisResult<T>>) -> Result<T, Lost> {
    match timeout(REPLY_TIMEOUT, op).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "redis command failed");
            Err(Lost)
        }
        Err(_) => {
            tracing::warn!("redis did not answer in time");
            Err(Lost)
        }
    }
}

/// The next push; never ready while the link is down.
async fn next_incoming(backend: &mut Backend) -> Incoming {
    let push = match backend {
        Backend::Single {
            live: Some(_),
            pushes,
            ..
        } => pushes.inflow.next().await,
        Backend::Single { live: None, .. } => std::future::pending().await,
        Backend::Sharded(sharded) => sharded.next_push().await,
    };
    match push {
        None => Incoming::Overflow,
        Some(push) if push.kind == PushKind::Disconnection && !backend.sharded() => {
            Incoming::Closed
        }
        Some(push) => Incoming::Push(push),
    }
}
