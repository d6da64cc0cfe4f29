//! The per-user limit across a cluster, on the shard's side: a request that would hold
//! its connection (WebSocket, event stream, poll) and whose user is counted waits in
//! [`Phase::Admitting`] while the cluster thread sums the user's connections over every
//! live node in Redis (`cluster::users`); the shard never waits on Redis. The verdict
//! comes back as one `Admitted` envelope: the request then goes on as if admitted at
//! once, or is refused 429 as on one node.
//!
//! Bounded: at most `cluster::users::MAX_QUEUED_ADMISSIONS` requests wait per node (past
//! it, 503 at once); a verdict comes within the cluster thread's Redis reply timeout (a
//! late or failed reply admits on the node-local count) and the request keeps its
//! handshake deadline while it waits (408 past it); the parked head counts against the
//! connection's read budget; a drain ends a parked request.

use std::sync::Arc;
use std::time::Instant;

use crate::cluster::{self, users::Verdict};
use crate::config::Config;
use crate::http::ApiError;
use crate::limits::Refusal;
use crate::proto::handshake::Request;

use super::Shard;
use super::conn::{ConnRef, Phase, UserCount};
use super::transport::{Action, Scope, Transport};

/// A request parked for the cluster's per-user verdict.
pub(super) struct Parked {
    request: Request,
    /// The bytes the parked request holds.
    held: usize,
    /// The request's deadline, kept: a verdict that comes later than the handshake
    /// timeout finds the request answered 408.
    pub(super) deadline: Instant,
}

impl Transport for Parked {
    /// What the parked head holds counts against what may wait behind it: a client sends
    /// nothing more before it is answered, and a pipelined request fits in one head.
    fn read_budget(&self, config: &Config) -> usize {
        config.max_head_bytes.saturating_sub(self.held)
    }

    /// Not admitted yet: the connection just ends (the late verdict gives its place back).
    fn on_drain(&mut self, _scope: &mut Scope<'_>) -> Action {
        Action::Finish
    }
}

/// The bytes a parsed request holds (its strings), for the read budget.
fn held_bytes(request: &Request) -> usize {
    let optional = [
        &request.query,
        &request.host,
        &request.origin,
        &request.authorization,
        &request.upgrade,
        &request.connection,
        &request.sec_websocket_key,
        &request.sec_websocket_version,
        &request.sec_websocket_protocol,
        &request.sec_websocket_extensions,
        &request.last_event_id,
        &request.x_forwarded_for,
        &request.transfer_encoding,
    ];
    request.method.len()
        + request.path.len()
        + optional
            .iter()
            .map(|field| field.as_ref().map_or(0, String::len))
            .sum::<usize>()
}

impl Shard {
    /// Parks `key`'s admitted request until the cluster has counted `user` over every
    /// live node; 503 when too many wait already.
    pub(super) fn park_admission(&mut self, key: usize, user: Arc<str>, request: &Request) {
        let deadline = match &self.conns[key].phase {
            Phase::Request(stage) => stage.deadline,
            _ => self.now + self.ctx.config.handshake_timeout,
        };
        let conn = self.conn_ref(key);
        let asked = self
            .ctx
            .cluster
            .as_ref()
            .map(|bridge| bridge.admit_user(user, self.id, conn));
        if !matches!(asked, Some(Ok(()))) {
            let error = ApiError::Unavailable(cluster::BUSY.into());
            self.refuse(key, &error, false);
            return;
        }
        let parked = Parked {
            request: request.clone(),
            held: held_bytes(request),
            deadline,
        };
        self.set_phase(key, Phase::Admitting(Box::new(parked)));
    }

    /// The cluster's verdict on `conn`'s user. A connection that is gone or ending gives
    /// back the place the verdict took.
    pub(super) fn admitted(&mut self, conn: ConnRef, user: Arc<str>, verdict: Verdict) {
        let parked = self
            .resolve(conn)
            .filter(|&key| !self.conns[key].is_closing())
            .filter(|&key| matches!(self.conns[key].phase, Phase::Admitting(_)));
        let Some(key) = parked else {
            if verdict.counts()
                && let Some(bridge) = &self.ctx.cluster
            {
                bridge.release_user(user);
            }
            return;
        };
        if !verdict.counts() {
            // Its place on this node is given back as the connection ends.
            self.refuse_busy(key, Refusal::PerUser);
            return;
        }
        self.conns[key].user_count = UserCount::Cluster;
        let Phase::Admitting(parked) = &mut self.conns[key].phase else {
            return;
        };
        let request = std::mem::take(&mut parked.request);
        self.hold(key, &request);
        if !self.conns[key].unread().is_empty() {
            self.reread.push(key);
        }
    }
}
