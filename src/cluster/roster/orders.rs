//! Orders between nodes: `disconnect` and `unsubscribe` by user (or a connection of a
//! named node) sent over the control channel, carried out by every other node on its
//! shards, and their counts gathered back into one part of the asking request.

use ::redis::Value;

use super::{Asked, CONTROL, Carrying, Conn, Control, ORDER_TIMEOUT, Roster, query};
use crate::cluster::presence::{self, cluster_conn};
use crate::http::api;
use crate::shard::{ConnRef, Envelope, Order, Part};

impl Roster {
    /// Sends `order` to the other live nodes and waits for their counts (at most
    /// [`ORDER_TIMEOUT`]); the asking shard gets their sum as one part.
    pub(super) async fn send_order(&mut self, shard: usize, conn: ConnRef, order: Order) {
        let done = |count| Envelope::Done {
            conn,
            part: Part::Count(count),
        };
        let Some(link) = self.link() else {
            self.shards.send(shard, done(0));
            return;
        };
        let others = match self.live_nodes(&link).await {
            Ok(nodes) => nodes.iter().filter(|n| **n != *self.node).count(),
            Err(_) => 0,
        };
        if others == 0 {
            self.shards.send(shard, done(0));
            return;
        }
        self.next_order += 1;
        let id = self.next_order;
        let from = self.node.to_string();
        let control = match order {
            Order::Disconnect {
                target,
                code,
                reason,
            } => {
                let (user, conn) = match target {
                    api::Target::User(user) => (Some(user.to_string()), None),
                    api::Target::NodeConn { node, conn } => {
                        (None, Some(cluster_conn(&node, &conn.to_string())))
                    }
                    api::Target::Conn(_) => (None, None),
                };
                Control::Disconnect {
                    from,
                    order: id,
                    user,
                    conn,
                    code,
                    reason: reason.to_string(),
                }
            }
            Order::Unsubscribe { user, channel } => Control::Unsubscribe {
                from,
                order: id,
                user: user.to_string(),
                channel: channel.to_string(),
            },
            _ => {
                self.shards.send(shard, done(0));
                return;
            }
        };
        self.asked.insert(
            id,
            Asked {
                shard,
                conn,
                waiting: others,
                count: 0,
            },
        );
        self.publish_control(&control).await;
        let timeouts = self.timeouts.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ORDER_TIMEOUT).await;
            let _ = timeouts.send(id);
        });
    }

    pub(super) fn order_timed_out(&mut self, order: u64) {
        if let Some(asked) = self.asked.remove(&order) {
            let part = Part::Count(asked.count);
            self.shards.send(
                asked.shard,
                Envelope::Done {
                    conn: asked.conn,
                    part,
                },
            );
        }
    }

    pub(super) async fn publish_control(&self, control: &Control) {
        let Some(link) = self.link() else {
            return;
        };
        let payload = serde_json::to_string(control).expect("plain JSON");
        let mut cmd = ::redis::cmd(if matches!(link, Conn::Sharded(_)) {
            "SPUBLISH"
        } else {
            "PUBLISH"
        });
        cmd.arg(CONTROL).arg(payload);
        if let Err(e) = query::<Value>(&link, &cmd).await {
            tracing::warn!(error = %e, "order not sent to the other nodes");
        }
    }

    /// A message on the control channel: an order from another node, carried out on
    /// every shard here, or another node's count for an order of this one.
    pub(super) async fn control(&mut self, payload: &[u8]) {
        let Ok(control) = serde_json::from_slice::<Control>(payload) else {
            tracing::warn!("ignoring a malformed control message");
            return;
        };
        let (from, order, body) = match control {
            Control::Done { to, order, count } => {
                if *to != *self.node {
                    return;
                }
                if let Some(asked) = self.asked.get_mut(&order) {
                    asked.count += count;
                    // A node that registered after the order was sent may answer too.
                    asked.waiting = asked.waiting.saturating_sub(1);
                    if asked.waiting == 0 {
                        self.order_timed_out(order);
                    }
                }
                return;
            }
            Control::Disconnect {
                from,
                order,
                user,
                conn,
                code,
                reason,
            } => {
                if *from == *self.node {
                    return;
                }
                let target = match (user, conn.as_deref().map(presence::parse_cursor)) {
                    (Some(user), None) => api::Target::User(user.into()),
                    (None, Some(Ok((node, id)))) => match id.parse() {
                        Ok(id) if node == &*self.node => api::Target::Conn(id),
                        // Another node's connection, or nothing: this node counts none.
                        _ => {
                            let done = Control::Done {
                                to: from,
                                order,
                                count: 0,
                            };
                            self.publish_control(&done).await;
                            return;
                        }
                    },
                    _ => {
                        tracing::warn!("ignoring a disconnect order with no target");
                        return;
                    }
                };
                let order_body = Order::Disconnect {
                    target,
                    code,
                    reason: reason.into(),
                };
                (from, order, order_body)
            }
            Control::Unsubscribe {
                from,
                order,
                user,
                channel,
            } => (
                from,
                order,
                Order::Unsubscribe {
                    user: user.into(),
                    channel: channel.into(),
                },
            ),
        };
        if *from == *self.node {
            return;
        }
        // Local numbers for orders from elsewhere, apart from this node's own.
        self.next_order += 1;
        let local = self.next_order;
        let shards: Vec<usize> = match &body {
            Order::Disconnect {
                target: api::Target::Conn(id),
                ..
            } => Some(id.shard as usize)
                .filter(|&shard| shard < self.shards.count())
                .into_iter()
                .collect(),
            _ => (0..self.shards.count()).collect(),
        };
        if shards.is_empty() {
            let done = Control::Done {
                to: from,
                order,
                count: 0,
            };
            self.publish_control(&done).await;
            return;
        }
        self.carrying.insert(
            local,
            Carrying {
                from,
                order,
                waiting: shards.len(),
                count: 0,
            },
        );
        for shard in shards {
            let body = body.clone();
            self.shards
                .send(shard, Envelope::RemoteOrder { order: local, body });
        }
    }
}
