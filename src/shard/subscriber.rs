//! The subscriber side of channels, whatever the transport: a connection's subscriptions
//! from pending (a ticket sent to the home) to active (a slot in the fan-out table), a
//! `since` replay paced in chunks within the outbound budget, history gaps, and leaving.

use bytes::Bytes;

use crate::cluster::{self, roster::Ask};
use crate::hub::{self, ChannelName, ConnId, Member};
use crate::proto::pubsub;

use super::conn::{CatchUp, ConnRef, Phase, Sub, SubState};
use super::transport::{Action, Chunk, Confirmed, Gap};
use super::{Answer, Envelope, Shard};

impl Shard {
    pub(super) fn subscribe(
        &mut self,
        key: usize,
        channel: &str,
        since: Option<u64>,
        epoch: Option<&str>,
        id: Option<u64>,
    ) {
        let conn = &self.conns[key];
        if conn.subs.iter().any(|s| &*s.channel == channel) {
            let message = format!("already subscribed to {channel:?}");
            self.reply(
                key,
                pubsub::encode_error("already_subscribed", &message, id),
            );
            return;
        }
        if conn.subs.len() >= self.ctx.config.max_subscriptions {
            let message = format!(
                "a connection may hold at most {} subscriptions",
                self.ctx.config.max_subscriptions
            );
            self.reply(
                key,
                pubsub::encode_error("too_many_subscriptions", &message, id),
            );
            return;
        }
        self.request_subscription(key, channel.into(), since, epoch, id);
    }

    /// Records a pending subscription and asks the channel's home for it.
    pub(super) fn request_subscription(
        &mut self,
        key: usize,
        channel: ChannelName,
        since: Option<u64>,
        epoch: Option<&str>,
        id: Option<u64>,
    ) {
        let conn_ref = self.conn_ref(key);
        self.next_ticket = self.next_ticket.wrapping_add(1);
        let ticket = self.next_ticket;
        let chunk = self.replay_chunk_bytes();
        let polling = matches!(self.conns[key].phase, Phase::Polling(_));
        // A poll is answered once, with the first chunk: the client asks again from its
        // last seq. A stream or WebSocket takes one chunk at a time, as its outbox drains.
        let max_replay_bytes = if polling || self.may_request_chunk(key) {
            chunk
        } else {
            0
        };
        let catch_up = since.filter(|_| !polling).map(|at| {
            Box::new(CatchUp {
                at,
                id,
                requested: max_replay_bytes > 0,
                answered: false,
                epoch: None,
            })
        });
        let subs = &mut self.conns[key].subs;
        // Most connections hold one or two channels: grow one at a time.
        subs.reserve_exact(1);
        subs.push(Sub {
            channel: channel.clone(),
            state: SubState::Pending {
                ticket,
                unsubscribe: None,
                catch_up,
            },
        });
        if let Some(bridge) = &self.ctx.cluster {
            let request = cluster::Request::Subscribe {
                channel,
                shard: self.id,
                conn: conn_ref,
                ticket,
                since,
                epoch: epoch.map(Into::into),
                id,
                max_replay_bytes,
            };
            if bridge.send(request).is_err() {
                let index = self.conns[key].subs.len() - 1;
                self.refuse_busy_subscription(key, index, false, id);
            }
            return;
        }
        let epoch_matches = epoch.is_none_or(|e| e == &*self.ctx.epoch);
        let member = self.member_of(key, &channel);
        let home = hub::home_of(&channel, self.shards);
        self.send(
            home,
            Envelope::Subscribe {
                channel,
                from: self.id,
                conn: conn_ref,
                ticket,
                since,
                epoch_matches,
                id,
                max_replay_bytes,
                member,
            },
        );
    }

    /// How `key` appears among `channel`'s members, where the channel keeps them: a
    /// WebSocket or an event stream (a poll comes and goes with each request).
    fn member_of(&self, key: usize, channel: &str) -> Option<Member> {
        let conn = &self.conns[key];
        let listed = matches!(conn.phase, Phase::WebSocket(_) | Phase::EventStream(_));
        if !listed || !self.ctx.config.namespaces.of(channel).tracks_members() {
            return None;
        }
        let identity = conn.identity.as_deref();
        Some(Member {
            user: identity.and_then(|id| id.user.clone()),
            info: identity.and_then(|id| id.info.clone()),
        })
    }

    /// `key`'s node-wide id, as presence lists it.
    fn conn_id(&self, key: usize) -> ConnId {
        let conn = self.conn_ref(key);
        ConnId {
            shard: self.id as u32,
            key: conn.key,
            generation: conn.generation,
        }
    }

    /// The most a replay chunk may bring: half the outbound budget.
    pub(super) fn replay_chunk_bytes(&self) -> usize {
        (self.ctx.config.outbound_queue_bytes / 2).max(1)
    }

