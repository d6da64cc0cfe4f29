//! The publisher task: every queued publish ordered by the script in Redis, pipelined in
//! arrival order, and answered `Ack`, `Conflict` (its `expect_seq` did not hold) or
//! `Refused`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use ::redis::aio::MultiplexedConnection;
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::Slot;
use ::redis::{Pipeline, RedisError, RedisResult, Value, from_redis_value};
use futures_util::future::join_all;
use tokio::sync::watch;
use tokio::time::error::Elapsed;
use tokio::time::timeout;

use super::redis::{Publishing, REPLY_TIMEOUT, Shards};
use super::script::{meta_key, pubsub_key, stream_key};
use super::{Link, Queue, Request};
use crate::hub::{self, ChannelName, HistoryPolicy};
use crate::shard::Envelope;

/// Most publishes sent to Redis in one pipelined round trip.
const MAX_BATCH: usize = 512;
/// Longest `WAIT` for replicas (ms): a reply within [`REPLY_TIMEOUT`] either way.
const WAIT_MS: u64 = 1000;
/// Channels in one generation of the publisher's memory ([`Seen`]).
pub(super) const SEEN_PER_GENERATION: usize = 16 * 1024;

/// The publisher task: orders publishes in Redis, pipelined, in arrival order.
pub(super) struct Publisher {
    pub(super) conn: watch::Receiver<Publishing>,
    /// Tells the node task which link failed a publish (the latest such link).
    pub(super) broken: watch::Sender<u64>,
    pub(super) shards: Shards,
    /// Each channel's history size and TTL, by namespace.
    pub(super) history: HistoryPolicy,
    /// Replicas that must hold a publish before its ack (`WAIT`); 0: the master's word.
    pub(super) ack_replicas: u32,
    pub(super) link: Arc<Link>,
    pub(super) seen: Seen,
    /// The ordering script's SHA1 and text.
    pub(super) script: String,
    pub(super) text: String,
}

/// What the ordering script returns: the channel's epoch, the publish's seq, and how
/// many nodes were subscribed; or -1 nodes and the channel's seq when the publish's
/// `expect_seq` did not hold.
type Stored = (String, u64, i64);

/// The link's command connection, as the publisher uses it.
#[derive(Clone)]
pub(super) enum Conn {
    Single(MultiplexedConnection),
    Sharded(ClusterConnection),
}

/// Per channel, the epoch and highest seq this node handed out: a Redis that comes back
/// below it has rolled back. Kept for the channels published to recently only, in two
/// generations of at most `per_generation` channels each: a channel published to again
/// moves to the current one, and one left alone for a whole generation is forgotten
/// (its next publish then relies on the script's own check of a missing meta, and on the
/// nodes that hold the channel, which check on their own).
pub(super) struct Seen {
    current: HashMap<ChannelName, (Box<str>, u64)>,
    previous: HashMap<ChannelName, (Box<str>, u64)>,
    per_generation: usize,
}

impl Seen {
    pub(super) fn new(per_generation: usize) -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
            per_generation,
        }
    }

    fn get(&self, channel: &str) -> Option<&(Box<str>, u64)> {
        self.current
            .get(channel)
            .or_else(|| self.previous.get(channel))
    }

    fn insert(&mut self, channel: ChannelName, epoch: Box<str>, seq: u64) {
        if self.current.len() >= self.per_generation && !self.current.contains_key(&channel) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.previous.remove(&channel);
        self.current.insert(channel, (epoch, seq));
    }
}

