//! The home shard's side of each channel: next sequence number, which shards hold
//! subscribers of it, and its bounded history.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Broadcast, ChannelName};
use crate::proto::pubsub;

/// The shard that orders `channel`'s messages. FNV-1a, so every shard (and every run)
/// agrees without sharing state.
pub fn home_of(channel: &str, shards: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in channel.as_bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % shards as u64) as usize
}

/// How much history each channel keeps: at most `size` messages, none older than `ttl`.
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    pub size: usize,
    pub ttl: Duration,
}

/// One stored message: the same frame subscribers were sent.
struct Stored {
    seq: u64,
    at: Instant,
    frame: Bytes,
}

struct Channel {
    /// The sequence number of the latest message; 0 before the first. Kept for the life of
    /// the process (the epoch) even when the history is empty, so numbers never repeat.
    seq: u64,
    /// Subscriptions per shard (pending or active), so a publish visits only the shards
    /// that have someone to deliver to.
    subscribers: Box<[u32]>,
    /// Oldest first; sequence numbers are consecutive.
    history: VecDeque<Stored>,
}

impl Channel {
    fn trim(&mut self, limits: HistoryLimits, now: Instant) {
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

    /// The stored frames after `since`, oldest first, as many as fit in `max_bytes` but
    /// at least one: a replay goes out in such chunks as the subscriber's socket drains.
    fn replay_after(&self, since: u64, max_bytes: usize) -> Vec<Bytes> {
        let mut bytes = 0;
        self.history
            .iter()
            .skip_while(|m| m.seq <= since)
            .take_while(|m| {
                let fits = bytes == 0 || bytes + m.frame.len() <= max_bytes;
                bytes += m.frame.len();
                fits
            })
            .map(|m| m.frame.clone())
            .collect()
    }
}

/// The channels homed on one shard.
pub struct Channels {
    shards: usize,
    limits: HistoryLimits,
    map: HashMap<ChannelName, Channel>,
}

/// What the home answers a subscribe with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeOutcome {
    /// Subscribed; `replay` holds the frames after `since` (up to `seq`), and live
    /// messages follow from `seq + 1`.
    Subscribed { seq: u64, replay: Vec<Bytes> },
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
            limits,
            map: HashMap::new(),
        }
    }

    fn entry(&mut self, name: &ChannelName) -> &mut Channel {
        let shards = self.shards;
        self.map.entry(name.clone()).or_insert_with(|| Channel {
            seq: 0,
            subscribers: vec![0; shards].into_boxed_slice(),
            history: VecDeque::new(),
        })
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
        let limits = self.limits;
        let channel = self.entry(name);
        channel.subscribers[shard] += 1;
        channel.trim(limits, now);
        let seq = channel.seq;
        let Some(since) = since else {
            return SubscribeOutcome::Subscribed {
                seq,
                replay: Vec::new(),
            };
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
        let limits = self.limits;
        let channel = self.entry(name);
        channel.trim(limits, now);
        let (seq, oldest) = (channel.seq, channel.oldest());
        if since > seq || since + 1 < oldest {
            return SubscribeOutcome::HistoryGap { seq, oldest };
        }
        let replay = channel.replay_after(since, max_bytes.max(1));
        SubscribeOutcome::Subscribed { seq, replay }
    }

    /// Releases one subscription counted by [`Channels::subscribe`].
    pub fn unsubscribe(&mut self, name: &str, shard: usize) {
        if let Some(channel) = self.map.get_mut(name) {
            debug_assert!(channel.subscribers[shard] > 0, "unbalanced unsubscribe");
            channel.subscribers[shard] = channel.subscribers[shard].saturating_sub(1);
        }
    }

    /// Orders one message: assigns its sequence number, encodes the frame once and
    /// stores it in the history (before anyone is told: an ack means recoverable).
    pub fn publish(&mut self, name: &ChannelName, data: &[u8], now: Instant) -> Published<'_> {
        let limits = self.limits;
        let channel = self.entry(name);
        channel.seq += 1;
        let frame = pubsub::encode_message(name, channel.seq, data);
        if limits.size > 0 {
            channel.history.push_back(Stored {
                seq: channel.seq,
                at: now,
                frame: frame.clone(),
            });
        }
        channel.trim(limits, now);
        Published {
            broadcast: Broadcast {
                channel: name.clone(),
                seq: channel.seq,
                frame,
                deflated: None,
                published_at: now,
            },
            subscribers: channel.subscribers.iter().sum(),
            shards: &channel.subscribers,
        }
    }

    /// Channels homed here (with or without subscribers).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ChannelName {
        s.into()
    }

    fn limits(size: usize) -> HistoryLimits {
        HistoryLimits {
            size,
            ttl: Duration::from_secs(60),
        }
    }

    fn seqs_of(replay: &[Bytes]) -> Vec<u64> {
        replay
            .iter()
            .map(|f| {
                let text = std::str::from_utf8(&f[2..]).unwrap();
                let rest = &text[text.find("\"seq\":").unwrap() + 6..];
                rest[..rest.find(',').unwrap()].parse().unwrap()
            })
            .collect()
    }

    #[test]
    fn home_is_stable_and_in_range() {
        for shards in 1..8 {
            for c in ["a", "news", "chat.room.1"] {
                let h = home_of(c, shards);
                assert!(h < shards);
                assert_eq!(h, home_of(c, shards));
            }
        }
    }

    #[test]
    fn sequence_increases_by_one_per_publish() {
        let now = Instant::now();
        let mut channels = Channels::new(2, limits(10));
        let news = name("news");
        let outcome = channels.subscribe(&news, 1, None, true, usize::MAX, now);
        assert_eq!(
            outcome,
            SubscribeOutcome::Subscribed {
                seq: 0,
                replay: vec![]
            }
        );
        for expect in 1..=3 {
            let published = channels.publish(&news, b"1", now);
            assert_eq!(published.broadcast.seq, expect);
            assert_eq!(published.shards, &[0, 1]);
            assert_eq!(published.subscribers, 1);
        }
    }

    #[test]
    fn since_replays_what_was_missed() {
        let now = Instant::now();
        let mut channels = Channels::new(1, limits(10));
        let c = name("c");
        for _ in 0..5 {
            channels.publish(&c, b"1", now);
        }
        match channels.subscribe(&c, 0, Some(2), true, usize::MAX, now) {
            SubscribeOutcome::Subscribed { seq, replay } => {
                assert_eq!(seq, 5);
                assert_eq!(seqs_of(&replay), [3, 4, 5]);
            }
            other => panic!("{other:?}"),
        }
        match channels.subscribe(&c, 0, Some(5), true, usize::MAX, now) {
            SubscribeOutcome::Subscribed { replay, .. } => assert!(replay.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn since_beyond_history_other_epoch_or_future_is_a_gap() {
        let now = Instant::now();
        let mut channels = Channels::new(1, limits(3));
        let c = name("c");
        for _ in 0..5 {
            channels.publish(&c, b"1", now);
        }
        let gap = SubscribeOutcome::HistoryGap { seq: 5, oldest: 3 };
        assert_eq!(
            channels.subscribe(&c, 0, Some(1), true, usize::MAX, now),
            gap
        );
        assert_eq!(
            channels.subscribe(&c, 0, Some(4), false, usize::MAX, now),
            gap
        );
        assert_eq!(
            channels.subscribe(&c, 0, Some(9), true, usize::MAX, now),
            gap
        );
        assert!(matches!(
            channels.subscribe(&c, 0, Some(2), true, usize::MAX, now),
            SubscribeOutcome::Subscribed { .. }
        ));
    }

    #[test]
    fn history_expires_by_age() {
        let start = Instant::now();
        let mut channels = Channels::new(1, limits(100));
        let c = name("c");
        channels.publish(&c, b"1", start);
        channels.publish(&c, b"2", start + Duration::from_secs(50));
        let later = start + Duration::from_secs(70);
        assert_eq!(
            channels.subscribe(&c, 0, Some(0), true, usize::MAX, later),
            SubscribeOutcome::HistoryGap { seq: 2, oldest: 2 }
        );
        let much_later = start + Duration::from_secs(200);
        assert_eq!(
            channels.subscribe(&c, 0, Some(0), true, usize::MAX, much_later),
            SubscribeOutcome::HistoryGap { seq: 2, oldest: 3 }
        );
    }

    #[test]
    fn unsubscribe_stops_counting_the_shard() {
        let now = Instant::now();
        let mut channels = Channels::new(2, limits(0));
        let c = name("c");
        channels.subscribe(&c, 0, None, true, usize::MAX, now);
        channels.unsubscribe(&c, 0);
        assert_eq!(channels.publish(&c, b"1", now).shards, &[0, 0]);
    }

    #[test]
    fn replay_goes_out_in_chunks_of_at_most_the_bytes_asked_for() {
        let now = Instant::now();
        let mut channels = Channels::new(
            1,
            HistoryLimits {
                size: 100,
                ttl: Duration::from_secs(60),
            },
        );
        let c = name("c");
        for _ in 0..10 {
            channels.publish(&c, &[b'1'; 100], now);
        }
        let frame_len = pubsub::encode_message(&c, 1, &[b'1'; 100]).len();
        let seqs = |outcome: SubscribeOutcome| match outcome {
            SubscribeOutcome::Subscribed { seq, replay } => (
                seq,
                replay.iter().map(|f| f.len()).sum::<usize>(),
                replay.len(),
            ),
            SubscribeOutcome::HistoryGap { .. } => panic!("gap"),
        };
        assert_eq!(
            seqs(channels.subscribe(&c, 0, Some(0), true, 0, now)),
            (10, 0, 0)
        );
        let (seq, bytes, count) =
            seqs(channels.subscribe(&c, 0, Some(2), true, 3 * frame_len + 1, now));
        assert_eq!((seq, bytes, count), (10, 3 * frame_len, 3));
        // At least one message, however small the chunk asked for.
        assert_eq!(seqs(channels.replay(&c, 5, 1, now)).2, 1);
        assert_eq!(seqs(channels.replay(&c, 8, usize::MAX, now)).2, 2);
        assert_eq!(seqs(channels.replay(&c, 10, usize::MAX, now)).2, 0);
        assert!(matches!(
            channels.replay(&c, 11, 1, now),
            SubscribeOutcome::HistoryGap { .. }
        ));
    }
}
