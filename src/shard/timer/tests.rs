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

#[test]
fn pruning_drops_stale_deadlines_up_to_the_first_live_one_and_the_room() {
    let start = Instant::now();
    let mut d = Deadlines::new(Duration::from_secs(1));
    for key in 0..1_000 {
        d.arm(start, ConnRef { key, generation: 0 });
    }
    d.prune_front(|_, conn| conn.key == 500 || conn.key == 900);
    assert_eq!(d.len(), 500);
    assert!(d.queue.capacity() >= 500);
    d.prune_front(|_, conn| conn.key == 900);
    assert_eq!(d.len(), 100);
    assert!(d.queue.capacity() <= 256, "{}", d.queue.capacity());
    let left: Vec<u32> = std::iter::from_fn(|| d.poll_expired(start + ms(1_000)))
        .map(|conn| conn.key)
        .collect();
    assert_eq!(left, (900..1_000).collect::<Vec<_>>());
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Drives `wheel` as a backend would, waking only at [`Wheel::next_deadline`];
/// returns what came out, when it was handed out, and the wake-ups that found
/// nothing due.
fn drive<T: Copy>(wheel: &mut Wheel<T>, until: Instant) -> (Vec<(Instant, Instant, T)>, usize) {
    let mut out = Vec::new();
    let mut idle = 0;
    while let Some(at) = wheel.next_deadline() {
        if at > until {
            break;
        }
        let before = out.len();
        while let Some((due, item)) = wheel.poll_expired(at) {
            out.push((at, due, item));
        }
        idle += usize::from(out.len() == before);
        let next = wheel.next_deadline();
        assert!(next.is_none_or(|next| next > at), "would spin at {at:?}");
    }
    (out, idle)
}

#[test]
fn an_entry_is_24_bytes() {
    assert_eq!(size_of::<Entry<(ConnRef, Timed)>>(), 24);
}

#[test]
fn wheel_hands_out_entries_at_their_tick_in_order() {
    let start = Instant::now();
    let mut wheel = Wheel::new(start);
    for (at, item) in [(70, 'c'), (3, 'a'), (70, 'd'), (5_000, 'e'), (4, 'b')] {
        assert_eq!(wheel.arm(start + ms(at), item), start + ms(at));
    }
    assert_eq!(wheel.len(), 5);
    assert_eq!(wheel.next_deadline(), Some(start + ms(3)));
    assert_eq!(wheel.poll_expired(start + ms(2)), None);
    assert_eq!(
        wheel.poll_expired(start + ms(69)),
        Some((start + ms(3), 'a'))
    );
    assert_eq!(
        wheel.poll_expired(start + ms(69)),
        Some((start + ms(4), 'b'))
    );
    assert_eq!(wheel.poll_expired(start + ms(69)), None);
    // One tick's entries come out in arming order.
    assert_eq!(
        wheel.poll_expired(start + ms(70)),
        Some((start + ms(70), 'c'))
    );
    assert_eq!(
        wheel.poll_expired(start + ms(70)),
        Some((start + ms(70), 'd'))
    );
    assert_eq!(
        wheel.next_deadline().map(|t| t > start + ms(70)),
        Some(true)
    );
    assert_eq!(wheel.poll_expired(start + ms(4_999)), None);
    assert_eq!(
        wheel.poll_expired(start + ms(6_000)),
        Some((start + ms(5_000), 'e'))
    );
    assert_eq!(wheel.len(), 0);
    assert_eq!(wheel.next_deadline(), None);
}

#[test]
fn a_deadline_between_ticks_comes_due_at_the_next_never_before() {
    let start = Instant::now();
    let mut wheel = Wheel::new(start);
    let at = start + Duration::from_micros(1_500);
    assert_eq!(wheel.arm(at, 1), start + ms(2));
    assert_eq!(wheel.rounded(at), start + ms(2));
    assert_eq!(wheel.poll_expired(at), None);
    assert_eq!(wheel.poll_expired(start + ms(2)), Some((start + ms(2), 1)));
}

#[test]
fn a_deadline_already_past_is_due_at_once() {
    let start = Instant::now();
    let mut wheel = Wheel::new(start);
    wheel.arm(start + ms(10), 1);
    assert_eq!(
        wheel.poll_expired(start + ms(50)),
        Some((start + ms(10), 1))
    );
    assert_eq!(wheel.poll_expired(start + ms(50)), None);
    // Armed for a tick the wheel has passed: the backend must not sleep.
    wheel.arm(start + ms(20), 2);
    assert!(wheel.next_deadline().is_some_and(|t| t <= start + ms(50)));
    assert_eq!(
        wheel.poll_expired(start + ms(50)),
        Some((start + ms(20), 2))
    );
    assert_eq!(wheel.next_deadline(), None);
}

#[test]
fn retain_cancels_entries_and_frees_their_slots() {
    let start = Instant::now();
    let mut wheel = Wheel::new(start);
    for i in 0..1_000u64 {
        wheel.arm(start + ms(1 + i * 37), i);
    }
    wheel.retain(|_, i| i % 100 == 99);
    assert_eq!(wheel.len(), 10);
    // The first wake-up is where the slot holding the first entry left starts.
    assert!(
        wheel
            .next_deadline()
            .is_some_and(|t| t > start + ms(1 + 98 * 37))
    );
    let (out, _) = drive(&mut wheel, start + Duration::from_secs(3_600));
    let items: Vec<u64> = out.iter().map(|&(_, _, i)| i).collect();
    assert_eq!(items, (0..10).map(|i| i * 100 + 99).collect::<Vec<_>>());
    wheel.retain(|_, _| false);
    assert_eq!((wheel.len(), wheel.next_deadline()), (0, None));
}

#[test]
fn entries_far_apart_come_due_exactly_across_every_level() {
    let start = Instant::now();
    let mut wheel = Wheel::new(start);
    // Spans from a millisecond to years, so entries cross every level on their way
    // down; a simple generator keeps the test reproducible.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut expected = Vec::new();
    for i in 0..5_000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bits = x % 41;
        let at = start + Duration::from_nanos(x % (1u64 << bits) * 1_000_000 + x % 999_999);
        expected.push((wheel.arm(at, i), i));
    }
    expected.sort_by_key(|&(at, _)| at);
    let (out, idle) = drive(&mut wheel, start + Duration::from_secs(1 << 41));
    assert_eq!(out.len(), expected.len());
    for (&(woke, due, item), &(at, _)) in out.iter().zip(&expected) {
        assert_eq!(due, at, "entry {item}");
        assert_eq!(woke, due, "entry {item} handed out late");
    }
    // At worst one per level an entry moves down through.
    assert!(
        idle <= 5_000 * (LEVELS - 1),
        "{idle} wake-ups with nothing due"
    );
    assert_eq!(wheel.len(), 0);
}

