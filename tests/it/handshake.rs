//! The HTTP/1.1 upgrade and the first bytes after it, over raw TCP (RFC 6455 §4,
//! DESIGN.md "HTTP before the upgrade"). Every read has a timeout: a hang is a failure.

use crate::support;

use std::io::{ErrorKind, Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const CLOSE_WAIT: Duration = Duration::from_secs(3);

fn upgrade_with(path: &str, lines: &[&str]) -> Vec<u8> {
    let mut req = format!("GET {path} HTTP/1.1\r\n");
    for l in lines {
        req.push_str(l);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// Asserts `status` and that the server then closes the socket.
fn expect_rejected(server: &mut Server, req: &[u8], status: u16, what: &str) -> Head {
    let (mut s, head) = request_head(server.addr(), req);
    assert_eq!(
        head.status, status,
        "{what}: expected {status}, got {:?}",
        head.status_line
    );
    assert_closed_within(&mut s, CLOSE_WAIT);
    head
}

fn expect_101(server: &Server, req: &[u8], what: &str) -> Head {
    let (_s, head) = request_head(server.addr(), req);
    assert_eq!(
        head.status, 101,
        "{what}: expected 101, got {:?}",
        head.status_line
    );
    assert_eq!(
        head.header("Sec-WebSocket-Accept"),
        Some(SAMPLE_ACCEPT),
        "{what}: {head:?}"
    );
    head
}

#[test]
fn rfc_sample_key_gets_rfc_accept_value() {
    let mut server = Server::start(&[]);
    let head = expect_101(&server, upgrade_request("/ws").as_bytes(), "RFC sample");
    assert!(
        head.header("Upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "101 without `Upgrade: websocket`: {head:?}"
    );
    assert!(
        head.header("Connection")
            .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade")),
        "101 without `Connection: Upgrade`: {head:?}"
    );
    server.assert_healthy();
}

#[test]
fn header_spelling_variants_are_accepted() {
    let mut server = Server::start(&[]);
    let key = format!("Sec-WebSocket-Key: {SAMPLE_KEY}");
    let lkey = format!("sec-websocket-key: {SAMPLE_KEY}");
    let variants: [(&str, Vec<&str>); 4] = [
        (
            "Firefox-style Connection list",
            vec![
                "Host: a",
                "Upgrade: websocket",
                "Connection: keep-alive, Upgrade",
                &key,
                "Sec-WebSocket-Version: 13",
            ],
        ),
        (
            "mixed-case Upgrade value",
            vec![
                "Host: a",
                "upgrade: WebSocket",
                "Connection: Upgrade",
                &key,
                "Sec-WebSocket-Version: 13",
            ],
        ),
        (
            "all-lowercase names and values",
            vec![
                "host: a",
                "upgrade: websocket",
                "connection: upgrade",
                &lkey,
                "sec-websocket-version: 13",
            ],
        ),
        (
            "extra spaces and unrelated headers",
            vec![
                "Host: a",
                "User-Agent: test",
                "Upgrade:   websocket  ",
                "Connection:Upgrade",
                &key,
                "Sec-WebSocket-Version:  13",
                "Accept: */*",
            ],
        ),
    ];
    for (what, lines) in &variants {
        expect_101(&server, &upgrade_with("/ws", lines), what);
    }
    server.assert_healthy();
}

#[test]
fn wrong_version_gets_426_with_supported_version() {
    let mut server = Server::start(&[]);
    let key = format!("Sec-WebSocket-Key: {SAMPLE_KEY}");
    for version in ["8", "12", "14"] {
        let v = format!("Sec-WebSocket-Version: {version}");
        let req = upgrade_with(
            "/ws",
            &[
                "Host: a",
                "Upgrade: websocket",
                "Connection: Upgrade",
                &key,
                &v,
            ],
        );
        let head = expect_rejected(&mut server, &req, 426, &format!("version {version}"));
        assert_eq!(
            head.header("Sec-WebSocket-Version"),
            Some("13"),
            "426 must name version 13: {head:?}"
        );
    }
    server.assert_healthy();
}

#[test]
fn missing_or_malformed_key_gets_400() {
    let mut server = Server::start(&[]);
    let base = [
        "Host: a",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
    ];
    let cases = [
        ("missing key", None),
        (
            "15-byte key",
            Some("Sec-WebSocket-Key: MTIzNDU2Nzg5MDEyMzQ1"),
        ),
        (
            "17-byte key",
            Some("Sec-WebSocket-Key: MTIzNDU2Nzg5MDEyMzQ1Njc="),
        ),
        (
            "not base64",
            Some("Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!!!"),
        ),
        ("empty key", Some("Sec-WebSocket-Key: ")),
    ];
    for (what, key) in cases {
        let mut lines = base.to_vec();
        lines.extend(key);
        expect_rejected(&mut server, &upgrade_with("/ws", &lines), 400, what);
    }
    server.assert_healthy();
}

#[test]
fn non_get_upgrade_gets_400_or_405() {
    let mut server = Server::start(&[]);
    for method in ["POST", "PUT", "DELETE"] {
        let req = upgrade_request("/ws").replacen("GET", method, 1);
        let (mut s, head) = request_head(server.addr(), req.as_bytes());
        assert!(
            head.status == 400 || head.status == 405,
            "{method} upgrade: expected 400 or 405, got {:?}",
            head.status_line
        );
        if head.status == 405 {
            assert!(
                head.header("Allow").is_some_and(|a| a.contains("GET")),
                "405 without `Allow: GET`: {head:?}"
            );
        }
        assert_closed_within(&mut s, CLOSE_WAIT);
    }
    server.assert_healthy();
}

#[test]
fn missing_upgrade_or_connection_header_is_not_upgraded() {
    let mut server = Server::start(&[]);
    let key = format!("Sec-WebSocket-Key: {SAMPLE_KEY}");
    let no_upgrade = upgrade_with(
        "/ws",
        &[
            "Host: a",
            "Connection: Upgrade",
            &key,
            "Sec-WebSocket-Version: 13",
        ],
    );
    let no_conn = upgrade_with(
        "/ws",
        &[
            "Host: a",
            "Upgrade: websocket",
            &key,
            "Sec-WebSocket-Version: 13",
        ],
    );
    for (what, req) in [("no Upgrade", no_upgrade), ("no Connection", no_conn)] {
        let (mut s, head) = request_head(server.addr(), &req);
        assert!(
            head.status == 400 || head.status == 426,
            "{what}: expected 400 or 426, never 101; got {:?}",
            head.status_line
        );
        assert_closed_within(&mut s, CLOSE_WAIT);
    }
    server.assert_healthy();
}

#[test]
fn two_hundred_headers_get_431() {
    let mut server = Server::start(&[]);
    let mut req = upgrade_request("/ws");
    req.truncate(req.len() - 2); // reopen the head
    for i in 0..200 {
        req.push_str(&format!("X-Filler-{i}: value\r\n"));
    }
    req.push_str("\r\n");
    expect_rejected(&mut server, req.as_bytes(), 431, "200 headers");
    server.assert_healthy();
}

#[test]
fn oversized_head_gets_431() {
    let mut server = Server::start(&[]);
    let mut req = upgrade_request("/ws");
    req.truncate(req.len() - 2);
    req.push_str(&format!("X-Big: {}\r\n\r\n", "b".repeat(20 * 1024)));
    expect_rejected(&mut server, req.as_bytes(), 431, "20 KiB header");
    server.assert_healthy();
}

#[test]
fn random_binary_garbage_gets_400_and_close_never_a_hang() {
    let mut server = Server::start(&[]);
    for seed in [1u64, 2, 3] {
        let mut junk = pseudo_random_bytes(seed, 4096);
        junk[0] = 0; // never a token character, so no parser can wait for "more method"
        let (mut s, head) = request_head(server.addr(), &junk);
        assert_eq!(
            head.status, 400,
            "garbage seed {seed}: got {:?}",
            head.status_line
        );
        assert_closed_within(&mut s, CLOSE_WAIT);
    }
    server.assert_healthy();
}

#[test]
fn handshake_and_first_frame_in_one_write_are_both_processed() {
    let mut server = Server::start(&[]);
    let mut bytes = upgrade_request("/ws").into_bytes();
    bytes.extend(client_text(
        r#"{"type":"subscribe","channel":"early","id":5}"#,
    ));
    bytes.extend(client_text(r#"{"type":"ping"}"#));
    let (mut s, head) = request_head(server.addr(), &bytes);
    assert_eq!(head.status, 101, "{head:?}");
    let mut buf = head.rest;
    // Replies are matched by id; the contract does not order a subscribe's reply (which
    // may wait for the channel's home shard) against a ping's.
    let mut replies = Vec::new();
    for _ in 0..2 {
        let f = read_frame(&mut s, &mut buf, RECV_TIMEOUT).expect("a frame after 101");
        assert_eq!((f.fin, f.opcode, f.masked), (true, OP_TEXT, false), "{f:?}");
        let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
        replies.push(v);
    }
    let subscribed = replies.iter().find(|v| v["type"] == "subscribed");
    let subscribed = subscribed.unwrap_or_else(|| panic!("no subscribed reply: {replies:?}"));
    assert_eq!(subscribed["id"], 5, "{subscribed}");
    assert_eq!(subscribed["channel"], "early", "{subscribed}");
    assert!(
        replies.iter().any(|v| v["type"] == "pong"),
        "no pong: {replies:?}"
    );
    server.assert_healthy();
}

#[test]
fn slow_handshake_is_closed_after_handshake_timeout() {
    let mut server = Server::start(&["--handshake-timeout-ms", "500"]);
    let mut s = raw_connect(server.addr());
    let start = Instant::now();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: a\r\n").unwrap();
    // Keep making progress (one byte per 100 ms) without ever finishing the head: the
    // deadline covers the whole head and must not be reset by progress.
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    // Generous: the lower bound is the claim; this only tells a deadline from none.
    let closed_after = loop {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "slow handshake still open after 5 s"
        );
        match s.read(&mut buf) {
            Ok(0) => break start.elapsed(),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => {
                if s.write_all(b"X").is_err() {
                    break start.elapsed();
                }
            }
            Err(_) => break start.elapsed(),
        }
    };
    assert!(
        closed_after >= Duration::from_millis(400),
        "closed too early ({closed_after:?}) for a 500 ms timeout"
    );
    assert!(
        got.starts_with(b"HTTP/1.1 408 "),
        "a 408 before the close, got {:?}",
        lossy(&got)
    );
    // A prompt client is still served.
    let _ = expect_101(
        &server,
        upgrade_request("/ws").as_bytes(),
        "after slowloris",
    );
    server.assert_healthy();
}

#[test]
fn idle_connection_without_any_bytes_is_closed_after_handshake_timeout() {
    let mut server = Server::start(&["--handshake-timeout-ms", "500"]);
    let mut s = raw_connect(server.addr());
    let start = Instant::now();
    assert_closed_within(&mut s, Duration::from_secs(3));
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "closed too early: {:?}",
        start.elapsed()
    );
    server.assert_healthy();
}

fn second_client_still_served(server: &Server) {
    let (mut s, mut buf) = raw_ws(server.addr());
    s.write_all(&client_text(r#"{"type":"ping"}"#)).unwrap();
    let f = read_frame(&mut s, &mut buf, RECV_TIMEOUT).expect("pong frame");
    let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
    assert_eq!(v["type"], "pong", "second client: {v}");
}

#[test]
fn unmasked_client_frame_closes_with_1002_and_server_keeps_serving() {
    let mut server = Server::start(&[]);
    let (mut s, mut buf) = raw_ws(server.addr());
    s.write_all(&encode_frame(OP_TEXT, br#"{"type":"ping"}"#, None))
        .unwrap();
    assert_eq!(raw_expect_close(&mut s, &mut buf, RECV_TIMEOUT), 1002);
    assert_closed_within(&mut s, CLOSE_WAIT);
    second_client_still_served(&server);
    server.assert_healthy();
}

#[test]
fn random_bytes_after_handshake_close_with_1002_and_server_keeps_serving() {
    let mut server = Server::start(&[]);
    for seed in [11u64, 12, 13] {
        let (mut s, mut buf) = raw_ws(server.addr());
        let mut junk = pseudo_random_bytes(seed, 4096);
        junk[0] = 0x7F; // FIN clear, all RSV bits set, reserved opcode 0xF
        // The server may close before reading everything; a failed write is fine.
        let _ = s.write_all(&junk);
        assert_eq!(
            raw_expect_close(&mut s, &mut buf, RECV_TIMEOUT),
            1002,
            "seed {seed}"
        );
        assert_closed_within(&mut s, CLOSE_WAIT);
    }
    second_client_still_served(&server);
    server.assert_healthy();
}

#[test]
fn reserved_opcode_and_oversized_control_frame_close_with_1002() {
    let mut server = Server::start(&[]);
    let key = Some([1, 2, 3, 4]);
    let cases: [(&str, Vec<u8>); 3] = [
        ("reserved opcode 3", encode_frame(0x3, b"x", key)),
        (
            "ping of 126 bytes",
            encode_frame(OP_PING, &[b'p'; 126], key),
        ),
        (
            "continuation without a start",
            encode_frame(OP_CONT, b"x", key),
        ),
    ];
    for (what, frame) in cases {
        let (mut s, mut buf) = raw_ws(server.addr());
        let _ = s.write_all(&frame);
        assert_eq!(
            raw_expect_close(&mut s, &mut buf, RECV_TIMEOUT),
            1002,
            "{what}"
        );
        assert_closed_within(&mut s, CLOSE_WAIT);
    }
    server.assert_healthy();
}

#[test]
fn websocket_ping_gets_pong_with_same_payload_and_close_is_echoed() {
    let mut server = Server::start(&[]);
    let (mut s, mut buf) = raw_ws(server.addr());
    s.write_all(&encode_frame(OP_PING, b"are you there", Some([9, 8, 7, 6])))
        .unwrap();
    let f = read_frame(&mut s, &mut buf, RECV_TIMEOUT).expect("pong");
    assert_eq!(
        (f.opcode, f.payload.as_slice()),
        (OP_PONG, &b"are you there"[..])
    );
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"bye");
    s.write_all(&encode_frame(OP_CLOSE, &close, Some([1, 1, 1, 1])))
        .unwrap();
    assert_eq!(raw_expect_close(&mut s, &mut buf, RECV_TIMEOUT), 1000);
    assert_closed_within(&mut s, CLOSE_WAIT);
    server.assert_healthy();
}

#[test]
fn healthz_returns_200() {
    let mut server = Server::start(&[]);
    let (_s, head) = request_head(server.addr(), b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(head.status, 200, "{head:?}");
    server.assert_healthy();
}

#[test]
fn unknown_path_returns_404() {
    let mut server = Server::start(&[]);
    let (_s, head) = request_head(
        server.addr(),
        b"GET /no-such-thing HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert_eq!(head.status, 404, "{head:?}");
    let (_s, head) = request_head(server.addr(), upgrade_request("/no-such-thing").as_bytes());
    assert_eq!(head.status, 404, "upgrade on an unknown path: {head:?}");
    server.assert_healthy();
}

#[test]
fn many_bad_handshakes_in_parallel_do_not_hurt_the_server() {
    let mut server = Server::start(&[]);
    let addr = server.addr();
    let workers: Vec<_> = (0..8u64)
        .map(|t| {
            thread::spawn(move || {
                for i in 0..25u64 {
                    let mut s = raw_connect(addr);
                    let mut junk = pseudo_random_bytes(t * 1000 + i, 512);
                    junk[0] = 0;
                    match s.write_all(&junk) {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::BrokenPipe => continue,
                        Err(e) if e.kind() == ErrorKind::ConnectionReset => continue,
                        Err(e) => panic!("write: {e}"),
                    }
                    assert_closed_within(&mut s, CLOSE_WAIT);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let _ = expect_101(
        &server,
        upgrade_request("/ws").as_bytes(),
        "after the storm",
    );
    server.assert_healthy();
}
