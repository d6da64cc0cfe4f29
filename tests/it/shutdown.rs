//! Graceful shutdown: SIGTERM or SIGINT → every WebSocket client gets close 1001, parked
//! polls their (empty) answer, event streams their end, then the process exits with
//! status 0 within `--drain-ms`; a second signal exits at once.

use crate::support;
use crate::support_http;

use std::io::Write;
use std::time::{Duration, Instant};

use support::*;
use support_http::HttpConn;

const DRAIN_MS: u64 = 2000;
/// Scheduling slack on a loaded 2-core CI box: generous, since what is checked is that
/// the drain ends rather than hangs.
const SLACK: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_1001_to_every_client_and_exits_zero() {
    let drain = DRAIN_MS.to_string();
    let mut server = Server::start(&["--threads", "2", "--drain-ms", &drain]);
    let addr = server.addr();

    // 24 clients over two SO_REUSEPORT shards: both shards get some in practice.
    let mut clients = Vec::new();
    for i in 0..20u64 {
        let mut ws = connect_ws(addr).await;
        subscribe(&mut ws, &format!("c{}", i % 3), i).await;
        clients.push(ws);
    }
    for _ in 0..4 {
        let mut ws = connect(addr, "/echo").await;
        send_text(&mut ws, "hi").await;
        assert_eq!(recv_text(&mut ws).await, "hi");
        clients.push(ws);
    }

    let sent = Instant::now();
    server.signal("TERM");
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| {
            tokio::spawn(async move {
                let code = recv_close_code(&mut ws, Duration::from_millis(DRAIN_MS) + SLACK).await;
                assert_eq!(code, 1001, "client {i}: expected close 1001 on shutdown");
            })
        })
        .collect();
    for h in handles {
        h.await.expect("client task");
    }
    let limit = Duration::from_millis(DRAIN_MS) + SLACK;
    let left = limit.saturating_sub(sent.elapsed());
    // Every client task is done, so blocking this worker thread is harmless.
    let status = server.wait_exit(left).unwrap_or_else(|| {
        panic!(
            "herald still running {limit:?} after SIGTERM\n{}",
            server.stderr()
        )
    });
    assert!(
        status.success(),
        "herald exited with {status} after SIGTERM\n{}",
        server.stderr()
    );
    assert!(
        !server.stderr().contains("panicked at"),
        "panic during shutdown\n{}",
        server.stderr()
    );
}

#[test]
fn sigterm_with_no_clients_exits_zero_promptly() {
    let drain = DRAIN_MS.to_string();
    let mut server = Server::start(&["--threads", "2", "--drain-ms", &drain]);
    server.signal("TERM");
    let status = server
        .wait_exit(Duration::from_millis(DRAIN_MS) + SLACK)
        .unwrap_or_else(|| {
            panic!(
                "herald still running after SIGTERM with no clients\n{}",
                server.stderr()
            )
        });
    assert!(
        status.success(),
        "exit status {status}\n{}",
        server.stderr()
    );
}

#[test]
fn sigterm_exits_within_drain_time_even_if_a_client_never_answers_the_close() {
    let drain = DRAIN_MS.to_string();
    let mut server = Server::start(&["--threads", "2", "--drain-ms", &drain]);
    // Raw clients that complete the handshake and then never read or reply.
    let mut deaf: Vec<_> = (0..4).map(|_| raw_ws(server.addr())).collect();
    for (s, buf) in &mut deaf {
        s.write_all(&client_text(r#"{"type":"subscribe","channel":"d","id":1}"#))
            .unwrap();
        // Subscribed (the only frame read before the signal).
        let reply = read_frame(s, buf, RECV_TIMEOUT).expect("subscribed");
        assert!(lossy(&reply.payload).contains("subscribed"), "{reply:?}");
    }
    let sent = Instant::now();
    server.signal("TERM");
    let status = server
        .wait_exit(Duration::from_millis(DRAIN_MS) + SLACK)
        .unwrap_or_else(|| {
            panic!(
                "herald ignored --drain-ms {DRAIN_MS} with deaf clients\n{}",
                server.stderr()
            )
        });
    assert!(
        status.success(),
        "exit status {status}\n{}",
        server.stderr()
    );
    eprintln!("exited {:?} after SIGTERM", sent.elapsed());
    // Each deaf client was at least sent the 1001 close (read what is buffered).
    for (i, (s, buf)) in deaf.iter_mut().enumerate() {
        assert_eq!(
            raw_expect_close(s, buf, RECV_TIMEOUT),
            1001,
            "deaf client {i}"
        );
    }
}

/// Waits (up to 10 s) until `/metrics` counts `count` connections of `transport`.
fn wait_for_connections(server: &Server, transport: &str, count: f64) {
    let series = format!(r#"herald_connections{{transport="{transport}"}}"#);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_value(server.addr(), &series) != Some(count) {
        assert!(Instant::now() < deadline, "{series} never reached {count}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_websockets_parked_polls_and_event_streams_and_exits_zero() {
    let drain = DRAIN_MS.to_string();
    let mut server = Server::start(&["--threads", "2", "--drain-ms", &drain]);
    let addr = server.addr();
    let mut ws = connect_ws(addr).await;
    subscribe(&mut ws, "news", 1).await;
    // A poll that would wait 60 s and an event stream, both in place before the signal.
    let poll = std::thread::spawn(move || {
        HttpConn::connect(addr).get("/poll?channel=news&timeout=60", Duration::from_secs(30))
    });
    let mut sse = HttpConn::connect(addr);
    sse.send_get("/sse?channel=news", "");
    let head = sse.read_head_only(RECV_TIMEOUT);
    assert_eq!(head.status, 200, "{head:?}");
    // Blocking here is harmless: nothing else runs on this runtime yet.
    wait_for_connections(&server, "poll", 1.0);
    wait_for_connections(&server, "sse", 1.0);
    server.signal("INT");

    assert_eq!(recv_close_code(&mut ws, RECV_TIMEOUT).await, 1001);
    let answer = blocking(move || poll.join().expect("poll thread")).await;
    assert_eq!(
        answer.status, 200,
        "the parked poll is answered: {answer:?}"
    );
    assert_eq!(
        answer.json()["messages"],
        serde_json::json!([]),
        "{}",
        answer.text()
    );
    assert!(
        blocking(move || sse.closed_within(RECV_TIMEOUT)).await,
        "the event stream was not ended by the drain"
    );
    let status = server
        .wait_exit(Duration::from_millis(DRAIN_MS) + SLACK)
        .unwrap_or_else(|| panic!("herald still running after SIGINT\n{}", server.stderr()));
    assert!(
        status.success(),
        "exit status {status}\n{}",
        server.stderr()
    );
}

#[test]
fn a_second_signal_exits_at_once_without_waiting_for_the_drain() {
    // A drain that would last a minute, held open by a client that never answers.
    let mut server = Server::start(&["--threads", "2", "--drain-ms", "60000"]);
    let (_deaf, _) = raw_ws(server.addr());
    wait_for_connections(&server, "websocket", 1.0);
    server.signal("INT");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.stderr().contains("draining") {
        assert!(
            Instant::now() < deadline,
            "no drain began\n{}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server.is_running(), "the first signal must drain, not exit");
    server.signal("TERM");
    let status = server
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("a second signal did not end the drain\n{}", server.stderr()));
    assert!(
        !status.success(),
        "a drain cut short is not a clean exit: {status}"
    );
    // The process may be gone before the reader of its stderr has taken the last line.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.stderr().contains("second signal") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        server.stderr().contains("second signal"),
        "{}",
        server.stderr()
    );
}
