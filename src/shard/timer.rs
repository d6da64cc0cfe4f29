//! A shard's deadlines, as times and the connections they name; what a deadline means is
//! `deadlines.rs`'s business.
//!
//! - [`Deadlines`]: FIFO queues for the deadlines whose delay is the same for every
//!   connection (request, close). They are armed in expiry order, so a queue is already
//!   sorted: arming is a push and expiry a pop, to the nanosecond, with nothing to scan.
//!   A wheel would do no better and round to its tick.
//! - [`Wheel`]: a hierarchical timer wheel for the deadlines that differ per connection
//!   (heartbeats at spread phases, parked polls, token expiry): O(1) to arm, and each
//!   entry is moved at most once per level on its way down (seven levels of 64 slots,
//!   from 1 ms each to 139 years in all).
//! - [`Spread`]: the phases that spread periodic deadlines (heartbeats) over their period.
//!
//! Nothing is cancelled in place: an entry names its connection by [`ConnRef`], and the
//! shard checks, when it comes out, whether it still applies (a new generation in the
//! slot, another phase, a later request). Stale entries that pile up are dropped by
//! `retain`, so memory stays bounded per connection.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::ConnRef;

/// What a wheel entry is for; whether it still applies is checked when it comes due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timed {
    /// A WebSocket's or event stream's heartbeat, once per ping interval at its phase.
    Heartbeat,
    /// A new WebSocket whose phase comes too early for its first heartbeat to ping it
    /// (less than half an interval after the upgrade): one ping in between, so that the
    /// first comes within an interval of the upgrade.
    FirstPing,
    /// A heartbeat pinged a silent WebSocket: it must have sent something since, or it is
    /// closed. Takes the place of the next heartbeat until then (one entry per
    /// connection), and arms it when the answer came.
    PongDue,
    /// A parked long-poll runs out.
    Poll,
    /// The token that admitted the request holding the connection runs out (its `exp`
    /// plus leeway): close with 4001.
    TokenExpiry,
}