    /// Whether `key` may ask for a replay chunk now: its outbox is below half its budget
    /// and no other chunk is on its way to it.
    pub(super) fn may_request_chunk(&self, key: usize) -> bool {
        let conn = &self.conns[key];
        !conn.is_closing()
            && conn.outbox.len_bytes() < self.replay_chunk_bytes()
            && !conn.subs.iter().any(
                |s| matches!(&s.state, SubState::Pending { catch_up: Some(c), .. } if c.requested),
            )
    }

    /// Asks the home for the next chunk of a replay that is catching up, if `key` has one
    /// and room for it.
    pub(super) fn continue_replay(&mut self, key: usize) {
        if !self.may_request_chunk(key) {
            return;
        }
        let conn_ref = self.conn_ref(key);
        let max_bytes = self.replay_chunk_bytes();
        let conn = &mut self.conns[key];
        let Some((channel, ticket, catch_up)) =
            conn.subs.iter_mut().find_map(|s| match &mut s.state {
                SubState::Pending {
                    ticket,
                    catch_up: Some(c),
                    ..
                } if c.answered => Some((s.channel.clone(), *ticket, c)),
                _ => None,
            })
        else {
            return;
        };
        catch_up.requested = true;
        let (since, id) = (catch_up.at, catch_up.id);
        if let Some(bridge) = &self.ctx.cluster {
            let request = cluster::Request::Replay {
                channel: channel.clone(),
                shard: self.id,
                conn: conn_ref,
                ticket,
                since,
                epoch: catch_up.epoch.as_deref().unwrap_or_default().into(),
                id,
                max_bytes,
            };
            if bridge.send(request).is_err()
                && let Some(index) = self.pending_index(key, ticket)
            {
                self.refuse_busy_subscription(key, index, true, id);
            }
            return;
        }
        let home = hub::home_of(&channel, self.shards);
        self.send(
            home,
            Envelope::Replay {
                channel,
                from: self.id,
                conn: conn_ref,
                ticket,
                since,
                id,
                max_bytes,
            },
        );
    }

    /// The cluster's queue refused a request for pending subscription `index` of `key`:
    /// the subscription ends and the client is told to retry. `counted`: the cluster
    /// counted it already (a replay chunk was refused), so releasing it sends the
    /// `Unsubscribe` that balances it; otherwise it is only forgotten.
    pub(super) fn refuse_busy_subscription(
        &mut self,
        key: usize,
        index: usize,
        counted: bool,
        id: Option<u64>,
    ) {
        if counted {
            self.release(key, index);
        } else {
            self.conns[key].subs.swap_remove(index);
        }
        self.dispatch(key, |transport, scope| {
            transport.on_busy(scope, cluster::BUSY, id)
        });
    }

    pub(super) fn unsubscribe(&mut self, key: usize, channel: &str, id: Option<u64>) {
        let conn = &mut self.conns[key];
        let Some(index) = conn.subs.iter().position(|s| &*s.channel == channel) else {
            let message = format!("not subscribed to {channel:?}");
            self.reply(key, pubsub::encode_error("not_subscribed", &message, id));
            return;
        };
        match &mut conn.subs[index].state {
            SubState::Pending { unsubscribe, .. } => {
                *unsubscribe = Some(Box::new(id));
            }
            SubState::Active { .. } => {
                self.release(key, index);
                self.reply(key, pubsub::encode_unsubscribed(channel, id));
            }
        }
    }

    /// Ends subscription `index` of `key`: leaves the local table and tells the home.
    pub(super) fn release(&mut self, key: usize, index: usize) {
        let conn = self.conn_ref(key);
        let sub = self.conns[key].subs.swap_remove(index);
        let active = matches!(sub.state, SubState::Active { .. });
        if let SubState::Active { slot, .. } = sub.state {
            self.subscriptions.remove(&sub.channel, slot);
            self.counters.subscriptions -= 1;
        }
        if let Some(bridge) = &self.ctx.cluster {
            if active && self.ctx.config.namespaces.of(&sub.channel).tracks_members() {
                let ask = Ask::Leave {
                    channel: sub.channel.clone(),
                    conn: self.conn_id(key),
                };
                let taken = bridge.ask(ask);
                debug_assert!(taken.is_ok(), "a leave counts against no bound");
            }
            bridge.unsubscribe(sub.channel, self.id);
            return;
        }
        let home = hub::home_of(&sub.channel, self.shards);
        self.send(
            home,
            Envelope::Unsubscribe {
                channel: sub.channel,
                from: self.id,
                conn,
            },
        );
    }

    /// The connection and pending subscription a home's answer is for, if both are still
    /// there (the connection may have gone, or the subscription ended, meanwhile).
    fn still_pending(&self, conn: ConnRef, ticket: u32) -> Option<(usize, usize)> {
        let key = self.resolve(conn)?;
        Some((key, self.pending_index(key, ticket)?))
    }

