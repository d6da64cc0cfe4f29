//! `--max-connections-per-user` across the nodes of a cluster: each node's connections
//! per user in Redis, and the admission that sums them over the live nodes.
//!
//! In Redis (one hash tag, `{herald-users}`, so a Redis Cluster keeps every key in one
//! slot and one script can read them all):
//! - `herald:{herald-users}:nodes`, a sorted set of the nodes counting users, each scored
//!   with the time (Redis's clock, ms) until which its counts count: its last refresh
//!   plus [`PRESENCE_TTL`], the same cadence as presence and the node registry;
//! - `herald:{herald-users}:conns:NODE`, a node incarnation's connections per user (a
//!   hash). A node's name is its epoch, new at every start, so a restarted node never
//!   inherits its former incarnation's counts.
//!
//! One script admits a connection: it sums the user's field over the live nodes and
//! increments this node's only if the sum is below the limit, atomically, so two nodes
//! admitting the same user at the same moment cannot both take the last place. A node's
//! counts stop counting [`PRESENCE_TTL`] after its last refresh (a `kill -9`'d node's
//! connections are free within that bound) and the next refresh by any node removes its
//! hash; a node that stops gracefully takes itself out at once. There is no key per
//! user, and nothing is refreshed per user.
//!
//! This node's own counts ([`Held`]) are the truth Redis mirrors: written whole again
//! after a new link, a Redis flush, its entry found lapsed, or any write that failed.
//! While Redis does not answer, an admission is decided by the node-local count alone
//! ([`Verdict::Unchecked`], logged once per outage and counted): refusing every user for
//! an outage of the shared store would turn it into an outage of the service.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};

use ::redis::Script;
use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{Notify, watch};

use super::Link;
use super::presence::{PRESENCE_TTL, REFRESH_EVERY};
use super::redis::{Publishing, Shards};
use super::roster::invoke;
use crate::shard::{ConnRef, Envelope};

/// The sorted set of live nodes, scored with the time they count until.
const LIVE: &str = "herald:{herald-users}:nodes";
/// What a node's counts key starts with; its name follows.
const CONNS_PREFIX: &str = "herald:{herald-users}:conns:";
/// Most admissions waiting for the task (each one a parked upgrade); past it an upgrade
/// is answered 503 at once.
pub const MAX_QUEUED_ADMISSIONS: usize = 4096;
/// Most users written again in one script call.
const MAX_REWRITE_AT_ONCE: usize = 512;

fn conns_key(node: &str) -> String {
    format!("{CONNS_PREFIX}{node}")
}

/// Admits one connection of a user if the live nodes hold fewer than the limit. KEYS:
/// live nodes, this node's counts. ARGV: node, user, limit, counts prefix. Returns 1
/// (counted), 0 (at the limit) or -1 (this node is not live: register it first).
const ADMIT_SCRIPT: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local mine = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not mine or tonumber(mine) <= now then
  return -1
end
local total = 0
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do
  total = total + (tonumber(redis.call('HGET', ARGV[4] .. node, ARGV[2])) or 0)
end
if total >= tonumber(ARGV[3]) then
  return 0
end
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
return 1
";

/// Gives back one connection of a user. KEYS: this node's counts. ARGV: user.
const RELEASE_SCRIPT: &str = r"
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if left <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return left
";

/// Keeps this node live and removes the nodes that are not (with their counts). KEYS:
/// live nodes. ARGV: node, ttl ms, counts prefix. Returns 1 when this node was not live
/// (its counts may be gone: write them again), else 0.
const REFRESH_SCRIPT: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  if node ~= ARGV[1] then
    redis.call('UNLINK', ARGV[3] .. node)
  end
  redis.call('ZREM', KEYS[1], node)
end
return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
";

/// Takes this node out: it counts nothing more. KEYS: live nodes, this node's counts.
/// ARGV: node.
const LEAVE_SCRIPT: &str = r"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('UNLINK', KEYS[2])
return 1
";