/// The deadlines of one fixed delay, in arming order.
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

    /// Drops the deadlines at the front that `live` says no longer apply, and gives back
    /// the room a burst left. Connections mostly end their request in the order they
    /// started it, so after a connect storm the queue empties as the upgrades happen,
    /// not a whole timeout later.
    pub(super) fn prune_front(&mut self, mut live: impl FnMut(Instant, ConnRef) -> bool) {
        while let Some(&(at, conn)) = self.queue.front() {
            if live(at, conn) {
                break;
            }
            self.queue.pop_front();
        }
        // A queue of up to 256 keeps its room, so a steady trickle does not reallocate.
        if self.queue.capacity() > 4 * self.queue.len().max(64) {
            self.queue.shrink_to(2 * self.queue.len());
        }
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

/// An instant of a shard's clock, as nanoseconds from its wheel's tick 0: 8 bytes in a
/// connection where an `Instant` takes 16, and as exact (584 years of range).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Stamp(u64);

impl Stamp {
    /// How long after the clock's start this is.
    pub(super) fn since_start(self) -> Duration {
        Duration::from_nanos(self.0)
    }

    /// How long after `self` `now` is (zero if it is not after).
    pub(super) fn until(self, now: Self) -> Duration {
        Duration::from_nanos(now.0.saturating_sub(self.0))
    }
}

/// The wheel's resolution: a deadline comes due at the first tick at or after it.
pub(super) const TICK: Duration = Duration::from_millis(1);
const TICK_NANOS: u128 = TICK.as_nanos();
const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
const LEVELS: usize = 7;
/// Ticks the wheel reaches (2^42 ms, 139 years); a deadline further out is brought in.
const HORIZON: u64 = 1 << (SLOT_BITS as usize * LEVELS);

/// The largest emptied slot vector kept for reuse, in entries.
const SPARE_MAX: usize = 64;

/// An armed deadline: 24 bytes for the shard's `(ConnRef, Timed)`.
struct Entry<T> {
    /// The tick it comes due at.
    at: u64,
    item: T,
}

/// 64 slots of `64^level` ticks each.
struct Level<T> {
    /// Bit `i` is set when slot `i` holds entries.
    occupied: u64,
    slots: [Vec<Entry<T>>; SLOTS],
    /// The earliest tick in each occupied slot: the wheel sleeps until then, not until
    /// the slot starts (a slot of level 1 starts every 64 ms, and waking for each to move
    /// its entries down was a quarter of an idle shard's wake-ups).
    earliest: [u64; SLOTS],
}

/// A hierarchical timer wheel (as tokio's): level `l` holds the entries whose tick
/// differs from `elapsed` first in bits `6l..6l+6`, in the slot those bits name. Every
/// entry of a level lies within the current turn of that level, so a lower level's
/// entries always come due before a higher one's. When time reaches a slot of a higher
/// level, its entries move down; at level 0 they are due.
///
/// A slot's vector is freed when the slot is emptied (but for one small one, kept for the
/// next slot to fill), so memory follows the armed entries: 24 bytes each, plus the
/// vectors' growth slack.
pub(super) struct Wheel<T> {
    origin: Instant,
    /// Every tick up to and including this one has been handed out.
    elapsed: u64,
    levels: Box<[Level<T>; LEVELS]>,
    /// Entries that are due, in the order they came due, handed out before anything else.
    due: VecDeque<Entry<T>>,
    /// The vector of the last slot emptied, for the next slot that gets an entry: a
    /// slot's vector is not allocated and freed each time it fills and empties.
    spare: Vec<Entry<T>>,
    /// Armed entries, stale ones included.
    len: usize,
}

impl<T: Copy> Wheel<T> {
    /// A wheel whose tick 0 is `now`.
    pub(super) fn new(now: Instant) -> Self {
        Self {
            origin: now,
            elapsed: 0,
            levels: Box::new(std::array::from_fn(|_| Level {
                occupied: 0,
                slots: std::array::from_fn(|_| Vec::new()),
                earliest: [0; SLOTS],
            })),
            due: VecDeque::new(),
            spare: Vec::new(),
            len: 0,
        }
    }

    /// Arms `item` for `at`; returns the instant it comes due ([`Wheel::rounded`]).
    pub(super) fn arm(&mut self, at: Instant, item: T) -> Instant {
        let at = self.tick_at_or_after(at);
        self.len += 1;
        let entry = Entry { at, item };
        if at <= self.elapsed {
            // Its tick is past: due at the next poll.
            self.due.push_back(entry);
        } else {
            self.insert(entry);
        }
        self.instant(at)
    }

    /// `at` on this wheel's clock.
    pub(super) fn stamp(&self, at: Instant) -> Stamp {
        let nanos = at.saturating_duration_since(self.origin).as_nanos();
        Stamp(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// The instant a deadline `at` comes due at once armed: the tick at or after it.
    pub(super) fn rounded(&self, at: Instant) -> Instant {
        self.instant(self.tick_at_or_after(at))
    }

    /// Armed entries, stale ones included.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// When the next entry comes due: the earliest entry of the first occupied slot, whose
    /// entries move down to lower levels in the call that comes then. After
    /// [`Wheel::poll_expired`] has returned `None` for `now`, this is after `now`.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        if !self.due.is_empty() {
            return Some(self.instant(self.elapsed));
        }
        self.next_expiry().map(|(level, slot, tick)| {
            // Nothing in the slot is due before its earliest entry; the entries move down
            // in the turn that comes then.
            self.instant(tick.max(self.levels[level].earliest[slot]))
        })
    }

    /// Takes one entry due by `now`, with the instant it came due at; entries come out in
    /// tick order, those of one tick in arming order.
    pub(super) fn poll_expired(&mut self, now: Instant) -> Option<(Instant, T)> {
        let now = self.tick_at_or_before(now);
        loop {
            if let Some(entry) = self.due.pop_front() {
                self.len -= 1;
                return Some((self.instant(entry.at), entry.item));
            }
            match self.next_expiry() {
                Some((level, slot, tick)) if tick <= now => self.expire_slot(level, slot, tick),
                _ => {
                    // Nothing is due until after `now`: move there, so the next deadline
                    // is asked for from here (and arming relative to it stays shallow).
                    self.elapsed = self.elapsed.max(now);
                    return None;
                }
            }
        }
    }

    /// Keeps the entries `live` says still apply (given the instant each comes due at)
    /// and frees the room of those dropped.
    pub(super) fn retain(&mut self, mut live: impl FnMut(Instant, T) -> bool) {
        let origin = self.origin;
        let mut keep = |entry: &Entry<T>| live(instant(origin, entry.at), entry.item);
        self.due.retain(&mut keep);
        self.due.shrink_to_fit();
        let mut len = self.due.len();
        for level in self.levels.iter_mut() {
            for (i, slot) in level.slots.iter_mut().enumerate() {
                slot.retain(&mut keep);
                slot.shrink_to_fit();
                if slot.is_empty() {
                    level.occupied &= !(1 << i);
                }
                if let Some(earliest) = slot.iter().map(|entry| entry.at).min() {
                    level.earliest[i] = earliest;
                }
                len += slot.len();
            }
        }
        self.len = len;
    }

    fn insert(&mut self, entry: Entry<T>) {
        let level = level_for(self.elapsed, entry.at);
        let slot = ((entry.at >> (SLOT_BITS as usize * level)) % SLOTS as u64) as usize;
        let level = &mut self.levels[level];
        if level.occupied & (1 << slot) == 0 || entry.at < level.earliest[slot] {
            level.earliest[slot] = entry.at;
        }
        level.occupied |= 1 << slot;
        let slot = &mut level.slots[slot];
        if slot.capacity() == 0 {
            *slot = std::mem::take(&mut self.spare);
        }
        slot.push(entry);
    }

    /// The first occupied slot from `elapsed` on, lowest level first: its level, slot and
    /// the tick it starts at.
    fn next_expiry(&self) -> Option<(usize, usize, u64)> {
        self.levels.iter().enumerate().find_map(|(l, level)| {
            if level.occupied == 0 {
                return None;
            }
            let shift = SLOT_BITS as usize * l;
            let current = ((self.elapsed >> shift) % SLOTS as u64) as u32;
            let slot =
                (level.occupied.rotate_right(current).trailing_zeros() + current) % SLOTS as u32;
            let level_ticks = 1u64 << (shift + SLOT_BITS as usize);
            let mut tick = (self.elapsed & !(level_ticks - 1)) + (u64::from(slot) << shift);
            if tick <= self.elapsed {
                // Only at the top level: an entry brought in to the horizon lies in the
                // level's next turn.
                debug_assert_eq!(l, LEVELS - 1);
                tick += level_ticks;
            }
            Some((l, slot as usize, tick))
        })
    }

    /// Time reaches `tick`, where slot `slot` of `level` starts: its entries are due or
    /// move down.
    fn expire_slot(&mut self, level: usize, slot: usize, tick: u64) {
        self.elapsed = tick;
        let level = &mut self.levels[level];
        level.occupied &= !(1 << slot);
        let mut entries = std::mem::take(&mut level.slots[slot]);
        for entry in entries.drain(..) {
            if entry.at <= tick {
                self.due.push_back(entry);
            } else {
                self.insert(entry);
            }
        }
        // A small one is kept; a large one (a burst's) goes, so memory follows the
        // armed entries.
        if entries.capacity() <= SPARE_MAX && entries.capacity() > self.spare.capacity() {
            self.spare = entries;
        }
    }

    fn tick_at_or_after(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.origin).as_nanos();
        let ticks = u64::try_from(nanos.div_ceil(TICK_NANOS)).unwrap_or(u64::MAX);
        ticks.min(self.elapsed + HORIZON - 1)
    }

    fn tick_at_or_before(&self, now: Instant) -> u64 {
        let nanos = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(nanos / TICK_NANOS).unwrap_or(u64::MAX)
    }

    fn instant(&self, tick: u64) -> Instant {
        instant(self.origin, tick)
    }
}