    /// The pending subscription that request `ticket` made, if it is still waiting.
    pub(super) fn pending_index(&self, key: usize, ticket: u32) -> Option<usize> {
        self.conns[key]
            .subs
            .iter()
            .position(|s| matches!(s.state, SubState::Pending { ticket: t, .. } if t == ticket))
    }

    pub(super) fn confirm_subscription(&mut self, answer: Answer, replay: Vec<(u64, Bytes)>) {
        let Answer {
            channel,
            conn,
            ticket,
            seq,
            id,
            epoch: answer_epoch,
        } = answer;
        let channel = &channel;
        let ctx = self.ctx.clone();
        let epoch = answer_epoch.as_deref().unwrap_or(&ctx.epoch);
        let Some((key, index)) = self.still_pending(conn, ticket) else {
            return;
        };
        if self.catch_up(
            key,
            index,
            channel,
            (epoch, answer_epoch.as_ref()),
            seq,
            &replay,
        ) {
            return;
        }
        let SubState::Pending { catch_up, .. } = &self.conns[key].subs[index].state else {
            unreachable!("pending_index returned a pending subscription");
        };
        let confirmed = Confirmed {
            channel,
            seq,
            epoch,
            cluster_epoch: answer_epoch.as_ref(),
            id: catch_up.as_ref().map_or(id, |c| c.id),
            replay: &replay,
            announced: catch_up.as_ref().is_some_and(|c| c.answered),
        };
        let action = self.answer(key, |transport, scope| {
            transport.on_subscribed(scope, &confirmed)
        });
        if let Action::Respond { .. } = action {
            // Answered before it started (a poll): it never becomes active.
            self.apply(key, action);
            return;
        }
        let policies = &self.ctx.config.slow_consumers;
        let (slot, tag, name) = self
            .subscriptions
            .insert(channel, key, || policies.policy_for(channel));
        self.counters.subscriptions += 1;
        let sub = &mut self.conns[key].subs[index];
        sub.channel = name;
        let SubState::Pending { unsubscribe, .. } =
            std::mem::replace(&mut sub.state, SubState::Active { slot, tag })
        else {
            unreachable!("pending_index returned a pending subscription");
        };
        self.apply(key, action);
        if let Some(bridge) = &self.ctx.cluster
            && let Some(member) = self.member_of(key, channel)
        {
            // Listed once active, as a home lists it once it answers.
            let ask = Ask::Join {
                channel: channel.clone(),
                conn: self.conn_id(key),
                member,
                announce: self.ctx.config.namespaces.of(channel).join_leave,
            };
            let taken = bridge.ask(ask);
            debug_assert!(taken.is_ok(), "a join counts against no bound");
        }
        if let Some(unsubscribe_id) = unsubscribe {
            // Asked for while pending, over a WebSocket (the one transport that can).
            self.release(key, index);
            self.reply(key, pubsub::encode_unsubscribed(channel, *unsubscribe_id));
        }
        // Another subscription of this connection may be waiting for its next chunk.
        self.continue_replay(key);
    }

    /// Queues a replay chunk for pending subscription `index` of `key` when it does not
    /// reach the channel's latest `seq` yet, and asks for the next one if there is room.
    /// Returns false when the subscription has caught up (the caller activates it).
    pub(super) fn catch_up(
        &mut self,
        key: usize,
        index: usize,
        channel: &str,
        (epoch, cluster_epoch): (&str, Option<&ChannelName>),
        seq: u64,
        replay: &[(u64, Bytes)],
    ) -> bool {
        let conn = &mut self.conns[key];
        let SubState::Pending {
            catch_up: Some(catch_up),
            ..
        } = &mut conn.subs[index].state
        else {
            return false;
        };
        let reached = replay.last().map_or(catch_up.at, |&(last, _)| last);
        if reached >= seq {
            return false;
        }
        let first = !catch_up.answered;
        catch_up.at = reached;
        catch_up.requested = false;
        catch_up.answered = true;
        catch_up.epoch = cluster_epoch.cloned();
        let chunk = Chunk {
            channel,
            seq,
            epoch,
            replay,
            first,
        };
        self.dispatch(key, |transport, scope| {
            transport.on_replay_chunk(scope, &chunk)
        });
        self.counters.messages_out_total += replay.len() as u64;
        self.continue_replay(key);
        true
    }

    pub(super) fn refuse_subscription(&mut self, answer: Answer, oldest: u64) {
        let Answer {
            channel,
            conn,
            ticket,
            seq,
            id,
            epoch,
        } = answer;
        let channel = &channel;
        let ctx = self.ctx.clone();
        let epoch = epoch.as_deref().unwrap_or(&ctx.epoch);
        let Some((key, index)) = self.still_pending(conn, ticket) else {
            return;
        };
        self.release(key, index);
        let gap = Gap {
            channel,
            seq,
            oldest,
            epoch,
            id,
        };
        self.dispatch(key, |transport, scope| transport.on_gap(scope, &gap));
    }
}