#[test]
fn a_periodic_deadline_keeps_its_tick_for_months() {
    let start = Instant::now();
    let mut wheel = Wheel::new(start);
    let period = ms(25_000);
    wheel.arm(start + ms(7), ());
    let mut now = start;
    let mut k = 0;
    while k < 400_000 {
        now = wheel.next_deadline().unwrap();
        if let Some((due, ())) = wheel.poll_expired(now) {
            assert_eq!(due, start + ms(7) + period * k);
            assert_eq!(now, due, "handed out late");
            assert_eq!(wheel.poll_expired(now), None);
            wheel.arm(next_period(due, period, now), ());
            k += 1;
        }
    }
    // 115 days: past 2^32 ticks, where a 32-bit tick count would have wrapped.
    assert!(now - start > TICK * u32::MAX);
}

#[test]
fn a_deadline_past_the_horizon_is_brought_in() {
    let start = Instant::now();
    let mut wheel = Wheel::new(start);
    let far = start + Duration::from_secs(200 * 365 * 86_400);
    let due = wheel.arm(far, 1);
    assert!(due < far && due > start + Duration::from_secs(100 * 365 * 86_400));
    let (out, _) = drive(&mut wheel, far);
    assert_eq!(out, [(due, due, 1)]);
}

#[test]
fn a_wake_up_with_nothing_due_moves_time_on() {
    let start = Instant::now();
    let mut wheel = Wheel::new(start);
    // Ten seconds out: on a level above 0, so a wake-up comes first to move it down.
    wheel.arm(start + ms(10_000), 1);
    let (out, idle) = drive(&mut wheel, start + ms(20_000));
    assert_eq!(out, [(start + ms(10_000), start + ms(10_000), 1)]);
    assert!(idle <= LEVELS, "{idle}");
    // Woken early (a backend rounding its timeout down): nothing due, no zero sleep.
    wheel.arm(start + ms(30_000), 2);
    let now = start + ms(29_999) + Duration::from_micros(400);
    assert_eq!(wheel.poll_expired(now), None);
    assert!(wheel.next_deadline().is_some_and(|t| t > now));
}

#[test]
fn spread_phases_fall_evenly_over_the_period_on_shared_phases() {
    let start = Instant::now();
    let period = ms(25_000);
    let mut spread = Spread::new(start);
    // 400 arms in a storm a while after the start: at most two on one phase, and the
    // phases evenly apart (even spacing would be 62.5 ms; one phase is 48.8 ms).
    let now = start + ms(61_234);
    let mut firsts: Vec<Instant> = (0..400).map(|_| spread.first(now, period)).collect();
    assert!(firsts.iter().all(|&t| t > now && t <= now + period));
    firsts.sort();
    assert!(
        firsts.windows(3).all(|w| w[0] != w[2]),
        "three on one phase"
    );
    firsts.dedup();
    let gaps: Vec<Duration> = firsts.windows(2).map(|w| w[1] - w[0]).collect();
    let max = gaps.iter().max().unwrap();
    assert!(*max <= ms(147), "a gap of {max:?}");
    // Past PHASES arms they share phases: 10,000 connections wake a shard 512 times a
    // period, not 10,000.
    let mut all: Vec<Instant> = (0..10_000).map(|_| spread.first(now, period)).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), PHASES as usize);
}