fn instant(origin: Instant, tick: u64) -> Instant {
    origin + Duration::from_nanos(tick.saturating_mul(TICK_NANOS as u64))
}

/// The level whose slots tell `at` apart from `elapsed`: the highest bit in which they
/// differ, six bits a level.
fn level_for(elapsed: u64, at: u64) -> usize {
    let masked = ((elapsed ^ at) | (SLOTS as u64 - 1)).min(HORIZON - 1);
    let significant = u64::BITS - 1 - masked.leading_zeros();
    (significant / SLOT_BITS) as usize
}

/// Phases of a period on which periodic deadlines fall, counted from the shard's start:
/// deadlines on the same phase come due in the same turn. 512 keep a connect storm
/// spread (49 ms apart at a 25 s period) while an idle shard wakes for heartbeats at most
/// 512 times a period, where one phase per connection woke it once per connection.
pub(super) const PHASES: u32 = 512;

/// Phases for periodic deadlines: the `k`-th one armed takes phase `frac(k / φ)` of the
/// period (a Kronecker sequence), rounded to one of [`PHASES`]. Any run of consecutive
/// arms, a connect storm included, then falls evenly over the period: by the three-gap
/// theorem no gap is more than φ² times another. A deadline re-armed one period after it
/// came due keeps its phase, so the spread lasts.
pub(super) struct Spread {
    next: u32,
    /// Phase 0.
    origin: Instant,
}

