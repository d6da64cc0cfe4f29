//! Deadlines of one kind (handshake, heartbeat, close) for all of a shard's connections.
//!
//! Every deadline of a kind is "now + the same delay", so they are created in time order
//! and a FIFO queue is already sorted: arming is a push, expiry a pop from the front, with
//! no per-connection timer objects. A connection that no longer needs its deadline is not
//! searched for; the shard checks, when the entry comes out, whether it still applies.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::ConnRef;

pub(super) struct Deadlines {
    delay: Duration,
    queue: VecDeque<(Instant, ConnRef)>,
}

impl Deadlines {
    pub(super) fn new(delay: Duration) -> Self {
        Self {
            delay,
            queue: VecDeque::new(),
        }
    }

    /// Arms a deadline `delay` after `now`.
    pub(super) fn arm(&mut self, now: Instant, conn: ConnRef) {
        debug_assert!(
            self.queue
                .back()
                .is_none_or(|(t, _)| *t <= now + self.delay)
        );
        self.queue.push_back((now + self.delay, conn));
    }

    /// Armed deadlines, stale ones included.
    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Keeps the deadlines `live` says still apply; their order is kept.
    pub(super) fn retain(&mut self, mut live: impl FnMut(Instant, ConnRef) -> bool) {
        self.queue.retain(|&(at, conn)| live(at, conn));
    }

    /// The earliest armed deadline.
    pub(super) fn next(&self) -> Option<Instant> {
        self.queue.front().map(|(t, _)| *t)
    }

    /// Takes one deadline that has passed by `now`.
    pub(super) fn poll_expired(&mut self, now: Instant) -> Option<ConnRef> {
        match self.queue.front() {
            Some((t, _)) if *t <= now => self.queue.pop_front().map(|(_, c)| c),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests start the clock they drive
mod tests {
    use super::*;

    #[test]
    fn expires_in_arming_order() {
        let start = Instant::now();
        let mut d = Deadlines::new(Duration::from_secs(1));
        let a = ConnRef {
            key: 1,
            generation: 0,
        };
        let b = ConnRef {
            key: 2,
            generation: 0,
        };
        d.arm(start, a);
        d.arm(start + Duration::from_millis(10), b);
        assert_eq!(d.next(), Some(start + Duration::from_secs(1)));
        assert_eq!(d.poll_expired(start), None);
        assert_eq!(d.poll_expired(start + Duration::from_secs(2)), Some(a));
        assert_eq!(d.poll_expired(start + Duration::from_secs(2)), Some(b));
        assert_eq!(d.poll_expired(start + Duration::from_secs(2)), None);
    }
}
