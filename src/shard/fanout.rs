//! The fan-out hot loop: a broadcast queued on every local subscriber (one shared frame,
//! one event for every event stream), and shedding for the slow consumers it finds.

use bytes::Bytes;

use crate::compression::CompressionPolicy;
use crate::http::sse;
use crate::hub::Broadcast;
use crate::limits::SlowConsumerPolicy;
use crate::metrics::Stopwatch;
use crate::proto::deflate::CompressorSettings;
use crate::proto::frame::server_frame_payload;
use crate::proto::pubsub;

use super::Shard;
use super::conn::{Phase, SubState};
use super::event_stream::json_string;

impl Shard {
    /// Queues the broadcast on every local subscriber: the shared frame for WebSockets,
    /// one event built here once for all event streams, an answer for parked polls.
    /// Subscribers whose outbox is over budget are slow consumers: they are closed with
    /// 4008 and recover with `since`.
    pub(super) fn deliver(&mut self, broadcast: &Broadcast) {
        let budget = self.ctx.config.outbound_queue_bytes;
        let Some(subscribers) = self.subscriptions.get(&broadcast.channel) else {
            return;
        };
        let (tag, policy, seq) = (subscribers.tag, subscribers.policy, broadcast.seq);
        let compression = self.ctx.config.compression.policy_for(&broadcast.channel);
        let mut plain_payload: Option<Bytes> = None;
        let mut slow = Vec::new();
        let mut polls = Vec::new();
        let mut event: Option<Bytes> = None;
        for key in subscribers.conns() {
            let conn = &mut self.conns[key];
            match &mut conn.phase {
                Phase::WebSocket(socket) => {
                    let ws = &mut socket.ws;
                    let shared = broadcast.deflated.as_ref().filter(|_| {
                        ws.accepts_frames_compressed_with(CompressorSettings::SHARED.window_bits)
                    });
                    let frame = if let Some(deflated) = shared {
                        self.counters
                            .count_compressed(broadcast.frame.len(), deflated.len(), 0);
                        deflated.clone()
                    } else if compression == CompressionPolicy::PerConnection && ws.compresses()
                        || compression == CompressionPolicy::Shared && ws.takes_over_context()
                    {
                        // A compressor that keeps its window must see every compressed
                        // message this connection gets, shared channels' included.
                        let stopwatch = Stopwatch::start();
                        let payload = plain_payload
                            .get_or_insert_with(|| server_frame_payload(&broadcast.frame));
                        let frame = ws
                            .encode_compressed(true, payload)
                            .expect("deflate was negotiated");
                        self.counters.count_compressed(
                            broadcast.frame.len(),
                            frame.len(),
                            stopwatch.elapsed_ns(),
                        );
                        frame
                    } else {
                        broadcast.frame.clone()
                    };
                    conn.outbox.push_message(frame, tag, seq);
                }
                Phase::EventStream(_) => {
                    let event = event.get_or_insert_with(|| sse::event(seq, &broadcast.frame));
                    conn.outbox.push_message(event.clone(), tag, seq);
                }
                Phase::Polling(_) => {
                    polls.push(key);
                    continue;
                }
                _ => continue,
            }
            self.counters.deliveries_total += 1;
            self.counters.messages_out_total += 1;
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(key);
            }
            let queued = conn.outbox.len_bytes();
            if queued as u64 > self.counters.outbound_queue_peak_bytes {
                self.counters.outbound_queue_peak_bytes = queued as u64;
            }
            if queued > budget {
                slow.push(key);
            }
        }
        self.delivered_this_turn.push(broadcast.published_at);
        for key in polls {
            let Phase::Polling(poll) = &self.conns[key].phase else {
                continue;
            };
            let action = poll.answer_broadcast(broadcast, &self.ctx.epoch);
            self.counters.deliveries_total += 1;
            self.apply(key, action);
        }
        for key in slow {
            self.shed(key, tag, policy);
        }
    }

    /// Queues a join or leave on this shard's WebSocket subscribers of `channel`; like a
    /// broadcast it counts against their outbound budget.
    pub(super) fn deliver_event(&mut self, channel: &str, frame: Bytes) {
        let budget = self.ctx.config.outbound_queue_bytes;
        let Some(subscribers) = self.subscriptions.get(channel) else {
            return;
        };
        let (tag, policy) = (subscribers.tag, subscribers.policy);
        let mut slow = Vec::new();
        for key in subscribers.conns() {
            let conn = &mut self.conns[key];
            if !matches!(conn.phase, Phase::WebSocket(_)) || conn.is_closing() {
                continue;
            }
            conn.outbox.push(frame.clone());
            self.counters.messages_out_total += 1;
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(key);
            }
            if conn.outbox.len_bytes() > budget {
                slow.push(key);
            }
        }
        for key in slow {
            self.shed(key, tag, policy);
        }
    }

    /// Brings a slow subscriber's queue back within budget as its channel's policy says,
    /// announcing what was shed; disconnects it when shedding is not enough.
    pub(super) fn shed(&mut self, key: usize, tag: u32, policy: SlowConsumerPolicy) {
        let budget = self.ctx.config.outbound_queue_bytes;
        let conn = &mut self.conns[key];
        // Frames from a compressor that keeps its window cannot be dropped or replaced:
        // the client's window would no longer match. Such a subscriber is disconnected
        // and recovers with `since`.
        let policy = match &conn.phase {
            Phase::WebSocket(socket) if socket.ws.takes_over_context() => {
                SlowConsumerPolicy::Disconnect
            }
            _ => policy,
        };
        let outbox = &mut conn.outbox;
        let shed = match policy {
            SlowConsumerPolicy::Disconnect => Vec::new(),
            // Down to half the budget, so the next messages do not shed again at once.
            SlowConsumerPolicy::DropOldest => outbox.drop_oldest(budget / 2),
            SlowConsumerPolicy::Conflate => outbox.conflate(tag).into_iter().collect(),
        };
        for range in shed {
            self.counters.messages_shed_total += range.to - range.from + 1;
            let conn = &mut self.conns[key];
            let Some(channel) = conn.subs.iter().find_map(|s| match s.state {
                SubState::Active { tag, .. } if tag == range.tag => Some(s.channel.clone()),
                _ => None,
            }) else {
                // It left that channel meanwhile: nothing to announce.
                continue;
            };
            let stream = matches!(conn.phase, Phase::EventStream(_));
            conn.outbox.announce(range, |from, to| {
                if stream {
                    let json = format!(
                        r#"{{"channel":{},"from":{from},"to":{to}}}"#,
                        json_string(&channel)
                    );
                    sse::control_event("gap", &json)
                } else {
                    pubsub::encode_gap(&channel, from, to)
                }
            });
        }
        if self.conns[key].outbox.len_bytes() > budget {
            self.counters.slow_consumer_closes_total += 1;
            self.conns[key].outbox.discard_unstarted();
            self.close_with(key, 4008, "slow consumer: reconnect and recover with since");
            self.finish(key);
        }
    }
}
