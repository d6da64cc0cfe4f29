//! The HTTP request stage: reading a request (head, then body) off a connection, admitting
//! it (Origin, token, limits: every request on its own, whatever came before on the same
//! keep-alive connection), routing it, and the plain responses and refusals. What a request
//! turns into lives in the transport files (`websocket`, `event_stream`, `longpoll`,
//! `publish`).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};

use crate::auth::{AuthMode, token_of};
use crate::config::Config;
use crate::http::{self, ApiError, Route};
use crate::limits::{Refusal, client_ip, retry_after};
use crate::namespace::PublishRule;
use crate::proto::handshake::{self, Request};

use super::Shard;
use super::conn::{Phase, UserCount};
use super::timer::Timed;
use super::transport::{Action, Scope, Transport};
use super::websocket::Endpoint;

/// An HTTP request being read.
pub(super) struct RequestStage {
    /// A parsed head whose body is still coming, with the body's length.
    pending: Option<Box<(Request, usize)>>,
    /// Bytes of the buffer known to hold no end of head, so a head that arrives a byte
    /// at a time is scanned once, not parsed again from its start per read.
    scanned: u32,
    /// When the request must be complete (handshake and keep-alive idle).
    pub(super) deadline: Instant,
}

impl RequestStage {
    pub(super) fn new_boxed(deadline: Instant) -> Box<Self> {
        Box::new(Self {
            pending: None,
            scanned: 0,
            deadline,
        })
    }
}

impl Transport for RequestStage {
    /// Its head and body.
    fn read_budget(&self, config: &Config) -> usize {
        config.max_head_bytes + config.max_body_bytes
    }

    /// Nothing was asked yet: the connection just ends.
    fn on_drain(&mut self, _scope: &mut Scope<'_>) -> Action {
        Action::Finish
    }
}

/// The user a personal channel (`name#user`, Centrifugo's convention) belongs to.
pub(super) fn personal_owner(channel: &str) -> Option<&str> {
    channel
        .rsplit_once('#')
        .map(|(_, owner)| owner)
        .filter(|owner| !owner.is_empty())
}

impl Shard {
    /// Refuses for `refusal` with a `Retry-After` spread over a few seconds; the
    /// connection ends.
    pub(super) fn refuse_busy(&mut self, key: usize, refusal: Refusal) {
        let retry_after = retry_after(
            Duration::from_secs(1),
            Duration::from_secs(5),
            &mut self.jitter,
        );
        let error = ApiError::Busy {
            refusal,
            retry_after,
        };
        self.refuse(key, &error, false);
    }

