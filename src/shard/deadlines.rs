//! Deadlines and timeouts: request deadlines (408), per-connection deadlines (a parked
//! poll, a token's expiry), close deadlines, heartbeats, and the next wake-up the backend
//! sleeps until.

use std::cmp::Reverse;
use std::time::Instant;

use bytes::Bytes;
use slab::Slab;

use crate::http::sse;

use super::Shard;
use super::conn::{Conn, ConnRef, Phase, SubState};

/// The heartbeat: an unmasked, final ping with no payload, the same bytes for everyone
/// (no allocation per ping).
const EMPTY_PING: &[u8] = &[0x89, 0x00];

/// Deadlines that differ per connection, kept in one ordered heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timed {
    /// A parked long-poll runs out.
    Poll,
    /// The token that admitted the request holding the connection expires (its `exp`
    /// plus leeway, in Unix seconds): close with 4001. Stale once a later request on the
    /// same connection was admitted with another token.
    TokenExpiry { expires_at: u64 },
}

impl Shard {
    /// Arms a per-connection deadline. An entry whose request has ended stays in the
    /// heap until its time, so a connection sending request after request would grow it
    /// without bound: past twice the connections it holds, the stale entries go.
    pub(super) fn arm_timed(&mut self, key: usize, at: Instant, what: Timed) {
        let conn_ref = self.conn_ref(key);
        self.timed.push(Reverse((at, conn_ref, what)));
        if self.timed.len() > 2 * self.conns.len() + 64 {
            let conns = &self.conns;
            self.timed
                .retain(|Reverse((at, conn, what))| timed_is_live(conns, *at, *conn, *what));
        }
    }

    /// Arms `key`'s request deadline (set by the caller in `Phase::Request`), dropping
    /// stale entries of earlier requests as [`Shard::arm_timed`] does.
    pub(super) fn arm_request_deadline(&mut self, key: usize) {
        let conn_ref = self.conn_ref(key);
        self.request_deadlines.arm(self.now, conn_ref);
        if self.request_deadlines.len() > 2 * self.conns.len() + 64 {
            let conns = &self.conns;
            self.request_deadlines.retain(|at, conn| {
                conns.get(conn.key as usize).is_some_and(|c| {
                    c.generation == conn.generation
                        && !c.is_dead()
                        && c.request_deadline() == Some(at)
                })
            });
        }
    }

    /// Acts on every deadline that has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        while let Some(conn) = self.request_deadlines.poll_expired(now) {
            if let Some(key) = self.resolve(conn) {
                let conn = &self.conns[key];
                // Stale unless this is still the request the deadline was armed for.
                if conn.request_deadline().is_some_and(|at| at <= now) && !conn.is_finishing() {
                    self.refuse(key, 408, "request not completed in time", &[]);
                }
            }
        }
        while let Some(Reverse((deadline, conn, what))) = self.timed.peek().copied() {
            if deadline > now {
                break;
            }
            self.timed.pop();
            let Some(key) = self.resolve(conn) else {
                continue;
            };
            match (what, &self.conns[key].phase) {
                (
                    Timed::Poll,
                    &Phase::Polling {
                        deadline: current,
                        keep_alive,
                        ..
                    },
                ) if current == deadline => {
                    let waiting_for_home = self.conns[key]
                        .subs
                        .iter()
                        .any(|s| matches!(s.state, SubState::Pending { .. }));
                    if waiting_for_home {
                        // History may hold the answer: let the home's reply decide.
                        if let Phase::Polling { expired, .. } = &mut self.conns[key].phase {
                            *expired = true;
                        }
                    } else {
                        self.end_poll_empty(key, keep_alive);
                    }
                }
                (Timed::Poll, _) => {}
                (Timed::TokenExpiry { expires_at }, phase) => {
                    let current = self.conns[key]
                        .identity
                        .as_ref()
                        .and_then(|identity| identity.expires_at);
                    if current != Some(expires_at) {
                        continue;
                    }
                    match phase {
                        Phase::WebSocket { .. } => self.close_with(
                            key,
                            4001,
                            "token expired: reconnect with a fresh token",
                        ),
                        Phase::EventStream | Phase::Polling { .. } => self.finish(key),
                        Phase::Request { .. } | Phase::Publishing { .. } => {}
                    }
                }
            }
        }
        while let Some(conn) = self.close_deadlines.poll_expired(now) {
            if let Some(key) = self.resolve(conn) {
                self.kill(key);
            }
        }
        while let Some(conn) = self.heartbeat_deadlines.poll_expired(now) {
            if let Some(key) = self.resolve(conn) {
                self.heartbeat(key, now);
            }
        }
        self.channels.sweep(now);
        self.reread_pipelined();
    }

    /// Pings a quiet WebSocket and closes one silent past the idle timeout; keeps an event
    /// stream's proxies awake with a comment.
    pub(super) fn heartbeat(&mut self, key: usize, now: Instant) {
        let conn = &mut self.conns[key];
        if conn.is_closing() {
            return;
        }
        // Once per interval is often enough to give an idle connection's memory back,
        // and costs the busy ones nothing per message.
        conn.outbox.release_memory();
        conn.subs.shrink_to_fit();
        match conn.phase {
            Phase::WebSocket { .. } => {
                let silent = now.saturating_duration_since(conn.last_activity);
                if silent >= self.ctx.config.idle_timeout {
                    self.close_with(key, 1001, "idle timeout");
                    return;
                }
                if silent >= self.ctx.config.ping_interval / 2 {
                    conn.outbox.push_control(Bytes::from_static(EMPTY_PING));
                    self.mark_dirty(key);
                }
            }
            Phase::EventStream => {
                conn.outbox.push(Bytes::from_static(sse::HEARTBEAT));
                self.mark_dirty(key);
            }
            _ => return,
        }
        let conn_ref = self.conn_ref(key);
        self.heartbeat_deadlines.arm(now, conn_ref);
    }

    /// The earliest deadline the backend must wake up for.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.request_deadlines.next(),
            self.heartbeat_deadlines.next(),
            self.close_deadlines.next(),
            self.timed.peek().map(|Reverse((t, _, _))| *t),
            self.channels.next_sweep(),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// Whether a per-connection deadline still applies: its connection lives and is still in
/// the request that armed it (the same poll deadline, the same token).
pub(super) fn timed_is_live(conns: &Slab<Conn>, at: Instant, conn: ConnRef, what: Timed) -> bool {
    let Some(c) = conns.get(conn.key as usize) else {
        return false;
    };
    if c.generation != conn.generation || c.is_dead() {
        return false;
    }
    match what {
        Timed::Poll => matches!(c.phase, Phase::Polling { deadline, .. } if deadline == at),
        Timed::TokenExpiry { expires_at } => c
            .identity
            .as_ref()
            .is_some_and(|i| i.expires_at == Some(expires_at)),
    }
}

#[cfg(test)]
mod tests {
    use super::EMPTY_PING;
    use crate::proto::frame::{OpCode, encode_frame};

    #[test]
    fn the_static_ping_is_the_encoded_empty_ping() {
        assert_eq!(EMPTY_PING, &encode_frame(OpCode::Ping, b"")[..]);
    }
}
