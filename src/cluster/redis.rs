//! The cluster thread: the Redis link (one command connection, one pub/sub connection),
//! reconnecting with backoff, and the node's view of each channel it subscribes to.
//!
//! Two tasks share the thread. The publisher pipelines every queued publish into one
//! round trip of the ordering script and answers each with `Ack` or `Refused`. The node
//! task owns everything else, one step at a time: it SUBSCRIBEs in Redis to a channel
//! when the node's first client subscribes and UNSUBSCRIBEs after the last leaves; it
//! turns each announced message into one frame for the shards, dropping duplicates and
//! filling holes from the stream; it answers subscriptions, replaying from its recent
//! ring or the stream. Because it handles one thing at a time, a subscriber's
//! `Subscribed` always reaches its shard after the broadcasts it must not repeat and
//! before the ones it must receive. So that one step cannot hold the others for long,
//! every stream read asks for at most the history size (`COUNT`), and every reply is
//! awaited at most [`REPLY_TIMEOUT`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ::redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use ::redis::{AsyncConnectionConfig, Msg, RedisError, RedisResult, Value};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout};

use super::{Idle, Link, Queue, Request};
use crate::compression::{CompressionPolicies, CompressionPolicy};
use crate::hub::{self, Broadcast, ChannelName, HistoryLimits};
use crate::proto::deflate::{Compressor, CompressorSettings};
use crate::proto::pubsub;
use crate::shard::{Answer, ConnRef, Envelope, Post};

/// Longest wait for one Redis reply: past it the link counts as lost (a hung Redis must
/// not hold publishes forever).
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an idle link is probed, so a silently dead pub/sub socket is noticed.
const PROBE_EVERY: Duration = Duration::from_secs(2);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Most publishes sent to Redis in one pipelined round trip.
const MAX_BATCH: usize = 512;
/// Channels in one generation of the publisher's memory ([`Seen`]).
const SEEN_PER_GENERATION: usize = 16 * 1024;

/// Orders one publish. KEYS: meta, stream, pub/sub channel. ARGV: data, history size,
/// history ttl (ms), a fresh epoch, the epoch this node last saw, the highest seq it saw
/// under that epoch. A missing meta (never published, evicted, lost in a restart) or a
/// seq below what this node already handed out (a rollback) starts a new epoch, so no
/// sequence number is ever reused for a different message.
const PUBLISH_SCRIPT: &str = r"
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local epoch, seq = meta[1], tonumber(meta[2]) or 0
if not epoch or (epoch == ARGV[5] and seq < tonumber(ARGV[6])) then
  epoch, seq = ARGV[4], 0
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
seq = seq + 1
redis.call('HSET', KEYS[1], 'seq', seq)
if tonumber(ARGV[2]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], seq .. '-0', 'd', ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
local nodes = redis.call('PUBLISH', KEYS[3], seq .. ' ' .. epoch .. ' ' .. ARGV[1])
return {epoch, seq, nodes}
";

/// Reads a channel's epoch and seq with the same rollback rule. KEYS: meta, stream.
/// ARGV: a fresh epoch, the epoch this node knows, the highest seq it saw under it.
const META_SCRIPT: &str = r"
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local epoch, seq = meta[1], tonumber(meta[2]) or 0
if not epoch or (epoch == ARGV[2] and seq < tonumber(ARGV[3])) then
  epoch, seq = ARGV[1], 0
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
end
return {epoch, seq}
";

fn meta_key(channel: &str) -> String {
    format!("herald:{{{channel}}}:meta")
}

fn stream_key(channel: &str) -> String {
    format!("herald:{{{channel}}}:stream")
}

fn pubsub_key(channel: &str) -> String {
    format!("herald:{{{channel}}}")
}

/// The channel a pub/sub key names.
fn channel_of(key: &str) -> Option<&str> {
    key.strip_prefix("herald:{")?.strip_suffix('}')
}

