//! A connection as the shard keeps it: its phase (which transport holds it), its buffers,
//! subscriptions and lifecycle ([`Life`]), and the names other shards use for it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use smallvec::SmallVec;

use crate::auth::Identity;
use crate::hub::ChannelName;
use crate::metrics::Transport;

use super::Outbox;
use super::admission::Parked;
use super::api::ApiCall;
use super::event_stream::EventStream;
use super::longpoll::Poll;
use super::publish::Publishing;
use super::request::RequestStage;
use super::timer::Stamp;
use super::websocket::WebSocket;

/// A connection as other shards name it: its slab key plus a generation, so a reply for
/// a connection that has gone never reaches a newer one in the same slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConnRef {
    pub key: u32,
    pub generation: u32,
}

/// Which transport holds a connection, with that transport's state. Each one's
/// behaviour lives in its file and answers the core through
/// [`Transport`](super::transport::Transport). Every state but the event stream's (it has
/// none) is behind a pointer, so the phase costs an idle connection 16 bytes.
pub(super) enum Phase {
    /// Reading an HTTP request (`request`).
    Request(Box<RequestStage>),
    /// `POST /api/publish` waiting for the homes to order its messages (`publish`).
    Publishing(Box<Publishing>),
    /// `GET /poll` parked until a message or its deadline (`longpoll`).
    Polling(Box<Poll>),
    /// `GET /sse`: an open event stream (`event_stream`).
    EventStream(EventStream),
    /// A WebSocket (`websocket`).
    WebSocket(Box<WebSocket>),
    /// A server API request waiting for the shards' answers (`api`).
    Api(Box<ApiCall>),
    /// A request that holds its connection, parked until the cluster has counted its
    /// user against the per-user limit over every node (`admission`).
    Admitting(Box<Parked>),
}

/// One subscription of a connection. A subscription is pending until its home answers;
/// the home counts it from the moment it sees the `Subscribe`, so exactly one
/// `Unsubscribe` goes back for each `Subscribe` sent, whatever happens in between.
pub(super) struct Sub {
    pub(super) channel: ChannelName,
    pub(super) state: SubState,
}

pub(super) enum SubState {
    /// Sent to the home as request `ticket`, not yet confirmed. `unsubscribe` holds the
    /// id of an unsubscribe that arrived meanwhile (outer `Some`), carried out once
    /// confirmed. A subscription with `since` stays pending while its replay goes out
    /// (`catch_up`); live messages reach it only once it has caught up. Both are rare, so
    /// both are behind pointers: a connection keeps its one subscription in 40 bytes.
    Pending {
        ticket: u32,
        unsubscribe: Option<Box<Option<u64>>>,
        catch_up: Option<Box<CatchUp>>,
    },
    /// Receiving messages; `slot` is its place in [`Subscriptions`], `tag` the channel's
    /// name in this shard's outboxes.
    Active { slot: usize, tag: u32 },
}

pub(super) struct Conn {
    pub(super) generation: u32,
    pub(super) phase: Phase,
    /// Bytes read and not yet processed; `None` when there are none (an idle connection
    /// holds neither a buffer nor room for one in its entry).
    pub(super) read_buf: Option<Box<BytesMut>>,
    pub(super) outbox: Outbox,
    /// Most connections hold one channel: it is kept inline.
    pub(super) subs: SmallVec<[Sub; 1]>,
    /// When the peer last sent anything.
    pub(super) last_activity: Stamp,
    /// In the dirty list already.
    pub(super) dirty: bool,
    pub(super) life: Life,
    /// Reading stopped while the outbox was over budget or too many publishes awaited
    /// their acks; resume once that clears.
    pub(super) read_paused: bool,
    /// The TCP peer's address.
    pub(super) peer: IpAddr,
    /// The address counted against the per-address limit: the peer's from accept on, or,
    /// when the peer is a trusted proxy, its client's while a request holds the connection
    /// (WebSocket, event stream, long-poll).
    pub(super) counted: Option<IpAddr>,
    /// What the request being served may do; set when it is admitted, and replaced by
    /// the next request's on a keep-alive connection.
    pub(super) identity: Option<Arc<Identity>>,
    /// Where the identity's user is counted against `--max-connections-per-user`.
    pub(super) user_count: UserCount,
}