/// Writes this node's counts: cleared first when ARGV[1] is 1, then user/count pairs.
/// KEYS: this node's counts.
const REWRITE_SCRIPT: &str = r"
if ARGV[1] == '1' then
  redis.call('DEL', KEYS[1])
end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
";

/// What the cluster answers an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Below the limit over every live node: counted in Redis.
    Admitted,
    /// The live nodes hold the limit already: refused (429).
    Refused,
    /// Redis did not answer: admitted on the node-local count alone, and counted here
    /// so that Redis gets it once it is back.
    Unchecked,
}

impl Verdict {
    /// Whether the connection now holds a place this node counts (to give back when it
    /// ends).
    pub fn counts(self) -> bool {
        self != Self::Refused
    }
}

/// What a shard hands the task.
#[derive(Debug)]
pub enum UserAsk {
    /// Admit a connection of `user`; answer `shard`'s `conn` with `Admitted`.
    Admit {
        user: Arc<str>,
        shard: usize,
        conn: ConnRef,
    },
    /// A connection admitted with a verdict that [`Verdict::counts`] ended.
    Release { user: Arc<str> },
    /// The node stops (its shards have drained): take it out of Redis, then say so on
    /// `done`.
    Leave { done: SyncSender<()> },
}

/// The queue from the shards: releases always taken (one per admitted connection,
/// bounded by them; losing one would hold a place forever), and the one leave at the
/// end; admissions refused past [`MAX_QUEUED_ADMISSIONS`].
pub(super) struct UserQueue {
    state: Mutex<(VecDeque<UserAsk>, usize)>,
    ready: Notify,
}

impl UserQueue {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new((VecDeque::new(), 0)),
            ready: Notify::new(),
        }
    }

    pub(super) fn push(&self, ask: UserAsk) -> Result<(), UserAsk> {
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(ask, UserAsk::Admit { .. }) {
                if state.1 >= MAX_QUEUED_ADMISSIONS {
                    return Err(ask);
                }
                state.1 += 1;
            }
            state.0.push_back(ask);
        }
        self.ready.notify_one();
        Ok(())
    }

    async fn recv_many(&self, out: &mut Vec<UserAsk>) {
        loop {
            {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if !state.0.is_empty() {
                    let asks: Vec<UserAsk> = state.0.drain(..).collect();
                    state.1 -= asks
                        .iter()
                        .filter(|a| matches!(a, UserAsk::Admit { .. }))
                        .count();
                    out.extend(asks);
                    return;
                }
            }
            self.ready.notified().await;
        }
    }
}

/// This node's connections per user that hold a place: only users holding one are
/// kept, so it is bounded by the node's connections.
#[derive(Debug, Default)]
pub(super) struct Held {
    users: HashMap<Arc<str>, u32>,
}

impl Held {
    fn count(&mut self, user: &Arc<str>) {
        *self.users.entry(user.clone()).or_insert(0) += 1;
    }

    fn release(&mut self, user: &str) {
        if let Some(count) = self.users.get_mut(user) {
            *count -= 1;
            if *count == 0 {
                self.users.remove(user);
            }
        }
    }

    /// The calls that write every count again, [`MAX_REWRITE_AT_ONCE`] users each; the
    /// first clears what Redis holds (there is always one).
    fn rewrite_args(&self) -> Vec<Vec<String>> {
        let pairs: Vec<(&Arc<str>, &u32)> = self.users.iter().collect();
        let mut calls: Vec<Vec<String>> = pairs
            .chunks(MAX_REWRITE_AT_ONCE)
            .map(|chunk| {
                let mut args = vec!["0".to_owned()];
                for (user, count) in chunk {
                    args.push(user.to_string());
                    args.push(count.to_string());
                }
                args
            })
            .collect();
        match calls.first_mut() {
            Some(first) => first[0] = "1".into(),
            None => calls.push(vec!["1".into()]),
        }
        calls
    }
}

/// A release on its way to Redis: whether Redis took it.
type Pending = Pin<Box<dyn Future<Output = bool> + Send>>;
/// The releases on their way.
type Releasing = FuturesUnordered<Pending>;

