//! What reaches the shards: announcements in seq order without duplicates, holes
//! filled from the stream, what the stream lost announced as a gap, and a rollback in
//! Redis announced as a new epoch; part of the node's state machine.

use std::sync::Arc;

use bytes::Bytes;

use super::{Action, Awaiting, Command, Node};
use crate::cluster::Link;
use crate::cluster::presence::EVENT_MARK;
use crate::hub::ChannelName;
use crate::proto::pubsub;

impl Node {
    pub(super) fn announcement(&mut self, name: &ChannelName, payload: &[u8]) {
        if let Some(event) = payload.strip_prefix(EVENT_MARK) {
            self.event(name, event);
            return;
        }
        let Some((seq, epoch, data)) = parse_announcement(payload) else {
            tracing::warn!(channel = %name, "ignoring a malformed announcement");
            return;
        };
        let Some(channel) = self.channels.get(name) else {
            return;
        };
        if !channel.live {
            return;
        }
        if *channel.epoch != *epoch {
            // Another node found the channel rolled back and began a new epoch.
            let command = Command::ReadMeta {
                channel: name.clone(),
                known_epoch: channel.epoch.clone(),
                known_seq: channel.seq,
            };
            self.command(command, Awaiting::Epoch(name.clone()));
            return;
        }
        let frame = pubsub::encode_message(name, seq, data);
        if seq <= channel.seq {
            let delivered = channel.recent.iter().find(|(s, _)| *s == seq);
            if delivered.is_some_and(|(_, sent)| *sent != frame) {
                // The same seq with other data: Redis lost the message this node
                // delivered (a failover) and gave its number to a new one. Dropped as a
                // duplicate, the new one would vanish silently here: the channel starts
                // a new epoch instead (the meta script does when the seq it is told
                // exceeds its own), which every node then announces.
                tracing::warn!(channel = %name, seq, "a delivered seq reused in redis");
                let command = Command::ReadMeta {
                    channel: name.clone(),
                    known_epoch: channel.epoch.clone(),
                    known_seq: u64::MAX,
                };
                self.command(command, Awaiting::Epoch(name.clone()));
            }
            return;
        }
        if seq > channel.seq + 1 {
            self.catch_up(name, seq - 1, Some((seq, frame)));
        } else {
            self.hand_out(name, seq, frame);
            self.start_answering(name);
        }
    }

    /// A join or leave: to the shards with subscribers, in its place among the
    /// channel's messages (this job comes after the announcements before it, holes
    /// filled). Not kept: like a home's, events are not history.
    fn event(&mut self, name: &ChannelName, json: &[u8]) {
        let Some(channel) = self.channels.get(name).filter(|c| c.live) else {
            return;
        };
        if std::str::from_utf8(json).is_err() {
            tracing::warn!(channel = %name, "ignoring a malformed join or leave");
            return;
        }
        let shards = (0..channel.counts.len())
            .filter(|&s| channel.counts[s] > 0)
            .collect();
        let frame = pubsub::encode_with_id(json, None);
        self.out.push_back(Action::Event {
            channel: name.clone(),
            frame,
            shards,
        });
    }

    /// The meta read after subscribing: the channel is live from there.
    pub(super) fn went_live(&mut self, name: &ChannelName, epoch: Arc<str>, seq: u64) {
        let Some(channel) = self.channels.get_mut(name) else {
            return;
        };
        if channel.epoch.is_empty() {
            // First time: nobody here has seen anything yet.
            channel.epoch = epoch;
            channel.seq = seq;
        } else if channel.epoch != epoch {
            self.begin_epoch(name, epoch);
        }
        if let Some(channel) = self.channels.get_mut(name) {
            channel.live = true;
        }
        self.catch_up(name, seq, None);
    }

    /// The channel's Redis state no longer continues what this node delivered: say so to
    /// every local subscriber (a `subscribed` notice with the new epoch and seq 0) and
    /// continue from there.
    pub(super) fn begin_epoch(&mut self, name: &ChannelName, epoch: Arc<str>) {
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

    /// Hands the shards every message after the channel's seq up to `to` (from the
    /// stream), then `then`, then answers the channel's waiters.
    pub(super) fn catch_up(&mut self, name: &ChannelName, to: u64, then: Option<(u64, Bytes)>) {
        let Some(channel) = self.channels.get(name) else {
            return;
        };
        let from = channel.seq + 1;
        if to < from {
            self.caught_up(name, from, to, Vec::new(), then);
            return;
        }
        let command = Command::ReadStream {
            channel: name.clone(),
            from,
            to,
            count: self.history_size.max(1),
        };
        let awaiting = Awaiting::CatchUp {
            channel: name.clone(),
            from,
            to,
            then,
        };
        self.command(command, awaiting);
    }

    /// The stream's entries for `from..=to`: handed out, and what the stream no longer
    /// holds announced as a gap.
    pub(super) fn caught_up(
        &mut self,
        name: &ChannelName,
        from: u64,
        to: u64,
        entries: Vec<(u64, Bytes)>,
        then: Option<(u64, Bytes)>,
    ) {
        let mut next = from;
        for (seq, data) in entries {
            if seq < next || seq > to {
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
        if let Some((seq, frame)) = then {
            self.hand_out(name, seq, frame);
        }
        self.start_answering(name);
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
    pub(super) fn hand_out(&mut self, name: &ChannelName, seq: u64, frame: Bytes) {
        let size = self.history_size;
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

    pub(super) fn broadcast(&mut self, name: &ChannelName, seq: u64, frame: Bytes) {
        let Some(channel) = self.channels.get(name) else {
            return;
        };
        let shards = (channel.counts.iter().enumerate())
            .filter(|(_, count)| **count > 0)
            .map(|(shard, _)| shard)
            .collect();
        self.out.push_back(Action::Broadcast {
            channel: name.clone(),
            seq,
            frame,
            shards,
        });
    }
}

/// An announcement: `SEQ EPOCH DATA`.
pub(super) fn parse_announcement(payload: &[u8]) -> Option<(u64, &str, &[u8])> {
    let space = payload.iter().position(|&b| b == b' ')?;
    let seq = std::str::from_utf8(&payload[..space]).ok()?.parse().ok()?;
    let rest = &payload[space + 1..];
    let space = rest.iter().position(|&b| b == b' ')?;
    let epoch = std::str::from_utf8(&rest[..space]).ok()?;
    Some((seq, epoch, &rest[space + 1..]))
}
