//! The HTTP request stage: reading a request (head, then body) off a connection, admitting
//! it (Origin, token, limits: every request on its own, whatever came before on the same
//! keep-alive connection), routing it, and the plain responses and refusals. What a request
//! turns into lives in the transport files (`websocket`, `event_stream`, `longpoll`,
//! `publish`).

use std::net::IpAddr;
use std::time::Duration;

use bytes::{Buf, Bytes};

use crate::auth::{AuthMode, token_of};
use crate::http::{self, Route};
use crate::limits::{client_ip, retry_after};
use crate::proto::handshake::{self, Request};

use super::Shard;
use super::conn::{Endpoint, Phase};
use super::deadlines::Timed;

impl Shard {
    /// Refuses with `status` and a `Retry-After` spread over a few seconds.
    pub(super) fn refuse_busy(&mut self, key: usize, status: u16, reason: &str) {
        let seconds = retry_after(
            Duration::from_secs(1),
            Duration::from_secs(5),
            &mut self.jitter,
        );
        let seconds = seconds.to_string();
        self.refuse_json(
            key,
            status,
            "retry_later",
            reason,
            &[("Retry-After", &seconds)],
        );
    }

    pub(super) fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        self.ctx.config.trusted_proxies.contains(&peer)
    }

    /// Admits a request to hold its connection (WebSocket, stream, poll). Every such
    /// request is checked on its own, whatever an earlier request on the same keep-alive
    /// connection presented: the `Origin` must be allowed (403), the token valid (401),
    /// and the connection limits not reached (503 in all, 429 per address). On refusal the
    /// response is queued and false returned.
    pub(super) fn admit(&mut self, key: usize, request: &Request) -> bool {
        self.conns[key].identity = None;
        let auth = &self.ctx.auth;
        if let Err(reason) = auth.check_origin(request.origin.as_deref()) {
            self.refuse_json(key, 403, "forbidden_origin", &reason, &[]);
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
                self.refuse_json(
                    key,
                    401,
                    "unauthorized",
                    &e.to_string(),
                    &[("WWW-Authenticate", "Bearer")],
                );
                return false;
            }
        };
        if let Err(refusal) = self.ctx.limits.check_total() {
            self.refuse_busy(key, refusal.status(), refusal.reason());
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
                self.refuse_busy(key, refusal.status(), refusal.reason());
                return false;
            }
            self.conns[key].counted = Some(ip);
        }
        let expiry = identity
            .expires_at
            .zip(identity.runs_out)
            .filter(|_| auth.mode() != AuthMode::Off);
        self.conns[key].identity = Some(identity);
        if let Some((expires_at, runs_out)) = expiry {
            // Not `self.now` plus what is left: that is the start of the turn, and such a
            // deadline would fall that much before `exp` (a backend that wakes to the
            // nanosecond, like io_uring, then sends 4001 while the handshake would still
            // accept the token).
            self.arm_timed(key, runs_out, Timed::TokenExpiry { expires_at });
        }
        true
    }

    /// Whether the request holding `key` may subscribe to `channel`: never without an
    /// admitted identity.
    pub(super) fn may_subscribe(&self, key: usize, channel: &str) -> bool {
        self.conns[key]
            .identity
            .as_ref()
            .is_some_and(|id| id.subscribe.allows(channel))
    }

    pub(super) fn may_publish(&self, key: usize, channel: &str) -> bool {
        self.conns[key]
            .identity
            .as_ref()
            .is_some_and(|id| id.publish.allows(channel))
    }

    /// Reads one HTTP request if it is complete and acts on it. Returns whether the
    /// connection moved on (so the caller looks at the buffer again).
    pub(super) fn read_request(&mut self, key: usize) -> bool {
        let max_head = self.handshake_limits.max_head_bytes;
        let conn = &mut self.conns[key];
        let Phase::Request {
            pending, scanned, ..
        } = &mut conn.phase
        else {
            return false;
        };
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
                        self.refuse(key, e.status(), &e.to_string(), e.extra_headers());
                        return false;
                    }
                };
                *scanned = 0;
                conn.read_buf.get_or_insert_default().advance(consumed);
                let body_len = request.content_length.unwrap_or(0);
                if body_len > self.ctx.config.max_body_bytes as u64 {
                    let reason = format!(
                        "request body is larger than {} bytes",
                        self.ctx.config.max_body_bytes
                    );
                    self.refuse_json(key, 413, "too_large", &reason, &[]);
                    return false;
                }
                if request.transfer_encoding.is_some() {
                    let reason = "chunked request bodies are not supported; send Content-Length";
                    self.refuse_json(key, 411, "length_required", reason, &[]);
                    return false;
                }
                (request, body_len as usize)
            }
        };
        let conn = &mut self.conns[key];
        if conn.unread().len() < body_len {
            if let Phase::Request {
                pending, scanned, ..
            } = &mut conn.phase
            {
                *pending = Some(Box::new((request, body_len)));
                *scanned = 0;
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
            Route::PubSub | Route::Echo | Route::Poll | Route::Sse if !self.admit(key, request) => {
            }
            Route::PubSub => self.upgrade(key, request, Endpoint::PubSub),
            Route::Echo => self.upgrade(key, request, Endpoint::Echo),
            Route::Publish => self.publish_http(key, request, &body, keep_alive),
            Route::Poll => self.poll(key, request, keep_alive),
            Route::Sse => self.open_event_stream(key, request),
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
            Route::Health => {
                let redis_up = self.ctx.cluster.as_ref().map(|c| c.link.is_up());
                let (status, body): (u16, &[u8]) = match (self.draining, redis_up) {
                    (true, _) => (503, br#"{"status":"draining"}"#),
                    // Without Redis this node can neither store nor receive publishes.
                    (false, Some(false)) => (503, br#"{"status":"degraded","redis":"down"}"#),
                    (false, Some(true)) => (200, br#"{"status":"ok","redis":"up"}"#),
                    (false, None) => (200, br#"{"status":"ok"}"#),
                };
                self.respond(key, status, "application/json", body, head_only, keep_alive);
            }
            Route::Asset { body, content_type } => {
                self.respond(key, 200, content_type, body, head_only, keep_alive);
            }
            Route::MethodNotAllowed { allow } => {
                let message = format!("use {allow}");
                self.refuse_json(
                    key,
                    405,
                    "method_not_allowed",
                    &message,
                    &[("Allow", allow)],
                );
            }
            Route::NotFound => {
                let message = if request.is_upgrade() {
                    "WebSocket endpoints are /ws and /echo"
                } else {
                    "no such path"
                };
                self.refuse_json(key, 404, "not_found", message, &[]);
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
        let conn = &mut self.conns[key];
        conn.identity = None;
        if self.ctx.config.trusted_proxies.contains(&peer)
            && let Some(ip) = conn.counted.take()
        {
            self.ctx.limits.release(ip);
        }
        self.set_phase(
            key,
            Phase::Request {
                pending: None,
                scanned: 0,
                deadline: self.now + self.ctx.config.handshake_timeout,
            },
        );
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

    /// A plain-text refusal before an upgrade; the connection ends.
    pub(super) fn refuse(
        &mut self,
        key: usize,
        status: u16,
        reason: &str,
        headers: &[(&str, &str)],
    ) {
        tracing::debug!(peer = %self.conns[key].peer, status, reason, "refused request");
        self.counters.count_rejected(status);
        let response = http::error_response(status, reason, headers);
        self.send_response(key, response, false);
    }

    /// A JSON refusal on the HTTP API; the connection ends (the request may not have
    /// been read to its end).
    pub(super) fn refuse_json(
        &mut self,
        key: usize,
        status: u16,
        code: &str,
        message: &str,
        headers: &[(&str, &str)],
    ) {
        tracing::debug!(peer = %self.conns[key].peer, status, code, reason = message, "refused request");
        self.counters.count_rejected(status);
        let response = http::json_error(status, code, message, headers, false);
        self.send_response(key, response, false);
    }
}
