//! permessage-deflate against the real binary over raw sockets (reliability catalogue
//! group Z): negotiation, compressed echo with the negotiated takeover parameters, shared
//! and per-connection broadcast frames, corrupt data and decompression bombs, the per-prefix
//! policy, and the memory a compressing connection costs.
//!
//! The client side compresses and inflates with `herald::proto::deflate`, a raw DEFLATE
//! codec (zlib-rs) independent of the server's framing; `tests/python/test_compression.py`
//! checks the same paths with the `websockets` library's own zlib.

use crate::support;
use crate::support_deflate;

use std::io::Read;
use std::net::SocketAddr;

use herald::proto::deflate::{Compressor, CompressorSettings};
use herald::proto::frame::{FrameHeader, OpCode};
use support::{Server, metric_settled, process_rss_kib, pseudo_random_bytes};
use support_deflate::{Client, Frame};

/// `message` deflated as a client sends it (raw, sync-flushed, tail removed).
fn deflated(message: &[u8]) -> Vec<u8> {
    let frame =
        Compressor::new(CompressorSettings::SHARED, true).encode_frame(OpCode::Binary, message);
    let (_, len) = FrameHeader::parse(&frame).unwrap().unwrap();
    frame[len..].to_vec()
}

/// A JSON document of about 1 KiB, like a push server's typical message.
fn json_1k(i: usize) -> String {
    let items: Vec<String> = (0..12)
        .map(|j| {
            format!(
                r#"{{"symbol":"SYM{j:02}","bid":{}.{:02},"ask":{}.{:02},"volume":{}}}"#,
                100 + j,
                (i * 7 + j) % 100,
                101 + j,
                (i * 3 + j) % 100,
                1000 * j + i
            )
        })
        .collect();
    format!(r#"{{"tick":{i},"quotes":[{}]}}"#, items.join(","))
}

fn publish(publisher: &mut Client, channel: &str, data: &str) {
    publisher.send_text(&format!(
        r#"{{"type":"publish","channel":"{channel}","data":{data},"id":2}}"#
    ));
    let (ack, _) = publisher.recv_message();
    assert!(ack.contains(r#""type":"ack""#), "{ack}");
}

fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (mut s, head) = support::request_head(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, 200);
    let mut body = head.rest;
    s.read_to_end(&mut body).unwrap();
    let body = String::from_utf8(body).unwrap();
    body.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
        .parse()
        .unwrap()
}

#[test]
fn compression_is_off_by_default_and_every_offer_is_declined() {
    let server = Server::start(&[]);
    let client = Client::connect(server.addr(), "/echo", Some("permessage-deflate"));
    assert_eq!(client.extensions(), None);
}

/// Reliability catalogue Z-03.
#[test]
fn accepts_the_first_offer_it_can_honour_and_echoes_its_parameters() {
    let server = Server::start(&["--compression", "shared"]);
    let cases = [
        (
            "permessage-deflate; client_max_window_bits",
            Some("permessage-deflate"),
        ),
        ("permessage-deflate; server_max_window_bits=8", None),
        ("permessage-deflate; server_max_window_bits=16", None),
        ("permessage-deflate; server_max_window_bits=abc", None),
        (
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            None,
        ),
        ("permessage-deflate; x-unknown", None),
        ("permessage-deflate; client_max_window_bits=", None),
        (
            "permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=10; client_no_context_takeover",
            Some("permessage-deflate; client_no_context_takeover; server_max_window_bits=10"),
        ),
        (
            "permessage-deflate; server_no_context_takeover",
            Some("permessage-deflate; server_no_context_takeover"),
        ),
    ];
    for (offer, expected) in cases {
        let client = Client::connect(server.addr(), "/ws", Some(offer));
        assert_eq!(client.extensions(), expected, "{offer}");
    }
}

#[test]
fn echo_answers_compressed_keeping_its_window_unless_told_not_to() {
    let server = Server::start(&["--compression", "shared"]);
    let message = json_1k(1);
    for (offer, repeats_shrink) in [
        ("permessage-deflate", true),
        ("permessage-deflate; server_no_context_takeover", false),
    ] {
        let mut client = Client::connect(server.addr(), "/echo", Some(offer));
        let mut sizes = Vec::new();
        for _ in 0..2 {
            client.send_compressed(OpCode::Text, &deflated(message.as_bytes()));
            let (echo, frame) = client.recv_message();
            assert!(frame.compressed(), "{offer}");
            assert_eq!(echo, message);
            sizes.push(frame.bytes.len());
        }
        assert!(sizes[0] < message.len() / 2, "{offer}: {sizes:?}");
        if repeats_shrink {
            assert!(sizes[1] < sizes[0] / 2, "{offer}: {sizes:?}");
        } else {
            assert_eq!(sizes[1], sizes[0], "{offer}");
        }
        // A plain message is accepted on a compressing connection as well.
        client.send_text("plain");
        assert_eq!(client.recv_message().0, "plain");
    }
}

#[test]
fn rsv1_without_negotiated_deflate_closes_with_1002() {
    let server = Server::start(&["--compression", "shared"]);
    let mut client = Client::connect(server.addr(), "/echo", None);
    client.send_compressed(OpCode::Text, &deflated(b"hello"));
    assert_eq!(client.expect_close(), 1002);
}

/// Reliability catalogue Z-02.
#[test]
fn corrupt_compressed_data_closes_with_1007_and_others_are_still_served() {
    let server = Server::start(&["--compression", "shared"]);
    let mut good = deflated(json_1k(3).as_bytes());
    // The first block header declares the reserved block type 3.
    good[0] |= 0b110;
    for payload in [pseudo_random_bytes(7, 300), good] {
        let mut client = Client::connect(server.addr(), "/echo", Some("permessage-deflate"));
        client.send_compressed(OpCode::Binary, &payload);
        assert_eq!(client.expect_close(), 1007);
    }
    let mut other = Client::connect(server.addr(), "/echo", Some("permessage-deflate"));
    other.send_text("still here");
    assert_eq!(other.recv_message().0, "still here");
}

#[test]
fn decompression_bomb_closes_with_1009() {
    let server = Server::start(&["--compression", "shared", "--max-message-bytes", "65536"]);
    let bomb = deflated(&vec![b' '; 64 << 20]);
    assert!(bomb.len() < 65_536, "{}", bomb.len());
    let mut client = Client::connect(server.addr(), "/ws", Some("permessage-deflate"));
    client.send_compressed(OpCode::Text, &bomb);
    assert_eq!(client.expect_close(), 1009);
    let mut other = Client::connect(server.addr(), "/ws", Some("permessage-deflate"));
    other.send_compressed(OpCode::Text, &deflated(br#"{"type":"ping"}"#));
    assert_eq!(other.recv_message().0, r#"{"type":"pong"}"#);
}

#[test]
fn shared_policy_sends_one_compressed_frame_to_every_compressing_subscriber() {
    let server = Server::start(&["--compression", "shared", "--threads", "2"]);
    let addr = server.addr();
    let mut compressing: Vec<Client> = (0..4)
        .map(|_| {
            Client::connect(
                addr,
                "/ws",
                Some("permessage-deflate; client_max_window_bits"),
            )
        })
        .collect();
    let mut limited = Client::connect(
        addr,
        "/ws",
        Some("permessage-deflate; server_max_window_bits=10"),
    );
    let mut plain = Client::connect(addr, "/ws", None);
    for client in compressing.iter_mut().chain([&mut limited, &mut plain]) {
        client.subscribe("ticks");
    }
    let mut publisher = Client::connect(addr, "/ws", None);
    let data = json_1k(5);
    publish(&mut publisher, "ticks", &data);

    let frames: Vec<(String, Frame)> = compressing.iter_mut().map(Client::recv_message).collect();
    let (_, first) = &frames[0];
    assert!(first.compressed());
    for (text, frame) in &frames {
        assert!(text.ends_with(&format!(r#""data":{data}}}"#)), "{text}");
        assert_eq!(
            frame.bytes, first.bytes,
            "every subscriber gets the same bytes"
        );
    }
    // A window smaller than the shared frame's, or no deflate at all: the plain frame.
    for client in [&mut limited, &mut plain] {
        let (text, frame) = client.recv_message();
        assert!(!frame.compressed());
        assert_eq!(text, frames[0].0);
        assert!(frame.bytes.len() > 2 * first.bytes.len());
    }
    assert_eq!(
        metric_settled(addr, "herald_compressed_frames_total", |n| n >= 4.0),
        4.0
    );
    assert!(metric(addr, "herald_compression_saved_bytes_total") > 4 * 500);
    assert!(metric(addr, "herald_deflate_nanoseconds_total") > 0);
}

#[test]
fn per_connection_policy_compresses_with_each_subscribers_own_window() {
    let server = Server::start(&["--compression", "per-connection"]);
    let addr = server.addr();
    let mut subscriber = Client::connect(addr, "/ws", Some("permessage-deflate"));
    subscriber.subscribe("ticks");
    let mut publisher = Client::connect(addr, "/ws", Some("permessage-deflate"));
    let mut sizes = Vec::new();
    for i in 0..3 {
        let data = json_1k(i);
        publish(&mut publisher, "ticks", &data);
        let (text, frame) = subscriber.recv_message();
        assert!(frame.compressed());
        assert!(text.ends_with(&format!(r#""data":{data}}}"#)), "{text}");
        sizes.push(frame.bytes.len());
    }
    // The window holds the previous messages: later ones compress far better.
    assert!(sizes[1] < sizes[0] * 2 / 3, "{sizes:?}");
    assert!(metric(addr, "herald_inflate_nanoseconds_total") == 0);
    publisher.send_compressed(OpCode::Text, &deflated(br#"{"type":"ping"}"#));
    assert_eq!(publisher.recv_message().0, r#"{"type":"pong"}"#);
    assert!(metric_settled(addr, "herald_inflate_nanoseconds_total", |n| n > 0.0) > 0.0);
}

#[test]
fn channel_prefix_policy_overrides_the_default() {
    let dir = std::env::temp_dir().join(format!("herald-compression-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("herald.toml");
    std::fs::write(
        &file,
        "compression = \"off\"\n[[namespace]]\nprefix = \"prices.\"\ncompression = \"shared\"\n",
    )
    .unwrap();
    let server = Server::start(&["--config", file.to_str().unwrap()]);
    let addr = server.addr();
    let mut subscriber = Client::connect(addr, "/ws", Some("permessage-deflate"));
    assert_eq!(subscriber.extensions(), Some("permessage-deflate"));
    subscriber.subscribe("prices.btc");
    subscriber.subscribe("news");
    let mut publisher = Client::connect(addr, "/ws", None);
    publish(&mut publisher, "prices.btc", &json_1k(1));
    publish(&mut publisher, "news", &json_1k(2));
    let (first, frame) = subscriber.recv_message();
    assert!(first.contains("prices.btc") && frame.compressed());
    let (second, frame) = subscriber.recv_message();
    assert!(second.contains("news") && !frame.compressed());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Reliability catalogue Z-04, scaled to a shared test machine: idle compressing
/// connections cost no compressor memory, busy ones a bounded compressor.
#[test]
fn compressing_connections_cost_bounded_memory() {
    let server = Server::start(&["--compression", "per-connection", "--threads", "1"]);
    let addr = server.addr();
    let mut publisher = Client::connect(addr, "/ws", None);
    let before = process_rss_kib(server.pid()) * 1024;
    let mut idle: Vec<Client> = (0..400)
        .map(|_| Client::connect(addr, "/ws", Some("permessage-deflate")))
        .collect();
    for client in &mut idle {
        client.subscribe("big");
    }
    let idle_rss = process_rss_kib(server.pid()) * 1024;
    let per_idle = idle_rss.saturating_sub(before) / 400;
    assert!(
        per_idle <= 64 * 1024,
        "{per_idle} bytes per idle connection"
    );

    let message = format!("\"{}\"", "compressible text ".repeat(32 * 1024 / 18));
    for _ in 0..2 {
        publish(&mut publisher, "big", &message);
        for client in &mut idle[..] {
            let (text, frame) = client.recv_message();
            assert!(frame.compressed() && text.len() > 32 * 1024);
        }
    }
    let per_active = (process_rss_kib(server.pid()) * 1024).saturating_sub(before) / 400;
    eprintln!("server RSS per compressing connection: idle {per_idle} B, active {per_active} B");
    assert!(
        per_active <= 350 * 1024,
        "{per_active} bytes per active connection"
    );
}

/// A per-connection compressor's window must see every frame it made, so a subscriber
/// with one that falls behind is closed with 4008 even where the channel's policy would
/// shed (`drop-oldest` here): nothing shed, no gap, what was queued and then the close.
#[test]
fn a_per_connection_compressing_subscriber_that_falls_behind_is_closed_with_4008() {
    let server = Server::start(&[
        "--compression",
        "per-connection",
        "--slow-consumer-policy",
        "drop-oldest",
        "--outbound-queue-bytes",
        "65536",
        "--max-messages-per-second",
        "1000000",
        // The close frame waits behind what is queued until the subscriber reads.
        "--close-timeout-ms",
        "60000",
    ]);
    let addr = server.addr();
    let mut behind = Client::connect(addr, "/ws", Some("permessage-deflate"));
    assert!(behind.extensions().is_some(), "deflate negotiated");
    behind.subscribe("fast");

    // Hard-to-compress messages, 50 at a time, until the server reports the close (the
    // socket buffers take an unknown part first).
    let mut publisher = Client::connect(addr, "/ws", None);
    let mut published = 0u64;
    while metric(addr, "herald_slow_consumer_closes_total") == 0 {
        assert!(
            published < 50_000,
            "no slow-consumer close after {published} messages"
        );
        for _ in 0..50 {
            published += 1;
            let data: String = pseudo_random_bytes(published, 2048)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            publisher.send_text(&format!(
                r#"{{"type":"publish","channel":"fast","data":"{data}","id":{published}}}"#
            ));
        }
        for _ in 0..50 {
            let (ack, _) = publisher.recv_message();
            assert!(ack.contains(r#""type":"ack""#), "{ack}");
        }
    }
    assert_eq!(
        metric(addr, "herald_messages_shed_total"),
        0,
        "nothing is shed"
    );

    let mut received = 0u64;
    let code = loop {
        let frame = behind
            .recv()
            .expect("connection ended without a close frame");
        match frame.header.opcode {
            OpCode::Close => break u16::from_be_bytes([frame.payload[0], frame.payload[1]]),
            OpCode::Text if frame.compressed() => received += 1,
            OpCode::Text => panic!(
                "a plain frame to a compressing subscriber: {}",
                String::from_utf8_lossy(&frame.payload)
            ),
            _ => {}
        }
    };
    eprintln!("per-connection subscriber: {received} of {published} messages, then {code}");
    assert_eq!(code, 4008);
    assert!(received < published, "cut off before the end");
    let mut other = Client::connect(addr, "/ws", None);
    other.subscribe("fast");
}
