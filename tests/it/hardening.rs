//! The hardening issue's cases against the real binary: what one hostile connection may
//! hold and spend, and that every request is admitted on its own. Each test asserts the
//! bound (RSS from `/proc`, CPU time of the process, status codes), then that the server
//! still serves a well-behaved client.

use crate::support;
use crate::support_http;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use support_http::HttpConn;

const SECRET: &str = "herald-test-secret-0123456789abcdef";
const GOOD_ORIGIN: &str = "http://good.example";
const T5: Duration = Duration::from_secs(5);

fn token(channels: &[&str]) -> String {
    fresh_token(SECRET, json!({"sub": "u1", "channels": channels}))
}

/// A request the server answers at once and keeps the connection for: a long-poll with
/// no wait, admitted with a valid token and an allowed Origin.
fn admitted_poll(conn: &mut HttpConn, token: &str) {
    conn.send_get(
        "/poll?channel=news&timeout=0",
        &format!("Authorization: Bearer {token}\r\nOrigin: {GOOD_ORIGIN}\r\n"),
    );
    let response = conn.read_response(T5);
    assert_eq!(
        response.status,
        200,
        "the admitted poll: {}",
        response.text()
    );
    assert_ne!(
        response.header("Connection").map(str::to_ascii_lowercase),
        Some("close".into()),
        "the admitted poll must keep the connection"
    );
}

#[test]
fn every_request_on_a_keep_alive_connection_is_admitted_on_its_own() {
    let server = Server::start(&[
        "--auth",
        "required",
        "--jwt-secret",
        SECRET,
        "--allowed-origins",
        GOOD_ORIGIN,
    ]);
    let good = token(&["news"]);
    let targets = ["/poll?channel=news&timeout=0", "/sse?channel=news", "/ws"];
    let bearer = format!("Bearer {good}");
    let cases = [
        ("no token", vec![("Origin", GOOD_ORIGIN)], 401),
        (
            "a garbage token",
            vec![("Authorization", "Bearer garbage"), ("Origin", GOOD_ORIGIN)],
            401,
        ),
        (
            "a foreign Origin",
            vec![
                ("Authorization", bearer.as_str()),
                ("Origin", "http://evil.example"),
            ],
            403,
        ),
    ];
    for target in targets {
        for (what, headers, status) in &cases {
            let mut conn = HttpConn::connect(server.addr());
            admitted_poll(&mut conn, &good);
            if target == "/ws" {
                let upgrade = headers
                    .iter()
                    .fold(client_handshake(target), |h, (k, v)| h.header(k, v));
                conn.send_raw(&upgrade.encode());
            } else {
                let lines: String = headers
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}\r\n"))
                    .collect();
                conn.send_get(target, &lines);
            }
            let response = conn.read_response(T5);
            assert_eq!(
                response.status,
                *status,
                "{target} with {what} after an admitted request: {}",
                response.text()
            );
        }
    }
    // A later request may only read what its own token allows.
    let mut conn = HttpConn::connect(server.addr());
    admitted_poll(&mut conn, &good);
    let other = token(&["other"]);
    conn.send_get(
        "/poll?channel=news&timeout=0",
        &format!("Authorization: Bearer {other}\r\nOrigin: {GOOD_ORIGIN}\r\n"),
    );
    assert_eq!(conn.read_response(T5).status, 403);
    server_still_serves(server.addr());
}

