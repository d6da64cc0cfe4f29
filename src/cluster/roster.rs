//! The cluster thread's second task besides the publisher: everything about who is
//! connected, across nodes. It keeps this node's presence entries in Redis (recorded as
//! subscriptions become active, refreshed every [`REFRESH_EVERY`], written again whole
//! after a link loss or a Redis restart), this node in the registry of live nodes with
//! its channels' subscriber counts, and answers the server API and WebSocket questions
//! that need the whole cluster (presence, history, channels, info) from Redis. Orders
//! (disconnect, unsubscribe by user) go to the other nodes over the control channel;
//! each node carries them out on its shards and answers with its count.
//!
//! Nothing here grows with what clients send: members are one entry per active
//! subscription (as the shards' tables), a fixed ~100 bytes each with the connection's
//! user and info shared, not copied, questions are bounded by the queue
//! ([`MAX_QUEUED_QUESTIONS`]) and each answer by its page, and an order waits for the
//! other nodes at most [`ORDER_TIMEOUT`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::{RedisResult, Script, Value};
use bytes::Bytes;
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::timeout;

mod answer;
mod orders;

use super::Link;
use super::presence::{
    self, PRESENCE_TTL, REFRESH_EVERY, cluster_conn, members_prefix, nodes_key, users_prefix,
};
use super::publish::Conn;
use super::redis::{Publishing, REPLY_TIMEOUT, Shards};
use super::script::pubsub_key;
use crate::auth::Patterns;
use crate::hub::{ChannelName, ConnId, Member};
use crate::shard::{ConnRef, Context, Envelope, Order, Part};

/// The pub/sub channel of orders between nodes (outside every channel's key space).
pub(super) const CONTROL: &str = "herald:{herald-control}:orders";
/// The sorted set of live nodes, scored with the time they count until.
const NODES: &str = "herald:nodes";
/// Longest wait for the other nodes' answers to an order.
pub const ORDER_TIMEOUT: Duration = Duration::from_secs(2);
/// Most questions (presence, history, channels, info, orders) waiting for the task.
const MAX_QUEUED_QUESTIONS: usize = 4096;
/// Most joins and leaves sent to Redis at once (pipelined on the connection).
const MAX_CHANGES_AT_ONCE: usize = 1024;
/// Most members written again in one script call after a link loss.
const MAX_REWRITE_AT_ONCE: usize = 512;
/// Most orders from other nodes waiting for the task; past it they are dropped (and the
/// asking node counts that node as silent).
const MAX_QUEUED_CONTROL: usize = 1024;

fn info_key(node: &str) -> String {
    format!("herald:node:{{{node}}}:info")
}

fn channels_key(node: &str) -> String {
    format!("herald:node:{{{node}}}:channels")
}

/// What a question asks of Redis.
#[derive(Debug)]
pub enum Question {
    Presence {
        cursor: Option<Box<str>>,
        limit: usize,
    },
    PresenceStats,
    History {
        since: Option<u64>,
        limit: usize,
        newest_first: bool,
    },
    Channels {
        pattern: Arc<Patterns>,
        cursor: Option<ChannelName>,
        limit: usize,
    },
    /// The live nodes; `this` is this node's own info object, which the answer extends.
    Info {
        this: Vec<u8>,
    },
}

/// What a shard hands the roster.
#[derive(Debug)]
pub enum Ask {
    /// `conn` became an active subscriber of `channel`, listed as `member`; `announce`:
    /// the namespace wants join and leave events.
    Join {
        channel: ChannelName,
        conn: ConnId,
        member: Member,
        announce: bool,
    },
    /// An active subscription of `conn` ended (listed or not: unlisted ones are ignored).
    Leave { channel: ChannelName, conn: ConnId },
    /// Answer `question` about `channel` to `shard`'s `conn` (`Found` or `Unanswered`),
    /// within `max_bytes`.
    Question {
        channel: ChannelName,
        shard: usize,
        conn: ConnRef,
        id: Option<u64>,
        question: Question,
        max_bytes: usize,
    },
    /// Carry out `order` on every other node; answer `shard`'s `conn` with one `Done`,
    /// the sum of their counts.
    Order {
        shard: usize,
        conn: ConnRef,
        order: Order,
    },
    /// A shard's part of order `order` from another node.
    OrderDone { order: u64, part: Part },
}

/// The queue from the shards: joins, leaves and parts always taken (one per
/// subscription or shard, bounded by them), questions and orders refused past
/// [`MAX_QUEUED_QUESTIONS`].
pub(super) struct AskQueue {
    state: Mutex<(VecDeque<Ask>, usize)>,
    ready: Notify,
}