    pub(super) fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        self.ctx.config.trusted_proxies.contains(&peer)
    }

    /// Admits a request to hold its connection (WebSocket, stream, poll). Every such
    /// request is checked on its own, whatever an earlier request on the same keep-alive
    /// connection presented: the `Origin` must be allowed (403), the token valid (401),
    /// and the connection limits not reached (503 in all, 429 per address and per user).
    /// On refusal the response is queued and false returned; false too when the request
    /// was parked for the cluster's per-user verdict (it goes on from
    /// [`Shard::admitted`]).
    pub(super) fn admit(&mut self, key: usize, request: &Request) -> bool {
        self.drop_identity(key);
        let auth = &self.ctx.auth;
        if let Err(reason) = auth.check_origin(request.origin.as_deref()) {
            self.refuse(key, &ApiError::ForbiddenOrigin(reason), false);
            return false;
        }
        let token = token_of(
            request.authorization.as_deref(),
            request.query_param("token"),
        );
        let identity = match auth.authenticate(token) {
            Ok(identity) => identity,
            Err(e) => {
                // The reason only: the token itself is a credential and never logged.
                tracing::debug!(peer = %self.conns[key].peer, reason = %e, "authentication failed");
                self.refuse(key, &ApiError::Unauthorized(e), false);
                return false;
            }
        };
        if let Err(refusal) = self.ctx.limits.check_total() {
            self.refuse_busy(key, refusal);
            return false;
        }
        let peer = self.conns[key].peer;
        if self.conns[key].counted.is_none() {
            // Behind a trusted proxy: the client it forwards for counts while this
            // request holds the connection.
            let ip = client_ip(
                peer,
                request.x_forwarded_for.as_deref(),
                &self.ctx.config.trusted_proxies,
            );
            if let Err(refusal) = self.ctx.limits.count(ip) {
                self.refuse_busy(key, refusal);
                return false;
            }
            self.conns[key].counted = Some(ip);
        }
        let mut counted = None;
        if let Some(user) = identity
            .user
            .as_ref()
            .filter(|_| self.ctx.limits.limits_users())
        {
            // This node's count first: at the limit here, the user is at it everywhere,
            // and no Redis round trip is needed to say so.
            if let Err(refusal) = self.ctx.limits.count_user(user) {
                self.refuse_busy(key, refusal);
                return false;
            }
            self.conns[key].user_count = UserCount::Node;
            counted = Some(user.clone());
        }
        let runs_out = identity.runs_out.filter(|_| auth.mode() != AuthMode::Off);
        self.conns[key].identity = Some(identity);
        if let Some(runs_out) = runs_out {
            // Not `self.now` plus what is left: that is the start of the turn, and such a
            // deadline would fall that much before `exp` (a backend that wakes to the
            // nanosecond, like io_uring, then sends 4001 while the handshake would still
            // accept the token).
            self.arm_timed(key, runs_out, Timed::TokenExpiry);
        }
        match counted {
            // In a cluster the user's connections on every node count: the request
            // waits for the cluster's verdict (`admission`).
            Some(user) if self.ctx.cluster.is_some() => {
                self.park_admission(key, user, request);
                false
            }
            _ => true,
        }
    }

    /// Forgets the identity of the request that held `key`, giving back its place in
    /// the per-user count, on this node and, where it took one, in the cluster.
    pub(super) fn drop_identity(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let identity = conn.identity.take();
        let count = std::mem::take(&mut conn.user_count);
        if count != UserCount::Uncounted
            && let Some(user) = identity.as_ref().and_then(|id| id.user.as_ref())
        {
            self.ctx.limits.release_user(user);
            if count == UserCount::Cluster
                && let Some(bridge) = &self.ctx.cluster
            {
                bridge.release_user(user.clone());
            }
        }
    }

    /// Serves an admitted request that holds its connection: a WebSocket, a poll or an
    /// event stream.
    pub(super) fn hold(&mut self, key: usize, request: &Request) {
        let keep_alive = http::keep_alive(request) && !self.draining;
        match http::route(request) {
            Route::PubSub => self.upgrade(key, request, Endpoint::PubSub),
            Route::Echo => self.upgrade(key, request, Endpoint::Echo),
            Route::Poll => self.poll(key, request, keep_alive),
            Route::Sse => self.open_event_stream(key, request),
            // Only the routes above are admitted; the route of a request never changes.
            _ => self.finish(key),
        }
    }

    /// Whether the request holding `key` may subscribe to `channel`: never without an
    /// admitted identity. Where the namespace has personal channels, `name#user` is its
    /// user's alone, whatever the token lists, and needs no listing.
    pub(super) fn may_subscribe(&self, key: usize, channel: &str) -> bool {
        let personal = self.ctx.config.namespaces.of(channel).personal_channels;
        self.conns[key].identity.as_ref().is_some_and(|id| {
            match personal_owner(channel).filter(|_| personal) {
                Some(owner) => id.user.as_deref() == Some(owner),
                None => id.subscribe.allows(channel),
            }
        })
    }

    /// Whether the client holding `key` may publish to `channel`, as its namespace's
    /// `publish` rule says.
    pub(super) fn may_publish(&self, key: usize, channel: &str) -> bool {
        match self.ctx.config.namespaces.of(channel).publish {
            PublishRule::Token => self.conns[key]
                .identity
                .as_ref()
                .is_some_and(|id| id.publish.allows(channel)),
            PublishRule::Subscribers => self.may_subscribe(key, channel),
            PublishRule::Api => false,
        }
    }

    /// Reads one HTTP request if it is complete and acts on it. Returns whether the
    /// connection moved on (so the caller looks at the buffer again).
    pub(super) fn read_request(&mut self, key: usize) -> bool {
        let max_head = self.handshake_limits.max_head_bytes;
        let conn = &mut self.conns[key];
        let Phase::Request(stage) = &mut conn.phase else {
            return false;
        };
        let RequestStage {
            pending, scanned, ..
        } = &mut **stage;
        let (request, body_len) = match pending.take() {
            Some(parsed) => *parsed,
            None => {
                let buf = conn.read_buf.as_deref().map_or(&[][..], |buf| &buf[..]);
                // The first bytes are parsed at once, so garbage is refused early; after
                // that only a completed head (or one past its limit) is worth parsing.
                let worth_parsing = *scanned == 0
                    || buf.len() > max_head
                    || handshake::head_end(buf, *scanned as usize).is_some();
                if !worth_parsing {
                    *scanned = buf.len() as u32;
                    return false;
                }
                let parsed = handshake::parse_request(buf, &self.handshake_limits);
                let (request, consumed) = match parsed {
                    Ok(None) => {
                        *scanned = buf.len().max(1) as u32;
                        return false;
                    }
                    Ok(Some(parsed)) => parsed,
                    Err(e) => {
                        self.refuse(key, &ApiError::Handshake(e), false);
                        return false;
                    }
                };
                *scanned = 0;
                conn.read_buf.get_or_insert_default().advance(consumed);
                let body_len = request.content_length.unwrap_or(0);
                if body_len > self.ctx.config.max_body_bytes as u64 {
                    let max = self.ctx.config.max_body_bytes;
                    self.refuse(key, &ApiError::BodyTooLarge { max }, false);
                    return false;
                }
                if request.transfer_encoding.is_some() {
                    self.refuse(key, &ApiError::LengthRequired, false);
                    return false;
                }
                (request, body_len as usize)
            }
        };
        let conn = &mut self.conns[key];
        if conn.unread().len() < body_len {
            if let Phase::Request(stage) = &mut conn.phase {
                stage.pending = Some(Box::new((request, body_len)));
                stage.scanned = 0;
            }
            return false;
        }
        let body = conn.read_buf_mut().split_to(body_len).freeze();
        self.handle_request(key, &request, body);
        !self.conns[key].is_finishing()
    }

    pub(super) fn handle_request(&mut self, key: usize, request: &Request, body: Bytes) {
        let keep_alive = http::keep_alive(request) && !self.draining;
        let head_only = request.method == "HEAD";
        match http::route(request) {
            Route::PubSub | Route::Echo | Route::Poll | Route::Sse => {
                if self.admit(key, request) {
                    self.hold(key, request);
                }
            }
            Route::Publish => self.publish_http(key, request, &body, keep_alive),
            Route::Api(endpoint) => self.api(key, endpoint, request, &body, keep_alive),
            Route::Metrics => {
                let mut text = http::metrics::prometheus(
                    &self.ctx.registry.snapshot(self.now),
                    self.ctx.config.io,
                );
                if let Some(cluster) = &self.ctx.cluster {
                    text.push_str(&cluster.link.prometheus());
                }
                let ctype = "text/plain; version=0.0.4; charset=utf-8";
                self.respond(key, 200, ctype, text.as_bytes(), head_only, keep_alive);
            }
            Route::Stats => {
                let json = http::metrics::stats_json(&self.ctx.registry.snapshot(self.now));
                self.respond(
                    key,
                    200,
                    "application/json",
                    json.as_bytes(),
                    head_only,
                    keep_alive,
                );
            }
            Route::OpenApi => {
                let body = http::OPENAPI.as_bytes();
                self.respond(key, 200, "application/json", body, head_only, keep_alive);
            }
            Route::Health => {
                let link = self.ctx.cluster.as_ref().map(|c| &c.link);
                let (status, mut body) = match (self.draining, link.map(|l| l.is_up())) {
                    (true, _) => (503, r#"{"status":"draining""#.to_string()),
                    // Without Redis this node can neither store nor receive publishes.
                    (false, Some(false)) => (503, r#"{"status":"degraded","redis":"down""#.into()),
                    (false, Some(true)) => (200, r#"{"status":"ok","redis":"up""#.into()),
                    (false, None) => (200, r#"{"status":"ok""#.into()),
                };
                // A Redis Cluster master that stopped answering leaves the node serving
                // every other slot: still 200, with the count for whoever looks (one
                // Redis counts as one master).
                if let Some((known, answering)) = link.and_then(|l| l.masters()) {
                    body.push_str(&format!(
                        r#","redis_masters":{known},"redis_masters_answering":{answering}"#
                    ));
                }
                body.push('}');
                let body = body.into_bytes();
                self.respond(
                    key,
                    status,
                    "application/json",
                    &body,
                    head_only,
                    keep_alive,
                );
            }
            Route::Asset { body, content_type } => {
                self.respond(key, 200, content_type, body, head_only, keep_alive);
            }
            Route::MethodNotAllowed { allow } => {
                self.refuse(key, &ApiError::MethodNotAllowed { allow }, false);
            }
            Route::NotFound => {
                let upgrade = request.is_upgrade();
                self.refuse(key, &ApiError::NotFound { upgrade }, false);
            }
        }
    }

    /// Queues a complete response; then reads the next request or finishes.
    pub(super) fn respond(
        &mut self,
        key: usize,
        status: u16,
        content_type: &str,
        body: &[u8],
        head_only: bool,
        keep_alive: bool,
    ) {
        let response = if head_only {
            Bytes::from(http::head(
                status,
                content_type,
                &[],
                keep_alive,
                Some(body.len()),
            ))
        } else {
            http::response(status, content_type, &[], body, keep_alive)
        };
        self.send_response(key, response, keep_alive);
    }

    pub(super) fn send_response(&mut self, key: usize, response: Bytes, keep_alive: bool) {
        self.conns[key].outbox.push(response);
        self.mark_dirty(key);
        if keep_alive {
            self.await_request(key);
        } else {
            self.finish(key);
        }
    }

    /// Back to reading a request, with a fresh deadline for it. The next request is
    /// admitted on its own: nothing of the last one's identity carries over.
    pub(super) fn await_request(&mut self, key: usize) {
        let peer = self.conns[key].peer;
        self.drop_identity(key);
        let conn = &mut self.conns[key];
        if self.ctx.config.trusted_proxies.contains(&peer)
            && let Some(ip) = conn.counted.take()
        {
            self.ctx.limits.release(ip);
        }
        let deadline = self.now + self.ctx.config.handshake_timeout;
        self.set_phase(key, Phase::Request(RequestStage::new_boxed(deadline)));
        self.arm_request_deadline(key);
        if !self.conns[key].unread().is_empty() {
            self.reread.push(key);
        }
    }

    /// Reads the requests that waited behind an answer given outside `handle_read`.
    pub(super) fn reread_pipelined(&mut self) {
        while let Some(key) = self.reread.pop() {
            if self.conns.get(key).is_some_and(|c| !c.is_dead()) {
                let now = self.now;
                self.handle_read(key, now);
            }
        }
    }

    /// Answers a refused request. The connection ends unless `keep_alive`, which only a
    /// request read to its end may ask for. A refused request holds no place under the
    /// per-user limit while its answer goes out.
    pub(super) fn refuse(&mut self, key: usize, error: &ApiError, keep_alive: bool) {
        self.drop_identity(key);
        let status = error.status();
        tracing::debug!(
            peer = %self.conns[key].peer,
            status,
            code = error.code(),
            reason = %error,
            "refused request"
        );
        self.counters.count_rejected(status);
        self.send_response(key, error.response(keep_alive), keep_alive);
    }
}
