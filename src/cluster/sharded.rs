//! The link to a Redis Cluster (`--redis redis+cluster://HOST:PORT,...`): one cluster
//! connection (the `redis` crate's: it reads the slot map, sends each command to the
//! master that owns its key's slot, follows `MOVED`/`ASK`, refreshes the map and
//! reconnects), announcements by sharded pub/sub (`SPUBLISH` in the ordering script,
//! `SSUBSCRIBE` routed to the owner of the channel's slot), and what Redis pushes back,
//! fed to the node:
//! - `smessage`: an announcement;
//! - `ssubscribe`: a subscription confirmed, ours or the crate's own after a reconnect
//!   or a new slot map: the channel catches up from its stream;
//! - `sunsubscribe`: the server dropped the subscription (the slot moved away, or we
//!   left): the channel, if still held, is subscribed again and caught up;
//! - a disconnection (the crate's own push): every held channel is subscribed again and
//!   caught up (see [`Sharded::handle_push`]); so is every channel, on a new
//!   connection, when a master does not answer the probe ([`Sharded::probe`]).
//!
//! A channel's keys share the hash tag `{CHANNEL}`, so the script's three keys sit in
//! one slot and a channel's publishes, history and announcements live on one shard.

use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use ::redis::{ProtocolVersion, PushInfo, PushKind, RedisResult, Value};
use tokio::time::timeout;

use super::Link;
use super::inflow::{Inflow, inflow};
use super::node::Node;
use super::redis::REPLY_TIMEOUT;
use super::roster::{CONTROL, Fed, Feed};
use super::script::{META_SCRIPT, channel_of, publish_script};

/// The URL's seed nodes, when it names a Redis Cluster.
pub(super) fn seeds(url: &str) -> Option<Vec<String>> {
    let list = url.strip_prefix("redis+cluster://")?;
    Some(
        list.split(',')
            .map(str::trim)
            .filter(|seed| !seed.is_empty())
            .map(|seed| format!("redis://{seed}"))
            .collect(),
    )
}

/// The cluster side of the link.
pub(super) struct Sharded {
    client: ClusterClient,
    conn: Option<ClusterConnection>,
    pushes: Inflow,
}

impl Sharded {
    /// Checks the seeds; nothing connects until [`Sharded::open`].
    /// Pushes read ahead hold at most `buffer_bytes` (see `inflow.rs`).
    pub(super) fn new(seeds: Vec<String>, buffer_bytes: usize) -> Result<Self, String> {
        if seeds.is_empty() {
            return Err("redis+cluster:// needs at least one HOST:PORT".into());
        }
        let (sender, pushes) = inflow(buffer_bytes);
        let client = ClusterClient::builder(seeds.clone())
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(move |push: PushInfo| {
                sender.push(push);
                Ok::<(), ()>(())
            })
            .connection_timeout(REPLY_TIMEOUT)
            .response_timeout(REPLY_TIMEOUT)
            // Our own retries (the node's, the clients') come after a refusal; the
            // crate's would only hold the reply past REPLY_TIMEOUT.
            .retries(2)
            .build()
            .map_err(|e| format!("redis cluster {seeds:?}: {e}"))?;
        Ok(Self {
            client,
            conn: None,
            pushes,
        })
    }

    pub(super) fn conn(&self) -> Option<ClusterConnection> {
        self.conn.clone()
    }

