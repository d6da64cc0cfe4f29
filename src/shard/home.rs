//! The home role: the channels whose name hashes to this shard are ordered here, their
//! history and members kept, and their subscriptions, replays and queries answered from
//! it. Without `--redis` every publish goes through its channel's home; with it, Redis
//! orders and this role is idle.
//!
//! Joins and leaves go out from here like broadcasts, so each subscriber sees them in
//! their place among the channel's messages.

use bytes::Bytes;

use crate::compression::CompressionPolicy;
use crate::http::api;
use crate::hub::presence::{self, ConnId, Member};
use crate::hub::{ChannelName, Conflict, SubscribeOutcome};
use crate::metrics::Stopwatch;
use crate::proto::pubsub;

use super::conn::ConnRef;
use super::{Answer, Envelope, Query, Shard};

/// The node-wide name of connection `conn` of shard `shard`.
fn conn_id(shard: usize, conn: ConnRef) -> ConnId {
    ConnId {
        shard: shard as u32,
        key: conn.key,
        generation: conn.generation,
    }
}

impl Shard {
    /// Serves a request for a channel homed here: orders its publishes, keeps its
    /// history and answers subscriptions and replays from it.
    pub(super) fn serve_as_home(&mut self, envelope: Envelope) {
        match envelope {
            Envelope::Subscribe {
                channel,
                from,
                conn,
                ticket,
                since,
                epoch_matches,
                id,
                max_replay_bytes,
                member,
            } => {
                let outcome = self.channels.subscribe(
                    &channel,
                    from,
                    since,
                    epoch_matches,
                    max_replay_bytes,
                    self.now,
                );
                let subscribed = matches!(outcome, SubscribeOutcome::Subscribed { .. });
                let reply = home_answer(outcome, channel.clone(), conn, ticket, id);
                self.send(from, reply);
                if let Some(member) = member.filter(|_| subscribed) {
                    let conn = conn_id(from, conn);
                    if self.channels.join(&channel, conn, member.clone()) {
                        self.announce("join", &channel, conn, &member);
                    }
                }
            }
            Envelope::Replay {
                channel,
                from,
                conn,
                ticket,
                since,
                id,
                max_bytes,
            } => {
                let outcome = self.channels.replay(&channel, since, max_bytes, self.now);
                let reply = home_answer(outcome, channel, conn, ticket, id);
                self.send(from, reply);
            }
            Envelope::Unsubscribe {
                channel,
                from,
                conn,
            } => {
                let conn = conn_id(from, conn);
                let left = self.channels.leave(&channel, conn);
                self.channels.unsubscribe(&channel, from);
                if let Some(member) = left {
                    self.announce("leave", &channel, conn, &member);
                }
            }
            Envelope::Query {
                channel,
                from,
                conn,
                id,
                query,
            } => {
                // An answer stays within half the asker's outbound budget, as a replay
                // chunk does: it is queued like one.
                let max_bytes = self.ctx.config.outbound_queue_bytes / 2;
                let members = self.channels.presence(&channel);
                let json = match query {
                    Query::Presence { cursor, limit } => {
                        presence::page_json(&channel, members, cursor, (limit, max_bytes))
                    }
                    Query::PresenceStats => presence::stats_json(&channel, members),
                    Query::History {
                        since,
                        limit,
                        newest_first,
                    } => {
                        let (seq, oldest, frames) = self.channels.history(
                            &channel,
                            since,
                            (limit, newest_first),
                            max_bytes,
                            self.now,
                        );
                        api::history_json(&channel, &self.ctx.epoch, (seq, oldest), &frames)
                    }
                };
                let json = Bytes::from(json);
                self.send(from, Envelope::Found { conn, id, json });
            }
            Envelope::Publish {
                channel,
                data,
                publisher,
                expect_seq,
                from,
                conn,
                id,
            } => {
                let publisher = publisher.as_deref();
                let published = match self
                    .channels
                    .publish_from(&channel, publisher, &data, expect_seq, self.now)
                {
                    Ok(published) => published,
                    Err(Conflict { seq }) => {
                        let envelope = Envelope::Conflict {
                            conn,
                            id,
                            channel,
                            seq,
                        };
                        self.send(from, envelope);
                        return;
                    }
                };
                let (mut broadcast, subscribers) = (published.broadcast, published.subscribers);
                let targets: Vec<usize> = (0..published.shards.len())
                    .filter(|&s| published.shards[s] > 0)
                    .collect();
                self.counters.publishes_total += 1;
                if self.ctx.config.compression.policy_for(&channel) == CompressionPolicy::Shared {
                    let stopwatch = Stopwatch::start();
                    broadcast.compress_shared(&mut self.shared_compressor);
                    self.counters.deflate_ns_total += stopwatch.elapsed_ns();
                }
                let seq = broadcast.seq;
                for shard in targets {
                    self.send(shard, Envelope::Broadcast(broadcast.clone()));
                }
                self.send(
                    from,
                    Envelope::Ack {
                        conn,
                        seq,
                        subscribers,
                        id,
                    },
                );
            }
            _ => unreachable!("only requests to a home come here"),
        }
    }

    /// Sends a `join` or `leave` of `conn` to the shards with subscribers of `channel`,
    /// where its namespace asks for them.
    fn announce(&mut self, kind: &str, channel: &ChannelName, conn: ConnId, member: &Member) {
        if !self.ctx.config.namespaces.of(channel).join_leave {
            return;
        }
        let Some(subscribers) = self.channels.subscribers(channel) else {
            return;
        };
        let targets: Vec<usize> = (0..subscribers.len())
            .filter(|&s| subscribers[s] > 0)
            .collect();
        let frame = pubsub::encode_presence_event(
            kind,
            channel,
            &conn.to_string(),
            member.user.as_deref(),
            member.info.as_deref(),
        );
        for shard in targets {
            let (channel, frame) = (channel.clone(), frame.clone());
            self.send(shard, Envelope::Event { channel, frame });
        }
    }
}

/// The envelope a home answers a subscription (or one of its replay chunks) with.
pub(super) fn home_answer(
    outcome: SubscribeOutcome,
    channel: ChannelName,
    conn: ConnRef,
    ticket: u32,
    id: Option<u64>,
) -> Envelope {
    let answer = |seq| Answer {
        channel,
        conn,
        ticket,
        seq,
        id,
        epoch: None,
    };
    match outcome {
        SubscribeOutcome::Subscribed { seq, replay } => Envelope::Subscribed {
            answer: answer(seq),
            replay,
        },
        SubscribeOutcome::HistoryGap { seq, oldest } => Envelope::HistoryGap {
            answer: answer(seq),
            oldest,
        },
    }
}
