//! Publishing: routing a publish to whoever orders its channel (the home shard or the
//! cluster), `POST /api/publish` waiting for its receipts, and the acks and refusals that
//! come back for WebSocket and HTTP publishers.

use std::sync::Arc;

use bytes::Bytes;

use crate::cluster;
use crate::config::Config;
use crate::http::{self, ApiError, publish};
use crate::hub::{self, ChannelName};
use crate::proto::handshake::Request;

use super::conn::{ConnRef, Phase};
use super::transport::{Action, Scope, Transport};
use super::{Envelope, Shard};

/// `POST /api/publish` waiting for its messages' receipts.
pub(super) struct Publishing {
    /// Each message's seq and subscribers once acknowledged, in the request's order.
    results: Vec<Option<(u64, u32)>>,
    remaining: usize,
    /// Asked as a batch (`{"messages": [...]}`): answered with a list.
    batch: bool,
    keep_alive: bool,
}

impl Transport for Publishing {
    /// Waiting for the receipts: only the start of a pipelined next request.
    fn read_budget(&self, config: &Config) -> usize {
        config.max_head_bytes
    }

    /// A publish in flight gets its receipt first: it is not cut off.
    fn on_drain(&mut self, _scope: &mut Scope<'_>) -> Action {
        Action::Stay
    }

    /// The message `id` (its index in the request) was acknowledged; once every one
    /// was, the receipt answers the request.
    fn on_ack(&mut self, seq: u64, subscribers: u32, id: Option<u64>) -> Action {
        let index = id.expect("HTTP publishes carry their index") as usize;
        self.results[index] = Some((seq, subscribers));
        self.remaining -= 1;
        if self.remaining > 0 {
            return Action::Stay;
        }
        let results: Vec<(u64, u32)> = self.results.iter().map(|r| r.expect("all acked")).collect();
        let body = publish::receipt(&results, self.batch);
        let response = http::response(200, "application/json", &[], &body, self.keep_alive);
        Action::Respond {
            response,
            keep_alive: self.keep_alive,
        }
    }

    /// Acks of the other messages of the batch may still come: the connection ends after
    /// the answer so none of them can meet a later request.
    fn on_refused(&mut self, message: &str, _id: Option<u64>) -> Action {
        Action::Refuse {
            error: ApiError::Unavailable(message.to_owned().into()),
            keep_alive: false,
        }
    }

    /// Only a single message carries `expect_seq`: nothing else of the request is
    /// outstanding, so the connection may carry the next one.
    fn on_conflict(&mut self, channel: &str, seq: u64, _id: Option<u64>) -> Action {
        Action::Refuse {
            error: ApiError::Conflict {
                channel: channel.into(),
                seq,
            },
            keep_alive: self.keep_alive,
        }
    }
}

impl Shard {
    pub(super) fn publish_http(
        &mut self,
        key: usize,
        request: &Request,
        body: &Bytes,
        keep_alive: bool,
    ) {
        if self.ctx.config.api_key.is_none() {
            self.refuse(key, &ApiError::PublishDisabled, false);
            return;
        }
        if let Err(error) = self.check_api_key(request) {
            self.refuse(key, &error, false);
            return;
        }
        let parsed = match publish::parse(body) {
            Ok(parsed) => parsed,
            Err(error) => {
                // The body was read whole: the connection can carry the next request.
                self.refuse(key, &error, keep_alive);
                return;
            }
        };
        let conn = self.conn_ref(key);
        let count = parsed.messages.len();
        self.set_phase(
            key,
            Phase::Publishing(Box::new(Publishing {
                results: vec![None; count],
                remaining: count,
                batch: parsed.batch,
                keep_alive,
            })),
        );
        for (index, message) in parsed.messages.into_iter().enumerate() {
            let channel = message.channel.into();
            let expect = (None, message.expect_seq);
            self.publish(channel, message.data, expect, conn, Some(index as u64));
        }
    }

    /// Sends a publish to whoever orders the channel: its home shard, or the cluster
    /// (which does not carry `publisher` yet), with the publisher's user and the seq it
    /// expects the channel at, if any.
    pub(super) fn publish(
        &mut self,
        channel: ChannelName,
        data: Bytes,
        (publisher, expect_seq): (Option<Arc<str>>, Option<u64>),
        conn: ConnRef,
        id: Option<u64>,
    ) {
        if let Some(bridge) = &self.ctx.cluster {
            let request = cluster::Request::Publish {
                channel,
                data,
                expect_seq,
                shard: self.id,
                conn,
                id,
            };
            if bridge.send(request).is_err() {
                // Answered as a refusal from the cluster is, by the same path.
                let message = cluster::BUSY.into();
                self.send(self.id, Envelope::Refused { conn, id, message });
            }
            return;
        }
        let home = hub::home_of(&channel, self.shards);
        self.send(
            home,
            Envelope::Publish {
                channel,
                data,
                publisher,
                expect_seq,
                from: self.id,
                conn,
                id,
            },
        );
    }

    pub(super) fn acknowledge(
        &mut self,
        conn: ConnRef,
        seq: u64,
        subscribers: u32,
        id: Option<u64>,
    ) {
        if let Some(key) = self.resolve(conn) {
            self.dispatch(key, |transport, _| transport.on_ack(seq, subscribers, id));
        }
    }

    /// A publish whose `expect_seq` did not hold: not stored.
    pub(super) fn conflict(&mut self, conn: ConnRef, id: Option<u64>, channel: &str, seq: u64) {
        if let Some(key) = self.resolve(conn) {
            self.dispatch(key, |transport, _| transport.on_conflict(channel, seq, id));
        }
    }

    /// A publish the cluster could not store: refused, never acknowledged.
    pub(super) fn refuse_publish(&mut self, conn: ConnRef, id: Option<u64>, message: &str) {
        if let Some(key) = self.resolve(conn) {
            self.dispatch(key, |transport, _| transport.on_refused(message, id));
        }
    }
}
