//! Questions a connection asks of a channel's home rather than of its own shard (who is
//! in a channel, how many, what it stored), and the answers that come back. With
//! `--redis` the cluster answers them instead, from Redis, for every node.

use crate::cluster::{
    self,
    roster::{Ask, Question},
};
use crate::hub::presence::{DEFAULT_PAGE, MAX_PAGE};
use crate::hub::{self, ConnId};
use crate::proto::pubsub;

use super::conn::{ConnRef, Phase};
use super::{Envelope, Query, Shard};

/// The most messages one `history` answer holds.
pub(super) const MAX_HISTORY_PAGE: usize = 1000;

impl Shard {
    /// `presence` (`page`: the cursor and limit asked for) or `presence_stats` of
    /// `channel` over a WebSocket; the answer comes back from the home.
    pub(super) fn ask_presence(
        &mut self,
        key: usize,
        channel: &str,
        page: Option<(Option<&str>, Option<u64>)>,
        id: Option<u64>,
    ) {
        let refusal = if !self.ctx.config.namespaces.of(channel).presence {
            Some((
                "presence_disabled",
                format!("presence is off for {channel:?}"),
            ))
        } else {
            None
        };
        if let Some((code, message)) = refusal {
            self.reply(key, pubsub::encode_error(code, &message, id));
            return;
        }
        if self.ctx.cluster.is_some() {
            let question = match page {
                None => Question::PresenceStats,
                Some((cursor, limit)) => Question::Presence {
                    cursor: cursor.map(Into::into),
                    limit: limit.map_or(DEFAULT_PAGE, |l| (l as usize).clamp(1, MAX_PAGE)),
                },
            };
            self.ask_cluster_for(key, channel, id, question);
            return;
        }
        let query = match page {
            None => Query::PresenceStats,
            Some((cursor, limit)) => {
                let cursor = match cursor.map(str::parse::<ConnId>).transpose() {
                    Ok(cursor) => cursor,
                    Err(message) => {
                        self.reply(key, pubsub::encode_error("bad_request", &message, id));
                        return;
                    }
                };
                let limit = limit.map_or(DEFAULT_PAGE, |l| (l as usize).clamp(1, MAX_PAGE));
                Query::Presence { cursor, limit }
            }
        };
        self.ask_home_for(key, channel, id, query);
    }

    /// `history` of `channel` over a WebSocket: up to `limit` stored messages after
    /// `since`, the newest first when asked; answered by the home within half the
    /// outbound budget.
    pub(super) fn ask_history(
        &mut self,
        key: usize,
        channel: &str,
        since: Option<u64>,
        (limit, newest_first): (Option<u64>, bool),
        id: Option<u64>,
    ) {
        let limit = limit.map_or(100, |l| (l as usize).clamp(1, MAX_HISTORY_PAGE));
        if self.ctx.cluster.is_some() {
            let question = Question::History {
                since,
                limit,
                newest_first,
            };
            self.ask_cluster_for(key, channel, id, question);
            return;
        }
        let query = Query::History {
            since,
            limit,
            newest_first,
        };
        self.ask_home_for(key, channel, id, query);
    }

    /// Sends a WebSocket's question to the channel's home; the connection reads nothing
    /// more until the answer is back.
    fn ask_home_for(&mut self, key: usize, channel: &str, id: Option<u64>, query: Query) {
        if let Phase::WebSocket(socket) = &mut self.conns[key].phase {
            socket.asking = true;
        }
        let conn = self.conn_ref(key);
        self.ask_home(channel.into(), conn, id, query);
    }

    /// Sends a WebSocket's question to the cluster (which answers from Redis); the
    /// connection reads nothing more until the answer is back.
    fn ask_cluster_for(&mut self, key: usize, channel: &str, id: Option<u64>, question: Question) {
        let conn = self.conn_ref(key);
        if self.ask_cluster(channel.into(), conn, id, question) {
            if let Phase::WebSocket(socket) = &mut self.conns[key].phase {
                socket.asking = true;
            }
        } else {
            self.reply(key, pubsub::encode_error("unavailable", cluster::BUSY, id));
        }
    }

    /// Hands `question` about `channel` to the cluster for `conn`; false when its queue
    /// is full (nothing was asked).
    pub(super) fn ask_cluster(
        &mut self,
        channel: hub::ChannelName,
        conn: ConnRef,
        id: Option<u64>,
        question: Question,
    ) -> bool {
        let Some(bridge) = &self.ctx.cluster else {
            return false;
        };
        let ask = Ask::Question {
            channel,
            shard: self.id,
            conn,
            id,
            question,
            max_bytes: self.ctx.config.outbound_queue_bytes / 2,
        };
        bridge.ask(ask).is_ok()
    }

    /// The cluster could not answer a query of `conn`'s.
    pub(super) fn unanswered(&mut self, conn: ConnRef, id: Option<u64>, message: &str) {
        if let Some(key) = self.resolve(conn) {
            self.dispatch(key, |transport, _| transport.on_unanswered(message, id));
        }
    }

    /// Sends `query` about `channel` to its home for `conn`.
    pub(super) fn ask_home(
        &mut self,
        channel: hub::ChannelName,
        conn: ConnRef,
        id: Option<u64>,
        query: Query,
    ) {
        let home = hub::home_of(&channel, self.shards);
        let from = self.id;
        self.send(
            home,
            Envelope::Query {
                channel,
                from,
                conn,
                id,
                query,
            },
        );
    }

    /// A home answered a query of `conn`'s.
    pub(super) fn found(&mut self, conn: ConnRef, id: Option<u64>, json: &[u8]) {
        if let Some(key) = self.resolve(conn) {
            self.dispatch(key, |transport, _| transport.on_found(json, id));
        }
    }
}
