//! The node's decisions about the channels its clients hold, without IO: which channels
//! to subscribe to in Redis, which announcements to hand to the shards and which to drop
//! as duplicates, which holes to fill from the stream, how to answer a subscription
//! (replay, `history_gap`), and when a channel's Redis state no longer continues what the
//! node delivered (a rollback: a new epoch). No sockets, no clock, no awaits: the caller
//! (`redis.rs`) performs the [`Action`]s and feeds back the replies.
//!
//! # Calling contract
//! Inputs are `handle_*`; the output is [`Node::poll_action`], to be called until it
//! returns `None` after every input:
//! - `Action::Send` and `Action::Broadcast` go to the shards at once, in order;
//! - `Action::Command` is a Redis command. Until its reply is fed back with
//!   [`Node::handle_reply`] (or its loss reported with [`Node::handle_failure`]),
//!   `poll_action` returns `None`.
//!
//! ```text
//!   input ──► jobs ──► poll_action ──► Send / Broadcast (again)
//!                          │
//!                          └──► Command ──► (awaiting) ──► handle_reply ──► poll_action
//!                                                    └──► handle_failure
//! ```
//! The node does one job at a time, so a subscriber's `Subscribed` always reaches its
//! shard after the broadcasts it must not repeat and before the ones it must receive.
//! The caller feeds the next input only once `poll_action` has returned `None` with no
//! command outstanding, which keeps the job queue to one input's work.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::{Link, Request};
use crate::hub::{ChannelName, HistoryLimits, HistoryPolicy};
use crate::shard::Envelope;

use answer::{Answering, Need, Waiter};

mod answer;
mod deliver;
#[cfg(test)]
mod tests;

/// What the node asks of its caller.
#[derive(Debug)]
pub(super) enum Action {
    /// Hand `envelope` to `shard`.
    Send { shard: usize, envelope: Envelope },
    /// Hand one message (or notice) of `channel` to every shard in `shards`, encoded once.
    Broadcast {
        channel: ChannelName,
        seq: u64,
        frame: Bytes,
        shards: Vec<usize>,
    },
    /// Hand a join or leave of `channel` (a whole frame) to every shard in `shards`.
    Event {
        channel: ChannelName,
        frame: Bytes,
        shards: Vec<usize>,
    },
    /// Run this in Redis and feed back the reply.
    Command(Command),
}

/// A Redis command the node waits on, with the reply it expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Command {
    /// Subscribe to these channels' announcements → [`Reply::Done`].
    Subscribe(Vec<ChannelName>),
    /// Stop receiving the channel's announcements → [`Reply::Done`].
    Unsubscribe(ChannelName),
    /// The channel's epoch and latest seq, a fresh epoch begun when Redis holds none or
    /// holds less than `known_seq` of `known_epoch` (the meta script) → [`Reply::Meta`].
    ReadMeta {
        channel: ChannelName,
        known_epoch: Arc<str>,
        known_seq: u64,
    },
    /// The newest `count` entries of the stream from `from` to `to`, inclusive →
    /// [`Reply::Entries`], oldest first.
    ReadStream {
        channel: ChannelName,
        from: u64,
        to: u64,
        count: usize,
    },
    /// The stream's first entry → [`Reply::Entries`] (empty or one).
    ReadOldest { channel: ChannelName },
}

/// Redis's answer to the outstanding [`Command`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reply {
    Done,
    Meta { epoch: Arc<str>, seq: u64 },
    Entries(Vec<(u64, Bytes)>),
}

/// The node's view of one channel its clients hold.
struct Channel {
    /// Subscriptions per shard.
    counts: Box<[u32]>,
    total: u32,
    /// Subscribed in Redis, with `epoch` and `seq` read after it.
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

/// Work the node has taken on and not started.
enum Job {
    Request(Request),
    Announcement {
        channel: ChannelName,
        payload: Bytes,
    },
    /// Subscribe in Redis again (the link came back, the channel's slot moved).
    Subscribe(Vec<ChannelName>),
    /// Read the channel's state after subscribing, catch up, answer its waiters.
    GoLive(ChannelName),
}

/// What the outstanding command's reply continues.
enum Awaiting {
    Subscribed(Vec<ChannelName>),
    Unsubscribed,
    /// The meta read after subscribing.
    GoLive(ChannelName),
    /// The meta read after an announcement of another epoch.
    Epoch(ChannelName),
    /// A stream read filling `from..=to`, then handing out `then` (the announcement that
    /// showed the hole), then answering the channel's waiters.
    CatchUp {
        channel: ChannelName,
        from: u64,
        to: u64,
        then: Option<(u64, Bytes)>,
    },
    /// A read that one waiter's answer depends on.
    Waiter {
        channel: ChannelName,
        waiter: Waiter,
        need: Need,
    },
}

/// The node's channel state machine; see the module doc for the calling contract.
pub(super) struct Node {
    shard_count: usize,
    history_size: usize,
    /// Which channels start a subscriber without `since` from their latest message.
    history: HistoryPolicy,
    link: Arc<Link>,
    /// Whether commands can be sent (the link is up).
    up: bool,
    channels: HashMap<ChannelName, Channel>,
    jobs: VecDeque<Job>,
    answering: Option<Answering>,
    awaiting: Option<Awaiting>,
    out: VecDeque<Action>,
}

impl Node {
    pub(super) fn new(shard_count: usize, history_size: usize, link: Arc<Link>) -> Self {
        Self {
            shard_count,
            history_size,
            history: HistoryPolicy {
                default: HistoryLimits {
                    size: history_size,
                    ttl: std::time::Duration::MAX,
                    latest: false,
                },
                by_prefix: Vec::new(),
            },
            link,
            up: false,
            channels: HashMap::new(),
            jobs: VecDeque::new(),
            answering: None,
            awaiting: None,
            out: VecDeque::new(),
        }
    }