/// What one admission's script reply means.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Decided(Verdict),
    /// This node is not live in Redis: register it, write its counts, ask again.
    NotLive,
}

fn judge(reply: Result<i64, ()>) -> Reply {
    match reply {
        Ok(1) => Reply::Decided(Verdict::Admitted),
        Ok(0) => Reply::Decided(Verdict::Refused),
        Ok(_) => Reply::NotLive,
        Err(()) => Reply::Decided(Verdict::Unchecked),
    }
}

pub(super) struct Users {
    node: Arc<str>,
    limit: usize,
    link_state: Arc<Link>,
    shards: Shards,
    conn: watch::Receiver<Publishing>,
    asks: Arc<UserQueue>,
    held: Held,
    /// Redis may not hold [`Users::held`] as it is: write it whole at the next refresh.
    stale: bool,
    /// Admissions are being decided without Redis (logged once per outage).
    unchecked: bool,
    admit: Script,
    release: Script,
    refresh: Script,
    rewrite: Script,
    leave: Script,
}

impl Users {
    pub(super) fn new(
        node: Arc<str>,
        limit: usize,
        link_state: Arc<Link>,
        shards: Shards,
        conn: watch::Receiver<Publishing>,
        asks: Arc<UserQueue>,
    ) -> Self {
        Self {
            node,
            limit,
            link_state,
            shards,
            conn,
            asks,
            held: Held::default(),
            stale: true,
            unchecked: false,
            admit: Script::new(ADMIT_SCRIPT),
            release: Script::new(RELEASE_SCRIPT),
            refresh: Script::new(REFRESH_SCRIPT),
            rewrite: Script::new(REWRITE_SCRIPT),
            leave: Script::new(LEAVE_SCRIPT),
        }
    }

    pub(super) async fn run(mut self) {
        let mut tick = tokio::time::interval(REFRESH_EVERY);
        let mut generation = None;
        let mut batch = Vec::new();
        let mut releasing: Releasing = FuturesUnordered::new();
        loop {
            let asks = self.asks.clone();
            // Releases finish here, whatever else is going on.
            tokio::select! {
                biased;
                Some(taken) = releasing.next(), if !releasing.is_empty() => {
                    self.stale |= !taken;
                }
                () = asks.recv_many(&mut batch) => self.serve(&mut batch, &mut releasing).await,
                Ok(()) = self.conn.changed() => self.refresh(&mut generation).await,
                _ = tick.tick() => self.refresh(&mut generation).await,
            }
        }
    }

    /// Admissions of a batch in one round trip's time (every script sent at once on the
    /// multiplexed link, in order); releases go out without being waited for, so an
    /// upgrade never waits behind another connection's close.
    async fn serve(&mut self, batch: &mut Vec<UserAsk>, releasing: &mut Releasing) {
        let link = self.conn.borrow().as_ref().map(|(_, conn)| conn.clone());
        let mut admits = Vec::new();
        let mut leaving = Vec::new();
        for ask in batch.drain(..) {
            match ask {
                UserAsk::Leave { done } => leaving.push(done),
                UserAsk::Release { user } => {
                    self.held.release(&user);
                    match &link {
                        Some(link) => releasing.push(self.release_of(link.clone(), user)),
                        None => self.stale = true,
                    }
                }
                UserAsk::Admit { user, shard, conn } => admits.push((user, shard, conn)),
            }
        }
        // Sent now (a future sends its script when first polled), before this batch's
        // admissions: Redis sees the node's changes in their order.
        while let Some(Some(taken)) = releasing.next().now_or_never() {
            self.stale |= !taken;
        }
        let Some(link) = link else {
            self.stale = true;
            for (user, shard, conn) in admits {
                self.answer(user, shard, conn, Verdict::Unchecked);
            }
            return;
        };
        if !leaving.is_empty() {
            self.leave(&link).await;
            for done in leaving {
                let _ = done.send(());
            }
        }
        if admits.is_empty() {
            return;
        }
        let admit_calls: Vec<_> = admits
            .iter()
            .map(|(user, ..)| self.admit_call(user))
            .collect();
        let admitted = join_all(admit_calls.iter().map(|c| invoke::<i64>(&link, c))).await;
        drop(admit_calls);
        let mut again = Vec::new();
        for (ask, reply) in admits.into_iter().zip(admitted) {
            match judge(reply.map_err(|e| self.failed(&e))) {
                Reply::Decided(verdict) => self.answer(ask.0, ask.1, ask.2, verdict),
                Reply::NotLive => again.push(ask),
            }
        }
        if again.is_empty() {
            return;
        }
        self.register(&link, true).await;
        let calls: Vec<_> = again
            .iter()
            .map(|(user, ..)| self.admit_call(user))
            .collect();
        let replies = join_all(calls.iter().map(|c| invoke::<i64>(&link, c))).await;
        drop(calls);
        for (ask, reply) in again.into_iter().zip(replies) {
            let verdict = match judge(reply.map_err(|e| self.failed(&e))) {
                Reply::Decided(verdict) => verdict,
                // Registered a moment ago and not live: Redis is not keeping what it
                // is told (evicting). The node-local count decides.
                Reply::NotLive => Verdict::Unchecked,
            };
            self.answer(ask.0, ask.1, ask.2, verdict);
        }
    }

