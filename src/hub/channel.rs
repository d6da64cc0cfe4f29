//! The home shard's side of each channel: next sequence number, which shards hold
//! subscribers of it, and its bounded history; and the sweep that forgets channels
//! nobody holds.
//!
//! # Lifetime
//! A channel is created by its first subscribe or publish and forgotten as soon as it has
//! no subscriber on any shard (pending or active) and no live history: at the last
//! unsubscribe, after a publish nobody receives or keeps, or by the sweep once its
//! history has aged past the TTL. The sweep runs on the home shard every
//! `SWEEP_INTERVAL` and visits a share of the channels each time, so every channel is
//! visited once per round (a quarter of the TTL, between 1 and 30 seconds) whatever their
//! number: the work per tick is a fraction of the channels, nothing waits for a channel to
//! be used again, and memory is released within the TTL plus two rounds.
//!
//! # Sequence numbers across incarnations
//! Sequence numbers still never repeat for a channel name within the node's epoch, even
//! though the channel itself is forgotten: forgetting raises a floor kept per bucket of
//! names (a hash; 4096 of them per home, 32 KiB) to the channel's last seq, and a
//! channel created later starts counting from its bucket's floor. A client's `since` for
//! a name is at most the last seq of the incarnation it read from, which is at most the
//! floor the next incarnation starts from; so against a new incarnation it is either
//! below the start (history cannot reach back: `history_gap`) or exactly the start (it
//! saw everything of the old one, and the new one's messages follow). It is never taken
//! for a seq of the new incarnation, on `/ws` (with or without `epoch`), `/poll` or
//! `/sse` alike. The price is a conservative gap: `since=0` on a new incarnation whose
//! bucket was raised (by this name or another) is answered `history_gap` with
//! `oldest` = the first seq to come.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use indexmap::IndexMap;

use super::presence::{ConnId, Member, Presence};
use super::{Broadcast, ChannelName};
use crate::proto::pubsub;

/// How often the home sweeps its channels.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Buckets of names with their own sequence floor (a power of two).
const FLOOR_BUCKETS: usize = 4096;

/// FNV-1a: every shard (and every run) agrees without sharing state.
fn fnv1a(channel: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in channel.as_bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The shard that orders `channel`'s messages.
pub fn home_of(channel: &str, shards: usize) -> usize {
    (fnv1a(channel) % shards as u64) as usize
}

/// The floor bucket of `channel`: the hash's top bits, which the home (its low bits
/// when the shard count is a power of two) does not fix.
fn floor_bucket(channel: &str) -> usize {
    (fnv1a(channel) >> (64 - FLOOR_BUCKETS.trailing_zeros())) as usize
}

/// How much history each channel keeps: at most `size` messages, none older than `ttl`
/// (`Duration::MAX`: no age limit); and whether a subscriber without `since` first gets
/// the latest of them (`recovery = "latest"`: the channel's message is its state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    pub size: usize,
    pub ttl: Duration,
    pub latest: bool,
}

/// History limits per channel: its namespace's (the longest matching prefix), else the
/// default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPolicy {
    pub default: HistoryLimits,
    pub by_prefix: Vec<(Box<str>, HistoryLimits)>,
}

impl HistoryPolicy {
    pub fn of(&self, name: &str) -> HistoryLimits {
        self.by_prefix
            .iter()
            .filter(|(prefix, _)| name.starts_with(&**prefix))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(self.default, |(_, limits)| *limits)
    }
}

/// A publish with `expect_seq` refused: the channel's last seq is `seq`, not the one
/// expected. Nothing was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    pub seq: u64,
}

/// One stored message: the same frame subscribers were sent.
struct Stored {
    seq: u64,
    at: Instant,
    frame: Bytes,
}

struct Channel {
    /// The sequence number of the latest message; before the first, the floor this
    /// incarnation started from (see the module documentation).
    seq: u64,
    /// Subscriptions per shard (pending or active), so a publish visits only the shards
    /// that have someone to deliver to.
    subscribers: Box<[u32]>,
    /// Oldest first; sequence numbers are consecutive.
    history: VecDeque<Stored>,
    /// Its members, where presence or join/leave is on and someone is subscribed.
    presence: Option<Box<Presence>>,
    /// Its namespace's history limits, looked up once when the channel is created.
    limits: HistoryLimits,
}

impl Channel {
    fn trim(&mut self, now: Instant) {
        let limits = self.limits;
        while self.history.len() > limits.size {
            self.history.pop_front();
        }
        while self
            .history
            .front()
            .is_some_and(|m| now.saturating_duration_since(m.at) > limits.ttl)
        {
            self.history.pop_front();
        }
    }

    /// The oldest sequence number a `since` can still be served from.
    fn oldest(&self) -> u64 {
        self.history.front().map_or(self.seq + 1, |m| m.seq)
    }

