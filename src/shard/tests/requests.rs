//! The HTTP side: request deadlines, publish, long-poll, event streams, metrics.

use super::*;

#[test]
fn deadlines_of_answered_requests_do_not_pile_up() {
    let mut cluster = Cluster::new(1, Config::default());
    let p = cluster.connect(0, "/ws");
    cluster.send(p, r#"{"type":"publish","channel":"c","data":"a"}"#);
    cluster.settle();
    // One keep-alive connection asks 2,000 times for what history answers at once;
    // each request arms a request deadline and a 120 s poll deadline.
    let (client, _) = http(&mut cluster, 0, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    for _ in 0..2000 {
        cluster.now += Duration::from_millis(1);
        cluster.write(
            client,
            b"GET /poll?channel=c&since=0&timeout=120 HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        cluster.settle();
        let answer = cluster.take_output(client);
        assert!(answer.starts_with(b"HTTP/1.1 200 "));
    }
    let shard = &cluster.shards[0];
    let bound = 2 * shard.conns.len() + 64 + 1;
    assert!(
        shard.wheel.len() <= bound,
        "{} poll deadlines",
        shard.wheel.len()
    );
    assert!(
        shard.request_deadlines.len() <= bound,
        "{} request deadlines",
        shard.request_deadlines.len()
    );
}

#[test]
fn an_upgraded_connection_leaves_no_request_deadline_behind() {
    let mut cluster = Cluster::new(1, Config::default());
    let clients: Vec<Client> = (0..1_000).map(|_| cluster.connect(0, "/ws")).collect();
    let shard = &mut cluster.shards[0];
    let silent = shard.accept(cluster.now, LOCALHOST).unwrap();
    assert_eq!(shard.request_deadlines.len(), clients.len() + 1);
    shard.handle_timeout(cluster.now);
    assert_eq!(
        shard.request_deadlines.len(),
        1,
        "the one still reading stays"
    );
    cluster.now += Config::default().handshake_timeout;
    shard.handle_timeout(cluster.now);
    let answer = cluster.take_output(Client {
        shard: 0,
        key: silent,
    });
    assert!(answer.starts_with(b"HTTP/1.1 408 "));
}

#[test]
fn http_publish_needs_the_api_key_and_returns_a_receipt() {
    let config = Config {
        api_key: Some("k3y".into()),
        ..Config::default()
    };
    let mut cluster = Cluster::new(2, config);
    let sub = cluster.connect(1, "/ws");
    cluster.send(sub, r#"{"type":"subscribe","channel":"news"}"#);
    cluster.settle();
    cluster.take_output(sub);
    let body = r#"{"channel":"news","data":{"a": 1}}"#;
    let request = |key: &str| {
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let (_, denied) = http(&mut cluster, 0, &request("wrong"));
    assert!(denied.starts_with("HTTP/1.1 401 "), "{denied}");
    assert!(denied.contains("WWW-Authenticate: Bearer\r\n"));
    let (_, ok) = http(&mut cluster, 0, &request("k3y"));
    assert!(ok.starts_with("HTTP/1.1 200 "), "{ok}");
    assert!(ok.ends_with(r#"{"seq":1,"subscribers":1}"#), "{ok}");
    assert_eq!(
        cluster.texts(sub),
        [r#"{"type":"message","channel":"news","seq":1,"data":{"a": 1}}"#]
    );
}

#[test]
fn http_publish_is_off_without_an_api_key() {
    let mut cluster = Cluster::new(1, Config::default());
    let (_, out) = http(
        &mut cluster,
        0,
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert!(out.starts_with("HTTP/1.1 403 "), "{out}");
}

#[test]
fn long_poll_answers_from_history_then_waits_for_the_next_message() {
    let config = Config {
        api_key: Some("k".into()),
        ..Config::default()
    };
    let mut cluster = Cluster::new(2, config);
    let p = cluster.connect(0, "/ws");
    cluster.send(p, r#"{"type":"publish","channel":"c","data":"a"}"#);
    cluster.settle();
    let (_, at_once) = http(
        &mut cluster,
        1,
        "GET /poll?channel=c&since=0 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(at_once.starts_with("HTTP/1.1 200 "), "{at_once}");
    assert!(
        at_once.ends_with(
            r#""seq":1,"messages":[{"type":"message","channel":"c","seq":1,"data":"a"}]}"#
        ),
        "{at_once}"
    );
    let (waiting, nothing_yet) = http(
        &mut cluster,
        1,
        "GET /poll?channel=c&since=1&timeout=5 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(nothing_yet, "");
    cluster.send(p, r#"{"type":"publish","channel":"c","data":"b"}"#);
    cluster.settle();
    let answer = String::from_utf8(cluster.take_output(waiting)).unwrap();
    assert!(
        answer.ends_with(
            r#""seq":2,"messages":[{"type":"message","channel":"c","seq":2,"data":"b"}]}"#
        ),
        "{answer}"
    );
    // Keep-alive: the same connection polls again and times out empty.
    cluster.write(
        waiting,
        b"GET /poll?channel=c&since=2&timeout=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    cluster.settle();
    assert!(cluster.take_output(waiting).is_empty());
    let later = cluster.now + Duration::from_secs(2);
    cluster.shards[1].handle_timeout(later);
    let empty = String::from_utf8(cluster.take_output(waiting)).unwrap();
    assert!(empty.ends_with(r#""seq":2,"messages":[]}"#), "{empty}");
    cluster.settle();
    assert_eq!(cluster.home_counts("c"), [0, 0]);
}

#[test]
fn event_stream_resumes_from_last_event_id() {
    let mut cluster = Cluster::new(2, Config::default());
    let p = cluster.connect(0, "/ws");
    for n in 1..=3 {
        cluster.send(
            p,
            &format!(r#"{{"type":"publish","channel":"c","data":{n}}}"#),
        );
    }
    cluster.settle();
    let (stream, head) = http(
        &mut cluster,
        1,
        "GET /sse?channel=c HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 2\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(head.contains("Content-Type: text/event-stream\r\n"));
    assert!(head.contains("event: subscribed\ndata: {\"channel\":\"c\",\"seq\":3,"));
    assert!(head.ends_with("id: 3\nevent: message\ndata: {\"type\":\"message\",\"channel\":\"c\",\"seq\":3,\"data\":3}\n\n"), "{head}");
    cluster.send(p, r#"{"type":"publish","channel":"c","data":4}"#);
    cluster.settle();
    let live = String::from_utf8(cluster.take_output(stream)).unwrap();
    assert!(live.starts_with("id: 4\n"), "{live}");
}

#[test]
fn metrics_and_stats_count_connections_and_deliveries() {
    let mut cluster = Cluster::new(1, Config::default());
    let a = cluster.connect(0, "/ws");
    cluster.send(a, r#"{"type":"subscribe","channel":"c"}"#);
    cluster.send(a, r#"{"type":"publish","channel":"c","data":1}"#);
    cluster.settle();
    cluster.shards[0].end_turn(Duration::from_micros(10), cluster.now);
    let (_, stats) = http(
        &mut cluster,
        0,
        "GET /api/stats HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    // Figures are as of each shard's last finished turn: the scrape's own connection
    // is not in them yet.
    assert!(
        stats.contains(r#""connections_by_transport":{"http":0,"websocket":1,"sse":0,"poll":0}"#),
        "{stats}"
    );
    assert!(stats.contains(r#""deliveries_total":1,"#), "{stats}");
    let (_, metrics) = http(&mut cluster, 0, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        metrics.contains("herald_connections{transport=\"websocket\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("herald_publish_flush_seconds_count 1\n"),
        "{metrics}"
    );
}

#[test]
fn an_earlier_polls_deadline_does_not_end_a_later_poll() {
    let mut cluster = Cluster::new(1, Config::default());
    let p = cluster.connect(0, "/ws");
    cluster.send(p, r#"{"type":"publish","channel":"c","data":"a"}"#);
    cluster.settle();
    let (client, _) = http(&mut cluster, 0, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    // Answered at once from history; its 1 s deadline stays armed.
    cluster.write(
        client,
        b"GET /poll?channel=c&since=0&timeout=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    cluster.settle();
    assert!(cluster.take_output(client).starts_with(b"HTTP/1.1 200 "));
    cluster.write(
        client,
        b"GET /poll?channel=c&since=1&timeout=5 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    cluster.settle();
    assert!(cluster.take_output(client).is_empty());
    let start = cluster.now;
    cluster.shards[0].handle_timeout(start + Duration::from_secs(2));
    assert!(
        cluster.take_output(client).is_empty(),
        "ended at the earlier deadline"
    );
    cluster.shards[0].handle_timeout(start + Duration::from_secs(5));
    let empty = String::from_utf8(cluster.take_output(client)).unwrap();
    assert!(empty.ends_with(r#""messages":[]}"#), "{empty}");
}
