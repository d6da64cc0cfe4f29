//! The only path between shards: one crossbeam queue per shard plus a wake-up, skipped
//! while one is already on its way. A shard sends its batches before its turn's flush,
//! during a long flush, and at the end of the turn.
//!
//! The cluster thread posts here too. What it posts for subscribers ([`Envelope::Remote`])
//! is counted in bytes per shard until the shard takes it, so the cluster can stop
//! reading Redis while a shard is behind instead of queueing without end
//! ([`Post::remote_room`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use tokio::sync::Notify;

use super::{ConnRef, Shard};
use crate::auth::Patterns;
use crate::cluster::users::Verdict;
use crate::http::api::Target;
use crate::hub::{Broadcast, ChannelName, ConnId, Member};

/// A channel's answer to a subscription request, as its home or the cluster sent it.
#[derive(Debug)]
pub struct Answer {
    pub channel: ChannelName,
    pub conn: ConnRef,
    /// The ticket of the `Subscribe` this answers.
    pub ticket: u32,
    pub seq: u64,
    pub id: Option<u64>,
    /// The channel's epoch when it is not the node's own (a cluster channel).
    pub epoch: Option<ChannelName>,
}

/// A message from one shard to another (or to itself).
#[derive(Debug)]
pub enum Envelope {
    /// To the channel's home: count a subscription from shard `from`.
    Subscribe {
        channel: ChannelName,
        from: usize,
        conn: ConnRef,
        /// Names this request, so a late answer never completes a newer one.
        ticket: u32,
        since: Option<u64>,
        epoch_matches: bool,
        id: Option<u64>,
        /// How much of the replay after `since` to send with the answer (0: none yet).
        max_replay_bytes: usize,
        /// The connection as the channel's members list it, where the channel keeps them.
        member: Option<Member>,
    },
    /// To the channel's home: the next chunk of a replay, the frames after `since` up to
    /// `max_bytes`, for a subscription it counted already. Answered like `Subscribe`.
    Replay {
        channel: ChannelName,
        from: usize,
        conn: ConnRef,
        ticket: u32,
        since: u64,
        id: Option<u64>,
        max_bytes: usize,
    },
    /// To the channel's home: release one subscription of shard `from` (`conn`'s).
    Unsubscribe {
        channel: ChannelName,
        from: usize,
        conn: ConnRef,
    },
    /// To the channel's home: answer `query` to `from`/`conn` with a [`Envelope::Found`].
    Query {
        channel: ChannelName,
        from: usize,
        conn: ConnRef,
        id: Option<u64>,
        query: Query,
    },
    /// From a home: the answer to a query, a JSON object.
    Found {
        conn: ConnRef,
        id: Option<u64>,
        json: Bytes,
    },
    /// To every shard (or the one a connection id names): carry out a server API order,
    /// then answer `from`/`conn` with a [`Envelope::Done`].
    Order {
        from: usize,
        conn: ConnRef,
        order: Order,
    },
    /// A shard's part of the answer to an order.
    Done { conn: ConnRef, part: Part },
    /// From the cluster: an order another node sent, to carry out here and report to the
    /// cluster as its number `order`.
    RemoteOrder { order: u64, body: Order },
    /// From the cluster: a query could not be answered (WebSocket `error` code
    /// `unavailable`, HTTP 503).
    Unanswered {
        conn: ConnRef,
        id: Option<u64>,
        message: Box<str>,
    },
    /// From the cluster: the verdict of the per-user limit over every live node on the
    /// upgrade `conn` parked for it (`admission`).
    Admitted {
        conn: ConnRef,
        user: Arc<str>,
        verdict: Verdict,
    },
    /// From the home: a join or leave frame for this shard's WebSocket subscribers of the
    /// channel, in its place among the channel's broadcasts.
    Event { channel: ChannelName, frame: Bytes },
    /// To the channel's home: order and fan out `data`, then ack to `from`/`conn`.
    Publish {
        channel: ChannelName,
        data: Bytes,
        /// The publisher's user, where the namespace exposes it.
        publisher: Option<Arc<str>>,
        /// Store only if the channel's last seq is still this, else [`Envelope::Conflict`].
        expect_seq: Option<u64>,
        from: usize,
        conn: ConnRef,
        id: Option<u64>,
    },
    /// From the home: the subscription is live after `seq`; `replay` holds the messages
    /// after the requested `since` as (seq, frame), or the first of them (a chunk) when
    /// they do not all fit the bytes asked for.
    Subscribed {
        answer: Answer,
        replay: Vec<(u64, Bytes)>,
    },
    /// From the home: `since` cannot be served; history holds `oldest..=seq`.
    HistoryGap { answer: Answer, oldest: u64 },
    /// From the home: the publish was stored and ordered as `seq`, and queued to
    /// `subscribers` subscriptions. For an HTTP publish `id` is the message's index.
    Ack {
        conn: ConnRef,
        seq: u64,
        subscribers: u32,
        id: Option<u64>,
    },
    /// From the cluster: the publish could not be stored, so it is not acknowledged
    /// (WebSocket `error` code `unavailable`, HTTP 503).
    Refused {
        conn: ConnRef,
        id: Option<u64>,
        message: Box<str>,
    },
    /// From the home or the cluster: a publish with `expect_seq` found the channel at
    /// `seq` and was not stored (WebSocket `error` code `conflict`, HTTP 409).
    Conflict {
        conn: ConnRef,
        id: Option<u64>,
        channel: ChannelName,
        seq: u64,
    },
    /// From the home: deliver to this shard's subscribers of the channel.
    Broadcast(Broadcast),
    /// From the cluster: a message from Redis for this shard's subscribers, counted in
    /// the shard's remote backlog until taken.
    Remote(Broadcast),
}

