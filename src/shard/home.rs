//! The home role: the channels whose name hashes to this shard are ordered here, their
//! history kept, and their subscriptions and replays answered from it. Without `--redis`
//! every publish goes through its channel's home; with it, Redis orders and this role is
//! idle.

use crate::compression::CompressionPolicy;
use crate::hub::{ChannelName, SubscribeOutcome};
use crate::metrics::Stopwatch;

use super::conn::ConnRef;
use super::{Answer, Envelope, Shard};

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
            } => {
                let outcome = self.channels.subscribe(
                    &channel,
                    from,
                    since,
                    epoch_matches,
                    max_replay_bytes,
                    self.now,
                );
                let reply = home_answer(outcome, channel, conn, ticket, id);
                self.send(from, reply);
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
            Envelope::Unsubscribe { channel, from } => self.channels.unsubscribe(&channel, from),
            Envelope::Publish {
                channel,
                data,
                from,
                conn,
                id,
            } => {
                let published = self.channels.publish(&channel, &data, self.now);
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
