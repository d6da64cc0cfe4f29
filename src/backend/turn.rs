//! The loop turn, written once for every backend: sleep until something happens, hand
//! the shard what the kernel reported, its mailbox and its deadlines, send the other
//! shards their envelopes, write, drop the dead, close the turn. A backend implements
//! [`Sockets`]; this module decides the order, which is the shard's calling contract.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::shard::{Inbox, Post, Shard};

/// Sockets flushed between two looks at the mailbox during a long flush: a broadcast
/// arriving meanwhile (or a publish to a channel homed here) is picked up within about
/// this many writes instead of after the whole flush.
const FLUSHES_BETWEEN_MAILBOX_CHECKS: usize = 64;

/// What a backend does with its sockets when the turn asks for it.
pub trait Sockets {
    /// Sleeps until the kernel reports something, a wake-up arrives or `timeout` passes.
    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()>;
    /// Hands the shard what the kernel reported: new sockets, bytes read, room to write.
    fn dispatch(&mut self, shard: &mut Shard, now: Instant) -> io::Result<()>;
    /// When the backend needs a turn of its own (accepting again after a pause).
    fn next_wakeup(&self) -> Option<Instant>;
    /// Work the backend already holds: the next wait must not sleep.
    fn has_pending(&self) -> bool;
    /// Closes the listener for good (the server is draining).
    fn stop_accepting(&mut self) -> io::Result<()>;
    /// Writes what `key`'s outbox holds, as far as its socket takes it.
    fn flush(&mut self, shard: &mut Shard, key: usize, now: Instant) -> io::Result<()>;
    /// Drops the socket of the dead connection `key`; calls [`Shard::remove`] once no
    /// operation can refer to the key any more.
    fn close(&mut self, shard: &mut Shard, key: usize) -> io::Result<()>;
}

/// A shard and its mailbox, as the thread that runs them owns them.
pub struct Loop {
    pub shard: Shard,
    pub inbox: Inbox,
    pub post: Arc<Post>,
    pub stop: Arc<AtomicBool>,
    /// How long a drain may take once `stop` is set.
    pub drain: Duration,
}

impl Loop {
    /// Runs turns until the shard is stopped and drained, or the drain time runs out. The
    /// shard stays with the caller, which drops it once the kernel is done with the
    /// frames its outboxes hold.
    pub fn run(&mut self, sockets: &mut impl Sockets) -> io::Result<()> {
        let Self {
            shard,
            inbox,
            post,
            stop,
            drain,
        } = self;
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let timeout = if shard.has_local_work() || sockets.has_pending() {
                Some(Duration::ZERO)
            } else {
                [shard.poll_timeout(), drain_deadline, sockets.next_wakeup()]
                    .into_iter()
                    .flatten()
                    .min()
                    .map(|t| t.saturating_duration_since(Instant::now()))
            };
            sockets.wait(timeout)?;
            let now = Instant::now();
            sockets.dispatch(shard, now)?;

            if drain_deadline.is_none() && stop.load(Ordering::Acquire) {
                sockets.stop_accepting()?;
                shard.begin_drain(now);
                drain_deadline = Some(now + *drain);
            }

            shard.handle_inbox(inbox, now);
            shard.handle_timeout(now);
            // The other shards get this turn's broadcasts before this one writes to its
            // own subscribers, so the shards write in parallel.
            post.deliver(shard.id(), shard.take_outgoing());
            let mut flushed = 0;
            while let Some(key) = shard.poll_dirty() {
                sockets.flush(shard, key, now)?;
                flushed += 1;
                if flushed % FLUSHES_BETWEEN_MAILBOX_CHECKS == 0 && inbox.has_mail() {
                    shard.handle_inbox(inbox, now);
                    post.deliver(shard.id(), shard.take_outgoing());
                }
            }
            while let Some(key) = shard.poll_dead() {
                sockets.close(shard, key)?;
            }
            let turn_ended = Instant::now();
            shard.end_turn(turn_ended.saturating_duration_since(now), turn_ended);
            post.deliver(shard.id(), shard.take_outgoing());

            if let Some(deadline) = drain_deadline {
                if shard.is_drained() {
                    return Ok(());
                }
                if now >= deadline {
                    tracing::warn!(
                        shard = shard.id(),
                        connections = shard.connection_count(),
                        "drain time over; closing the remaining connections"
                    );
                    return Ok(());
                }
            }
        }
    }
}