    /// The stored messages after `since` as (seq, frame), oldest first, as many as fit in
    /// `max_bytes` but at least one: a replay goes out in such chunks as the subscriber's
    /// socket drains.
    fn replay_after(&self, since: u64, max_bytes: usize) -> Vec<(u64, Bytes)> {
        let mut bytes = 0;
        self.history
            .iter()
            .skip_while(|m| m.seq <= since)
            .take_while(|m| {
                let fits = bytes == 0 || bytes + m.frame.len() <= max_bytes;
                bytes += m.frame.len();
                fits
            })
            .map(|m| (m.seq, m.frame.clone()))
            .collect()
    }

    /// Nobody subscribes and nothing is kept: the channel may be forgotten.
    fn is_idle(&self) -> bool {
        self.history.is_empty() && self.subscribers.iter().all(|&n| n == 0)
    }
}

/// The channels homed on one shard.
pub struct Channels {
    shards: usize,
    /// History limits per namespace prefix, and of channels no namespace matches.
    history: HistoryPolicy,
    /// The shortest TTL of any namespace: it paces the sweep.
    shortest_ttl: Duration,
    /// Indexed as well as keyed, so the sweep can resume where it stopped.
    map: IndexMap<ChannelName, Channel>,
    /// Per bucket of names, the highest seq a forgotten channel of the bucket reached.
    floors: Box<[u64]>,
    /// The index the sweep visits next in this round.
    cursor: usize,
    /// Sweeps left in this round.
    ticks_left: u32,
    /// `None` until the first sweep: due at once.
    next_sweep: Option<Instant>,
}

/// What the home answers a subscribe with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeOutcome {
    /// Subscribed; `replay` holds the messages after `since` (up to `seq`) as (seq,
    /// frame), and live messages follow from `seq + 1`.
    Subscribed { seq: u64, replay: Vec<(u64, Bytes)> },
    /// `since` cannot be served: history holds `oldest..=seq` only (or it came from
    /// another epoch). The subscription is counted all the same; the subscriber's shard
    /// releases it.
    HistoryGap { seq: u64, oldest: u64 },
}

/// What a publish produced.
pub struct Published<'a> {
    pub broadcast: Broadcast,
    /// Subscriptions per shard: deliver where non-zero.
    pub shards: &'a [u32],
    /// Subscriptions in all (the HTTP publish receipt).
    pub subscribers: u32,
}

impl Channels {
    pub fn new(shards: usize, limits: HistoryLimits) -> Self {
        Self {
            shards,
            history: HistoryPolicy {
                default: limits,
                by_prefix: Vec::new(),
            },
            shortest_ttl: limits.ttl,
            map: IndexMap::new(),
            floors: vec![0; FLOOR_BUCKETS].into_boxed_slice(),
            cursor: 0,
            ticks_left: 0,
            next_sweep: None,
        }
    }

    /// History limits per namespace prefix (the longest matching prefix wins), over the
    /// default given to [`Channels::new`].
    pub fn with_prefixes(mut self, by_prefix: Vec<(Box<str>, HistoryLimits)>) -> Self {
        self.shortest_ttl = by_prefix
            .iter()
            .map(|(_, limits)| limits.ttl)
            .fold(self.history.default.ttl, Duration::min);
        self.history.by_prefix = by_prefix;
        self
    }

    /// The channel's index, created from its bucket's floor when new.
    fn entry(&mut self, name: &ChannelName) -> usize {
        if let Some(index) = self.map.get_index_of(&**name) {
            return index;
        }
        let limits = self.history.of(name);
        let (shards, floors) = (self.shards, &self.floors);
        let entry = self.map.entry(name.clone());
        let index = entry.index();
        entry.or_insert_with(|| Channel {
            seq: floors[floor_bucket(name)],
            subscribers: vec![0; shards].into_boxed_slice(),
            history: VecDeque::new(),
            presence: None,
            limits,
        });
        index
    }

    /// Drops the channel at `index`, raising its bucket's floor to its last seq.
    fn forget(&mut self, index: usize) {
        let Some((name, channel)) = self.map.swap_remove_index(index) else {
            return;
        };
        let floor = &mut self.floors[floor_bucket(&name)];
        *floor = (*floor).max(channel.seq);
        // Gives the memory of a burst of channels back once most of them are gone; the
        // rehash costs the channels left, after at least as many were forgotten.
        if self.map.capacity() > 4 * self.map.len().max(16) {
            self.map.shrink_to(2 * self.map.len());
        }
    }

