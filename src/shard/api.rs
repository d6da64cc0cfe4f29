//! The server API besides publishing (`crate::http::api`): a request admitted by the API
//! key waits in [`Phase::Api`] while the homes answer its query (presence, history) or
//! every shard carries out its order (disconnect, unsubscribe, list channels) and sends
//! its part back through the mailbox; the last part answers the request. Each order costs
//! one envelope per shard and each part is bounded (a count, or a page of channels).
//!
//! With `--redis` the cluster answers for every node: questions (presence, history,
//! channels, info) from Redis, and orders (disconnect, unsubscribe by user) go to this
//! node's shards and, through the cluster, to every other node, whose sum comes back as
//! one more part.

use crate::auth::api_key_matches;
use crate::cluster::{self, roster::Question};
use crate::config::Config;
use crate::http::api::{self, Call, Endpoint, Target};
use crate::http::{self, ApiError};
use crate::hub::ChannelName;
use crate::proto::handshake::Request;

use super::conn::{ConnRef, Phase};
use super::transport::{Action, Scope, Transport};
use super::{Envelope, Order, Part, Query, Shard};

/// A server API request waiting for its answer.
pub(super) struct ApiCall {
    keep_alive: bool,
    /// Shards still to answer.
    waiting: usize,
    gathered: Gathered,
}

/// Who answers a request: the channel's home, the cluster (from Redis), or the shards
/// carrying out an order (and the other nodes' shards, in a cluster).
enum Ask {
    Home(ChannelName, Query),
    Cluster(ChannelName, Question),
    Shards(Order),
}

/// What the parts add up to so far.
enum Gathered {
    /// A home's answer is the whole response.
    Found,
    /// Counts summed under this key.
    Count { key: &'static str, total: u64 },
    /// Channel pages merged, at most `limit` kept.
    Channels {
        limit: usize,
        list: Vec<(ChannelName, u32)>,
    },
}

impl ApiCall {
    fn respond(&self, body: &[u8]) -> Action {
        Action::Respond {
            response: http::response(200, "application/json", &[], body, self.keep_alive),
            keep_alive: self.keep_alive,
        }
    }
}

impl Transport for ApiCall {
    /// Waiting for the shards: only the start of a pipelined next request.
    fn read_budget(&self, config: &Config) -> usize {
        config.max_head_bytes
    }

    /// Every shard answers within its next turns: the answer is not cut off.
    fn on_drain(&mut self, _scope: &mut Scope<'_>) -> Action {
        Action::Stay
    }

    fn on_found(&mut self, json: &[u8], _id: Option<u64>) -> Action {
        self.respond(json)
    }

    fn on_unanswered(&mut self, message: &str, _id: Option<u64>) -> Action {
        let error = ApiError::Unavailable(message.to_owned().into());
        Action::Respond {
            response: error.response(self.keep_alive),
            keep_alive: self.keep_alive,
        }
    }

    fn on_done(&mut self, part: Part) -> Action {
        match (&mut self.gathered, part) {
            (Gathered::Count { total, .. }, Part::Count(n)) => *total += n,
            (Gathered::Channels { list, .. }, Part::Channels(page)) => list.extend(page),
            _ => {}
        }
        self.waiting -= 1;
        if self.waiting > 0 {
            return Action::Stay;
        }
        let body = match &mut self.gathered {
            Gathered::Found => return Action::Stay,
            Gathered::Count { key, total } => api::count_json(key, *total),
            Gathered::Channels { limit, list } => {
                // Each shard sent up to `limit + 1` after the cursor: anything a shard held
                // back sorts after what is kept here, so the last kept is the next cursor.
                list.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                let more = list.len() > *limit;
                list.truncate(*limit);
                let cursor = list.last().filter(|_| more).map(|(name, _)| &**name);
                api::channels_json(list, cursor)
            }
        };
        self.respond(&body)
    }
}

impl Shard {
    /// The API key as `Authorization: Bearer`, checked in constant time.
    pub(super) fn check_api_key(&self, request: &Request) -> Result<(), ApiError> {
        let key = self.ctx.config.api_key.as_deref();
        let presented = request
            .authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .unwrap_or("");
        match key {
            Some(key) if api_key_matches(presented.trim(), key) => Ok(()),
            _ => Err(ApiError::BadApiKey),
        }
    }

