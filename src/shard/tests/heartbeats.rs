//! Heartbeats: spread over the ping interval whatever the connections' arrival, the pong
//! timeout and the idle timeout kept.

use super::*;

/// How long after a ping the shard checks its pong: the pong timeout on the heartbeats'
/// phases.
fn pong_wait(config: &Config) -> Duration {
    timer::pong_wait_on_phases(config.pong_timeout, config.ping_interval)
        .unwrap_or(config.pong_timeout)
}

/// Whether `closed` is a pong wait after one of `pings`: the ping's turn and the check's
/// are the phases' instants rounded up to the wheel's tick.
fn closed_a_pong_wait_after_a_ping(pings: &[Instant], closed: Instant, wait: Duration) -> bool {
    pings
        .iter()
        .any(|&ping| closed - ping + timer::TICK > wait && closed - ping < wait + timer::TICK)
}

/// What a turn of the shard, woken at the deadline it asked for, sent.
#[derive(Default)]
struct Turn {
    pinged: Vec<usize>,
    closed: Vec<usize>,
}

/// Wakes the shard at its next deadline, as a backend would; `None` past `until`.
fn next_turn(cluster: &mut Cluster, until: Instant) -> Option<Turn> {
    let at = cluster.shards[0].poll_timeout().filter(|&at| at <= until)?;
    assert!(
        at >= cluster.now,
        "a deadline in the past after a turn: spinning"
    );
    cluster.now = at;
    cluster.shards[0].handle_timeout(at);
    let mut turn = Turn::default();
    let mut dirty = Vec::new();
    while let Some(key) = cluster.shards[0].poll_dirty() {
        dirty.push(key);
    }
    for key in dirty {
        for (opcode, payload) in cluster.frames(Client { shard: 0, key }) {
            match opcode {
                OpCode::Ping => turn.pinged.push(key),
                OpCode::Close => {
                    assert_eq!(&payload[..2], &1001u16.to_be_bytes());
                    turn.closed.push(key);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    Some(turn)
}

#[test]
fn a_connect_storm_is_pinged_spread_over_the_interval_and_the_dead_are_closed_in_time() {
    let config = Config::default();
    let (interval, idle, wait) = (
        config.ping_interval,
        config.idle_timeout,
        pong_wait(&config),
    );
    let mut cluster = Cluster::new(1, config);
    let start = cluster.now;
    // 1,000 connections in one turn; every tenth answers its pings, the others are gone.
    let clients: Vec<Client> = (0..1_000).map(|_| cluster.connect(0, "/ws")).collect();
    let live = |key: usize| clients.iter().position(|c| c.key == key).unwrap() % 10 == 0;
    let pong = encode_client_frame(OpCode::Pong, true, b"", [1, 2, 3, 4]);
    let mut first_ping = vec![None; clients.len()];
    let mut pinged_at = vec![Vec::new(); clients.len()];
    let mut last_ping = vec![start; clients.len()];
    let mut closed_at = vec![None; clients.len()];
    let (mut turns_pinging, mut most_pinged, mut most_closed) = (0, 0, 0);
    let until = start + idle + interval;
    while let Some(turn) = next_turn(&mut cluster, until) {
        turns_pinging += usize::from(!turn.pinged.is_empty());
        most_pinged = most_pinged.max(turn.pinged.len());
        most_closed = most_closed.max(turn.closed.len());
        for key in turn.pinged {
            first_ping[key].get_or_insert(cluster.now);
            pinged_at[key].push(cluster.now);
            if live(key) {
                // A client that answers hears from the server at least once per interval.
                assert!(cluster.now - last_ping[key] <= interval);
                last_ping[key] = cluster.now;
                cluster.write(Client { shard: 0, key }, &pong);
            }
        }
        for key in turn.closed {
            assert!(!live(key), "a client answering its pings was closed");
            closed_at[key] = Some(cluster.now);
        }
    }
    // Not 1,000 pings in one turn: the connections share the shard's phases, at most
    // three on one (1,000 over 512, evenly), and a turn pings one phase's heartbeats and
    // at most one phase's first pings (3/8 of an interval is a whole number of phases).
    // The first interval pings on every phase.
    assert!(most_pinged <= 6, "{most_pinged} pings in one turn");
    assert!(most_closed <= 3, "{most_closed} closes in one turn");
    assert!(
        turns_pinging >= timer::PHASES as usize,
        "pings in {turns_pinging} turns only"
    );
    for c in &clients {
        // First pinged within an interval of connecting, not in the first third of it.
        let pinged = first_ping[c.key].expect("every client is pinged") - start;
        assert!(pinged >= interval / 3 && pinged <= interval, "{pinged:?}");
        if live(c.key) {
            assert_eq!(closed_at[c.key], None);
        } else {
            // Closed the pong wait after a heartbeat's ping it did not answer. That
            // heartbeat comes within 1.5 intervals of connecting (the first, when it
            // finds the client silent for half an interval): long before the idle timeout.
            let closed = closed_at[c.key].expect("every silent client is closed");
            assert!(
                closed_a_pong_wait_after_a_ping(&pinged_at[c.key], closed, wait),
                "closed at {:?}, pinged at {:?}",
                closed - start,
                pinged_at[c.key]
            );
            assert!(closed - start <= interval * 3 / 2 + wait);
            assert!(closed - start < idle);
        }
    }
}

#[test]
fn a_busy_connection_is_not_pinged_and_a_quiet_one_is_pinged_each_interval() {
    let config = Config::default();
    let interval = config.ping_interval;
    let mut cluster = Cluster::new(1, config);
    let start = cluster.now;
    let busy = cluster.connect(0, "/ws");
    let quiet = cluster.connect(0, "/ws");
    let pong = encode_client_frame(OpCode::Pong, true, b"", [1, 2, 3, 4]);
    let mut pings = Vec::new();
    let until = start + interval * 5;
    let mut next_message = start;
    loop {
        // The busy client sends something every second, between the shard's deadlines.
        // The quiet one is the shard's second: its phase comes early, so it gets a first
        // ping of its own.
        let wake = cluster.shards[0].poll_timeout().unwrap().min(next_message);
        if wake > until {
            break;
        }
        if wake == next_message {
            cluster.now = wake;
            cluster.send(busy, r#"{"type":"ping"}"#);
            cluster.take_output(busy);
            next_message += Duration::from_secs(1);
            continue;
        }
        let turn = next_turn(&mut cluster, until).unwrap();
        assert!(!turn.pinged.contains(&busy.key), "a busy connection pinged");
        assert!(turn.closed.is_empty());
        if turn.pinged.contains(&quiet.key) {
            pings.push(cluster.now);
            cluster.write(quiet, &pong);
        }
    }
    // Within an interval of connecting, then at least once per interval; once on its
    // phase, exactly once per interval.
    assert!(pings.len() >= 4, "{pings:?}");
    assert!(pings[0] - start <= interval, "{pings:?}");
    assert!(
        pings.windows(2).all(|w| w[1] - w[0] <= interval),
        "{pings:?}"
    );
    assert!(
        pings[1..].windows(2).all(|w| w[1] - w[0] == interval),
        "{pings:?}"
    );
}

#[test]
fn a_client_answering_late_is_closed_at_the_pong_timeout_and_one_answering_in_time_is_not() {
    let config = Config::default();
    let (interval, wait) = (config.ping_interval, pong_wait(&config));
    // The pong timeout, rounded up onto the phases: never shorter than asked.
    assert!(wait >= config.pong_timeout && wait < config.pong_timeout + interval / timer::PHASES);
    let mut cluster = Cluster::new(1, config);
    let start = cluster.now;
    let prompt = cluster.connect(0, "/ws");
    let late = cluster.connect(0, "/ws");
    let pong = encode_client_frame(OpCode::Pong, true, b"", [1, 2, 3, 4]);
    // A pong read before the check's turn counts, one after it does not (the ping's turn
    // and the check's are rounded up to the tick: two ticks either side).
    let mut answer_due = Vec::new();
    let (mut late_pings, mut late_answered) = (Vec::new(), start);
    let mut closed = None;
    let until = start + interval * 4;
    loop {
        let deadline = cluster.shards[0].poll_timeout().unwrap();
        let wake = answer_due
            .iter()
            .map(|&(at, _)| at)
            .min()
            .map_or(deadline, |at: Instant| at.min(deadline));
        if wake > until || closed.is_some() {
            break;
        }
        if wake < deadline || answer_due.iter().any(|&(at, _)| at == wake) {
            cluster.now = wake;
            for (_, client) in answer_due.iter().filter(|&&(at, _)| at == wake) {
                cluster.write(*client, &pong);
                if client.key == late.key {
                    late_answered = wake;
                }
            }
            answer_due.retain(|&(at, _)| at != wake);
            continue;
        }
        let turn = next_turn(&mut cluster, until).unwrap();
        for key in turn.pinged {
            let client = if key == prompt.key { prompt } else { late };
            if key == late.key {
                late_pings.push(cluster.now);
            }
            let delay = if key == prompt.key {
                wait - 2 * timer::TICK
            } else {
                wait + 2 * timer::TICK
            };
            answer_due.push((cluster.now + delay, client));
        }
        if let Some(&key) = turn.closed.first() {
            assert_eq!(key, late.key, "the client answering in time was closed");
            closed = Some(cluster.now);
        }
    }
    // At the timeout of a ping it answered late, within 1.5 intervals and a pong timeout
    // of its last answer (a late answer is still an answer for the heartbeat after it).
    let closed = closed.expect("the late client is closed");
    assert!(
        closed_a_pong_wait_after_a_ping(&late_pings, closed, wait),
        "{late_pings:?}"
    );
    assert!(closed - late_answered <= interval * 3 / 2 + wait + timer::TICK);
}

#[test]
fn an_idle_shard_wakes_once_a_phase_its_pong_checks_sharing_the_heartbeats_turns() {
    let config = Config::default();
    let interval = config.ping_interval;
    let mut cluster = Cluster::new(1, config);
    let start = cluster.now;
    let clients: Vec<Client> = (0..1_000).map(|_| cluster.connect(0, "/ws")).collect();
    let pong = encode_client_frame(OpCode::Pong, true, b"", [1, 2, 3, 4]);
    // Past the first interval (first pings, a connect storm's own turns), two intervals of
    // clients answering every ping at once.
    let (settled, until) = (start + interval * 2, start + interval * 4);
    let mut turns = 0;
    while let Some(turn) = next_turn(&mut cluster, until) {
        if cluster.now > settled {
            turns += 1;
        }
        for key in turn.pinged {
            cluster.write(clients[key], &pong);
        }
        assert!(
            turn.closed.is_empty(),
            "a client answering its pings was closed"
        );
    }
    // One turn per phase and interval. Checks waking the shard on their own, a pong
    // timeout after each phase (not a whole number of phases), made it twice that.
    let phases = 2 * timer::PHASES as usize;
    assert!(
        turns <= phases + 2,
        "{turns} wake-ups over two intervals of {} phases",
        timer::PHASES
    );
}