/// What a query asks a channel's home.
#[derive(Debug)]
pub enum Query {
    /// A page of members after `cursor`.
    Presence {
        cursor: Option<ConnId>,
        limit: usize,
    },
    /// Connections and distinct users.
    PresenceStats,
    /// Stored messages after `since`: the first `limit`, or the last `limit` newest first.
    History {
        since: Option<u64>,
        limit: usize,
        newest_first: bool,
    },
}

/// What the server API asks of every shard (each gets its own copy: names and counts).
#[derive(Debug, Clone)]
pub enum Order {
    /// Close the connections of a user, or one connection, with this code and reason.
    Disconnect {
        target: Target,
        code: u16,
        reason: Arc<str>,
    },
    /// Take a user's connections out of a channel.
    Unsubscribe {
        user: Arc<str>,
        channel: ChannelName,
    },
    /// The channels homed here matching `pattern`, after `cursor` in name order: at most
    /// `limit + 1`, so the gatherer knows whether a page follows.
    Channels {
        pattern: Arc<Patterns>,
        cursor: Option<ChannelName>,
        limit: usize,
    },
}

/// One shard's answer to an [`Order`].
#[derive(Debug)]
pub enum Part {
    /// Connections disconnected or unsubscribed.
    Count(u64),
    /// Channels with their subscriber counts, in name order.
    Channels(Vec<(ChannelName, u32)>),
}

impl Shard {
    /// One envelope, from another shard or this one: a request to this shard as the home of
    /// a channel, or an answer one of its connections waits for.
    pub(super) fn handle_envelope(&mut self, envelope: Envelope) {
        match envelope {
            Envelope::Subscribe { .. }
            | Envelope::Replay { .. }
            | Envelope::Unsubscribe { .. }
            | Envelope::Query { .. }
            | Envelope::Publish { .. } => self.serve_as_home(envelope),
            Envelope::Found { conn, id, json } => self.found(conn, id, &json),
            Envelope::Event { channel, frame } => self.deliver_event(&channel, frame),
            Envelope::Order { from, conn, order } => self.carry_out(from, conn, order),
            Envelope::Done { conn, part } => self.done(conn, part),
            Envelope::RemoteOrder { order, body } => self.carry_out_remote(order, body),
            Envelope::Unanswered { conn, id, message } => self.unanswered(conn, id, &message),
            Envelope::Admitted {
                conn,
                user,
                verdict,
            } => self.admitted(conn, user, verdict),
            Envelope::Subscribed { answer, replay } => self.confirm_subscription(answer, replay),
            Envelope::HistoryGap { answer, oldest } => self.refuse_subscription(answer, oldest),
            Envelope::Refused { conn, id, message } => self.refuse_publish(conn, id, &message),
            Envelope::Conflict {
                conn,
                id,
                channel,
                seq,
            } => self.conflict(conn, id, &channel, seq),
            Envelope::Ack {
                conn,
                seq,
                subscribers,
                id,
            } => self.acknowledge(conn, seq, subscribers, id),
            Envelope::Broadcast(broadcast) | Envelope::Remote(broadcast) => {
                self.deliver(&broadcast);
            }
        }
    }
}