impl Spread {
    pub(super) fn new(origin: Instant) -> Self {
        Self { next: 0, origin }
    }

    /// The first deadline of a periodic one armed at `now`: within `(now, now + period]`.
    pub(super) fn first(&mut self, now: Instant, period: Duration) -> Instant {
        // 2^32 / φ, rounded to odd: its multiples run through every u32 before repeating.
        let fraction = self.next.wrapping_mul(0x9e37_79b9);
        self.next = self.next.wrapping_add(1);
        let phase = fraction >> (u32::BITS - PHASES.trailing_zeros());
        let at = self.origin + period * phase / PHASES;
        if at > now {
            at
        } else {
            next_period(at, period, now)
        }
    }

    /// The phase instant of `period` at or before `at`: where a periodic deadline that
    /// came due (rounded up to the wheel's tick) at `at` was armed.
    pub(super) fn phase_at_or_before(&self, at: Instant, period: Duration) -> Instant {
        let since = at.saturating_duration_since(self.origin).as_nanos();
        let period_nanos = period.as_nanos().max(1);
        let periods = since / period_nanos;
        let phase = (since % period_nanos) * u128::from(PHASES) / period_nanos;
        let start = self.origin
            + Duration::from_nanos(u64::try_from(periods * period_nanos).unwrap_or(u64::MAX));
        start + period * u32::try_from(phase).unwrap_or(0) / PHASES
    }
}

/// How long after a heartbeat's ping its pong is checked: `pong_timeout` rounded up to
/// whole phases of `period`, so the check of one phase comes due in the turn of a later
/// phase's heartbeat instead of waking the shard on its own (an idle shard then wakes
/// about twice a phase, its pings and their pongs, where it woke three or four times).
/// At the default 25 s / 10 s that is 10.0098 s. `None` where phases are closer than the
/// wheel's tick (a ping interval under half a second) or the rounding would reach the
/// next heartbeat: the pong timeout is kept as given.
pub(super) fn pong_wait_on_phases(pong_timeout: Duration, period: Duration) -> Option<Duration> {
    let phase = period / PHASES;
    if phase < TICK {
        return None;
    }
    let phases = u32::try_from(pong_timeout.as_nanos().div_ceil(phase.as_nanos())).ok()?;
    let wait = period * phases / PHASES;
    (wait < period).then_some(wait)
}

/// The first `deadline + k × period` (k ≥ 1) after `now`: a periodic deadline keeps its
/// phase, even after a turn that came late.
pub(super) fn next_period(deadline: Instant, period: Duration, now: Instant) -> Instant {
    let next = deadline + period;
    if next > now {
        return next;
    }
    let behind = now.duration_since(next).as_nanos() / period.as_nanos().max(1);
    next + period * (u32::try_from(behind).unwrap_or(u32::MAX - 1) + 1)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests start the clock they drive
mod tests;