    /// Connects (reading the slot map from a seed) and loads the scripts on every master.
    pub(super) async fn open(&mut self) -> RedisResult<ClusterConnection> {
        let mut conn = self.client.get_async_connection().await?;
        for script in [publish_script(true), META_SCRIPT.to_string()] {
            // The crate sends SCRIPT LOAD to every master.
            let _: Value = ::redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(script)
                .query_async(&mut conn)
                .await?;
        }
        // Orders between nodes arrive on a sharded channel of their own.
        conn.ssubscribe(CONTROL).await?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    pub(super) fn close(&mut self) {
        self.conn = None;
    }

    /// The next push (`None`: pushes were dropped), never ready while not connected.
    pub(super) async fn next_push(&mut self) -> Option<PushInfo> {
        if self.conn.is_none() {
            return std::future::pending().await;
        }
        self.pushes.next().await
    }

    /// Pings every master serving slots (as `CLUSTER NODES` on one of them lists them)
    /// and records how many answered in `link`. One that does not answer in time (hung,
    /// or dead without its socket closing) sends no `smessage` either, and the crate,
    /// which refreshes its slot map on errors it gets back, never gets one from it: a new
    /// connection is made, with the slot map as the masters that answer see it (their
    /// replica promoted, once it is), and every channel subscribes again on it and
    /// catches up. Returns the new connection, for the publisher.
    pub(super) async fn probe(
        &mut self,
        node: &mut Node,
        link: &Link,
    ) -> Option<ClusterConnection> {
        let mut conn = self.conn()?;
        if let Some((known, answering)) = answering_masters(&mut conn).await {
            link.set_masters(known, answering);
            if answering == known {
                return None;
            }
        }
        tracing::warn!("a redis master did not answer in time; connecting anew");
        let fresh = timeout(REPLY_TIMEOUT * 2, self.client.get_async_connection()).await;
        let Ok(Ok(conn)) = fresh else {
            return None;
        };
        if let Err(e) = conn.clone().ssubscribe(CONTROL).await {
            tracing::warn!(error = %e, "orders between nodes not subscribed");
        }
        self.conn = Some(conn.clone());
        start_over(node);
        Some(conn)
    }

    /// Hands one push to the node.
    pub(super) fn handle_push(&self, push: PushInfo, node: &mut Node, feed: &Feed) {
        if push.kind == PushKind::Disconnection {
            // A node's connection closed, and the push does not say which. The crate
            // reconnects to that address only, and would wait forever for a master
            // that died: subscribing every channel again sends the dead master's
            // channels to the crate's slot map, which it refreshes once they fail, and
            // catches every channel up from its stream.
            start_over(node);
            return;
        }
        let mut data = push.data.into_iter();
        let Some(Some(key)) = data.next().map(|v| text(&v)) else {
            return;
        };
        if key == CONTROL {
            if push.kind == PushKind::SMessage
                && let Some(Value::BulkString(payload)) = data.next()
            {
                let _ = feed.try_send(Fed::Control(payload.into()));
            }
            return;
        }
        let Some(channel) = channel_of(&key) else {
            return;
        };
        match push.kind {
            PushKind::SMessage => {
                if let Some(Value::BulkString(payload)) = data.next() {
                    node.handle_announcement(channel, payload.into());
                }
            }
            PushKind::SSubscribe => node.handle_resubscribed(channel),
            PushKind::SUnsubscribe => node.handle_channel_lost(channel),
            _ => {}
        }
    }
}

/// The masters serving slots and how many answer a `PING` within [`REPLY_TIMEOUT`];
/// `None` when the master asked for the list did not give it in time.
async fn answering_masters(conn: &mut ClusterConnection) -> Option<(u64, u64)> {
    let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
    let mut cluster_nodes = ::redis::cmd("CLUSTER");
    cluster_nodes.arg("NODES");
    let nodes = conn.route_command(cluster_nodes, routing);
    let masters = match timeout(REPLY_TIMEOUT, nodes).await {
        Ok(Ok(Value::BulkString(bytes))) => masters_serving_slots(&String::from_utf8_lossy(&bytes)),
        Ok(Ok(Value::VerbatimString { text, .. } | Value::SimpleString(text))) => {
            masters_serving_slots(&text)
        }
        _ => return None,
    };
    let pings = masters.into_iter().map(|(host, port)| {
        let mut conn = conn.clone();
        async move {
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
            let ping = conn.route_command(::redis::cmd("PING"), routing);
            matches!(timeout(REPLY_TIMEOUT, ping).await, Ok(Ok(_)))
        }
    });
    let answers = futures_util::future::join_all(pings).await;
    let answering = answers.iter().filter(|answered| **answered).count();
    Some((answers.len() as u64, answering as u64))
}

/// The addresses of the masters that serve slots, from `CLUSTER NODES` (`ID HOST:PORT@BUS
/// FLAGS MASTER PING PONG EPOCH STATE SLOT...`): a failed master whose slots its replica
/// took over serves none and is left out.
fn masters_serving_slots(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let is_master = fields.get(2)?.split(',').any(|flag| flag == "master");
            if !is_master || fields.len() <= 8 {
                return None;
            }
            let address = fields[1].split('@').next()?;
            let (host, port) = address.rsplit_once(':')?;
            Some((host.to_string(), port.parse().ok()?))
        })
        .collect()
}