    /// The namespaces' history policy (which of them recover `latest`).
    pub(super) fn with_history(mut self, history: HistoryPolicy) -> Self {
        self.history = history;
        self
    }

    /// The channels held, live or not.
    pub(super) fn channels(&self) -> impl Iterator<Item = &ChannelName> {
        self.channels.keys()
    }

    /// The channels held and their subscriptions on this node.
    pub(super) fn counts(&self) -> Vec<(ChannelName, u32)> {
        self.channels
            .iter()
            .map(|(name, channel)| (name.clone(), channel.total))
            .collect()
    }

    pub(super) fn handle_request(&mut self, request: Request) {
        self.jobs.push_back(Job::Request(request));
    }

    /// An announcement (`SEQ EPOCH DATA`) received on `channel`'s pub/sub key.
    pub(super) fn handle_announcement(&mut self, channel: &str, payload: Bytes) {
        // Announcements of channels no client holds here are dropped at once.
        if let Some((name, _)) = self.channels.get_key_value(channel) {
            let channel = name.clone();
            self.jobs.push_back(Job::Announcement { channel, payload });
        }
    }

    /// The link is up: subscribe to every held channel again and catch each up.
    pub(super) fn handle_link_up(&mut self) {
        self.up = true;
        let names: Vec<ChannelName> = self.channels.keys().cloned().collect();
        if !names.is_empty() {
            self.jobs.push_back(Job::Subscribe(names));
        }
    }

    /// The link is down: every channel waits for it to come back, its subscriptions kept;
    /// the step under way is dropped (its waiters wait again).
    pub(super) fn handle_link_lost(&mut self) {
        self.abort_step();
        self.up = false;
        self.jobs.retain(|job| matches!(job, Job::Request(_)));
        self.channels.retain(|_, channel| channel.total > 0);
        for channel in self.channels.values_mut() {
            channel.live = false;
        }
    }

    /// Redis no longer delivers `channel`'s announcements here (its slot moved, its
    /// owner failed): subscribe again and catch up from the stream.
    pub(super) fn handle_channel_lost(&mut self, channel: &str) {
        let Some((name, _)) = self.channels.get_key_value(channel) else {
            return;
        };
        let name = name.clone();
        if let Some(held) = self.channels.get_mut(&name) {
            held.live = false;
        }
        if self.up {
            self.jobs.push_back(Job::Subscribe(vec![name]));
        }
    }

    /// Redis confirmed a subscription to `channel` this node did not ask for just now (a
    /// client library's resubscription after a reconnect): what was announced meanwhile
    /// is caught up from the stream.
    pub(super) fn handle_resubscribed(&mut self, channel: &str) {
        if let Some((name, held)) = self.channels.get_key_value(channel)
            && held.live
        {
            self.jobs.push_back(Job::GoLive(name.clone()));
        }
    }

    /// The outstanding command's reply.
    pub(super) fn handle_reply(&mut self, reply: Reply) {
        let Some(awaiting) = self.awaiting.take() else {
            debug_assert!(false, "a reply with no command outstanding");
            return;
        };
        match (awaiting, reply) {
            (Awaiting::Subscribed(names), Reply::Done) => {
                for name in names.into_iter().rev() {
                    self.jobs.push_front(Job::GoLive(name));
                }
            }
            (Awaiting::Unsubscribed, Reply::Done) => {}
            (Awaiting::GoLive(name), Reply::Meta { epoch, seq }) => {
                self.went_live(&name, epoch, seq)
            }
            (Awaiting::Epoch(name), Reply::Meta { epoch, seq }) => {
                if self.channels.get(&name).is_some_and(|c| c.epoch != epoch) {
                    self.begin_epoch(&name, epoch);
                }
                self.catch_up(&name, seq, None);
            }
            (
                Awaiting::CatchUp {
                    channel,
                    from,
                    to,
                    then,
                },
                Reply::Entries(entries),
            ) => self.caught_up(&channel, from, to, entries, then),
            (
                Awaiting::Waiter {
                    channel,
                    waiter,
                    need,
                },
                reply,
            ) => self.waiter_reply(&channel, waiter, need, reply),
            (_, reply) => {
                debug_assert!(false, "unexpected reply {reply:?}");
                tracing::warn!(?reply, "unexpected redis reply; channel step dropped");
            }
        }
    }

