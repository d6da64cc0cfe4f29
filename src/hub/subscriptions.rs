//! One shard's table of which of its connections hold which channel. Owned by the shard,
//! so fan-out reads it without a lock.

use std::collections::HashMap;

use slab::Slab;

use super::ChannelName;
use crate::limits::SlowConsumerPolicy;

/// One channel's subscribers on this shard.
pub struct ChannelSubscribers {
    /// Names the channel inside this shard's outboxes (never reused while the shard runs).
    pub tag: u32,
    /// What its slow subscribers get.
    pub policy: SlowConsumerPolicy,
    conns: Slab<usize>,
}

impl ChannelSubscribers {
    /// The connection keys subscribed.
    pub fn conns(&self) -> impl Iterator<Item = usize> + '_ {
        self.conns.iter().map(|(_, &conn)| conn)
    }
}

/// Channel → the shard's connection keys subscribed to it. Each subscriber sits in a
/// slot of its channel's slab; the connection remembers the slot, so leaving is O(1)
/// even on a channel with a million subscribers.
#[derive(Default)]
pub struct Subscriptions {
    map: HashMap<ChannelName, ChannelSubscribers>,
    next_tag: u32,
}

impl Subscriptions {
    /// Adds connection `conn`; returns the slot to give back to [`Subscriptions::remove`],
    /// the channel's tag, and its name as this table holds it, for the subscriber to keep
    /// instead of a copy of its own (one name per channel and shard, not per subscriber).
    /// `policy` is asked only when the channel is new here.
    pub fn insert(
        &mut self,
        channel: &ChannelName,
        conn: usize,
        policy: impl FnOnce() -> SlowConsumerPolicy,
    ) -> (usize, u32, ChannelName) {
        let next_tag = &mut self.next_tag;
        let entry = self.map.entry(channel.clone());
        let name = entry.key().clone();
        let subscribers = entry.or_insert_with(|| {
            *next_tag = next_tag.wrapping_add(1);
            ChannelSubscribers {
                tag: *next_tag,
                policy: policy(),
                conns: Slab::new(),
            }
        });
        (subscribers.conns.insert(conn), subscribers.tag, name)
    }

    pub fn remove(&mut self, channel: &str, slot: usize) {
        if let Some(subscribers) = self.map.get_mut(channel) {
            subscribers.conns.try_remove(slot);
            if subscribers.conns.is_empty() {
                self.map.remove(channel);
                // A burst of channels that all left gives its memory back; the rehash
                // costs the channels left, after at least as many were removed.
                if self.map.capacity() > 4 * self.map.len().max(16) {
                    self.map.shrink_to(2 * self.map.len());
                }
            }
        }
    }

    pub fn get(&self, channel: &str) -> Option<&ChannelSubscribers> {
        self.map.get(channel)
    }

    /// Channels with at least one subscriber on this shard.
    pub fn channel_count(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    #[test]
    fn insert_iterate_remove() {
        let mut subs = Subscriptions::default();
        let c: ChannelName = "c".into();
        let policy = || SlowConsumerPolicy::Disconnect;
        let (a, tag, _) = subs.insert(&c, 10, policy);
        let other: ChannelName = "c".into();
        let (b, same_tag, name) = subs.insert(&other, 11, policy);
        assert_eq!(tag, same_tag);
        assert!(Arc::ptr_eq(&name, &c), "the table's name is shared");
        let mut got: Vec<_> = subs.get("c").unwrap().conns().collect();
        got.sort();
        assert_eq!(got, [10, 11]);
        subs.remove("c", a);
        assert_eq!(subs.get("c").unwrap().conns().collect::<Vec<_>>(), [11]);
        subs.remove("c", b);
        assert_eq!(subs.channel_count(), 0);
        assert!(subs.get("nope").is_none());
        let (_, new_tag, _) = subs.insert(&c, 12, policy);
        assert_ne!(new_tag, tag, "a tag is never reused");
    }

    #[test]
    fn a_burst_of_channels_that_left_gives_its_memory_back() {
        let mut subs = Subscriptions::default();
        let names: Vec<ChannelName> = (0..10_000).map(|i| format!("c{i}").into()).collect();
        let slots: Vec<usize> = names
            .iter()
            .map(|c| subs.insert(c, 1, || SlowConsumerPolicy::Disconnect).0)
            .collect();
        assert!(subs.map.capacity() >= 10_000);
        for (c, slot) in names.iter().zip(slots) {
            subs.remove(c, slot);
        }
        assert_eq!(subs.channel_count(), 0);
        assert!(subs.map.capacity() <= 64, "{}", subs.map.capacity());
    }
}