/// An announcement: `SEQ EPOCH DATA`.
fn parse_announcement(payload: &[u8]) -> Option<(u64, &str, &[u8])> {
    let space = payload.iter().position(|&b| b == b' ')?;
    let seq = std::str::from_utf8(&payload[..space]).ok()?.parse().ok()?;
    let rest = &payload[space + 1..];
    let space = rest.iter().position(|&b| b == b' ')?;
    let epoch = std::str::from_utf8(&rest[..space]).ok()?;
    Some((seq, epoch, &rest[space + 1..]))
}

/// Sends envelopes to shards from outside them.
struct Shards {
    post: Arc<Post>,
}

impl Shards {
    fn send(&self, shard: usize, envelope: Envelope) {
        self.post.send(shard, envelope);
    }
}

/// Runs the cluster thread until the process ends.
pub(super) async fn run(idle: Idle, post: Arc<Post>) {
    let Idle {
        client,
        requests,
        publishes,
        history,
        compression,
        link,
    } = idle;
    let (conn_tx, conn_rx) = watch::channel(None);
    let (broken, broken_rx) = watch::channel(0);
    let shards = post.shards();
    let publisher = Publisher {
        conn: conn_rx,
        broken,
        shards: Shards { post: post.clone() },
        history,
        link: link.clone(),
        seen: Seen::new(SEEN_PER_GENERATION),
        script: ::redis::Script::new(PUBLISH_SCRIPT).get_hash().to_string(),
    };
    tokio::spawn(publisher.run(publishes));
    let mut node = Node {
        client,
        shards: Shards { post },
        shard_count: shards,
        history,
        compression,
        shared_compressor: Compressor::new(CompressorSettings::SHARED, true),
        link,
        conn_tx,
        generation: 0,
        live: None,
        channels: HashMap::new(),
        backoff: FIRST_BACKOFF,
        retry_at: Instant::now(),
        connected_before: false,
        meta_script: ::redis::Script::new(META_SCRIPT).get_hash().to_string(),
    };
    node.run(requests, broken_rx).await;
}

/// The command connection of one link, numbered so that a report about a link that has
/// already been replaced is recognised as stale.
type Command = Option<(u64, MultiplexedConnection)>;

/// The publisher task: orders publishes in Redis, pipelined, in arrival order.
struct Publisher {
    conn: watch::Receiver<Command>,
    /// Tells the node task which link failed a publish (the latest such link).
    broken: watch::Sender<u64>,
    shards: Shards,
    history: HistoryLimits,
    link: Arc<Link>,
    seen: Seen,
    script: String,
}

/// Per channel, the epoch and highest seq this node handed out: a Redis that comes back
/// below it has rolled back. Kept for the channels published to recently only, in two
/// generations of at most `per_generation` channels each: a channel published to again
/// moves to the current one, and one left alone for a whole generation is forgotten
/// (its next publish then relies on the script's own check of a missing meta, and on the
/// nodes that hold the channel, which check on their own).
struct Seen {
    current: HashMap<ChannelName, (Box<str>, u64)>,
    previous: HashMap<ChannelName, (Box<str>, u64)>,
    per_generation: usize,
}

impl Seen {
    fn new(per_generation: usize) -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
            per_generation,
        }
    }

    fn get(&self, channel: &str) -> Option<&(Box<str>, u64)> {
        self.current
            .get(channel)
            .or_else(|| self.previous.get(channel))
    }

    fn insert(&mut self, channel: ChannelName, epoch: Box<str>, seq: u64) {
        if self.current.len() >= self.per_generation && !self.current.contains_key(&channel) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.previous.remove(&channel);
        self.current.insert(channel, (epoch, seq));
    }
}

