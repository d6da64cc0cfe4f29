//! One shard's table of which of its connections hold which channel. Owned by the shard,
//! so fan-out reads it without a lock.

use std::collections::HashMap;

use slab::Slab;

use super::ChannelName;

/// Channel → the shard's connection keys subscribed to it. Each subscriber sits in a
/// slot of its channel's slab; the connection remembers the slot, so leaving is O(1)
/// even on a channel with a million subscribers.
#[derive(Default)]
pub struct Subscriptions {
    map: HashMap<ChannelName, Slab<usize>>,
}

impl Subscriptions {
    /// Adds connection `conn`; returns the slot to give back to [`Subscriptions::remove`].
    pub fn insert(&mut self, channel: &ChannelName, conn: usize) -> usize {
        self.map.entry(channel.clone()).or_default().insert(conn)
    }

    pub fn remove(&mut self, channel: &str, slot: usize) {
        if let Some(subscribers) = self.map.get_mut(channel) {
            subscribers.try_remove(slot);
            if subscribers.is_empty() {
                self.map.remove(channel);
            }
        }
    }

    /// The connection keys subscribed to `channel` on this shard.
    pub fn subscribers(&self, channel: &str) -> impl Iterator<Item = usize> + '_ {
        self.map
            .get(channel)
            .into_iter()
            .flat_map(|s| s.iter().map(|(_, &conn)| conn))
    }

    /// Channels with at least one subscriber on this shard.
    pub fn channel_count(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_iterate_remove() {
        let mut subs = Subscriptions::default();
        let c: ChannelName = "c".into();
        let a = subs.insert(&c, 10);
        let b = subs.insert(&c, 11);
        let mut got: Vec<_> = subs.subscribers("c").collect();
        got.sort();
        assert_eq!(got, [10, 11]);
        subs.remove("c", a);
        assert_eq!(subs.subscribers("c").collect::<Vec<_>>(), [11]);
        subs.remove("c", b);
        assert_eq!(subs.channel_count(), 0);
        assert_eq!(subs.subscribers("nope").count(), 0);
    }
}