    /// The outstanding command failed. Its step is dropped (waiters wait again) and the
    /// channels it was about are no longer live; returns them, for the caller to report
    /// the link or the channels lost.
    pub(super) fn handle_failure(&mut self) -> Vec<ChannelName> {
        let channels = match &self.awaiting {
            Some(Awaiting::Subscribed(names)) => names.clone(),
            Some(
                Awaiting::GoLive(name)
                | Awaiting::Epoch(name)
                | Awaiting::CatchUp { channel: name, .. }
                | Awaiting::Waiter { channel: name, .. },
            ) => vec![name.clone()],
            Some(Awaiting::Unsubscribed) | None => Vec::new(),
        };
        self.abort_step();
        for name in &channels {
            if let Some(channel) = self.channels.get_mut(name) {
                channel.live = false;
            }
        }
        channels
    }

    /// The next thing to do, or `None`: idle, or waiting for a command's reply.
    #[must_use]
    pub(super) fn poll_action(&mut self) -> Option<Action> {
        loop {
            if let Some(action) = self.out.pop_front() {
                return Some(action);
            }
            if self.awaiting.is_some() {
                return None;
            }
            if self.answering.is_some() {
                self.answer_next();
                continue;
            }
            let job = self.jobs.pop_front()?;
            self.run(job);
        }
    }

    /// Gives the waiters of the step under way back to their channel.
    fn abort_step(&mut self) {
        let mut back: Vec<(ChannelName, Waiter)> = Vec::new();
        if let Some(Awaiting::Waiter {
            channel, waiter, ..
        }) = self.awaiting.take()
        {
            back.push((channel, waiter));
        }
        if let Some(answering) = self.answering.take() {
            let channel = answering.channel;
            for waiter in answering.queue.into_iter().chain(answering.still) {
                back.push((channel.clone(), waiter));
            }
        }
        for (name, waiter) in back {
            if let Some(channel) = self.channels.get_mut(&name) {
                channel.waiting.push(waiter);
            }
        }
        self.out
            .retain(|action| !matches!(action, Action::Command(_)));
    }

    fn command(&mut self, command: Command, awaiting: Awaiting) {
        debug_assert!(self.awaiting.is_none(), "one command at a time");
        self.out.push_back(Action::Command(command));
        self.awaiting = Some(awaiting);
    }

    fn run(&mut self, job: Job) {
        match job {
            Job::Request(request) => self.request(request),
            Job::Announcement { channel, payload } => self.announcement(&channel, &payload),
            Job::Subscribe(names) => {
                let names: Vec<ChannelName> = names
                    .into_iter()
                    .filter(|name| self.channels.contains_key(name))
                    .collect();
                if self.up && !names.is_empty() {
                    self.command(
                        Command::Subscribe(names.clone()),
                        Awaiting::Subscribed(names),
                    );
                }
            }
            Job::GoLive(name) => {
                let Some(channel) = self.channels.get(&name) else {
                    return;
                };
                let command = Command::ReadMeta {
                    channel: name.clone(),
                    known_epoch: channel.epoch.clone(),
                    known_seq: channel.seq,
                };
                self.command(command, Awaiting::GoLive(name));
            }
        }
    }

    fn request(&mut self, request: Request) {
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
                if !self.up {
                    return;
                }
                if first {
                    let names = vec![channel];
                    self.command(
                        Command::Subscribe(names.clone()),
                        Awaiting::Subscribed(names),
                    );
                } else {
                    self.start_answering(&channel);
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
                    return;
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
                if self.up {
                    self.start_answering(&channel);
                }
            }
            Request::Unsubscribe { channel, shard } => {
                let Some(entry) = self.channels.get_mut(&channel) else {
                    return;
                };
                entry.counts[shard] = entry.counts[shard].saturating_sub(1);
                entry.total = entry.total.saturating_sub(1);
                if entry.total > 0 {
                    return;
                }
                self.channels.remove(&channel);
                if self.up {
                    self.command(Command::Unsubscribe(channel), Awaiting::Unsubscribed);
                }
            }
            Request::Publish { .. } => unreachable!("publishes go to the publisher"),
        }
    }

    fn send(&mut self, shard: usize, envelope: Envelope) {
        self.out.push_back(Action::Send { shard, envelope });
    }
}