impl Publisher {
    async fn run(mut self, queue: Arc<Queue>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            queue.recv_many(&mut batch, MAX_BATCH).await;
            self.publish(&mut batch).await;
        }
    }

    async fn publish(&mut self, batch: &mut Vec<Request>) {
        let conn = self.conn.borrow().clone();
        let Some((generation, mut conn)) = conn else {
            self.refuse(
                batch,
                "the cluster's Redis is unreachable; not stored, retry",
            );
            return;
        };
        let ttl_ms = self.history.ttl.as_millis().max(1) as u64;
        let mut pipe = ::redis::pipe();
        for request in batch.iter() {
            let Request::Publish { channel, data, .. } = request else {
                unreachable!("only publishes reach the publisher");
            };
            let (epoch, seq) = self.seen.get(channel).map_or(("", 0), |(e, s)| (&**e, *s));
            pipe.cmd("EVALSHA")
                .arg(&self.script)
                .arg(3)
                .arg(meta_key(channel))
                .arg(stream_key(channel))
                .arg(pubsub_key(channel))
                .arg(&data[..])
                .arg(self.history.size)
                .arg(ttl_ms)
                .arg(hub::new_epoch(SystemTime::now()))
                .arg(epoch)
                .arg(seq);
        }
        let result: RedisResult<Vec<(String, u64, u64)>> =
            match timeout(REPLY_TIMEOUT, pipe.query_async(&mut conn)).await {
                Ok(result) => result,
                Err(_) => {
                    self.broken.send_replace(generation);
                    self.refuse(batch, "the cluster's Redis did not answer in time; retry");
                    return;
                }
            };
        match result {
            Ok(stored) => {
                for (request, (epoch, seq, nodes)) in batch.drain(..).zip(stored) {
                    let Request::Publish {
                        channel,
                        shard,
                        conn,
                        id,
                        ..
                    } = request
                    else {
                        unreachable!("only publishes reach the publisher");
                    };
                    Link::count(&self.link.publishes);
                    self.seen.insert(channel, epoch.into(), seq);
                    self.shards.send(
                        shard,
                        Envelope::Ack {
                            conn,
                            seq,
                            subscribers: u32::try_from(nodes).unwrap_or(u32::MAX),
                            id,
                        },
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "redis refused a publish batch");
                if link_is_broken(&e) {
                    self.broken.send_replace(generation);
                }
                self.refuse(batch, "the cluster's Redis could not store it; retry");
            }
        }
    }

    fn refuse(&self, batch: &mut Vec<Request>, message: &str) {
        for request in batch.drain(..) {
            if let Request::Publish {
                shard, conn, id, ..
            } = request
            {
                Link::count(&self.link.publish_failures);
                self.shards.send(
                    shard,
                    Envelope::Refused {
                        conn,
                        id,
                        message: message.into(),
                    },
                );
            }
        }
    }
}

/// Errors after which the connection cannot be trusted any more.
fn link_is_broken(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || e.code() == Some("NOSCRIPT")
}

/// A subscription waiting for its answer.
struct Waiter {
    shard: usize,
    conn: ConnRef,
    ticket: u32,
    since: Option<u64>,
    epoch: Option<Box<str>>,
    id: Option<u64>,
    /// The most replay bytes the answer may carry (at least one message unless 0).
    max_replay_bytes: usize,
}

impl Waiter {
    /// The answer to this waiter's subscription: live (or refused) at `seq` of `epoch`.
    fn answer(&self, channel: &ChannelName, seq: u64, epoch: &Arc<str>) -> Answer {
        Answer {
            channel: channel.clone(),
            conn: self.conn,
            ticket: self.ticket,
            seq,
            id: self.id,
            epoch: Some(epoch.clone()),
        }
    }
}

/// The node's view of one channel its clients hold.
struct Channel {
    /// Subscriptions per shard.
    counts: Box<[u32]>,
    total: u32,
    /// Subscribed in Redis on the current link, with `epoch` and `seq` read after it.
    live: bool,
    /// Empty until first read from Redis.
    epoch: Arc<str>,
    /// The latest message handed to the shards.
    seq: u64,
    /// The last messages handed to the shards (at most the history size): most
    /// reconnecting clients replay from here without asking Redis.
    recent: VecDeque<(u64, Bytes)>,
    /// Subscriptions not answered yet: the channel is not live, or their `since` is
    /// ahead of what reached this node (the message is still on its way).
    waiting: Vec<Waiter>,
}