#[test]
fn next_period_keeps_the_phase_after_a_late_turn() {
    let start = Instant::now();
    let period = ms(1_000);
    assert_eq!(
        next_period(start, period, start + ms(10)),
        start + ms(1_000)
    );
    assert_eq!(
        next_period(start, period, start + ms(1_000)),
        start + ms(2_000)
    );
    assert_eq!(
        next_period(start, period, start + ms(5_500)),
        start + ms(6_000)
    );
}

#[test]
fn the_pong_wait_is_the_timeout_rounded_up_onto_whole_phases() {
    let (pong, period) = (Duration::from_secs(10), Duration::from_secs(25));
    let wait = pong_wait_on_phases(pong, period).unwrap();
    assert_eq!(wait, period * 205 / PHASES);
    assert_eq!(wait.as_nanos(), 10_009_765_625);
    // Phases closer than the wheel's tick, or a wait reaching the next heartbeat: as given.
    let short = Duration::from_millis(200);
    assert_eq!(pong_wait_on_phases(Duration::from_millis(100), short), None);
    assert_eq!(pong_wait_on_phases(period - TICK, period), None);
}

#[test]
fn a_deadline_rounded_up_to_the_tick_snaps_back_onto_its_phase() {
    let origin = Instant::now();
    let period = Duration::from_secs(25);
    let mut spread = Spread::new(origin);
    let later = origin + Duration::from_secs(600);
    for _ in 0..1_000 {
        let phase = spread.first(later, period);
        // In later periods too, and from anywhere up to the next phase.
        for at in [phase, phase + period * 3] {
            assert_eq!(spread.phase_at_or_before(at, period), at);
            assert_eq!(spread.phase_at_or_before(at + TICK, period), at);
            let next = at + period / PHASES;
            assert_eq!(
                spread.phase_at_or_before(next - Duration::from_nanos(1), period),
                at
            );
        }
    }
}

#[test]
fn the_wheel_sleeps_until_its_earliest_entry_not_until_a_slot_moves_down() {
    let start = Instant::now();
    let mut wheel = Wheel::new(start);
    // Level 2 (slots of 4,096 ticks): the slot starts at 4,096 ms.
    wheel.arm(start + Duration::from_millis(5_000), 1u32);
    wheel.arm(start + Duration::from_millis(6_000), 2u32);
    assert_eq!(
        wheel.next_deadline(),
        Some(start + Duration::from_millis(5_000))
    );
    assert_eq!(
        wheel.poll_expired(start + Duration::from_millis(4_999)),
        None
    );
    assert_eq!(
        wheel.poll_expired(start + Duration::from_millis(5_000)),
        Some((start + Duration::from_millis(5_000), 1))
    );
    assert_eq!(
        wheel.next_deadline(),
        Some(start + Duration::from_millis(6_000))
    );
}

/// A ping round arms thousands of deadlines into a few slots, which move down a level
/// and come due: at every step the wheel's room stays within a chunk per occupied slot
/// (and the kept chunks) of its entries, and goes once they are due.
#[test]
fn a_slot_holds_room_for_its_entries_and_a_chunk_more() {
    let start = Instant::now();
    let mut wheel = Wheel::new(start);
    let bound = |wheel: &Wheel<u32>| {
        let (room, occupied) = wheel.room();
        assert!(
            room <= wheel.len() + (occupied + SPARE_CHUNKS) * CHUNK,
            "room for {room} entries, {} armed in {occupied} slots",
            wheel.len()
        );
    };
    // 5,000 deadlines over 2 s, 10 s out: a few slots of the third level.
    for i in 0..5_000u32 {
        wheel.arm(start + ms(10_000) + ms(u64::from(i) * 2 / 5), i);
    }
    bound(&wheel);
    assert!(wheel.room().1 <= 2, "{:?}", wheel.room());
    let mut due = 0;
    for step in (0..=13_000).step_by(250) {
        while wheel.poll_expired(start + ms(step)).is_some() {
            due += 1;
        }
        bound(&wheel);
    }
    assert_eq!((due, wheel.len()), (5_000, 0));
    assert!(wheel.room().0 <= SPARE_CHUNKS * CHUNK, "{:?}", wheel.room());
}