/// Writes `bytes` until it is all out or the socket stays full for `stall`; returns how
/// much went out.
fn write_until_stalled(stream: &mut TcpStream, bytes: &[u8], stall: Duration) -> usize {
    stream.set_write_timeout(Some(stall)).unwrap();
    let mut written = 0;
    while written < bytes.len() {
        match stream.write(&bytes[written..]) {
            Ok(n) => written += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    written
}

fn server_still_serves(addr: SocketAddr) {
    let response = HttpConn::connect(addr).get("/healthz", T5);
    assert_eq!(response.status, 200, "{}", response.text());
}

#[test]
fn pipelined_requests_behind_unread_answers_stay_within_the_outbound_budget() {
    // A 256 KiB outbound budget: the bound is then far below what the requests ask for.
    let server = Server::start(&["--outbound-queue-bytes", "262144"]);
    let before = process_rss_kib(server.pid());
    // Each connection asks for the 21 KiB browser client 1,000 times (21 MB) and reads
    // nothing; without a bound 16 connections would make the server hold ~340 MB.
    let requests = "GET /herald.js HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
    let mut streams: Vec<TcpStream> = (0..16)
        .map(|_| TcpStream::connect(server.addr()).unwrap())
        .collect();
    for stream in &mut streams {
        write_until_stalled(stream, requests.as_bytes(), Duration::from_millis(500));
    }
    // Let the server do all it will do with what it was sent.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut grown = 0;
    while Instant::now() < deadline {
        grown = process_rss_kib(server.pid()).saturating_sub(before);
        thread::sleep(Duration::from_millis(100));
    }
    // 16 × (budget + one response + read buffer) is under 8 MiB; allow allocator slack.
    assert!(
        grown < 24 * 1024,
        "the server grew by {grown} KiB for 16 connections that read nothing"
    );
    let peak = outbound_queue_peak(server.addr());
    assert!(
        peak <= 262_144 + 24 * 1024,
        "a connection that read nothing had {peak} bytes of answers queued"
    );
    server_still_serves(server.addr());
    // The answers were only waiting: a reader gets every one of them, in order.
    let mut stream = streams.pop().unwrap();
    stream.set_read_timeout(Some(T5)).unwrap();
    let mut seen = 0;
    let mut buf = vec![0u8; 1 << 16];
    let mut pending = Vec::new();
    while seen < 3 {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {seen} answers");
        pending.extend_from_slice(&buf[..n]);
        seen = pending
            .windows(15)
            .filter(|w| w == b"HTTP/1.1 200 OK")
            .count();
    }
}

#[test]
fn bytes_sent_behind_a_parked_poll_are_left_in_the_kernel() {
    let server = Server::start(&[]);
    let before = process_rss_kib(server.pid());
    let junk = vec![b'x'; 64 << 20];
    let mut conns = Vec::new();
    let mut sent = 0;
    for _ in 0..8 {
        let mut conn = HttpConn::connect(server.addr());
        conn.send_get("/poll?channel=parked&timeout=60", "");
        sent += write_until_stalled(&mut conn.stream, &junk, Duration::from_millis(500));
        conns.push(conn);
    }
    let grown = process_rss_kib(server.pid()).saturating_sub(before);
    // What the kernel's buffers take is all a client can push; the server holds at most
    // a request head and one read per connection.
    assert!(
        sent < 8 * (24 << 20),
        "the server took {sent} bytes from 8 parked polls"
    );
    assert!(
        grown < 16 * 1024,
        "the server grew by {grown} KiB for 8 parked polls sent {sent} bytes"
    );
    server_still_serves(server.addr());
}

/// A plain TCP connection from `source` that has had one keep-alive answer.
fn keep_alive_from(server: SocketAddr, source: &str) -> Result<HttpConn, u16> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&format!("{source}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.connect(&server.into()).unwrap();
    let mut conn = HttpConn::from_stream(socket.into());
    let response = conn.get("/healthz", T5);
    if response.status == 200 {
        Ok(conn)
    } else {
        assert!(
            response.header("Retry-After").is_some(),
            "{} without Retry-After",
            response.status
        );
        Err(response.status)
    }
}

#[test]
fn the_per_address_cap_counts_plain_http_connections_from_accept_on() {
    let server = Server::start(&["--max-connections-per-ip", "5"]);
    let mut held: Vec<HttpConn> = (0..5)
        .map(|i| {
            keep_alive_from(server.addr(), "127.0.0.1")
                .unwrap_or_else(|s| panic!("connection {i} refused with {s}"))
        })
        .collect();
    assert_eq!(
        keep_alive_from(server.addr(), "127.0.0.1").err(),
        Some(429),
        "a sixth keep-alive connection from the same address"
    );
    assert!(
        keep_alive_from(server.addr(), "127.0.0.2").is_ok(),
        "another address is still served"
    );
    // A connection that ends gives its place back.
    drop(held.pop());
    let deadline = Instant::now() + T5;
    while keep_alive_from(server.addr(), "127.0.0.1").is_err() {
        assert!(
            Instant::now() < deadline,
            "the closed connection's place never came back"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `bytes` one per write, spaced so the server reads nearly every byte on its
/// own, and returns the CPU time the server spent meanwhile and the answer's status.
fn drip(server: &Server, first: &[u8], bytes: &[u8]) -> (Duration, u16) {
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    stream.set_nodelay(true).unwrap();
    stream.write_all(first).unwrap();
    let cpu_before = process_cpu_time(server.pid());
    for byte in bytes {
        stream.write_all(std::slice::from_ref(byte)).unwrap();
        thread::sleep(Duration::from_micros(50));
    }
    let status = HttpConn::from_stream(stream).read_response(T5).status;
    (process_cpu_time(server.pid()) - cpu_before, status)
}

#[test]
fn a_head_sent_a_byte_at_a_time_costs_what_a_body_sent_so_costs() {
    // 15 KiB a byte per write takes seconds on a busy machine: no request deadline here.
    let server = Server::start(&["--threads", "1", "--handshake-timeout-ms", "300000"]);
    // 100 headers: a 15 KiB head, just under the 16 KiB limit.
    let mut head = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..98 {
        head.push_str(&format!("X-Filler-{i:02}: {}\r\n", "v".repeat(136)));
    }
    head.push_str("\r\n");
    // The baseline: as many bytes, one per read, as a body, which is never parsed again.
    let body_head = format!(
        "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        head.len()
    );
    let (body_cpu, status) = drip(&server, body_head.as_bytes(), &vec![b'x'; head.len()]);
    assert_eq!(status, 405);
    let (head_cpu, status) = drip(&server, b"", head.as_bytes());
    assert_eq!(status, 200);
    // Parsing the head again from its start on every read costs ~100 MB of parsing in
    // all: more than twice the baseline in a debug build.
    assert!(
        head_cpu < body_cpu * 3 / 2 + Duration::from_millis(60),
        "the server spent {head_cpu:?} of CPU on a head sent a byte at a time, \
         {body_cpu:?} on a body of the same size"
    );
}

const KEY: &str = "hardening-key";

/// Publishes `count` messages of `size` bytes to `channel` over HTTP, in batches.
fn publish_large(addr: SocketAddr, channel: &str, count: usize, size: usize) {
    let data = format!("\"{}\"", "x".repeat(size));
    let per_batch = (512 * 1024 / size).max(1);
    let mut left = count;
    while left > 0 {
        let batch = left.min(per_batch);
        let messages: Vec<String> = (0..batch)
            .map(|_| format!(r#"{{"channel":"{channel}","data":{data}}}"#))
            .collect();
        let body = format!(r#"{{"messages":[{}]}}"#, messages.join(","));
        let response = HttpConn::connect(addr).publish(Some(KEY), &body);
        assert_eq!(response.status, 200, "{}", response.text());
        left -= batch;
    }
}

/// The most bytes any connection had queued, as `/metrics` reports it.
fn outbound_queue_peak(addr: SocketAddr) -> u64 {
    let text = HttpConn::connect(addr).get("/metrics", T5).text();
    text.lines()
        .filter(|l| l.starts_with("herald_shard_outbound_queue_peak_bytes{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .max()
        .expect("herald_shard_outbound_queue_peak_bytes in /metrics")
}

const BUDGET: u64 = 65536;

/// A server with a 64 KiB outbound budget and `count` messages of `size` bytes in the
/// history of `channel`.
fn server_with_history(channel: &str, count: usize, size: usize) -> Server {
    let history = count.to_string();
    let server = Server::start(&[
        "--api-key",
        KEY,
        "--outbound-queue-bytes",
        &BUDGET.to_string(),
        "--history-size",
        &history,
    ]);
    publish_large(server.addr(), channel, count, size);
    server
}

/// Reads `stream` until `needle` has arrived; returns everything read.
fn read_until(stream: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
    stream.set_read_timeout(Some(T5)).unwrap();
    let mut read = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    while !read[read.len().saturating_sub(chunk.len() + needle.len())..]
        .windows(needle.len())
        .any(|w| w == needle)
    {
        let n = stream.read(&mut chunk).expect("the replay stalled");
        assert!(n > 0, "the stream ended early");
        read.extend_from_slice(&chunk[..n]);
    }
    read
}

/// Ten clients that each start a 3.2 MB replay with `open` and read nothing for a
/// second: paced, each holds at most its budget and one message (copied in at once, it
/// would hold the whole replay).
fn replaying_without_reading(server: &Server, open: impl Fn() -> TcpStream) -> Vec<TcpStream> {
    let clients: Vec<TcpStream> = (0..10).map(|_| open()).collect();
    thread::sleep(Duration::from_secs(1));
    let peak = outbound_queue_peak(server.addr());
    assert!(
        peak <= BUDGET + 33 * 1024,
        "a client replaying 3.2 MB had {peak} bytes queued"
    );
    clients
}

#[test]
fn event_stream_replays_are_paced_within_the_outbound_budget() {
    // A 3.2 MB replay for each stream that resumes from 0.
    let server = server_with_history("big", 100, 32 * 1024);
    let streams = replaying_without_reading(&server, || {
        let mut stream = TcpStream::connect(server.addr()).unwrap();
        stream
            .write_all(b"GET /sse?channel=big HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 0\r\n\r\n")
            .unwrap();
        stream
    });
    // A stream that reads gets the whole replay, every id once and in order.
    let mut reader = streams.into_iter().next().unwrap();
    let read = read_until(&mut reader, b"id: 100\n");
    let ids: Vec<u64> = String::from_utf8_lossy(&read)
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(ids, (1..=100).collect::<Vec<u64>>());
    server_still_serves(server.addr());
}

#[test]
fn websocket_replays_are_paced_within_the_outbound_budget() {
    let server = server_with_history("big", 100, 32 * 1024);
    let subscribe = client_text(r#"{"type":"subscribe","channel":"big","since":0,"id":7}"#);
    let mut clients = replaying_without_reading(&server, || {
        let (mut stream, _) = raw_ws(server.addr());
        stream.write_all(&subscribe).unwrap();
        stream
    });
    // The replay arrives whole, then `subscribed` with the request's id.
    let read = read_until(&mut clients[0], br#""type":"subscribed""#);
    let text = String::from_utf8_lossy(&read);
    let seqs: Vec<u64> = text
        .match_indices(r#""type":"message","channel":"big","seq":"#)
        .map(|(at, m)| {
            let rest = &text[at + m.len()..];
            rest[..rest.find(',').unwrap()].parse().unwrap()
        })
        .collect();
    assert_eq!(seqs, (1..=100).collect::<Vec<u64>>());
    server_still_serves(server.addr());
}

#[test]
fn a_long_poll_replay_is_answered_in_pages_within_the_outbound_budget() {
    let server = server_with_history("paged", 100, 8 * 1024);
    let mut conn = HttpConn::connect(server.addr());
    let mut since = 0;
    let mut seen = Vec::new();
    let mut pages = 0;
    while since < 100 {
        let response = conn.get(&format!("/poll?channel=paged&since={since}"), T5);
        assert_eq!(response.status, 200);
        assert!(
            response.body.len() < 32 * 1024 + 9 * 1024,
            "a page of {} bytes",
            response.body.len()
        );
        let json = response.json();
        let seqs: Vec<u64> = json["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        assert!(!seqs.is_empty(), "an empty page from {since}: {json}");
        assert_eq!(json["seq"].as_u64(), seqs.last().copied(), "{json}");
        since = *seqs.last().unwrap();
        seen.extend(seqs);
        pages += 1;
    }
    assert_eq!(seen, (1..=100).collect::<Vec<u64>>());
    assert!(pages >= 4, "100 messages of 8 KiB came in {pages} pages");
}