    /// Counts a subscription from `shard`, replaying what came after `since` when the
    /// history still holds it: the first `max_replay_bytes` of it (at least one message
    /// unless that is 0); the subscriber asks for the rest with [`Channels::replay`]. A
    /// `since` from another epoch, or ahead of the channel, cannot be trusted and is a gap.
    pub fn subscribe(
        &mut self,
        name: &ChannelName,
        shard: usize,
        since: Option<u64>,
        epoch_matches: bool,
        max_replay_bytes: usize,
        now: Instant,
    ) -> SubscribeOutcome {
        let index = self.entry(name);
        let channel = &mut self.map[index];
        channel.subscribers[shard] += 1;
        channel.trim(now);
        let seq = channel.seq;
        let Some(since) = since else {
            // A `latest` channel's last message is its state: a new subscriber starts
            // from it (one message, within any replay budget's "at least one").
            let replay = match channel.history.back() {
                Some(last) if channel.limits.latest && last.seq == seq => {
                    vec![(last.seq, last.frame.clone())]
                }
                _ => Vec::new(),
            };
            return SubscribeOutcome::Subscribed { seq, replay };
        };
        let oldest = channel.oldest();
        if !epoch_matches || since > seq || since + 1 < oldest {
            return SubscribeOutcome::HistoryGap { seq, oldest };
        }
        let replay = if max_replay_bytes == 0 {
            Vec::new()
        } else {
            channel.replay_after(since, max_replay_bytes)
        };
        SubscribeOutcome::Subscribed { seq, replay }
    }

    /// The next chunk of a replay for a subscription counted already: the frames after
    /// `since`, up to `max_bytes` (at least one). A gap when history no longer reaches
    /// back to `since + 1`.
    pub fn replay(
        &mut self,
        name: &ChannelName,
        since: u64,
        max_bytes: usize,
        now: Instant,
    ) -> SubscribeOutcome {
        let index = self.entry(name);
        let channel = &mut self.map[index];
        channel.trim(now);
        let (seq, oldest) = (channel.seq, channel.oldest());
        if since > seq || since + 1 < oldest {
            return SubscribeOutcome::HistoryGap { seq, oldest };
        }
        let replay = channel.replay_after(since, max_bytes.max(1));
        SubscribeOutcome::Subscribed { seq, replay }
    }

    /// Lists `conn`, subscribed to `name` already, among its members; false if it was.
    pub fn join(&mut self, name: &str, conn: ConnId, member: Member) -> bool {
        self.map.get_mut(name).is_some_and(|channel| {
            channel
                .presence
                .get_or_insert_with(Default::default)
                .join(conn, member)
        })
    }

    /// Takes `conn` off `name`'s members (before its subscription is released).
    pub fn leave(&mut self, name: &str, conn: ConnId) -> Option<Member> {
        let channel = self.map.get_mut(name)?;
        let presence = channel.presence.as_mut()?;
        let member = presence.leave(conn);
        if presence.is_empty() {
            channel.presence = None;
        }
        member
    }

    /// `name`'s members, if it has any.
    pub fn presence(&self, name: &str) -> Option<&Presence> {
        self.map.get(name)?.presence.as_deref()
    }

    /// The channels homed here that `matches` accepts, after `cursor` in name order, at
    /// most `max`, with their subscriptions on every shard. Visits every channel: for the
    /// server API, not the message path.
    pub fn list(
        &self,
        matches: impl Fn(&str) -> bool,
        cursor: Option<&str>,
        max: usize,
    ) -> Vec<(ChannelName, u32)> {
        let mut found: Vec<(ChannelName, u32)> = self
            .map
            .iter()
            .filter(|(name, _)| cursor.is_none_or(|c| &***name > c) && matches(name))
            .map(|(name, channel)| (name.clone(), channel.subscribers.iter().sum()))
            .collect();
        found.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        found.truncate(max);
        found
    }

    /// Stored frames of `name` after `since` (all without it): the first `limit`, or the
    /// last `limit` newest first, stopping before `max_bytes` (at least one); with the
    /// channel's latest seq and the oldest a `since` can reach. A channel not known here
    /// has none, and is not created by asking.
    pub fn history(
        &mut self,
        name: &str,
        since: Option<u64>,
        (limit, newest_first): (usize, bool),
        max_bytes: usize,
        now: Instant,
    ) -> (u64, u64, Vec<Bytes>) {
        let Some(channel) = self.map.get_mut(name) else {
            let floor = self.floors[floor_bucket(name)];
            return (floor, floor + 1, Vec::new());
        };
        channel.trim(now);
        let after = channel
            .history
            .iter()
            .filter(|m| since.is_none_or(|since| m.seq > since));
        let picked: Vec<&Stored> = if newest_first {
            after.rev().take(limit).collect()
        } else {
            after.take(limit).collect()
        };
        let mut bytes = 0;
        let frames = picked
            .into_iter()
            .take_while(|m| {
                let fits = bytes == 0 || bytes + m.frame.len() <= max_bytes;
                bytes += m.frame.len();
                fits
            })
            .map(|m| m.frame.clone())
            .collect();
        (channel.seq, channel.oldest(), frames)
    }

