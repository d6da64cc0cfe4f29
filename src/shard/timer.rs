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

/// Entries in a chunk of a slot: a slot grows a chunk at a time, so its room stays
/// within a chunk of its entries and nothing it holds is moved. Growing by doubling, a
/// slot holding a connect storm's or a ping round's thousands of entries had up to twice
/// their room, and left each smaller copy behind in the allocator: 55–120 B of every idle
/// connection (`bench-client/memory.sh`).
const CHUNK: usize = 32;
/// Emptied chunks kept for the next slot to fill: entries moving down a level free chunks
/// as they fill others, so a few are enough to cover the churn.
const SPARE_CHUNKS: usize = 8;

/// An armed deadline: 24 bytes for the shard's `(ConnRef, Timed)`.
struct Entry<T> {
    /// The tick it comes due at.
    at: u64,
    item: T,
}

/// A slot's entries in arming order, in chunks each allocated with room for exactly
/// [`CHUNK`] entries.
struct Slot<T> {
    chunks: Vec<Vec<Entry<T>>>,
}

impl<T> Slot<T> {
    const fn new() -> Self {
        Self { chunks: Vec::new() }
    }

    fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    fn push(&mut self, entry: Entry<T>, spare: &mut Vec<Vec<Entry<T>>>) {
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() < CHUNK => chunk.push(entry),
            _ => {
                let mut chunk = spare.pop().unwrap_or_else(|| Vec::with_capacity(CHUNK));
                chunk.push(entry);
                self.chunks.push(chunk);
            }
        }
    }

    fn entries(&self) -> impl Iterator<Item = &Entry<T>> {
        self.chunks.iter().flatten()
    }
}

/// Keeps an emptied chunk for reuse, or frees it when enough are kept.
fn recycle<T>(mut chunk: Vec<Entry<T>>, spare: &mut Vec<Vec<Entry<T>>>) {
    if spare.len() < SPARE_CHUNKS {
        chunk.clear();
        spare.push(chunk);
    }
}

/// 64 slots of `64^level` ticks each.
struct Level<T> {
    /// Bit `i` is set when slot `i` holds entries.
    occupied: u64,
    slots: [Slot<T>; SLOTS],
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
/// A slot's chunks are freed as the slot empties (but for a few, kept for the next slots
/// to fill), so memory follows the armed entries: 24 bytes each, and less than a chunk's
/// room more per occupied slot.
pub(super) struct Wheel<T> {
    origin: Instant,
    /// Every tick up to and including this one has been handed out.
    elapsed: u64,
    levels: Box<[Level<T>; LEVELS]>,
    /// Entries that are due, in the order they came due, handed out before anything else.
    due: VecDeque<Entry<T>>,
    /// Emptied chunks for the next slots that get entries (at most [`SPARE_CHUNKS`]): a
    /// slot's room is not allocated and freed each time it fills and empties.
    spare: Vec<Vec<Entry<T>>>,
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
                slots: std::array::from_fn(|_| Slot::new()),
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
        let spare = &mut self.spare;
        for level in self.levels.iter_mut() {
            for (i, slot) in level.slots.iter_mut().enumerate() {
                // Kept entries are packed into the slot anew, in order.
                let mut kept = Slot::new();
                for mut chunk in std::mem::take(&mut slot.chunks) {
                    for entry in chunk.drain(..) {
                        if keep(&entry) {
                            len += 1;
                            kept.push(entry, spare);
                        }
                    }
                    recycle(chunk, spare);
                }
                *slot = kept;
                if slot.is_empty() {
                    level.occupied &= !(1 << i);
                }
                if let Some(earliest) = slot.entries().map(|entry| entry.at).min() {
                    level.earliest[i] = earliest;
                }
            }
        }
        self.len = len;
    }

    /// Entries the wheel has room for, kept chunks included, and its occupied slots.
    #[cfg(test)]
    fn room(&self) -> (usize, usize) {
        let slots = self.levels.iter().flat_map(|level| level.slots.iter());
        let chunks = slots.flat_map(|slot| slot.chunks.iter()).chain(&self.spare);
        let occupied = self.levels.iter().map(|level| level.occupied.count_ones());
        (
            chunks.map(Vec::capacity).sum(),
            occupied.sum::<u32>() as usize,
        )
    }

    fn insert(&mut self, entry: Entry<T>) {
        let level = level_for(self.elapsed, entry.at);
        let slot = ((entry.at >> (SLOT_BITS as usize * level)) % SLOTS as u64) as usize;
        let level = &mut self.levels[level];
        if level.occupied & (1 << slot) == 0 || entry.at < level.earliest[slot] {
            level.earliest[slot] = entry.at;
        }
        level.occupied |= 1 << slot;
        level.slots[slot].push(entry, &mut self.spare);
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
        let chunks = std::mem::take(&mut level.slots[slot].chunks);
        for mut chunk in chunks {
            for entry in chunk.drain(..) {
                if entry.at <= tick {
                    self.due.push_back(entry);
                } else {
                    self.insert(entry);
                }
            }
            // Each chunk is free for the entries moving down as soon as it is emptied.
            recycle(chunk, &mut self.spare);
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