/// Every held channel subscribed again and caught up from its stream.
pub(super) fn start_over(node: &mut Node) {
    let held: Vec<_> = node.channels().cloned().collect();
    for channel in held {
        node.handle_channel_lost(&channel);
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use std::sync::Arc;

    use super::*;
    use crate::cluster::node::{Action, Command, Reply};
    use crate::cluster::roster;
    use crate::cluster::{Link, Request};
    use crate::shard::ConnRef;

    #[test]
    fn the_masters_serving_slots_are_read_from_cluster_nodes() {
        let nodes = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master - 0 1 2 connected 5461-10922
c3 127.0.0.1:7002@17002 master,fail - 1 1 3 connected 10923-16383
d4 127.0.0.1:7003@17003 slave a1 0 1 1 connected
e5 127.0.0.1:7004@17004 master,fail - 1 1 5 disconnected
";
        assert_eq!(
            masters_serving_slots(nodes),
            [7000, 7001, 7002].map(|port| ("127.0.0.1".to_string(), port))
        );
    }

    fn push(kind: PushKind, data: &[&[u8]]) -> PushInfo {
        PushInfo {
            kind,
            data: data.iter().map(|d| Value::BulkString(d.to_vec())).collect(),
        }
    }

    /// What the node asks for next, as text.
    fn next(node: &mut Node) -> Option<String> {
        node.poll_action().map(|action| match action {
            Action::Command(command) => format!("{command:?}"),
            Action::Broadcast { seq, .. } => format!("broadcast {seq}"),
            Action::Send { .. } => "send".into(),
            Action::Event { .. } => "event".into(),
        })
    }

    /// A node holding `news`, live at seq 1.
    fn live_node() -> Node {
        let mut node = Node::new(1, 8, Arc::new(Link::default()));
        node.handle_link_up();
        node.handle_request(Request::Subscribe {
            channel: "news".into(),
            shard: 0,
            conn: ConnRef {
                key: 1,
                generation: 1,
            },
            ticket: 1,
            since: None,
            epoch: None,
            id: None,
            max_replay_bytes: 0,
        });
        assert_eq!(
            next(&mut node),
            Some(format!("{:?}", Command::Subscribe(vec!["news".into()])))
        );
        node.handle_reply(Reply::Done);
        assert!(next(&mut node).is_some_and(|c| c.starts_with("ReadMeta")));
        node.handle_reply(Reply::Meta {
            epoch: "e".into(),
            seq: 1,
        });
        assert_eq!(next(&mut node).as_deref(), Some("send"));
        assert_eq!(next(&mut node), None);
        node
    }

    #[test]
    fn pushes_become_announcements_resubscriptions_and_catch_ups() {
        let sharded = Sharded::new(vec!["redis://127.0.0.1:1".into()], 1 << 20).unwrap();
        let (feed, mut fed) = roster::feed();
        let mut node = live_node();
        let message = push(PushKind::SMessage, &[b"herald:{news}", b"2 e {\"a\":1}"]);
        sharded.handle_push(message, &mut node, &feed);
        assert_eq!(next(&mut node).as_deref(), Some("broadcast 2"));
        sharded.handle_push(
            push(PushKind::SMessage, &[b"other", b"3 e 1"]),
            &mut node,
            &feed,
        );
        assert_eq!(next(&mut node), None, "not a herald key");
        // The slot moved: subscribe again, then catch up.
        sharded.handle_push(
            push(PushKind::SUnsubscribe, &[b"herald:{news}"]),
            &mut node,
            &feed,
        );
        let subscribe = format!("{:?}", Command::Subscribe(vec!["news".into()]));
        assert_eq!(next(&mut node), Some(subscribe.clone()));
        node.handle_reply(Reply::Done);
        assert!(next(&mut node).is_some_and(|c| c.starts_with("ReadMeta")));
        node.handle_reply(Reply::Meta {
            epoch: "e".into(),
            seq: 2,
        });
        assert_eq!(next(&mut node), None);
        // A connection lost somewhere: every channel subscribes again.
        sharded.handle_push(
            PushInfo {
                kind: PushKind::Disconnection,
                data: Vec::new(),
            },
            &mut node,
            &feed,
        );
        assert_eq!(next(&mut node), Some(subscribe));
        node.handle_reply(Reply::Done);
        assert!(next(&mut node).is_some_and(|c| c.starts_with("ReadMeta")));
        node.handle_reply(Reply::Meta {
            epoch: "e".into(),
            seq: 3,
        });
        let read = next(&mut node).unwrap();
        assert!(read.starts_with("ReadStream"), "{read}");
        node.handle_reply(Reply::Entries(vec![(3, Bytes::from_static(b"[3]"))]));
        assert_eq!(next(&mut node).as_deref(), Some("broadcast 3"));
        // The crate resubscribed on its own: catch up.
        sharded.handle_push(
            push(PushKind::SSubscribe, &[b"herald:{news}"]),
            &mut node,
            &feed,
        );
        assert!(next(&mut node).is_some_and(|c| c.starts_with("ReadMeta")));
        // An order between nodes goes to the roster, not the node.
        let order = push(PushKind::SMessage, &[CONTROL.as_bytes(), b"{}"]);
        sharded.handle_push(order, &mut node, &feed);
        assert!(matches!(fed.try_recv(), Ok(Fed::Control(payload)) if &payload[..] == b"{}"));
    }

    #[test]
    fn cluster_urls_name_their_seeds() {
        assert_eq!(
            seeds("redis+cluster://10.0.0.1:7000, 10.0.0.2:7001,"),
            Some(vec![
                "redis://10.0.0.1:7000".to_string(),
                "redis://10.0.0.2:7001".to_string()
            ])
        );
        assert_eq!(seeds("redis://10.0.0.1:6379"), None);
        assert!(Sharded::new(Vec::new(), 1 << 20).is_err());
    }
}