/// Where a connection's user holds a place under `--max-connections-per-user`: each
/// place is given back where it was taken when the request ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum UserCount {
    /// Not counted (no user, or no limit).
    #[default]
    Uncounted,
    /// On this node's count only (alone, or while the cluster's verdict is awaited).
    Node,
    /// On this node's count and on the cluster's (`cluster::users`).
    Cluster,
}

/// Where a connection is in its life. Each state includes the ones before it (the derived
/// order is the diagram's), so "closing" holds for a finishing connection too.
///
/// ```text
///          close frame queued               peer's close frame,
///   Open ────────────────────▶ Closing ───── or a final answer ─────▶ Finishing
///    │                                                                 ▲   │
///    └────── final response, refusal, protocol error, drain ───────────┘   │ outbox
///                                                                          ▼ flushed
///   (any) ── peer's end of stream, socket error, close timeout ──▶ Dead ◀─ WriteShut
///                                                                 peer's end of stream
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Life {
    /// Served by its phase.
    Open,
    /// A close frame is queued: nothing may follow it. The peer has the close timeout to
    /// answer.
    Closing,
    /// Flush what is queued, shut down writing, then wait (bounded) for the peer's end of
    /// stream so our last bytes are not lost to a reset. Subscriptions have ended.
    Finishing,
    /// The write side is shut down; only the end of stream is awaited.
    WriteShut,
    /// Everything it held is released; the backend drops the socket, then the entry.
    Dead,
}

impl Conn {
    /// A close frame or a final answer is queued: nothing may follow it.
    pub(super) fn is_closing(&self) -> bool {
        self.life >= Life::Closing
    }

    /// Nothing more is read or queued; what is queued is being flushed.
    pub(super) fn is_finishing(&self) -> bool {
        self.life >= Life::Finishing
    }

    pub(super) fn is_dead(&self) -> bool {
        self.life == Life::Dead
    }

    /// Bytes read and not yet processed.
    pub(super) fn unread(&self) -> &[u8] {
        self.read_buf.as_deref().map_or(&[], |buf| &buf[..])
    }

    /// The read buffer, made if there was none.
    pub(super) fn read_buf_mut(&mut self) -> &mut BytesMut {
        self.read_buf.get_or_insert_default()
    }

    /// Gives back the read buffer once everything in it was processed.
    pub(super) fn release_read_buf(&mut self) {
        if self.read_buf.as_ref().is_some_and(|buf| buf.is_empty()) {
            self.read_buf = None;
        }
    }

    /// When the request being read must be complete, while one is.
    pub(super) fn request_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Request(request) => Some(request.deadline),
            Phase::Admitting(parked) => Some(parked.deadline),
            _ => None,
        }
    }
}

/// A replay that goes out in chunks of at most half the outbound budget, the next asked
/// of the home only once the outbox has drained below half: what a `since` brings back
/// never holds more than the budget of the connection, however much history it covers.
/// Live messages published meanwhile come from history too, until the chunk that
/// reaches the channel's latest seq ends the catch-up.
pub(super) struct CatchUp {
    /// The last seq sent (the `since` to ask the next chunk from).
    pub(super) at: u64,
    /// The id the `subscribed` reply will carry.
    pub(super) id: Option<u64>,
    /// A chunk is on its way (at most one per connection).
    pub(super) requested: bool,
    /// The home has answered once (an event stream announces `subscribed` then).
    pub(super) answered: bool,
    /// The channel's epoch as a cluster first answered (the next chunks must be of it).
    pub(super) epoch: Option<ChannelName>,
}

impl Phase {
    /// The transport the connection counts as in the metrics.
    pub(super) fn counted_as(&self) -> Transport {
        match self {
            Self::Request(_) | Self::Publishing(_) | Self::Api(_) | Self::Admitting(_) => {
                Transport::Http
            }
            Self::Polling(_) => Transport::Poll,
            Self::EventStream(_) => Transport::Sse,
            Self::WebSocket(_) => Transport::WebSocket,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection holds a `Conn`, and every WebSocket one `WebSocket` (measured
    /// with `bench-client/memory.sh`): growing either costs each idle connection.
    #[test]
    fn a_connection_is_compact() {
        assert!(size_of::<Conn>() <= 184, "{}", size_of::<Conn>());
        assert!(size_of::<WebSocket>() <= 112, "{}", size_of::<WebSocket>());
    }
}
