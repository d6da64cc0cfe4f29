//! What happens when a deadline comes due: a request not read in time (408), a parked
//! poll that runs out, a token that expires, a close handshake that takes too long, a
//! heartbeat; and the next wake-up the backend sleeps until. The deadlines themselves
//! are kept in `timer.rs`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use slab::Slab;

use crate::http::{ApiError, sse};

use super::Shard;
use super::conn::{Conn, ConnRef, Phase, SubState};
use super::timer::{self, TICK, Timed};

/// The heartbeat: an unmasked, final ping with no payload, the same bytes for everyone
/// (no allocation per ping).
const EMPTY_PING: &[u8] = &[0x89, 0x00];

impl Shard {
    /// Arms a per-connection deadline; returns the instant it comes due (`at` rounded up
    /// to the wheel's tick). An entry whose request has ended stays in the wheel until its
    /// time, so a connection sending request after request would grow it without bound:
    /// past twice what was live at the last sweep, the stale entries go.
    pub(super) fn arm_timed(&mut self, key: usize, at: Instant, what: Timed) -> Instant {
        let conn_ref = self.conn_ref(key);
        let due = self.wheel.arm(at, (conn_ref, what));
        if self.wheel.len() > self.wheel_sweep_at {
            let conns = &self.conns;
            self.wheel
                .retain(|at, (conn, what)| timed_is_live(conns, at, conn, what));
            self.wheel_sweep_at = 2 * self.wheel.len() + 64;
        }
        due
    }

    /// Arms the first heartbeat of a WebSocket or event stream, at a phase of its own
    /// within the ping interval ([`timer::Spread`]): connections that arrive together
    /// are not pinged together, then or ever after.
    ///
    /// A WebSocket is pinged at a heartbeat that finds it silent for half an interval,
    /// so a phase less than half an interval after the upgrade would leave its first
    /// ping more than an interval away: it gets a [`Timed::FirstPing`] at the phase plus
    /// [`first_ping_quiet`], early enough that the heartbeat after it still finds a
    /// client that answered silent for half an interval.
    pub(super) fn arm_heartbeat(&mut self, key: usize) {
        let interval = self.ctx.config.ping_interval;
        let first = self.heartbeat_phases.first(self.now, interval);
        self.arm_timed(key, first, Timed::Heartbeat);
        if matches!(self.conns[key].phase, Phase::WebSocket { .. })
            && first - self.now < interval / 2
        {
            self.arm_timed(key, first + first_ping_quiet(interval), Timed::FirstPing);
        }
    }

    /// Arms `key`'s request deadline (set by the caller in `Phase::Request`), dropping
    /// stale entries of earlier requests as [`Shard::arm_timed`] does.
    pub(super) fn arm_request_deadline(&mut self, key: usize) {
        let conn_ref = self.conn_ref(key);
        self.request_deadlines.arm(self.now, conn_ref);
        if self.request_deadlines.len() > 2 * self.conns.len() + 64 {
            let conns = &self.conns;
            self.request_deadlines
                .retain(|at, conn| request_is_live(conns, at, conn));
        }
    }