    /// Serves a server API request: checks the key, reads the request, then answers at
    /// once (`/api/info`) or parks the connection in [`Phase::Api`] until the home or
    /// every shard has answered.
    pub(super) fn api(
        &mut self,
        key: usize,
        endpoint: Endpoint,
        request: &Request,
        body: &[u8],
        keep_alive: bool,
    ) {
        let call = if self.ctx.config.api_key.is_none() {
            Err(ApiError::ApiDisabled)
        } else if let Err(error) = self.check_api_key(request) {
            Err(error)
        } else {
            api::parse(endpoint, request, body)
        };
        let call = match call {
            Ok(call) => call,
            Err(error) => {
                // The request was read whole: the connection can carry the next one.
                self.refuse(key, &error, keep_alive);
                return;
            }
        };
        let conn = self.conn_ref(key);
        let clustered = self.ctx.cluster.is_some();
        // A connection of this node, named as cluster presence names it.
        let call = match call {
            Call::Disconnect {
                target: Target::NodeConn { node, conn },
                code,
                reason,
            } if *node == *self.ctx.epoch => Call::Disconnect {
                target: Target::Conn(conn),
                code,
                reason,
            },
            call => call,
        };
        let (ask, gathered) = match call {
            Call::Info if clustered => {
                let question = Question::Info {
                    this: self.info_json(),
                };
                (Ask::Cluster("".into(), question), Gathered::Found)
            }
            Call::Info => {
                let body = self.info_json();
                self.respond(key, 200, "application/json", &body, false, keep_alive);
                return;
            }
            Call::Presence { channel, .. } | Call::PresenceStats { channel }
                if !self.ctx.config.namespaces.of(&channel).presence =>
            {
                let error = ApiError::PresenceDisabled(channel.to_string());
                self.refuse(key, &error, keep_alive);
                return;
            }
            Call::Presence {
                channel,
                cursor,
                limit,
            } if clustered => (
                Ask::Cluster(channel, Question::Presence { cursor, limit }),
                Gathered::Found,
            ),
            Call::Presence {
                channel,
                cursor,
                limit,
            } => {
                let cursor = match cursor.as_deref().map(str::parse).transpose() {
                    Ok(cursor) => cursor,
                    Err(message) => {
                        self.refuse(key, &ApiError::BadRequest(message), keep_alive);
                        return;
                    }
                };
                (
                    Ask::Home(channel, Query::Presence { cursor, limit }),
                    Gathered::Found,
                )
            }
            Call::PresenceStats { channel } if clustered => (
                Ask::Cluster(channel, Question::PresenceStats),
                Gathered::Found,
            ),
            Call::PresenceStats { channel } => {
                (Ask::Home(channel, Query::PresenceStats), Gathered::Found)
            }
            Call::History {
                channel,
                since,
                limit,
                newest_first,
            } if clustered => {
                let question = Question::History {
                    since,
                    limit,
                    newest_first,
                };
                (Ask::Cluster(channel, question), Gathered::Found)
            }
            Call::History {
                channel,
                since,
                limit,
                newest_first,
            } => {
                let query = Query::History {
                    since,
                    limit,
                    newest_first,
                };
                (Ask::Home(channel, query), Gathered::Found)
            }
            Call::Disconnect {
                target,
                code,
                reason,
            } => {
                let key = "disconnected";
                let order = Order::Disconnect {
                    target,
                    code,
                    reason,
                };
                (Ask::Shards(order), Gathered::Count { key, total: 0 })
            }
            Call::Unsubscribe { user, channel } => {
                let key = "unsubscribed";
                let order = Order::Unsubscribe { user, channel };
                (Ask::Shards(order), Gathered::Count { key, total: 0 })
            }
            Call::Channels {
                pattern,
                cursor,
                limit,
            } if clustered => {
                let question = Question::Channels {
                    pattern,
                    cursor,
                    limit,
                };
                (Ask::Cluster("".into(), question), Gathered::Found)
            }
            Call::Channels {
                pattern,
                cursor,
                limit,
            } => {
                let list = Vec::new();
                let order = Order::Channels {
                    pattern,
                    cursor,
                    limit,
                };
                (Ask::Shards(order), Gathered::Channels { limit, list })
            }
        };
        // One connection lives on one shard; every other order goes to every shard.
        let shards: Vec<usize> = match &ask {
            Ask::Home(..) | Ask::Cluster(..) => Vec::new(),
            Ask::Shards(Order::Disconnect {
                target: Target::Conn(id),
                ..
            }) => Some(id.shard as usize)
                .filter(|&shard| shard < self.shards)
                .into_iter()
                .collect(),
            // Another node's: that node acts, through the cluster.
            Ask::Shards(Order::Disconnect {
                target: Target::NodeConn { .. },
                ..
            }) => Vec::new(),
            Ask::Shards(_) => (0..self.shards).collect(),
        };
        // In a cluster, the other nodes' sum of an order by user (or for a connection of
        // another node) is one more part.
        let remote = clustered
            && matches!(
                &ask,
                Ask::Shards(Order::Unsubscribe { .. })
                    | Ask::Shards(Order::Disconnect {
                        target: Target::User(_) | Target::NodeConn { .. },
                        ..
                    })
            );
        let waiting = match ask {
            Ask::Home(..) | Ask::Cluster(..) => 1,
            Ask::Shards(_) => shards.len() + usize::from(remote),
        };
        if waiting == 0 {
            let body = api::count_json("disconnected", 0);
            self.respond(key, 200, "application/json", &body, false, keep_alive);
            return;
        }
        self.set_phase(
            key,
            Phase::Api(Box::new(ApiCall {
                keep_alive,
                waiting,
                gathered,
            })),
        );
        match ask {
            Ask::Home(channel, query) => self.ask_home(channel, conn, None, query),
            Ask::Cluster(channel, question) => {
                if !self.ask_cluster(channel, conn, None, question) {
                    self.unanswered(conn, None, cluster::BUSY);
                }
            }
            Ask::Shards(order) => {
                if remote && let Some(bridge) = &self.ctx.cluster {
                    let (shard, order) = (self.id, order.clone());
                    if bridge
                        .ask(cluster::roster::Ask::Order { shard, conn, order })
                        .is_err()
                    {
                        // Refused: the other nodes are not asked, and count for none.
                        self.send(
                            self.id,
                            Envelope::Done {
                                conn,
                                part: Part::Count(0),
                            },
                        );
                    }
                }
                for shard in shards {
                    let (from, order) = (self.id, order.clone());
                    self.send(shard, Envelope::Order { from, conn, order });
                }
            }
        }
    }