impl Publisher {
    pub(super) async fn run(mut self, queue: Arc<Queue>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            queue.recv_many(&mut batch, MAX_BATCH).await;
            self.publish(&mut batch).await;
        }
    }

    async fn publish(&mut self, batch: &mut Vec<Request>) {
        let conn = self.conn.borrow().clone();
        match conn {
            None => self.refuse(
                batch,
                "the cluster's Redis is unreachable; not stored, retry",
            ),
            Some((generation, Conn::Single(mut conn))) => {
                let pipe = self.pipeline(batch);
                let result = timeout(REPLY_TIMEOUT, pipe.query_async(&mut conn)).await;
                self.answer(batch, result, Some(generation));
            }
            Some((_, Conn::Sharded(conn))) => self.publish_sharded(batch, conn).await,
        }
    }

    /// On a Redis Cluster: one pipeline per slot (a pipeline may not cross slots), all
    /// at once, each slot's publishes in arrival order. A slot whose master is down is
    /// refused alone, and never takes the link down: the crate finds the new master.
    async fn publish_sharded(&mut self, batch: &mut Vec<Request>, conn: ClusterConnection) {
        let groups = by_slot(batch);
        let pipes: Vec<Pipeline> = groups.iter().map(|group| self.pipeline(group)).collect();
        let results = join_all(pipes.iter().map(|pipe| {
            let mut conn = conn.clone();
            async move { timeout(REPLY_TIMEOUT, pipe.query_async(&mut conn)).await }
        }))
        .await;
        let mut reload = false;
        for (mut group, result) in groups.into_iter().zip(results) {
            reload |= matches!(&result, Ok(Err(e)) if e.code() == Some("NOSCRIPT"));
            self.answer(&mut group, result, None);
        }
        if reload {
            // A replica promoted since the scripts were loaded: load them on every master
            // (the crate sends SCRIPT LOAD to each); the refused publishes are retried.
            let mut conn = conn;
            let mut load = ::redis::cmd("SCRIPT");
            load.arg("LOAD").arg(&self.text);
            if let Ok(Err(e)) = timeout(REPLY_TIMEOUT, load.query_async::<Value>(&mut conn)).await {
                tracing::warn!(error = %e, "could not load the ordering script");
            }
        }
    }

    /// The ordering script for each publish of `batch`, in order.
    fn pipeline(&self, batch: &[Request]) -> Pipeline {
        let mut pipe = ::redis::pipe();
        for request in batch {
            let Request::Publish {
                channel,
                data,
                expect_seq,
                ..
            } = request
            else {
                unreachable!("only publishes reach the publisher");
            };
            let history = self.history.of(channel);
            // 0: no age limit (a `latest` namespace's state is kept until replaced).
            let ttl_ms = u64::try_from(history.ttl.as_millis())
                .ok()
                .filter(|&ms| ms < u64::MAX / 2)
                .map_or(0, |ms| ms.max(1));
            let expect = expect_seq.map_or(String::new(), |seq| seq.to_string());
            let (epoch, seq) = self.seen.get(channel).map_or(("", 0), |(e, s)| (&**e, *s));
            pipe.cmd("EVALSHA")
                .arg(&self.script)
                .arg(3)
                .arg(meta_key(channel))
                .arg(stream_key(channel))
                .arg(pubsub_key(channel))
                .arg(&data[..])
                .arg(history.size)
                .arg(ttl_ms)
                .arg(hub::new_epoch(SystemTime::now()))
                .arg(epoch)
                .arg(seq)
                .arg(expect);
        }
        if self.ack_replicas > 0 {
            // After the batch on the same connection: waits for every write above.
            pipe.cmd("WAIT").arg(self.ack_replicas).arg(WAIT_MS);
        }
        pipe
    }

    /// Acknowledges what Redis stored, or refuses the batch; a failure on the single
    /// Redis's link (`generation`) takes that link down.
    fn answer(
        &mut self,
        batch: &mut Vec<Request>,
        result: Result<RedisResult<Vec<Value>>, Elapsed>,
        generation: Option<u64>,
    ) {
        let Ok(result) = result else {
            if let Some(generation) = generation {
                self.broken.send_replace(generation);
            }
            self.refuse(batch, "the cluster's Redis did not answer in time; retry");
            return;
        };
        match result {
            Ok(mut replies) => {
                if self.ack_replicas > 0 {
                    let copies = replies.pop().and_then(|v| from_redis_value::<u32>(v).ok());
                    if copies.is_none_or(|n| n < self.ack_replicas) {
                        // Stored and announced, not yet safe from a failover: refused
                        // like a publish whose reply was lost.
                        self.refuse(
                            batch,
                            "the cluster's Redis replicas did not confirm it in time; retry",
                        );
                        return;
                    }
                }
                for (request, reply) in batch.drain(..).zip(replies) {
                    let Request::Publish {
                        channel,
                        shard,
                        conn,
                        id,
                        expect_seq,
                        ..
                    } = request
                    else {
                        unreachable!("only publishes reach the publisher");
                    };
                    let Ok((epoch, seq, nodes)) = from_redis_value::<Stored>(reply) else {
                        Link::count(&self.link.publish_failures);
                        let message = "the cluster's Redis answered oddly; retry".into();
                        self.shards
                            .send(shard, Envelope::Refused { conn, id, message });
                        continue;
                    };
                    if nodes < 0 && expect_seq.is_some() {
                        let conflict = Envelope::Conflict {
                            conn,
                            id,
                            channel,
                            seq,
                        };
                        self.shards.send(shard, conflict);
                        continue;
                    }
                    Link::count(&self.link.publishes);
                    self.seen.insert(channel, epoch.into(), seq);
                    self.shards.send(
                        shard,
                        Envelope::Ack {
                            conn,
                            seq,
                            subscribers: u32::try_from(nodes).unwrap_or(u32::MAX),
                            id,
                        },
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "redis refused a publish batch");
                if let Some(generation) = generation
                    && link_is_broken(&e)
                {
                    self.broken.send_replace(generation);
                }
                self.refuse(batch, "the cluster's Redis could not store it; retry");
            }
        }
    }

    fn refuse(&self, batch: &mut Vec<Request>, message: &str) {
        for request in batch.drain(..) {
            if let Request::Publish {
                shard, conn, id, ..
            } = request
            {
                Link::count(&self.link.publish_failures);
                self.shards.send(
                    shard,
                    Envelope::Refused {
                        conn,
                        id,
                        message: message.into(),
                    },
                );
            }
        }
    }
}

