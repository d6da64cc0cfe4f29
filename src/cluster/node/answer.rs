//! Answering subscriptions: from the recent ring, from the stream, or with
//! `history_gap`, one waiter at a time; part of the node's state machine. A subscriber
//! without `since` to a `latest` channel gets the channel's latest message first.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use super::{Awaiting, Command, Node, Reply};
use crate::hub::ChannelName;
use crate::proto::pubsub;
use crate::shard::{Answer, ConnRef, Envelope};

/// A subscription waiting for its answer.
#[derive(Debug)]
pub(super) struct Waiter {
    pub(super) shard: usize,
    pub(super) conn: ConnRef,
    pub(super) ticket: u32,
    pub(super) since: Option<u64>,
    pub(super) epoch: Option<Box<str>>,
    pub(super) id: Option<u64>,
    /// The most replay bytes the answer may carry (at least one message unless 0).
    pub(super) max_replay_bytes: usize,
}

/// What a waiter's answer waits for.
pub(super) enum Need {
    /// The oldest seq history serves, to say `history_gap` at `seq` of `epoch`.
    Oldest { seq: u64, epoch: Arc<str> },
    /// The latest seq in Redis: a `since` ahead of the node is on its way, or a gap.
    Latest { seq: u64, epoch: Arc<str> },
    /// The message at `seq` of a `latest` channel, to start a subscriber without `since`.
    LatestValue { seq: u64, epoch: Arc<str> },
    /// The messages after `since` up to `seq`, to replay.
    Replay {
        seq: u64,
        epoch: Arc<str>,
        since: u64,
    },
}

/// The waiters of one channel being answered, one at a time.
pub(super) struct Answering {
    pub(super) channel: ChannelName,
    pub(super) queue: VecDeque<Waiter>,
    /// Waiters to give back to the channel: their `since` has not reached the node yet.
    pub(super) still: Vec<Waiter>,
}

impl Node {
    /// Starts answering the channel's waiters, if it is live.
    pub(super) fn start_answering(&mut self, name: &ChannelName) {
        debug_assert!(self.answering.is_none(), "one channel's waiters at a time");
        let Some(channel) = self.channels.get_mut(name) else {
            return;
        };
        if !channel.live || channel.waiting.is_empty() {
            return;
        }
        self.answering = Some(Answering {
            channel: name.clone(),
            queue: std::mem::take(&mut channel.waiting).into(),
            still: Vec::new(),
        });
    }

    /// Answers the next waiter, or ends the round and gives back those still waiting.
    pub(super) fn answer_next(&mut self) {
        let Some(answering) = &mut self.answering else {
            return;
        };
        let name = answering.channel.clone();
        match answering.queue.pop_front() {
            Some(waiter) => self.answer(&name, waiter),
            None => {
                let still = std::mem::take(&mut answering.still);
                self.answering = None;
                if let Some(channel) = self.channels.get_mut(&name) {
                    channel.waiting.extend(still);
                }
            }
        }
    }

    fn keep_waiting(&mut self, waiter: Waiter) {
        if let Some(answering) = &mut self.answering {
            answering.still.push(waiter);
        }
    }

    /// Answers one subscription of a live channel, asks Redis what its answer needs, or
    /// keeps it waiting for a message that has not reached this node yet.
    fn answer(&mut self, name: &ChannelName, waiter: Waiter) {
        let Some(channel) = self.channels.get(name) else {
            return;
        };
        let (epoch, seq) = (channel.epoch.clone(), channel.seq);
        let Some(since) = waiter.since else {
            if seq == 0 || !self.history.of(name).latest {
                self.subscribed(name, &waiter, seq, &epoch, Vec::new());
            } else if let Some(last) = channel.recent.back().filter(|(s, _)| *s == seq) {
                let replay = vec![last.clone()];
                self.subscribed(name, &waiter, seq, &epoch, replay);
            } else {
                let command = Command::ReadStream {
                    channel: name.clone(),
                    from: seq,
                    to: seq,
                    count: 1,
                };
                self.command_for(name, waiter, command, Need::LatestValue { seq, epoch });
            }
            return;
        };
        if waiter.epoch.as_deref().is_some_and(|e| *e != *epoch) {
            return self.ask_oldest(name, waiter, seq, epoch);
        }
        if since > seq {
            // Either still on its way to this node, or from the future.
            let command = Command::ReadMeta {
                channel: name.clone(),
                known_epoch: epoch.clone(),
                known_seq: seq,
            };
            let need = Need::Latest { seq, epoch };
            return self.command_for(name, waiter, command, need);
        }
        if seq - since > self.history_size as u64 {
            // More than one read may return: a gap, without reading what cannot be sent.
            return self.ask_oldest(name, waiter, seq, epoch);
        }
        let recent = &channel.recent;
        if since == seq {
            self.replay(name, waiter, seq, &epoch, since, Vec::new());
        } else if recent.front().is_some_and(|(first, _)| *first <= since + 1) {
            let replay = recent.iter().filter(|(s, _)| *s > since).cloned().collect();
            self.replay(name, waiter, seq, &epoch, since, replay);
        } else {
            let command = Command::ReadStream {
                channel: name.clone(),
                from: since + 1,
                to: seq,
                count: self.history_size.max(1),
            };
            let need = Need::Replay { seq, epoch, since };
            self.command_for(name, waiter, command, need);
        }
    }