/// Wakes a sleeping shard. Implemented by the backend (a `mio::Waker`, an eventfd).
pub trait Wake: Send + Sync {
    fn wake(&self);
}

/// Envelopes a batch keeps room for between turns. A burst (a reconnect storm's
/// subscriptions) grows a batch to thousands; kept at that size, the batches of every
/// shard pair would hold more than a thousand connections do.
const KEPT_BATCH_CAPACITY: usize = 64;

/// Gives back what an emptied batch grew to past [`KEPT_BATCH_CAPACITY`].
pub(super) fn trim(batch: &mut Vec<Envelope>) {
    if batch.capacity() > KEPT_BATCH_CAPACITY {
        batch.shrink_to(KEPT_BATCH_CAPACITY);
    }
}

/// The sending side of one shard's queue.
struct Slot {
    queue: Sender<Envelope>,
    /// Set by the first sender since the receiver last looked; later senders skip the
    /// wake-up system call.
    notified: AtomicBool,
    waker: Arc<dyn Wake>,
    /// Bytes of [`Envelope::Remote`] in the queue.
    remote_bytes: AtomicUsize,
}

/// Every shard's queue; each shard holds an `Arc` of it.
pub struct Post {
    slots: Vec<Slot>,
    /// Set by the cluster thread while it waits for a shard to take remote envelopes.
    remote_waiting: AtomicBool,
    remote_taken: Notify,
}

/// What a remote broadcast holds while queued: its frames and the envelope.
fn remote_cost(broadcast: &Broadcast) -> usize {
    size_of::<Envelope>()
        + broadcast.frame.len()
        + broadcast.deflated.as_ref().map_or(0, Bytes::len)
}

/// One shard's receiving side.
pub struct Inbox {
    shard: usize,
    queue: Receiver<Envelope>,
    post: Arc<Post>,
}

impl Post {
    /// Creates the queues; `wakers[i]` wakes shard `i`.
    pub fn new(wakers: Vec<Arc<dyn Wake>>) -> (Arc<Self>, Vec<Receiver<Envelope>>) {
        let mut slots = Vec::with_capacity(wakers.len());
        let mut receivers = Vec::with_capacity(wakers.len());
        for waker in wakers {
            let (tx, rx) = crossbeam_channel::unbounded();
            slots.push(Slot {
                queue: tx,
                notified: AtomicBool::new(false),
                waker,
                remote_bytes: AtomicUsize::new(0),
            });
            receivers.push(rx);
        }
        let post = Self {
            slots,
            remote_waiting: AtomicBool::new(false),
            remote_taken: Notify::new(),
        };
        (Arc::new(post), receivers)
    }

    pub fn shards(&self) -> usize {
        self.slots.len()
    }

    /// Sends each batch to its shard, waking each receiving shard at most once. The
    /// sender's own batch (`from`) stays where it is.
    pub fn deliver(&self, from: usize, batches: &mut [Vec<Envelope>]) {
        for (shard, (slot, batch)) in self.slots.iter().zip(batches.iter_mut()).enumerate() {
            if shard == from || batch.is_empty() {
                continue;
            }
            for envelope in batch.drain(..) {
                // The receiver lives as long as the process runs its shards; after it is
                // gone nobody is left to deliver to.
                let _ = slot.queue.send(envelope);
            }
            trim(batch);
            if !slot.notified.swap(true, Ordering::AcqRel) {
                slot.waker.wake();
            }
        }
    }

    /// Sends one envelope to `shard` from outside the shards (the cluster thread),
    /// waking it unless a wake-up is already on its way.
    pub fn send(&self, shard: usize, envelope: Envelope) {
        let slot = &self.slots[shard];
        // As in `deliver`: a shard that is gone has nobody left to deliver to.
        let _ = slot.queue.send(envelope);
        if !slot.notified.swap(true, Ordering::AcqRel) {
            slot.waker.wake();
        }
    }

    /// Sends a message from Redis to `shard`'s subscribers, counted in its remote backlog
    /// until the shard takes it. Returns the shard's backlog in bytes, this one included.
    pub fn send_remote(&self, shard: usize, broadcast: Broadcast) -> usize {
        let cost = remote_cost(&broadcast);
        let backlog = self.slots[shard]
            .remote_bytes
            .fetch_add(cost, Ordering::SeqCst)
            + cost;
        self.send(shard, Envelope::Remote(broadcast));
        backlog
    }