    /// Takes this node's counts out of Redis at once, so that its users' places are
    /// free on the other nodes now, not once its entry has lapsed.
    async fn leave(&mut self, link: &super::publish::Conn) {
        let mut call = self.leave.key(LIVE);
        call.key(conns_key(&self.node)).arg(&*self.node);
        if let Err(e) = invoke::<i64>(link, &call).await {
            tracing::warn!(error = %e, "per-user counts: node not taken out of redis; they lapse in 6 s");
        }
    }

    /// The release of one of `user`'s places, to run on its own: whether Redis took it.
    fn release_of(&self, link: super::publish::Conn, user: Arc<str>) -> Pending {
        let (script, key) = (self.release.clone(), conns_key(&self.node));
        Box::pin(async move {
            let mut call = script.key(key);
            call.arg(&*user);
            invoke::<i64>(&link, &call).await.is_ok()
        })
    }

    fn admit_call(&self, user: &str) -> ::redis::ScriptInvocation<'_> {
        let mut call = self.admit.key(LIVE);
        call.key(conns_key(&self.node))
            .arg(&*self.node)
            .arg(user)
            .arg(self.limit)
            .arg(CONNS_PREFIX);
        call
    }

    /// A script on this path failed: the counts are written again once Redis answers.
    fn failed(&mut self, error: &::redis::RedisError) {
        self.stale = true;
        if !self.unchecked {
            self.unchecked = true;
            tracing::warn!(
                %error,
                "per-user limit: redis did not answer; admitting on this node's count alone until it does"
            );
        }
    }

    fn answer(&mut self, user: Arc<str>, shard: usize, conn: ConnRef, verdict: Verdict) {
        let counter = match verdict {
            Verdict::Admitted => {
                if self.unchecked {
                    self.unchecked = false;
                    tracing::info!("per-user limit: redis answers again; counting across nodes");
                }
                &self.link_state.user_admissions
            }
            Verdict::Refused => &self.link_state.user_refusals,
            Verdict::Unchecked => &self.link_state.user_failures,
        };
        Link::count(counter);
        if verdict.counts() {
            self.held.count(&user);
        }
        self.shards.send(
            shard,
            Envelope::Admitted {
                conn,
                user,
                verdict,
            },
        );
    }

    /// Keeps this node live, writing its counts again on a new link (Redis may have
    /// restarted empty), after a failed write, or when its entry had lapsed.
    async fn refresh(&mut self, generation: &mut Option<u64>) {
        let (now, link) = match self.conn.borrow_and_update().as_ref() {
            Some((g, conn)) => (Some(*g), Some(conn.clone())),
            None => (None, None),
        };
        let new_link = now.is_some() && now != *generation;
        *generation = now;
        if let Some(link) = link {
            self.register(&link, new_link).await;
        }
    }

    /// Writes the counts first when `rewrite` or stale (so the node counts whole once
    /// it is live), then registers; registering a node that was not live writes them
    /// again (another node's refresh may have removed them meanwhile).
    async fn register(&mut self, link: &super::publish::Conn, rewrite: bool) {
        if rewrite || self.stale {
            self.write_all(link).await;
        }
        let mut call = self.refresh.key(LIVE);
        call.arg(&*self.node)
            .arg(PRESENCE_TTL.as_millis() as u64)
            .arg(CONNS_PREFIX);
        match invoke::<i64>(link, &call).await {
            Ok(1) => self.write_all(link).await,
            Ok(_) => {}
            Err(e) => {
                self.stale = true;
                tracing::warn!(error = %e, "per-user counts: node not registered in redis");
            }
        }
    }

    async fn write_all(&mut self, link: &super::publish::Conn) {
        let key = conns_key(&self.node);
        for args in self.held.rewrite_args() {
            let mut call = self.rewrite.key(&key);
            for arg in &args {
                call.arg(arg);
            }
            if let Err(e) = invoke::<i64>(link, &call).await {
                self.stale = true;
                tracing::warn!(error = %e, "per-user counts not written again");
                return;
            }
        }
        self.stale = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONN: ConnRef = ConnRef {
        key: 0,
        generation: 0,
    };

    #[tokio::test]
    async fn admissions_are_bounded_but_releases_are_always_taken() {
        let queue = UserQueue::new();
        let admit = || UserAsk::Admit {
            user: "ann".into(),
            shard: 0,
            conn: CONN,
        };
        for _ in 0..MAX_QUEUED_ADMISSIONS {
            assert!(queue.push(admit()).is_ok());
        }
        assert!(queue.push(admit()).is_err(), "past the bound");
        assert!(queue.push(UserAsk::Release { user: "ann".into() }).is_ok());
        let mut taken = Vec::new();
        queue.recv_many(&mut taken).await;
        assert_eq!(taken.len(), MAX_QUEUED_ADMISSIONS + 1);
        assert!(queue.push(admit()).is_ok(), "room again once taken");
    }

    #[test]
    fn a_reply_decides_or_asks_to_register_first() {
        assert_eq!(judge(Ok(1)), Reply::Decided(Verdict::Admitted));
        assert_eq!(judge(Ok(0)), Reply::Decided(Verdict::Refused));
        assert_eq!(judge(Ok(-1)), Reply::NotLive);
        assert_eq!(judge(Err(())), Reply::Decided(Verdict::Unchecked));
        assert!(Verdict::Admitted.counts() && Verdict::Unchecked.counts());
        assert!(!Verdict::Refused.counts());
    }

    #[test]
    fn held_counts_keep_only_users_holding_a_place_and_rewrite_in_chunks() {
        let mut held = Held::default();
        assert_eq!(
            held.rewrite_args(),
            vec![vec!["1".to_owned()]],
            "a clear alone"
        );
        let ann: Arc<str> = "ann".into();
        held.count(&ann);
        held.count(&ann);
        held.release("ann");
        held.release("nobody");
        assert_eq!(held.rewrite_args(), vec![vec!["1", "ann", "1"]]);
        held.release("ann");
        assert!(held.users.is_empty());
        for i in 0..MAX_REWRITE_AT_ONCE + 1 {
            held.count(&Arc::from(format!("u{i}")));
        }
        let calls = held.rewrite_args();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0][0], "1", "the first call clears");
        assert_eq!(calls[1][0], "0", "the others add");
        assert_eq!(
            calls[0].len() + calls[1].len(),
            2 + 2 * (MAX_REWRITE_AT_ONCE + 1)
        );
    }

    #[test]
    fn every_key_is_in_the_users_slot() {
        use ::redis::cluster_routing::Slot;
        let slot = Slot::for_key(LIVE);
        assert_eq!(Slot::for_key(conns_key("k3x9")), slot);
        assert_eq!(Slot::for_key(format!("{CONNS_PREFIX}other")), slot);
    }
}