/// The link's two connections while up.
struct Live {
    conn: MultiplexedConnection,
    sink: PubSubSink,
    stream: PubSubStream,
}

/// The link went down during a step; the caller stops and lets `run` reconnect.
struct Lost;

struct Node {
    client: ::redis::Client,
    shards: Shards,
    shard_count: usize,
    history: HistoryLimits,
    /// Shared-policy channels are compressed once per node, as a home shard does alone.
    compression: CompressionPolicies,
    shared_compressor: Compressor,
    link: Arc<Link>,
    conn_tx: watch::Sender<Command>,
    /// Counts links established, naming the current one.
    generation: u64,
    live: Option<Live>,
    channels: HashMap<ChannelName, Channel>,
    backoff: Duration,
    retry_at: Instant,
    connected_before: bool,
    meta_script: String,
}

impl Node {
    async fn run(&mut self, requests: Arc<Queue>, mut broken: watch::Receiver<u64>) {
        let mut probe = tokio::time::interval(PROBE_EVERY);
        loop {
            let up = self.live.is_some();
            let step = tokio::select! {
                request = requests.recv() => self.handle_request(request).await,
                message = next_message(&mut self.live) => match message {
                    Some(message) => self.handle_message(&message).await,
                    None => Err(Lost),
                },
                () = sleep_until(self.retry_at), if !up => self.connect().await,
                Ok(()) = broken.changed() => {
                    let generation = *broken.borrow_and_update();
                    if up && generation == self.generation { Err(Lost) } else { Ok(()) }
                }
                _ = probe.tick(), if up => self.probe().await,
            };
            if step.is_err() {
                self.lose_link();
            }
        }
    }