    /// The largest remote backlog of any shard, in bytes.
    pub fn remote_backlog(&self) -> usize {
        self.slots
            .iter()
            .map(|slot| slot.remote_bytes.load(Ordering::SeqCst))
            .max()
            .unwrap_or(0)
    }

    /// Returns once every shard's remote backlog is under `budget` bytes.
    pub async fn remote_room(&self, budget: usize) {
        loop {
            // Announce the wait before looking: a shard that takes an envelope after the
            // look sees the flag and leaves a permit, so the wait below cannot miss it.
            self.remote_waiting.store(true, Ordering::SeqCst);
            if self.remote_backlog() < budget {
                return;
            }
            self.remote_taken.notified().await;
        }
    }

    /// A shard took a remote envelope of `cost` bytes.
    fn remote_released(&self, shard: usize, cost: usize) {
        self.slots[shard]
            .remote_bytes
            .fetch_sub(cost, Ordering::SeqCst);
        if self.remote_waiting.swap(false, Ordering::SeqCst) {
            self.remote_taken.notify_one();
        }
    }

    /// Wakes every shard (shutdown).
    pub fn wake_all(&self) {
        for slot in &self.slots {
            slot.waker.wake();
        }
    }
}

impl Inbox {
    pub fn new(shard: usize, queue: Receiver<Envelope>, post: Arc<Post>) -> Self {
        Self { shard, queue, post }
    }

    /// Whether envelopes wait (a look only: the wake flag stays as it is).
    pub fn has_mail(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Takes the next envelope. Clears the wake flag before reporting empty, so a sender
    /// racing with us either lands in this drain or wakes us again.
    pub fn poll(&self) -> Option<Envelope> {
        let envelope = match self.queue.try_recv() {
            Ok(envelope) => Some(envelope),
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => {
                self.post.slots[self.shard]
                    .notified
                    .store(false, Ordering::Release);
                self.queue.try_recv().ok()
            }
        };
        if let Some(Envelope::Remote(broadcast)) = &envelope {
            self.post
                .remote_released(self.shard, remote_cost(broadcast));
        }
        envelope
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests start a clock of their own
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    struct Asleep;

    impl Wake for Asleep {
        fn wake(&self) {}
    }

    fn post(shards: usize) -> (Arc<Post>, Vec<Inbox>) {
        let wakers: Vec<Arc<dyn Wake>> = (0..shards).map(|_| Arc::new(Asleep) as _).collect();
        let (post, receivers) = Post::new(wakers);
        let inboxes = receivers
            .into_iter()
            .enumerate()
            .map(|(shard, queue)| Inbox::new(shard, queue, post.clone()))
            .collect();
        (post, inboxes)
    }

    fn message(bytes: usize) -> Broadcast {
        Broadcast {
            channel: "news".into(),
            seq: 1,
            frame: Bytes::from(vec![b'x'; bytes]),
            deflated: None,
            published_at: Instant::now(),
        }
    }

    #[test]
    fn remote_messages_count_until_their_shard_takes_them() {
        let (post, inboxes) = post(2);
        let one = post.send_remote(1, message(1000));
        let two = post.send_remote(1, message(1000));
        assert!(one > 1000 && two == 2 * one, "{one} then {two}");
        assert_eq!(post.remote_backlog(), two);
        // Another shard's mail and a local broadcast count for nothing.
        assert!(inboxes[0].poll().is_none());
        assert!(matches!(inboxes[1].poll(), Some(Envelope::Remote(_))));
        assert_eq!(post.remote_backlog(), one);
        assert!(inboxes[1].poll().is_some());
        assert_eq!(post.remote_backlog(), 0);
    }

    #[tokio::test]
    async fn the_cluster_waits_for_room_until_the_shard_takes_its_backlog() {
        let (post, inboxes) = post(1);
        for _ in 0..4 {
            post.send_remote(0, message(1000));
        }
        let budget = 2500;
        let waiting = tokio::spawn({
            let post = post.clone();
            async move { post.remote_room(budget).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiting.is_finished(),
            "room with 4 KB queued and 2.5 KB allowed"
        );
        // Taken on another thread, as a shard would.
        std::thread::spawn(move || while inboxes[0].poll().is_some() {});
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken once the shard took its mail")
            .unwrap();
        assert!(post.remote_backlog() < budget);
    }
}