    /// Acts on every deadline that has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        // Upgraded connections leave their request deadline behind: 24 bytes each until
        // the handshake timeout, for every connection of a connect storm.
        let conns = &self.conns;
        self.request_deadlines
            .prune_front(|at, conn| request_is_live(conns, at, conn));
        while let Some(conn) = self.request_deadlines.poll_expired(now) {
            if let Some(key) = self.resolve(conn) {
                let conn = &self.conns[key];
                // Stale unless this is still the request the deadline was armed for.
                if conn.request_deadline().is_some_and(|at| at <= now) && !conn.is_finishing() {
                    self.refuse(key, &ApiError::RequestTimeout, false);
                }
            }
        }
        while let Some(conn) = self.close_deadlines.poll_expired(now) {
            if let Some(key) = self.resolve(conn) {
                self.kill(key);
            }
        }
        while let Some((deadline, (conn, what))) = self.wheel.poll_expired(now) {
            let Some(key) = self.resolve(conn) else {
                continue;
            };
            match (what, &self.conns[key].phase) {
                (Timed::Heartbeat, _) => self.heartbeat(key, deadline, now),
                (Timed::FirstPing, _) => {
                    let quiet = first_ping_quiet(self.ctx.config.ping_interval);
                    self.ping_if_silent(key, now, quiet);
                }
                // The poll's own entry, or a stale one of an earlier poll that comes due
                // after this one's deadline: either way it has run out.
                (
                    Timed::Poll,
                    &Phase::Polling {
                        deadline: current,
                        keep_alive,
                        ..
                    },
                ) if current <= now => {
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
                (Timed::TokenExpiry, phase) => {
                    // Stale unless the token admitting the current request has run out
                    // (a later request may hold a later one).
                    let expired = self.conns[key]
                        .identity
                        .as_ref()
                        .and_then(|identity| identity.runs_out)
                        .is_some_and(|runs_out| runs_out <= now);
                    if !expired {
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
        self.channels.sweep(now);
        self.reread_pipelined();
    }

    /// Pings a quiet WebSocket and closes one silent past the idle timeout; keeps an event
    /// stream's proxies awake with a comment. `deadline` is when this heartbeat came due:
    /// the next one comes a ping interval after it, so the connection keeps its phase.
    ///
    /// A WebSocket is pinged at a heartbeat that finds it silent for half an interval or
    /// more: a quiet one that answers is pinged once per interval, the first time within
    /// an interval of its upgrade (see [`Shard::arm_heartbeat`]); one that spoke last is
    /// pinged within 1.5 intervals of that. One silent for the idle timeout is closed at
    /// the next heartbeat, at most an interval later.
    pub(super) fn heartbeat(&mut self, key: usize, deadline: Instant, now: Instant) {
        let stamp = self.wheel.stamp(now);
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
                let silent = conn.last_activity.until(stamp);
                if silent >= self.ctx.config.idle_timeout {
                    self.close_with(key, 1001, "idle timeout");
                    return;
                }
                self.ping_if_silent(key, now, self.ctx.config.ping_interval / 2);
            }
            Phase::EventStream => {
                conn.outbox.push(Bytes::from_static(sse::HEARTBEAT));
                self.mark_dirty(key);
            }
            _ => return,
        }
        let next = timer::next_period(deadline, self.ctx.config.ping_interval, now);
        self.arm_timed(key, next, Timed::Heartbeat);
    }

    /// Pings `key` if nothing came from it for `quiet`.
    fn ping_if_silent(&mut self, key: usize, now: Instant, quiet: Duration) {
        let stamp = self.wheel.stamp(now);
        let conn = &mut self.conns[key];
        if !conn.is_closing() && conn.last_activity.until(stamp) >= quiet {
            conn.outbox.push_control(Bytes::from_static(EMPTY_PING));
            self.mark_dirty(key);
        }
    }

    /// The earliest deadline the backend must wake up for.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.request_deadlines.next(),
            self.close_deadlines.next(),
            self.wheel.next_deadline(),
            self.channels.next_sweep(),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// Whether a request deadline due `at` still applies: its connection lives and still
/// reads the request that armed it.
fn request_is_live(conns: &Slab<Conn>, at: Instant, conn: ConnRef) -> bool {
    conns.get(conn.key as usize).is_some_and(|c| {
        c.generation == conn.generation && !c.is_dead() && c.request_deadline() == Some(at)
    })
}

/// Whether a wheel entry due `at` still applies: its connection lives and is still in the
/// phase or request that armed it (the same poll deadline, the same token).
fn timed_is_live(conns: &Slab<Conn>, at: Instant, conn: ConnRef, what: Timed) -> bool {
    let Some(c) = conns.get(conn.key as usize) else {
        return false;
    };
    if c.generation != conn.generation || c.is_dead() {
        return false;
    }
    match what {
        Timed::Heartbeat => matches!(c.phase, Phase::WebSocket { .. } | Phase::EventStream),
        Timed::FirstPing => matches!(c.phase, Phase::WebSocket { .. }),
        Timed::Poll => matches!(c.phase, Phase::Polling { deadline, .. } if deadline == at),
        // Armed at `runs_out` rounded up to the tick.
        Timed::TokenExpiry => c
            .identity
            .as_ref()
            .and_then(|i| i.runs_out)
            .is_some_and(|runs_out| runs_out <= at && at - runs_out < TICK),
    }
}

/// How long a new WebSocket must have been silent for its [`Timed::FirstPing`] to ping
/// it, and how long after its first heartbeat that comes: three eighths of an interval,
/// so the first ping comes at least that long after the upgrade, and the heartbeat
/// after it still finds a client that answered within an eighth of an interval silent
/// for half of one.
fn first_ping_quiet(interval: Duration) -> Duration {
    interval * 3 / 8
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