    /// Subscriptions to `name` per shard (pending or active), if it is known here.
    pub fn subscribers(&self, name: &str) -> Option<&[u32]> {
        self.map.get(name).map(|channel| &*channel.subscribers)
    }

    /// Releases one subscription counted by [`Channels::subscribe`]; the last one of a
    /// channel without history forgets it.
    pub fn unsubscribe(&mut self, name: &str, shard: usize) {
        let Some((index, _, channel)) = self.map.get_full_mut(name) else {
            return;
        };
        debug_assert!(channel.subscribers[shard] > 0, "unbalanced unsubscribe");
        channel.subscribers[shard] = channel.subscribers[shard].saturating_sub(1);
        if channel.is_idle() {
            self.forget(index);
        }
    }

    /// Orders one message: assigns its sequence number, encodes the frame once and
    /// stores it in the history (before anyone is told: an ack means recoverable). A
    /// channel that neither delivers nor keeps it is forgotten again at once.
    pub fn publish(&mut self, name: &ChannelName, data: &[u8], now: Instant) -> Published<'_> {
        self.publish_from(name, None, data, None, now)
            .expect("a publish without expect_seq always goes through")
    }

    /// [`Channels::publish`], naming the `publisher` in the frame when given, and only
    /// when the channel's last seq is still `expect_seq`, when given (optimistic
    /// concurrency: a refused publish creates and stores nothing).
    pub fn publish_from(
        &mut self,
        name: &ChannelName,
        publisher: Option<&str>,
        data: &[u8],
        expect_seq: Option<u64>,
        now: Instant,
    ) -> Result<Published<'_>, Conflict> {
        if let Some(expected) = expect_seq {
            let seq = self
                .map
                .get(&**name)
                .map_or(self.floors[floor_bucket(name)], |channel| channel.seq);
            if seq != expected {
                return Err(Conflict { seq });
            }
        }
        let index = self.entry(name);
        let channel = &mut self.map[index];
        channel.seq += 1;
        let frame = pubsub::encode_published(name, channel.seq, publisher, data);
        if channel.limits.size > 0 {
            channel.history.push_back(Stored {
                seq: channel.seq,
                at: now,
                frame: frame.clone(),
            });
        }
        channel.trim(now);
        let broadcast = Broadcast {
            channel: name.clone(),
            seq: channel.seq,
            frame,
            deflated: None,
            published_at: now,
        };
        if channel.is_idle() {
            self.forget(index);
            return Ok(Published {
                broadcast,
                shards: &[],
                subscribers: 0,
            });
        }
        let channel = &self.map[index];
        Ok(Published {
            broadcast,
            subscribers: channel.subscribers.iter().sum(),
            shards: &channel.subscribers,
        })
    }

    /// When [`Channels::sweep`] next has work; `None` while no channel is homed here.
    pub fn next_sweep(&self) -> Option<Instant> {
        self.next_sweep.filter(|_| !self.map.is_empty())
    }

    /// Trims history past its TTL and forgets idle channels, a share at a time: the
    /// channels not yet visited this round, spread over the ticks left in it. Does nothing
    /// before [`Channels::next_sweep`], so it may be called every loop turn.
    pub fn sweep(&mut self, now: Instant) {
        if self.next_sweep.is_some_and(|at| now < at) {
            return;
        }
        // The cadence is kept from when it was due, so a sweep run late (the shard waits
        // for a turn that comes anyway, see `Shard::poll_timeout`) does not slow the
        // rounds down.
        let next = self.next_sweep.unwrap_or(now) + SWEEP_INTERVAL;
        self.next_sweep = Some(if next > now {
            next
        } else {
            now + SWEEP_INTERVAL
        });
        if self.cursor >= self.map.len() {
            let round =
                (self.shortest_ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
            self.cursor = 0;
            self.ticks_left = (round.as_nanos() / SWEEP_INTERVAL.as_nanos()) as u32;
        }
        let ticks_left = self.ticks_left.max(1);
        self.ticks_left = ticks_left - 1;
        // Each visit either moves the cursor on or forgets one channel, so after these
        // the round's last tick has visited every channel.
        let visits = (self.map.len() - self.cursor).div_ceil(ticks_left as usize);
        for _ in 0..visits {
            let channel = &mut self.map[self.cursor];
            channel.trim(now);
            if channel.is_idle() {
                // The last channel moves into this index: it is visited next.
                self.forget(self.cursor);
            } else {
                self.cursor += 1;
            }
        }
    }

    /// Channels homed here: those with subscribers or live history, and those the sweep
    /// has not reached yet since their history expired.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests;