    /// `{"node":..}` for `GET /api/info`: this node, answered at once.
    fn info_json(&self) -> Vec<u8> {
        let snapshot = self.ctx.registry.snapshot(self.now);
        let connections: u64 = snapshot.total.connections.iter().sum();
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"{\"version\":");
        http::push_json_str(&mut out, env!("CARGO_PKG_VERSION"));
        out.extend_from_slice(b",\"epoch\":");
        http::push_json_str(&mut out, &self.ctx.epoch);
        out.extend_from_slice(
            format!(
                ",\"uptime_ms\":{},\"shards\":{},\"connections\":{connections},\"subscriptions\":{},\"channels\":{},\"cluster\":{}}}",
                snapshot.uptime.as_millis(),
                self.shards,
                snapshot.total.subscriptions,
                snapshot.total.channels_homed,
                self.ctx.cluster.is_some(),
            )
            .as_bytes(),
        );
        out
    }

    /// Carries out a server API order on this shard's connections (or the channels homed
    /// here) and sends `from` this shard's part of the answer.
    pub(super) fn carry_out(&mut self, from: usize, conn: ConnRef, order: Order) {
        let part = self.part_of(order);
        self.send(from, Envelope::Done { conn, part });
    }

    /// Carries out an order another node of the cluster sent, and reports this shard's
    /// part to the cluster.
    pub(super) fn carry_out_remote(&mut self, order: u64, body: Order) {
        let part = self.part_of(body);
        if let Some(bridge) = &self.ctx.cluster {
            let done = cluster::roster::Ask::OrderDone { order, part };
            let taken = bridge.ask(done);
            debug_assert!(taken.is_ok(), "a part counts against no bound");
        }
    }

    /// This shard's part of an order, carried out.
    fn part_of(&mut self, order: Order) -> Part {
        match order {
            Order::Disconnect {
                target,
                code,
                reason,
            } => {
                let keys: Vec<usize> = match target {
                    Target::User(user) => self.keys_of(&user),
                    // Never sent to a shard: another node's connection.
                    Target::NodeConn { .. } => Vec::new(),
                    Target::Conn(id) => self
                        .resolve(ConnRef {
                            key: id.key,
                            generation: id.generation,
                        })
                        .filter(|&key| self.is_client(key))
                        .into_iter()
                        .collect(),
                };
                for &key in &keys {
                    if matches!(self.conns[key].phase, Phase::WebSocket(_)) {
                        self.close_with(key, code, &reason);
                    } else {
                        self.finish(key);
                    }
                }
                Part::Count(keys.len() as u64)
            }
            Order::Unsubscribe { user, channel } => {
                let mut count = 0;
                for key in self.keys_of(&user) {
                    if !self.conns[key].subs.iter().any(|s| s.channel == channel) {
                        continue;
                    }
                    count += 1;
                    if matches!(self.conns[key].phase, Phase::WebSocket(_)) {
                        self.unsubscribe(key, &channel, None);
                    } else {
                        // An event stream or a poll is its one channel.
                        self.finish(key);
                    }
                }
                Part::Count(count)
            }
            Order::Channels {
                pattern,
                cursor,
                limit,
            } => Part::Channels(self.channels.list(
                |name| pattern.allows(name),
                cursor.as_deref(),
                limit + 1,
            )),
        }
    }

    /// The part of an order's answer from one shard.
    pub(super) fn done(&mut self, conn: ConnRef, part: Part) {
        if let Some(key) = self.resolve(conn) {
            self.dispatch(key, |transport, _| transport.on_done(part));
        }
    }

    /// Whether `key` is a client the API acts on: a WebSocket, event stream or poll that
    /// is not already closing.
    fn is_client(&self, key: usize) -> bool {
        let conn = &self.conns[key];
        !conn.is_closing()
            && matches!(
                conn.phase,
                Phase::WebSocket(_) | Phase::EventStream(_) | Phase::Polling(_)
            )
    }

    /// This shard's clients whose token's user is `user`. Visits every connection: for
    /// the server API, not the message path.
    fn keys_of(&self, user: &str) -> Vec<usize> {
        self.conns
            .iter()
            .filter(|(_, conn)| {
                conn.identity
                    .as_ref()
                    .is_some_and(|id| id.user.as_deref() == Some(user))
            })
            .map(|(key, _)| key)
            .filter(|&key| self.is_client(key))
            .collect()
    }
}