    fn ask_oldest(&mut self, name: &ChannelName, waiter: Waiter, seq: u64, epoch: Arc<str>) {
        let command = Command::ReadOldest {
            channel: name.clone(),
        };
        self.command_for(name, waiter, command, Need::Oldest { seq, epoch });
    }

    fn command_for(&mut self, name: &ChannelName, waiter: Waiter, command: Command, need: Need) {
        let awaiting = Awaiting::Waiter {
            channel: name.clone(),
            waiter,
            need,
        };
        self.command(command, awaiting);
    }

    pub(super) fn waiter_reply(
        &mut self,
        name: &ChannelName,
        waiter: Waiter,
        need: Need,
        reply: Reply,
    ) {
        match (need, reply) {
            (Need::Oldest { seq, epoch }, Reply::Entries(first)) => {
                // No further back than one history size from the latest: what one read
                // returns.
                let next = seq + 1;
                let servable = next.saturating_sub(self.history_size as u64);
                let oldest = first
                    .first()
                    .map_or(next, |(first, _)| (*first).clamp(servable, next));
                self.history_gap(name, &waiter, seq, oldest, &epoch);
            }
            (Need::Latest { seq, epoch }, Reply::Meta { seq: latest, .. }) => {
                if waiter.since.is_some_and(|since| since > latest) {
                    self.ask_oldest(name, waiter, seq, epoch);
                } else {
                    self.keep_waiting(waiter);
                }
            }
            (Need::LatestValue { seq, epoch }, Reply::Entries(entries)) => {
                // Gone from the stream (trimmed by hand, expired by an explicit TTL): the
                // subscriber starts live, as on a `stream` channel.
                let replay = entries
                    .into_iter()
                    .filter(|(s, _)| *s == seq)
                    .map(|(s, data)| (s, pubsub::encode_message(name, s, &data)))
                    .collect();
                self.subscribed(name, &waiter, seq, &epoch, replay);
            }
            (Need::Replay { seq, epoch, since }, Reply::Entries(entries)) => {
                let replay = entries
                    .into_iter()
                    .map(|(s, data)| (s, pubsub::encode_message(name, s, &data)))
                    .collect();
                self.replay(name, waiter, seq, &epoch, since, replay);
            }
            (_, reply) => {
                debug_assert!(false, "unexpected reply {reply:?} for a waiter");
                self.keep_waiting(waiter);
            }
        }
    }

    /// Answers with the messages after `since` up to `seq` when `replay` holds them all,
    /// the first chunk only; with `history_gap` otherwise.
    fn replay(
        &mut self,
        name: &ChannelName,
        waiter: Waiter,
        seq: u64,
        epoch: &Arc<str>,
        since: u64,
        replay: Vec<(u64, Bytes)>,
    ) {
        let complete = replay.len() as u64 == seq - since
            && replay.first().is_none_or(|(first, _)| *first == since + 1);
        if !complete {
            let oldest = replay.first().map_or(seq + 1, |(first, _)| *first);
            self.history_gap(name, &waiter, seq, oldest, epoch);
            return;
        }
        // The shard asks for the next chunk as its client drains.
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
        self.subscribed(name, &waiter, seq, epoch, chunk);
    }

    fn subscribed(
        &mut self,
        name: &ChannelName,
        waiter: &Waiter,
        seq: u64,
        epoch: &Arc<str>,
        replay: Vec<(u64, Bytes)>,
    ) {
        let answer = waiter.answer(name, seq, epoch);
        self.send(waiter.shard, Envelope::Subscribed { answer, replay });
    }

    fn history_gap(
        &mut self,
        name: &ChannelName,
        waiter: &Waiter,
        seq: u64,
        oldest: u64,
        epoch: &Arc<str>,
    ) {
        let answer = waiter.answer(name, seq, epoch);
        self.send(waiter.shard, Envelope::HistoryGap { answer, oldest });
    }
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