impl AskQueue {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new((VecDeque::new(), 0)),
            ready: Notify::new(),
        }
    }

    fn counted(ask: &Ask) -> bool {
        matches!(ask, Ask::Question { .. } | Ask::Order { .. })
    }

    pub(super) fn push(&self, ask: Ask) -> Result<(), Ask> {
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if Self::counted(&ask) {
                if state.1 >= MAX_QUEUED_QUESTIONS {
                    return Err(ask);
                }
                state.1 += 1;
            }
            state.0.push_back(ask);
        }
        self.ready.notify_one();
        Ok(())
    }

    async fn recv_many(&self, out: &mut Vec<Ask>) {
        loop {
            {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if !state.0.is_empty() {
                    let asks: Vec<Ask> = state.0.drain(..).collect();
                    state.1 -= asks.iter().filter(|a| Self::counted(a)).count();
                    out.extend(asks);
                    return;
                }
            }
            self.ready.notified().await;
        }
    }
}

/// An order between nodes, as the control channel carries it (JSON).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Control {
    /// A user's connections, or one connection (`NODE/ID`: only that node acts).
    Disconnect {
        from: String,
        order: u64,
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        conn: Option<String>,
        code: u16,
        reason: String,
    },
    Unsubscribe {
        from: String,
        order: u64,
        user: String,
        channel: String,
    },
    Done {
        to: String,
        order: u64,
        count: u64,
    },
}

/// What the driver hands the roster.
pub(super) enum Fed {
    /// A message on [`CONTROL`].
    Control(Bytes),
    /// This node's channels and their subscriber counts, for `/api/channels`.
    Counts(Vec<(ChannelName, u32)>),
}

/// The sender the driver feeds the roster with; full, it drops (see
/// [`MAX_QUEUED_CONTROL`]).
pub(super) type Feed = mpsc::Sender<Fed>;

pub(super) fn feed() -> (Feed, mpsc::Receiver<Fed>) {
    mpsc::channel(MAX_QUEUED_CONTROL)
}

/// One member this node listed: the connection's own user and info (`Arc`s shared with
/// its identity, as a home's members are, so a connection in many channels holds its
/// info once), its entry written out only when sent.
#[derive(Clone)]
struct Listed {
    conn: ConnId,
    member: Member,
    announce: bool,
}

impl Listed {
    /// Its entry in Redis: `CONN "user":U,"info":I`.
    fn entry(&self) -> String {
        presence::entry(
            &self.conn.to_string(),
            self.member.user.as_deref(),
            self.member.info.as_deref(),
        )
    }

    fn user(&self) -> &str {
        self.member.user.as_deref().unwrap_or("")
    }
}

/// A join (`join`) or leave to record in Redis.
struct Change {
    channel: ChannelName,
    conn: ConnId,
    listed: Listed,
    join: bool,
}

/// An order this node asked the others to carry out.
struct Asked {
    shard: usize,
    conn: ConnRef,
    waiting: usize,
    count: u64,
}

/// An order from another node, carried out on this node's shards.
struct Carrying {
    from: String,
    order: u64,
    waiting: usize,
    count: u64,
}

pub(super) struct Roster {
    /// The link's counters (`/metrics`).
    link_state: Arc<Link>,
    node: Arc<str>,
    ctx: Arc<Context>,
    shards: Shards,
    conn: watch::Receiver<Publishing>,
    asks: Arc<AskQueue>,
    fed: mpsc::Receiver<Fed>,
    members: HashMap<ChannelName, HashMap<ConnId, Listed>>,
    counts: Vec<(ChannelName, u32)>,
    change: Script,
    refresh: Script,
    page: Script,
    stats: Script,
    register: Script,
    report: Script,
    next_order: u64,
    asked: HashMap<u64, Asked>,
    carrying: HashMap<u64, Carrying>,
    timeouts: mpsc::UnboundedSender<u64>,
    timed_out: mpsc::UnboundedReceiver<u64>,
    started_ms: u64,
}

/// Adds this node to the live nodes (removing the expired ones). KEYS: nodes. ARGV:
/// node, ttl ms.
const REGISTER_SCRIPT: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
";