    /// Connects both connections, loads the scripts, and makes every channel still held
    /// live again (resubscribing, then catching up from the streams).
    async fn connect(&mut self) -> Result<(), Lost> {
        match self.open().await {
            Ok(live) => {
                self.live = Some(live);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?self.backoff, "cannot reach redis");
                self.retry_at = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                return Ok(());
            }
        }
        let names: Vec<ChannelName> = self.channels.keys().cloned().collect();
        if !names.is_empty() {
            let keys: Vec<String> = names.iter().map(|c| pubsub_key(c)).collect();
            let (_, mut sink) = self.connections()?;
            bounded(sink.subscribe(keys)).await?;
        }
        for name in names {
            self.go_live(&name).await?;
        }
        self.backoff = FIRST_BACKOFF;
        self.link
            .up
            .store(true, std::sync::atomic::Ordering::Release);
        if self.connected_before {
            Link::count(&self.link.reconnects);
        }
        self.connected_before = true;
        self.generation += 1;
        let conn = self
            .live
            .as_ref()
            .map(|l| (self.generation, l.conn.clone()));
        self.conn_tx.send_replace(conn);
        tracing::info!(
            channels = self.channels.len(),
            "redis link up; every held channel resubscribed"
        );
        Ok(())
    }

    async fn open(&self) -> RedisResult<Live> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REPLY_TIMEOUT))
            .set_response_timeout(Some(REPLY_TIMEOUT));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        for script in [PUBLISH_SCRIPT, META_SCRIPT] {
            let _: String = ::redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(script)
                .query_async(&mut conn)
                .await?;
        }
        let pubsub = timeout(REPLY_TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(|_| RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))??;
        let (sink, stream) = pubsub.split();
        Ok(Live { conn, sink, stream })
    }

    fn lose_link(&mut self) {
        if self.live.take().is_some() {
            tracing::warn!("redis link lost; local subscribers stay connected, reconnecting");
        }
        self.link
            .up
            .store(false, std::sync::atomic::Ordering::Release);
        self.conn_tx.send_replace(None);
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.channels.retain(|_, channel| channel.total > 0);
        for channel in self.channels.values_mut() {
            channel.live = false;
        }
    }

    /// Clones of the live link's connections (they share the sockets).
    fn connections(&self) -> Result<(MultiplexedConnection, PubSubSink), Lost> {
        let live = self.live.as_ref().ok_or(Lost)?;
        Ok((live.conn.clone(), live.sink.clone()))
    }

    async fn probe(&mut self) -> Result<(), Lost> {
        let (mut conn, mut sink) = self.connections()?;
        bounded(sink.ping::<Value>()).await?;
        bounded(::redis::cmd("PING").query_async::<String>(&mut conn)).await?;
        Ok(())
    }

    async fn handle_request(&mut self, request: Request) -> Result<(), Lost> {
        match request {
            Request::Subscribe {
                channel,
                shard,
                conn,
                ticket,
                since,
                epoch,
                id,
                max_replay_bytes,
            } => {
                let shards = self.shard_count;
                let entry = self
                    .channels
                    .entry(channel.clone())
                    .or_insert_with(|| Channel {
                        counts: vec![0; shards].into_boxed_slice(),
                        total: 0,
                        live: false,
                        epoch: "".into(),
                        seq: 0,
                        recent: VecDeque::new(),
                        waiting: Vec::new(),
                    });
                entry.counts[shard] += 1;
                entry.total += 1;
                let first = entry.total == 1;
                entry.waiting.push(Waiter {
                    shard,
                    conn,
                    ticket,
                    since,
                    epoch,
                    id,
                    max_replay_bytes,
                });
                if self.live.is_none() {
                    return Ok(());
                }
                if first {
                    let key = pubsub_key(&channel);
                    let (_, mut sink) = self.connections()?;
                    bounded(sink.subscribe(key)).await?;
                    self.go_live(&channel).await
                } else {
                    self.answer_waiting(&channel).await
                }
            }
            Request::Replay {
                channel,
                shard,
                conn,
                ticket,
                since,
                epoch,
                id,
                max_bytes,
            } => {
                // Only a subscription this node counts has a replay going on.
                let Some(entry) = self.channels.get_mut(&channel) else {
                    return Ok(());
                };
                entry.waiting.push(Waiter {
                    shard,
                    conn,
                    ticket,
                    since: Some(since),
                    epoch: Some(epoch),
                    id,
                    max_replay_bytes: max_bytes.max(1),
                });
                if self.live.is_none() {
                    return Ok(());
                }
                self.answer_waiting(&channel).await
            }
            Request::Unsubscribe { channel, shard } => {
                let Some(entry) = self.channels.get_mut(&channel) else {
                    return Ok(());
                };
                entry.counts[shard] = entry.counts[shard].saturating_sub(1);
                entry.total = entry.total.saturating_sub(1);
                if entry.total > 0 {
                    return Ok(());
                }
                self.channels.remove(&channel);
                if self.live.is_some() {
                    let key = pubsub_key(&channel);
                    let (_, mut sink) = self.connections()?;
                    bounded(sink.unsubscribe(key)).await?;
                }
                Ok(())
            }
            Request::Publish { .. } => unreachable!("publishes go to the publisher"),
        }
    }

    /// Reads the channel's epoch and seq after subscribing in Redis, catches up on what
    /// was announced while it was not subscribed, then answers its waiting subscriptions.
    async fn go_live(&mut self, name: &ChannelName) -> Result<(), Lost> {
        let Some(channel) = self.channels.get(name) else {
            return Ok(());
        };
        let (known_epoch, known_seq) = (channel.epoch.clone(), channel.seq);
        let (epoch, seq) = self.read_meta(name, &known_epoch, known_seq).await?;
        let Some(channel) = self.channels.get_mut(name) else {
            return Ok(());
        };
        if known_epoch.is_empty() {
            // First time: nobody here has seen anything yet.
            channel.epoch = epoch.into();
            channel.seq = seq;
        } else if *known_epoch != *epoch {
            self.begin_epoch(name, epoch.into());
        }
        if let Some(channel) = self.channels.get_mut(name) {
            channel.live = true;
        }
        self.catch_up(name, seq).await?;
        self.answer_waiting(name).await
    }

    async fn read_meta(
        &mut self,
        name: &str,
        known_epoch: &str,
        known_seq: u64,
    ) -> Result<(String, u64), Lost> {
        let mut cmd = ::redis::cmd("EVALSHA");
        cmd.arg(&self.meta_script)
            .arg(2)
            .arg(meta_key(name))
            .arg(stream_key(name))
            .arg(hub::new_epoch(SystemTime::now()))
            .arg(known_epoch)
            .arg(known_seq);
        let (mut conn, _) = self.connections()?;
        bounded(cmd.query_async::<(String, u64)>(&mut conn)).await
    }

    /// The channel's history in Redis from `from` to `to` (inclusive), oldest first: the
    /// newest history-size entries of that range at most, whatever the stream holds.
    async fn read_stream(
        &mut self,
        name: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Bytes)>, Lost> {
        Link::count(&self.link.history_reads);
        let mut cmd = ::redis::cmd("XREVRANGE");
        cmd.arg(stream_key(name))
            .arg(format!("{to}-0"))
            .arg(format!("{from}-0"))
            .arg("COUNT")
            .arg(self.history.size.max(1));
        let (mut conn, _) = self.connections()?;
        let value = bounded(cmd.query_async::<Value>(&mut conn)).await?;
        let mut entries = stream_entries(value);
        entries.reverse();
        Ok(entries)
    }

    /// The oldest seq the channel's history can still serve: the stream's first entry,
    /// and no further back than one history size from the latest (what one read returns).
    async fn oldest(&mut self, name: &ChannelName) -> Result<u64, Lost> {
        let Some(channel) = self.channels.get(name) else {
            return Ok(0);
        };
        let next = channel.seq + 1;
        let servable = next.saturating_sub(self.history.size as u64);
        Link::count(&self.link.history_reads);
        let mut cmd = ::redis::cmd("XRANGE");
        cmd.arg(stream_key(name))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1);
        let (mut conn, _) = self.connections()?;
        let value = bounded(cmd.query_async::<Value>(&mut conn)).await?;
        Ok(stream_entries(value)
            .first()
            .map_or(next, |(first, _)| (*first).clamp(servable, next)))
    }

    async fn handle_message(&mut self, message: &Msg) -> Result<(), Lost> {
        let Some(name) = channel_of(message.get_channel_name()) else {
            return Ok(());
        };
        let Some((seq, epoch, data)) = parse_announcement(message.get_payload_bytes()) else {
            tracing::warn!(channel = name, "ignoring a malformed announcement");
            return Ok(());
        };
        let Some((name, channel)) = self.channels.get_key_value(name) else {
            return Ok(());
        };
        if !channel.live {
            return Ok(());
        }
        let name = name.clone();
        if *channel.epoch != *epoch {
            // Another node found the channel rolled back and began a new epoch.
            let (known_epoch, known_seq) = (channel.epoch.clone(), channel.seq);
            let (epoch, latest) = self.read_meta(&name, &known_epoch, known_seq).await?;
            if *known_epoch != *epoch {
                self.begin_epoch(&name, epoch.into());
            }
            self.catch_up(&name, latest).await?;
            return self.answer_waiting(&name).await;
        }
        if seq <= channel.seq {
            return Ok(());
        }
        if seq > channel.seq + 1 {
            self.catch_up(&name, seq - 1).await?;
        }
        let frame = pubsub::encode_message(&name, seq, data);
        self.hand_out(&name, seq, frame);
        self.answer_waiting(&name).await
    }

    /// The channel's Redis state no longer continues what this node delivered: say so to
    /// every local subscriber (a `subscribed` notice with the new epoch and seq 0) and
    /// continue from there.
    fn begin_epoch(&mut self, name: &ChannelName, epoch: Arc<str>) {
        let Some(channel) = self.channels.get_mut(name) else {
            return;
        };
        Link::count(&self.link.epoch_changes);
        tracing::warn!(channel = %name, %epoch, "channel rolled back in redis: new epoch");
        channel.epoch = epoch;
        channel.seq = 0;
        channel.recent.clear();
        let notice = pubsub::encode_subscribed(name, 0, &channel.epoch, None);
        self.broadcast(name, 0, notice);
    }

    /// Hands the shards every message after the channel's seq up to `to`, from the
    /// stream; what the stream no longer holds is announced as a gap.
    async fn catch_up(&mut self, name: &ChannelName, to: u64) -> Result<(), Lost> {
        let Some(channel) = self.channels.get(name) else {
            return Ok(());
        };
        let from = channel.seq + 1;
        if to < from {
            return Ok(());
        }
        let entries = self.read_stream(name, from, to).await?;
        let mut next = from;
        for (seq, data) in entries {
            if seq < next {
                continue;
            }
            if seq > next {
                self.announce_gap(name, next, seq - 1);
            }
            let frame = pubsub::encode_message(name, seq, &data);
            self.hand_out(name, seq, frame);
            next = seq + 1;
        }
        if next <= to {
            self.announce_gap(name, next, to);
        }
        Ok(())
    }

    fn announce_gap(&mut self, name: &ChannelName, from: u64, to: u64) {
        tracing::warn!(channel = %name, from, to, "messages lost from redis history: gap");
        if let Some(channel) = self.channels.get_mut(name) {
            channel.seq = to;
            channel.recent.clear();
        }
        self.broadcast(name, to, pubsub::encode_gap(name, from, to));
    }

    /// Hands message `seq` to the shards and remembers it.
    fn hand_out(&mut self, name: &ChannelName, seq: u64, frame: Bytes) {
        let size = self.history.size;
        let Some(channel) = self.channels.get_mut(name) else {
            return;
        };
        channel.seq = seq;
        if size > 0 {
            if channel.recent.len() == size {
                channel.recent.pop_front();
            }
            channel.recent.push_back((seq, frame.clone()));
        }
        self.broadcast(name, seq, frame);
    }

    fn broadcast(&mut self, name: &ChannelName, seq: u64, frame: Bytes) {
        if !self.channels.contains_key(name) {
            return;
        }
        let mut broadcast = Broadcast {
            channel: name.clone(),
            seq,
            frame,
            deflated: None,
            published_at: std::time::Instant::now(),
        };
        if self.compression.policy_for(name) == CompressionPolicy::Shared {
            broadcast.compress_shared(&mut self.shared_compressor);
        }
        let Some(channel) = self.channels.get(name) else {
            return;
        };
        for (shard, &count) in channel.counts.iter().enumerate() {
            if count > 0 {
                self.shards
                    .send(shard, Envelope::Broadcast(broadcast.clone()));
            }
        }
    }

    /// Answers every waiting subscription that can be answered now.
    async fn answer_waiting(&mut self, name: &ChannelName) -> Result<(), Lost> {
        let Some(channel) = self.channels.get_mut(name) else {
            return Ok(());
        };
        if !channel.live {
            return Ok(());
        }
        let waiting = std::mem::take(&mut channel.waiting);
        let mut still = Vec::new();
        let mut waiting = waiting.into_iter();
        while let Some(waiter) = waiting.next() {
            match self.answer(name, waiter).await {
                Ok(None) => {}
                Ok(Some(waiter)) => still.push(waiter),
                Err(Lost) => {
                    still.extend(waiting);
                    if let Some(channel) = self.channels.get_mut(name) {
                        channel.waiting.extend(still);
                    }
                    return Err(Lost);
                }
            }
        }
        if let Some(channel) = self.channels.get_mut(name) {
            channel.waiting.extend(still);
        }
        Ok(())
    }

    /// Answers one subscription of a live channel, or gives it back to wait for a
    /// message that has not reached this node yet.
    async fn answer(&mut self, name: &ChannelName, waiter: Waiter) -> Result<Option<Waiter>, Lost> {
        let Some(channel) = self.channels.get(name) else {
            return Ok(None);
        };
        let (epoch, seq) = (channel.epoch.clone(), channel.seq);
        let Some(since) = waiter.since else {
            self.subscribed(name, &waiter, seq, &epoch, Vec::new());
            return Ok(None);
        };
        if waiter.epoch.as_deref().is_some_and(|e| *e != *epoch) {
            let oldest = self.oldest(name).await?;
            self.history_gap(name, &waiter, seq, oldest, &epoch);
            return Ok(None);
        }
        if since > seq {
            // Either still on its way to this node, or from the future.
            let (_, latest) = self.read_meta(name, &epoch, seq).await?;
            if since > latest {
                let oldest = self.oldest(name).await?;
                self.history_gap(name, &waiter, seq, oldest, &epoch);
                return Ok(None);
            }
            return Ok(Some(waiter));
        }
        if seq - since > self.history.size as u64 {
            // More than one read may return: a gap, without reading what cannot be sent.
            let oldest = self.oldest(name).await?;
            self.history_gap(name, &waiter, seq, oldest, &epoch);
            return Ok(None);
        }
        let Some(channel) = self.channels.get(name) else {
            return Ok(None);
        };
        let recent = &channel.recent;
        let replay: Vec<(u64, Bytes)> = if since == seq {
            Vec::new()
        } else if recent.front().is_some_and(|(first, _)| *first <= since + 1) {
            recent.iter().filter(|(s, _)| *s > since).cloned().collect()
        } else {
            self.read_stream(name, since + 1, seq)
                .await?
                .into_iter()
                .map(|(s, data)| (s, pubsub::encode_message(name, s, &data)))
                .collect()
        };
        let complete = replay.len() as u64 == seq - since
            && replay.first().is_none_or(|(first, _)| *first == since + 1);
        if complete {
            // The first chunk only: the shard asks for the next as its client drains.
            let mut bytes = 0;
            let chunk = replay
                .into_iter()
                .take_while(|(_, frame)| {
                    let fits = waiter.max_replay_bytes > 0
                        && (bytes == 0 || bytes + frame.len() <= waiter.max_replay_bytes);
                    bytes += frame.len();
                    fits
                })
                .collect();
            self.subscribed(name, &waiter, seq, &epoch, chunk);
        } else {
            let oldest = replay.first().map_or(seq + 1, |(first, _)| *first);
            self.history_gap(name, &waiter, seq, oldest, &epoch);
        }
        Ok(None)
    }

    fn subscribed(
        &self,
        name: &ChannelName,
        waiter: &Waiter,
        seq: u64,
        epoch: &Arc<str>,
        replay: Vec<(u64, Bytes)>,
    ) {
        let answer = waiter.answer(name, seq, epoch);
        self.shards
            .send(waiter.shard, Envelope::Subscribed { answer, replay });
    }

    fn history_gap(
        &self,
        name: &ChannelName,
        waiter: &Waiter,
        seq: u64,
        oldest: u64,
        epoch: &Arc<str>,
    ) {
        let answer = waiter.answer(name, seq, epoch);
        self.shards
            .send(waiter.shard, Envelope::HistoryGap { answer, oldest });
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

/// The next announcement, or `None` once the pub/sub connection is gone; never ready
/// while the link is down.
async fn next_message(live: &mut Option<Live>) -> Option<Msg> {
    match live {
        Some(live) => live.stream.next().await,
        None => std::future::pending().await,
    }
}

/// `XRANGE` entries as `(seq, data)`: ids are `SEQ-0`, the one field is `d`.
fn stream_entries(value: Value) -> Vec<(u64, Bytes)> {
    let Value::Array(entries) = value else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|entry| {
            let Value::Array(mut parts) = entry else {
                return None;
            };
            let fields = parts.pop()?;
            let id = match parts.pop()? {
                Value::BulkString(id) => String::from_utf8(id).ok()?,
                Value::SimpleString(id) => id,
                _ => return None,
            };
            let seq = id.strip_suffix("-0")?.parse().ok()?;
            let Value::Array(mut fields) = fields else {
                return None;
            };
            let Value::BulkString(data) = fields.pop()? else {
                return None;
            };
            Some((seq, Bytes::from(data)))
        })
        .collect()
}

#[cfg(test)]
mod tests;