/// The publishes of `batch` grouped by their channel's slot, in arrival order within
/// each group.
fn by_slot(batch: &mut Vec<Request>) -> Vec<Vec<Request>> {
    let mut slots: HashMap<Slot, usize> = HashMap::new();
    let mut groups: Vec<Vec<Request>> = Vec::new();
    for request in batch.drain(..) {
        let Request::Publish { channel, .. } = &request else {
            unreachable!("only publishes reach the publisher");
        };
        let slot = Slot::for_key(meta_key(channel));
        let group = *slots.entry(slot).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[group].push(request);
    }
    groups
}

/// Errors after which the connection cannot be trusted any more.
pub(super) fn link_is_broken(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || e.code() == Some("NOSCRIPT")
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::shard::ConnRef;

    fn publish(channel: &str, id: u64) -> Request {
        Request::Publish {
            channel: channel.into(),
            data: Bytes::from_static(b"1"),
            expect_seq: None,
            shard: 0,
            conn: ConnRef {
                key: 0,
                generation: 0,
            },
            id: Some(id),
        }
    }

    #[test]
    fn a_batch_splits_by_slot_in_arrival_order() {
        // Three channels in three slots: each channel's publishes share a group, in order.
        let mut batch = vec![
            publish("news", 1),
            publish("sport", 2),
            publish("news", 3),
            publish("}odd", 4),
            publish("sport", 5),
        ];
        let groups = by_slot(&mut batch);
        assert!(batch.is_empty());
        let ids: Vec<Vec<u64>> = groups
            .iter()
            .map(|group| {
                group
                    .iter()
                    .map(|r| match r {
                        Request::Publish { id, .. } => id.expect("id"),
                        _ => unreachable!(),
                    })
                    .collect()
            })
            .collect();
        assert_eq!(ids, [vec![1, 3], vec![2, 5], vec![4]]);
    }

    #[test]
    fn the_publishers_memory_keeps_recent_channels_and_is_bounded() {
        let mut seen = Seen::new(3);
        for (i, channel) in ["a", "b", "c"].into_iter().enumerate() {
            seen.insert(channel.into(), "e".into(), i as u64 + 1);
        }
        // Published to again: kept through the next turnover, with its latest seq.
        seen.insert("a".into(), "e".into(), 10);
        seen.insert("d".into(), "e".into(), 1);
        assert_eq!(seen.get("a"), Some(&("e".into(), 10)));
        seen.insert("a".into(), "e".into(), 11);
        for i in 0..10_000 {
            seen.insert(format!("x{i}").into(), "e".into(), 1);
            assert!(seen.current.len() + seen.previous.len() <= 6);
        }
        assert_eq!(
            seen.get("a"),
            None,
            "left alone for a generation: forgotten"
        );
        assert!(seen.get("x9999").is_some());
    }
}
