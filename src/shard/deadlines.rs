//! What happens when a deadline comes due: a request not read in time (408), a parked
//! poll that runs out, a token that expires, a close handshake that takes too long, a
//! heartbeat; and the next wake-up the backend sleeps until. The deadlines themselves
//! are kept in `timer.rs`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use slab::Slab;

use crate::http::ApiError;

use super::Shard;
use super::conn::{Conn, ConnRef, Phase, SubState};
use super::timer::{self, TICK, Timed};
use super::transport::Action;
use super::websocket::EMPTY_PING;

/// How late a channel sweep may run, waiting for a turn the shard has anyway.
const SWEEP_SLACK: Duration = Duration::from_millis(50);

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

    /// Arms the first heartbeat of a WebSocket or event stream, at one of the shard's
    /// phases of the ping interval ([`timer::Spread`]): connections that arrive together
    /// are not pinged together, then or ever after, and those on one phase are pinged in
    /// one turn.
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
        if matches!(self.conns[key].phase, Phase::WebSocket(_)) && first - self.now < interval / 2 {
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
            match what {
                Timed::Heartbeat => self.heartbeat(key, deadline),
                Timed::PongDue => self.check_pong(key, deadline),
                Timed::FirstPing => {
                    let quiet = first_ping_quiet(self.ctx.config.ping_interval);
                    self.ping_if_silent(key, now, quiet);
                }
                Timed::Poll => {
                    let waiting_for_home = self.conns[key]
                        .subs
                        .iter()
                        .any(|s| matches!(s.state, SubState::Pending { .. }));
                    self.dispatch(key, |transport, scope| {
                        transport.on_deadline(scope, waiting_for_home)
                    });
                }
                Timed::TokenExpiry => {
                    // Stale unless the token admitting the current request has run out
                    // (a later request may hold a later one).
                    let expired = self.conns[key]
                        .identity
                        .as_ref()
                        .and_then(|identity| identity.runs_out)
                        .is_some_and(|runs_out| runs_out <= now);
                    if expired {
                        self.dispatch(key, |transport, _| transport.on_token_expired());
                    }
                }
            }
        }
        self.channels.sweep(now);
        self.reread_pipelined();
    }

    /// A heartbeat of `key`, due at `deadline`: its transport answers it (see
    /// [`Transport::on_heartbeat`](super::transport::Transport::on_heartbeat)), and the
    /// next one comes a ping interval after this one, so the connection keeps its phase.
    /// After a ping, the pong timeout's check comes first and arms it.
    pub(super) fn heartbeat(&mut self, key: usize, deadline: Instant) {
        let conn = &mut self.conns[key];
        if conn.is_closing() {
            return;
        }
        // Once per interval is often enough to give an idle connection's memory back,
        // and costs the busy ones nothing per message.
        conn.outbox.release_memory();
        conn.subs.shrink_to_fit();
        let action = self.answer(key, |transport, scope| transport.on_heartbeat(scope));
        let pinged = matches!(action, Action::Ping);
        self.apply(key, action);
        let conn = &mut self.conns[key];
        if conn.is_closing() || !conn.phase.transport_ref().has_heartbeat() {
            return;
        }
        let phase = self.heartbeat_phase(deadline);
        if pinged {
            self.arm_timed(key, phase + self.pong_wait(), Timed::PongDue);
        } else {
            let next = timer::next_period(phase, self.ctx.config.ping_interval, self.now);
            self.arm_timed(key, next, Timed::Heartbeat);
        }
    }

    /// The pong timeout after the ping of `key`'s heartbeat has passed (`due`): anything
    /// the peer sent since the ping answers it, and the heartbeats go on at their phase;
    /// silence closes the connection.
    fn check_pong(&mut self, key: usize, due: Instant) {
        if self.conns[key].is_closing() {
            return;
        }
        let pinged_at = self.heartbeat_phase(due - self.pong_wait());
        // The due time was rounded up to the tick: a tick's slack keeps an answer that
        // came at once from being missed.
        let pinged_at_stamp = self.wheel.stamp(pinged_at);
        if self.conns[key].last_activity.until(pinged_at_stamp) < TICK {
            let next = timer::next_period(pinged_at, self.ctx.config.ping_interval, self.now);
            self.arm_timed(key, next, Timed::Heartbeat);
        } else {
            self.dispatch(key, |transport, _| transport.on_pong_timeout());
        }
    }

    /// How long after a heartbeat's ping its pong is checked.
    pub(super) fn pong_wait(&self) -> Duration {
        self.pong_wait_on_phases
            .unwrap_or(self.ctx.config.pong_timeout)
    }

    /// The phase a heartbeat that came due at `due` was armed on: the wheel rounds up to
    /// its tick, and the next deadlines are counted from the phase, not the tick, so the
    /// connections of one phase stay in one turn. Without phases on the tick's scale
    /// ([`timer::pong_wait_on_phases`]), `due` itself, as before.
    fn heartbeat_phase(&self, due: Instant) -> Instant {
        if self.pong_wait_on_phases.is_some() {
            self.heartbeat_phases
                .phase_at_or_before(due, self.ctx.config.ping_interval)
        } else {
            due
        }
    }

    /// Queues a ping in the control lane, ahead of queued data.
    pub(super) fn ping(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        conn.outbox.push_control(Bytes::from_static(EMPTY_PING));
        self.mark_dirty(key);
    }

    /// Pings `key` if nothing came from it for `quiet`.
    fn ping_if_silent(&mut self, key: usize, now: Instant, quiet: Duration) {
        let stamp = self.wheel.stamp(now);
        let conn = &mut self.conns[key];
        if !conn.is_closing() && conn.last_activity.until(stamp) >= quiet {
            self.ping(key);
        }
    }

    /// The earliest deadline the backend must wake up for.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.request_deadlines.next(),
            self.close_deadlines.next(),
            self.wheel.next_deadline(),
            // The sweep may wait for a turn that comes anyway: a shard with connections
            // has one each heartbeat phase (49 ms apart at the default interval).
            self.channels.next_sweep().map(|at| at + SWEEP_SLACK),
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
        Timed::Heartbeat => c.phase.transport_ref().has_heartbeat(),
        Timed::FirstPing | Timed::PongDue => matches!(c.phase, Phase::WebSocket(_)),
        Timed::Poll => matches!(&c.phase, Phase::Polling(poll) if poll.deadline == at),
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