/// Replaces a node's channel counts and info. KEYS: channels, info. ARGV: ttl ms, the
/// number of info fields, info field/value pairs, then channel/count pairs.
const REPORT_SCRIPT: &str = r"
redis.call('DEL', KEYS[1], KEYS[2])
local fields = tonumber(ARGV[2])
for i = 3, 2 + 2 * fields, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
for i = 3 + 2 * fields, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
";

impl Roster {
    pub(super) fn new(
        ctx: Arc<Context>,
        link_state: Arc<Link>,
        shards: Shards,
        conn: watch::Receiver<Publishing>,
        asks: Arc<AskQueue>,
        fed: mpsc::Receiver<Fed>,
        sharded: bool,
    ) -> Self {
        let (timeouts, timed_out) = mpsc::unbounded_channel();
        let started_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            link_state,
            node: ctx.epoch.as_ref().into(),
            ctx,
            shards,
            conn,
            asks,
            fed,
            members: HashMap::new(),
            counts: Vec::new(),
            change: Script::new(&presence::change_script(sharded)),
            refresh: Script::new(&presence::refresh_script()),
            page: Script::new(&presence::page_script()),
            stats: Script::new(&presence::stats_script()),
            register: Script::new(REGISTER_SCRIPT),
            report: Script::new(REPORT_SCRIPT),
            next_order: 0,
            asked: HashMap::new(),
            carrying: HashMap::new(),
            timeouts,
            timed_out,
            started_ms,
        }
    }

    pub(super) async fn run(mut self) {
        let mut tick = tokio::time::interval(REFRESH_EVERY);
        let mut generation = None;
        let mut batch = Vec::new();
        loop {
            let asks = self.asks.clone();
            tokio::select! {
                () = asks.recv_many(&mut batch) => {
                    // Joins and leaves in a row go to Redis together, in order (one
                    // connection, or one per slot: a channel's stay in order).
                    let mut changes = Vec::new();
                    for ask in batch.drain(..) {
                        match ask {
                            Ask::Join { .. } | Ask::Leave { .. } => changes.extend(self.note(ask)),
                            ask => {
                                self.write(std::mem::take(&mut changes)).await;
                                self.ask(ask).await;
                            }
                        }
                    }
                    self.write(changes).await;
                }
                Some(fed) = self.fed.recv() => match fed {
                    Fed::Control(payload) => self.control(&payload).await,
                    Fed::Counts(counts) => self.counts = counts,
                },
                Some(order) = self.timed_out.recv() => self.order_timed_out(order),
                // A new link registers the node at once, so orders find it.
                Ok(()) = self.conn.changed() => self.refresh(&mut generation).await,
                _ = tick.tick() => self.refresh(&mut generation).await,
            }
        }
    }

    /// Refreshes everything, all of it written again on a new link (`generation`
    /// changed): Redis may have lost it (a restart), and what changed while the link was
    /// down was not written.
    async fn refresh(&mut self, generation: &mut Option<u64>) {
        let now = self.conn.borrow_and_update().as_ref().map(|(g, _)| *g);
        let reset = now.is_some() && now != *generation;
        *generation = now;
        self.refresh_all(reset).await;
    }

    fn link(&self) -> Option<Conn> {
        self.conn.borrow().as_ref().map(|(_, conn)| conn.clone())
    }

    /// Records a join or leave among this node's members: the change to write, if any
    /// (a leave of a connection never listed is none).
    fn note(&mut self, ask: Ask) -> Option<Change> {
        match ask {
            Ask::Join {
                channel,
                conn,
                member,
                announce,
            } => {
                let listed = Listed {
                    conn,
                    member,
                    announce,
                };
                let members = self.members.entry(channel.clone()).or_default();
                members.insert(conn, listed.clone());
                Some(Change {
                    channel,
                    conn,
                    listed,
                    join: true,
                })
            }
            Ask::Leave { channel, conn } => {
                let members = self.members.get_mut(&channel)?;
                let listed = members.remove(&conn)?;
                if members.is_empty() {
                    self.members.remove(&channel);
                }
                Some(Change {
                    channel,
                    conn,
                    listed,
                    join: false,
                })
            }
            _ => None,
        }
    }

    async fn ask(&mut self, ask: Ask) {
        match ask {
            Ask::Join { .. } | Ask::Leave { .. } => {
                let change = self.note(ask);
                self.write(change.into_iter().collect()).await;
            }
            Ask::Question {
                channel,
                shard,
                conn,
                id,
                question,
                max_bytes,
            } => {
                let envelope = match self.answer(&channel, question, max_bytes).await {
                    Ok(json) => Envelope::Found {
                        conn,
                        id,
                        json: json.into(),
                    },
                    Err(message) => Envelope::Unanswered {
                        conn,
                        id,
                        message: message.into(),
                    },
                };
                self.shards.send(shard, envelope);
            }
            Ask::Order { shard, conn, order } => self.send_order(shard, conn, order).await,
            Ask::OrderDone { order, part } => {
                let Some(carrying) = self.carrying.get_mut(&order) else {
                    return;
                };
                if let Part::Count(n) = part {
                    carrying.count += n;
                }
                carrying.waiting -= 1;
                if carrying.waiting == 0 {
                    let carrying = self.carrying.remove(&order).expect("present");
                    let done = Control::Done {
                        to: carrying.from,
                        order: carrying.order,
                        count: carrying.count,
                    };
                    self.publish_control(&done).await;
                }
            }
        }
    }

    /// Records joins and leaves in Redis, in order, and announces them where asked,
    /// [`MAX_CHANGES_AT_ONCE`] at a time. A failure is only logged: the next refresh after
    /// the link is back writes every member again.
    async fn write(&self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let Some(link) = self.link() else {
            return;
        };
        for group in changes.chunks(MAX_CHANGES_AT_ONCE) {
            let calls: Vec<_> = group
                .iter()
                .map(|change| self.change_call(change))
                .collect();
            let results = join_all(calls.iter().map(|call| invoke::<Value>(&link, call))).await;
            for (change, result) in group.iter().zip(results) {
                match result {
                    Ok(_) => Link::count(&self.link_state.presence_writes),
                    Err(e) => {
                        Link::count(&self.link_state.presence_failures);
                        let channel = &*change.channel;
                        tracing::warn!(error = %e, channel, "presence not recorded in redis");
                    }
                }
            }
        }
    }

    fn change_call(&self, change: &Change) -> ::redis::ScriptInvocation<'_> {
        let Change {
            channel,
            conn,
            listed,
            join,
        } = change;
        let id = cluster_conn(&self.node, &conn.to_string());
        let entry = listed.entry();
        let event = if listed.announce {
            let fields = entry.split_once(' ').map_or("", |(_, f)| f);
            let kind = if *join { "join" } else { "leave" };
            presence::event_payload(kind, channel, &id, fields)
        } else {
            Vec::new()
        };
        let mut call = self.change.key(nodes_key(channel));
        call.key(members_prefix(channel) + &self.node)
            .key(users_prefix(channel) + &self.node)
            .key(pubsub_key(channel))
            .arg(&*self.node)
            .arg(&entry)
            .arg(listed.user())
            .arg(PRESENCE_TTL.as_millis() as u64)
            .arg(event)
            .arg(if *join { "1" } else { "0" });
        call
    }

    /// Keeps every member alive in Redis (writing a channel's again where Redis lost
    /// them, or all of them when `reset`), and this node in the registry.
    async fn refresh_all(&mut self, reset: bool) {
        let Some(link) = self.link() else {
            return;
        };
        let ttl = PRESENCE_TTL.as_millis() as u64;
        let lost: Vec<ChannelName> = if reset {
            self.members.keys().cloned().collect()
        } else {
            let calls: Vec<_> = self
                .members
                .keys()
                .map(|channel| self.refresh_call(channel, true, &[]))
                .collect();
            let found = join_all(calls.iter().map(|call| invoke::<i64>(&link, call))).await;
            for _ in found.iter().filter(|f| f.is_err()) {
                Link::count(&self.link_state.presence_failures);
            }
            self.members
                .keys()
                .zip(found)
                .filter(|(_, found)| matches!(found, Ok(0)))
                .map(|(channel, _)| channel.clone())
                .collect()
        };
        for channel in lost {
            let members: Vec<&Listed> = self.members[&channel].values().collect();
            // The first call clears what Redis holds of this node's, the others add.
            for (i, chunk) in members.chunks(MAX_REWRITE_AT_ONCE).enumerate() {
                let call = self.refresh_call(&channel, i > 0, chunk);
                if let Err(e) = invoke::<i64>(&link, &call).await {
                    Link::count(&self.link_state.presence_failures);
                    tracing::warn!(error = %e, %channel, "presence not written again");
                    break;
                }
            }
        }
        let mut register = self.register.key(NODES);
        register.arg(&*self.node).arg(ttl);
        let snapshot = self.ctx.registry.snapshot(std::time::Instant::now());
        let info = [
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("started_ms", self.started_ms.to_string()),
            ("uptime_ms", snapshot.uptime.as_millis().to_string()),
            ("shards", self.shards.count().to_string()),
            (
                "connections",
                snapshot.total.connections.iter().sum::<u64>().to_string(),
            ),
            ("subscriptions", snapshot.total.subscriptions.to_string()),
        ];
        let mut report = self.report.key(channels_key(&self.node));
        report.key(info_key(&self.node)).arg(ttl).arg(info.len());
        for (field, value) in &info {
            report.arg(*field).arg(value);
        }
        for (channel, count) in &self.counts {
            report.arg(&**channel).arg(*count);
        }
        for call in [register, report] {
            if let Err(e) = invoke::<Value>(&link, &call).await {
                tracing::warn!(error = %e, "node not registered in redis");
            }
        }
    }

    /// The refresh of a channel's entries: `keep` leaves what Redis holds of them (else it
    /// is cleared first), and `add` is written.
    fn refresh_call(
        &self,
        channel: &str,
        keep: bool,
        add: &[&Listed],
    ) -> ::redis::ScriptInvocation<'_> {
        let mut call = self.refresh.key(nodes_key(channel));
        call.key(members_prefix(channel) + &self.node)
            .key(users_prefix(channel) + &self.node)
            .arg(&*self.node)
            .arg(PRESENCE_TTL.as_millis() as u64)
            .arg(if keep { "0" } else { "1" });
        for listed in add {
            call.arg(listed.entry()).arg(listed.user());
        }
        call
    }
}

