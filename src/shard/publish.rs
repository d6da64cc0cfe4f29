//! Publishing: routing a publish to whoever orders its channel (the home shard or the
//! cluster), `POST /api/publish` waiting for its receipts, and the acks and refusals that
//! come back for WebSocket and HTTP publishers.

use bytes::Bytes;

use crate::auth::api_key_matches;
use crate::cluster;
use crate::http::{ApiError, publish};
use crate::hub::{self, ChannelName};
use crate::proto::handshake::Request;
use crate::proto::pubsub;

use super::conn::{ConnRef, Phase};
use super::{Envelope, Shard};

impl Shard {
    pub(super) fn publish_http(
        &mut self,
        key: usize,
        request: &Request,
        body: &Bytes,
        keep_alive: bool,
    ) {
        let Some(api_key) = self.ctx.config.api_key.as_deref() else {
            self.refuse(key, &ApiError::PublishDisabled, false);
            return;
        };
        let presented = request
            .authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .unwrap_or("");
        if !api_key_matches(presented.trim(), api_key) {
            self.refuse(key, &ApiError::BadApiKey, false);
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
            Phase::Publishing {
                results: vec![None; count],
                remaining: count,
                batch: parsed.batch,
                keep_alive,
            },
        );
        for (index, message) in parsed.messages.into_iter().enumerate() {
            self.publish(
                message.channel.into(),
                message.data,
                conn,
                Some(index as u64),
            );
        }
    }

    /// Sends a publish to whoever orders the channel: its home shard, or the cluster.
    pub(super) fn publish(
        &mut self,
        channel: ChannelName,
        data: Bytes,
        conn: ConnRef,
        id: Option<u64>,
    ) {
        if let Some(bridge) = &self.ctx.cluster {
            let request = cluster::Request::Publish {
                channel,
                data,
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
        let Some(key) = self.resolve(conn) else {
            return;
        };
        let conn = &mut self.conns[key];
        match &mut conn.phase {
            Phase::WebSocket { .. } => {
                conn.inflight_publishes -= 1;
                self.reply(key, pubsub::encode_ack(id, seq));
            }
            Phase::Publishing {
                results,
                remaining,
                batch,
                keep_alive,
            } => {
                let index = id.expect("HTTP publishes carry their index") as usize;
                results[index] = Some((seq, subscribers));
                *remaining -= 1;
                if *remaining == 0 {
                    let (batch, keep_alive) = (*batch, *keep_alive);
                    let results: Vec<(u64, u32)> =
                        results.iter().map(|r| r.expect("all acked")).collect();
                    let body = publish::receipt(&results, batch);
                    self.respond(key, 200, "application/json", &body, false, keep_alive);
                }
            }
            _ => {}
        }
    }

    /// A publish the cluster could not store: refused, never acknowledged.
    pub(super) fn refuse_publish(&mut self, conn: ConnRef, id: Option<u64>, message: &str) {
        let Some(key) = self.resolve(conn) else {
            return;
        };
        let conn = &mut self.conns[key];
        match conn.phase {
            Phase::WebSocket { .. } => {
                conn.inflight_publishes -= 1;
                self.reply(key, pubsub::encode_error("unavailable", message, id));
            }
            Phase::Publishing { .. } => {
                // Acks of the other messages of the batch may still come: this connection
                // ends after the answer so none of them can meet a later request.
                let error = ApiError::Unavailable(message.to_owned().into());
                self.refuse(key, &error, false);
            }
            _ => {}
        }
    }
}
