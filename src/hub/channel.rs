//! The home shard's side of each channel: next sequence number and which shards hold
//! subscribers of it.

use std::collections::HashMap;

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

struct Channel {
    /// The sequence number of the latest message; 0 before the first.
    seq: u64,
    /// Subscriptions per shard (pending or active), so a publish visits only the shards
    /// that have someone to deliver to.
    subscribers: Box<[u32]>,
}

/// The channels homed on one shard.
pub struct Channels {
    shards: usize,
    map: HashMap<ChannelName, Channel>,
}

/// What the home answers a subscribe with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeOutcome {
    /// Subscribed; live messages follow from `seq + 1`.
    Subscribed { seq: u64 },
    /// `since` cannot be served: messages from `oldest` on are all that is available.
    /// The subscription is counted all the same; the subscriber's shard releases it.
    HistoryGap { seq: u64, oldest: u64 },
}

impl Channels {
    pub fn new(shards: usize) -> Self {
        Self {
            shards,
            map: HashMap::new(),
        }
    }

    fn entry(&mut self, name: &ChannelName) -> &mut Channel {
        let shards = self.shards;
        self.map.entry(name.clone()).or_insert_with(|| Channel {
            seq: 0,
            subscribers: vec![0; shards].into_boxed_slice(),
        })
    }

    /// Counts a subscription from `shard`. Without history, a `since` is only satisfied
    /// when nothing was missed; an `epoch` other than ours is a gap.
    pub fn subscribe(
        &mut self,
        name: &ChannelName,
        shard: usize,
        since: Option<u64>,
        epoch_matches: bool,
    ) -> SubscribeOutcome {
        let channel = self.entry(name);
        channel.subscribers[shard] += 1;
        let seq = channel.seq;
        match since {
            Some(since) if since != seq || !epoch_matches => SubscribeOutcome::HistoryGap {
                seq,
                oldest: seq + 1,
            },
            _ => SubscribeOutcome::Subscribed { seq },
        }
    }

    /// Releases one subscription counted by [`Channels::subscribe`].
    pub fn unsubscribe(&mut self, name: &str, shard: usize) {
        if let Some(channel) = self.map.get_mut(name) {
            debug_assert!(channel.subscribers[shard] > 0, "unbalanced unsubscribe");
            channel.subscribers[shard] = channel.subscribers[shard].saturating_sub(1);
        }
    }

    /// Orders one message: assigns its sequence number and encodes the frame once.
    /// Returns the broadcast and the per-shard subscriber counts (deliver where non-zero).
    pub fn publish(&mut self, name: &ChannelName, data: &[u8]) -> (Broadcast, &[u32]) {
        let channel = self.entry(name);
        channel.seq += 1;
        let broadcast = Broadcast {
            channel: name.clone(),
            seq: channel.seq,
            frame: pubsub::encode_message(name, channel.seq, data),
        };
        (broadcast, &channel.subscribers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ChannelName {
        s.into()
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
        let mut channels = Channels::new(2);
        let news = name("news");
        assert_eq!(
            channels.subscribe(&news, 1, None, true),
            SubscribeOutcome::Subscribed { seq: 0 }
        );
        for expect in 1..=3 {
            let (b, shards) = channels.publish(&news, b"1");
            assert_eq!(b.seq, expect);
            assert_eq!(shards, &[0, 1]);
        }
        assert_eq!(
            channels.subscribe(&news, 0, Some(3), true),
            SubscribeOutcome::Subscribed { seq: 3 }
        );
    }

    #[test]
    fn since_behind_without_history_or_other_epoch_is_a_gap() {
        let mut channels = Channels::new(1);
        let c = name("c");
        channels.publish(&c, b"1");
        channels.publish(&c, b"2");
        assert_eq!(
            channels.subscribe(&c, 0, Some(1), true),
            SubscribeOutcome::HistoryGap { seq: 2, oldest: 3 }
        );
        assert_eq!(
            channels.subscribe(&c, 0, Some(2), false),
            SubscribeOutcome::HistoryGap { seq: 2, oldest: 3 }
        );
    }

    #[test]
    fn unsubscribe_stops_counting_the_shard() {
        let mut channels = Channels::new(2);
        let c = name("c");
        channels.subscribe(&c, 0, None, true);
        channels.unsubscribe(&c, 0);
        let (_, shards) = channels.publish(&c, b"1");
        assert_eq!(shards, &[0, 0]);
    }
}