/// Runs a script on either link, bounded by [`REPLY_TIMEOUT`].
pub(super) async fn invoke<T: ::redis::FromRedisValue>(
    link: &Conn,
    call: &::redis::ScriptInvocation<'_>,
) -> RedisResult<T> {
    let run = async {
        match link.clone() {
            Conn::Single(mut conn) => call.invoke_async(&mut conn).await,
            Conn::Sharded(mut conn) => call.invoke_async(&mut conn).await,
        }
    };
    timeout(REPLY_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()))
}

/// Runs a command on either link, bounded by [`REPLY_TIMEOUT`].
async fn query<T: ::redis::FromRedisValue>(link: &Conn, cmd: &::redis::Cmd) -> RedisResult<T> {
    let run = async {
        match link.clone() {
            Conn::Single(mut conn) => cmd.query_async(&mut conn).await,
            Conn::Sharded(mut conn) => cmd.query_async(&mut conn).await,
        }
    };
    timeout(REPLY_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONN: ConnRef = ConnRef {
        key: 0,
        generation: 0,
    };

    fn question() -> Ask {
        Ask::Question {
            channel: "c".into(),
            shard: 0,
            conn: CONN,
            id: None,
            question: Question::PresenceStats,
            max_bytes: 1 << 20,
        }
    }

    fn leave() -> Ask {
        Ask::Leave {
            channel: "c".into(),
            conn: ConnId {
                shard: 0,
                key: 1,
                generation: 1,
            },
        }
    }

    #[tokio::test]
    async fn questions_are_bounded_but_leaves_and_parts_are_always_taken() {
        let queue = AskQueue::new();
        for _ in 0..MAX_QUEUED_QUESTIONS {
            assert!(queue.push(question()).is_ok());
        }
        assert!(queue.push(question()).is_err(), "past the bound");
        assert!(queue.push(leave()).is_ok());
        let part = Ask::OrderDone {
            order: 1,
            part: Part::Count(2),
        };
        assert!(queue.push(part).is_ok());
        let mut taken = Vec::new();
        queue.recv_many(&mut taken).await;
        assert_eq!(taken.len(), MAX_QUEUED_QUESTIONS + 2);
        assert!(matches!(
            taken.last(),
            Some(Ask::OrderDone { order: 1, .. })
        ));
        assert!(queue.push(question()).is_ok(), "room again once taken");
    }

    #[test]
    fn control_messages_read_back_what_they_write() {
        let order = Control::Unsubscribe {
            from: "n1".into(),
            order: 7,
            user: "ann".into(),
            channel: "room".into(),
        };
        let text = serde_json::to_string(&order).unwrap();
        assert_eq!(
            text,
            r#"{"kind":"unsubscribe","from":"n1","order":7,"user":"ann","channel":"room"}"#
        );
        assert!(matches!(
            serde_json::from_str::<Control>(&text),
            Ok(Control::Unsubscribe { order: 7, .. })
        ));
        assert!(serde_json::from_str::<Control>(r#"{"kind":"reboot"}"#).is_err());
    }
}
