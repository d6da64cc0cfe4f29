//! Limits that keep the server up, against the real binary (issue 4; reliability.md
//! groups H, F and D): slowloris, slow consumers, frame and message sizes, ping floods,
//! inbound rate, connections per address and in all, accept storms, `X-Forwarded-For`,
//! and running out of file descriptors. Each hostile case asserts the exact status or
//! close code of DESIGN.md and then that a well-behaved client is still served.
//!
//! Several client addresses: the whole of 127.0.0.0/8 is on `lo`, so a client socket
//! bound to 127.0.0.2 before `connect` is "another address" to the server.

use crate::support;

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use futures_util::stream::{self, StreamExt};
use serde_json::{Value, json};
use socket2::{Domain, Socket, Type};
use support::*;
use tokio_tungstenite::tungstenite::Message;

const CLOSE_WAIT: Duration = Duration::from_secs(3);
const MASK: Option<[u8; 4]> = Some([0x11, 0x22, 0x33, 0x44]);

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A TCP connection from `127.0.0.<last>` (bound before connect); `rcvbuf` shrinks the
/// receive buffer first when given.
fn connect_from(last: u8, addr: SocketAddr, rcvbuf: Option<usize>) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
    }
    let local = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, last), 0);
    socket
        .bind(&SocketAddr::V4(local).into())
        .unwrap_or_else(|e| panic!("bind 127.0.0.{last}: {e}"));
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr} from 127.0.0.{last}: {e}"));
    let s: TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// An upgrade request for `/ws` with extra header lines.
fn ws_request(headers: &[(&str, &str)]) -> Vec<u8> {
    headers
        .iter()
        .fold(client_handshake("/ws"), |h, (k, v)| h.header(k, v))
        .encode()
}

/// Sends an upgrade from `127.0.0.<last>` and reads the response head.
fn upgrade_from(last: u8, addr: SocketAddr, headers: &[(&str, &str)]) -> (TcpStream, Head) {
    let mut s = connect_from(last, addr, None);
    s.write_all(&ws_request(headers)).expect("write upgrade");
    let head = read_head(&mut s);
    (s, head)
}

/// Asserts a refusal with `status` and an integer `Retry-After` in the 1–5 s README
/// promises, and that the socket is then closed. Returns the Retry-After seconds.
fn expect_retry_after(mut s: TcpStream, head: &Head, status: u16, what: &str) -> u64 {
    assert_eq!(
        head.status, status,
        "{what}: expected {status}, got {head:?}"
    );
    let retry = head
        .header("Retry-After")
        .unwrap_or_else(|| panic!("{what}: {status} without Retry-After: {head:?}"));
    let seconds: u64 = retry
        .parse()
        .unwrap_or_else(|_| panic!("{what}: Retry-After {retry:?} is not whole seconds"));
    assert!(
        (1..=5).contains(&seconds),
        "{what}: Retry-After {seconds}, README promises 1–5 s"
    );
    assert_closed_within(&mut s, CLOSE_WAIT);
    seconds
}

fn send_text_raw(s: &mut TcpStream, text: &str) {
    s.write_all(&client_text(text)).expect("send frame");
}

/// The next text frame as JSON, skipping control frames; `None` if a close frame or the
/// end of the connection comes first (the close code, if any, goes to `closed`).
fn next_json(s: &mut TcpStream, buf: &mut Vec<u8>, closed: &mut Option<u16>) -> Option<Value> {
    loop {
        let f = read_frame(s, buf, RECV_TIMEOUT)?;
        match f.opcode {
            OP_TEXT => return Some(serde_json::from_slice(&f.payload).expect("JSON reply")),
            OP_CLOSE => {
                *closed = f.close_code();
                return None;
            }
            _ => continue,
        }
    }
}

/// A fresh `/ws` client on 127.0.0.1 gets a pong (the implicit check after each case).
fn healthy_client(server: &mut Server) {
    let (mut s, mut buf) = raw_ws(server.addr());
    send_text_raw(&mut s, r#"{"type":"ping"}"#);
    let mut closed = None;
    let v = next_json(&mut s, &mut buf, &mut closed)
        .unwrap_or_else(|| panic!("healthy client: closed ({closed:?}) instead of a pong"));
    assert_eq!(v["type"], "pong", "healthy client: {v}");
    server.assert_healthy();
}

/// App-level ping on an open raw connection.
fn raw_ping(s: &mut TcpStream, buf: &mut Vec<u8>, what: &str) {
    send_text_raw(s, r#"{"type":"ping"}"#);
    let mut closed = None;
    let v = next_json(s, buf, &mut closed)
        .unwrap_or_else(|| panic!("{what}: closed ({closed:?}) instead of a pong"));
    assert_eq!(v["type"], "pong", "{what}: {v}");
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count()
}

/// Samples the server's RSS every 20 ms until dropped; `peak()` is the largest seen.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(process_rss_kib(pid)));
        let (s, p) = (Arc::clone(&stop), Arc::clone(&peak));
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    && let Some(kib) = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                {
                    p.fetch_max(kib, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The value of the sample `name` in `/metrics` (see [`metric_value`]); panics without it.
fn metric(addr: SocketAddr, name: &str) -> f64 {
    metric_value(addr, name).unwrap_or_else(|| panic!("no metric {name} in /metrics"))
}

// ---------------------------------------------------------------------------------------
// Slowloris
// ---------------------------------------------------------------------------------------

#[test]
fn slowloris_connections_are_closed_at_the_handshake_timeout_while_others_handshake_fast() {
    const SLOW: usize = 300;
    const TIMEOUT_MS: u64 = 1500;
    let mut server = Server::start(&["--handshake-timeout-ms", &TIMEOUT_MS.to_string()]);
    let addr = server.addr();
    let pid = server.pid();
    let fds_before = fd_count(pid);

    // 300 connections from 127.0.0.2-11, each sending an unfinished head and then one
    // header byte every 200 ms: progress must not extend the deadline.
    let mut slow: Vec<(TcpStream, Instant, Option<Instant>, Vec<u8>)> = (0..SLOW)
        .map(|i| {
            let mut s = connect_from(2 + (i % 10) as u8, addr, None);
            let at = Instant::now();
            s.write_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                .unwrap();
            s.set_nonblocking(true).unwrap();
            (s, at, None, Vec::new())
        })
        .collect();

    // Meanwhile a legitimate client on 127.0.0.1 keeps handshaking (at least 5 times,
    // however slowly a busy machine lets it).
    let probe = thread::spawn(move || {
        let mut times = Vec::new();
        let end = Instant::now() + Duration::from_millis(TIMEOUT_MS + 500);
        while Instant::now() < end || times.len() < 5 {
            let start = Instant::now();
            let (mut s, mut buf) = raw_ws(addr);
            raw_ping(&mut s, &mut buf, "client during slowloris");
            times.push(start.elapsed());
            thread::sleep(Duration::from_millis(50));
        }
        times
    });

    let give_up = Instant::now() + Duration::from_millis(TIMEOUT_MS * 3 + 3000);
    let mut chunk = [0u8; 1024];
    while slow.iter().any(|c| c.2.is_none()) && Instant::now() < give_up {
        for (s, _, closed, got) in slow.iter_mut().filter(|c| c.2.is_none()) {
            loop {
                match s.read(&mut chunk) {
                    Ok(0) => {
                        *closed = Some(Instant::now());
                        break;
                    }
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        *closed = Some(Instant::now());
                        break;
                    }
                }
            }
            if closed.is_none() && s.write(b"x").is_err() {
                *closed = Some(Instant::now());
            }
        }
        thread::sleep(Duration::from_millis(200));
    }

    let times = probe.join().expect("probe thread");
    let timeout = Duration::from_millis(TIMEOUT_MS);
    for (i, (_, at, closed, got)) in slow.iter().enumerate() {
        let closed = closed.unwrap_or_else(|| panic!("slow connection {i} still open"));
        let after = closed - *at;
        assert!(
            after >= timeout - Duration::from_millis(100),
            "slow connection {i} closed after {after:?}, before the {timeout:?} deadline"
        );
        assert!(
            after <= timeout + Duration::from_secs(3),
            "slow connection {i} closed only after {after:?} (deadline {timeout:?})"
        );
        assert!(
            got.starts_with(b"HTTP/1.1 408 "),
            "slow connection {i} got {:?} instead of a 408",
            lossy(got)
        );
    }
    assert_eq!(
        metric_settled(
            addr,
            r#"herald_rejected_requests_total{status="408"}"#,
            |n| { n >= SLOW as f64 }
        ),
        SLOW as f64,
        "the server counts one 408 per slow connection"
    );
    // The attack must not make a legitimate client wait for the slow connections'
    // deadline; how much faster than that it is, is for the benchmarks to say.
    let worst = times.iter().max().copied().unwrap_or_default();
    eprintln!(
        "slowloris: {} probe handshakes, worst {worst:?}",
        times.len()
    );
    assert!(
        worst < timeout,
        "a legitimate handshake took {worst:?} during the attack (deadline {timeout:?}): {times:?}"
    );
    drop(slow);
    // The descriptors come back.
    let deadline = Instant::now() + Duration::from_secs(3);
    while fd_count(pid) > fds_before + 2 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        fd_count(pid) <= fds_before + 2,
        "server holds {} descriptors, {fds_before} before the attack",
        fd_count(pid)
    );
    healthy_client(&mut server);
}

// ---------------------------------------------------------------------------------------
// Slow consumer
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_that_never_reads_is_closed_with_4008_while_a_thousand_others_receive_everything()
 {
    const SUBS: usize = 1000;
    const FEED: u64 = 100;
    const BULK: u64 = 500;
    const BULK_BYTES: usize = 48 * 1024;
    const QUEUE: usize = 256 * 1024;
    let started = Instant::now();
    let mut server = Server::start(&[
        "--outbound-queue-bytes",
        &QUEUE.to_string(),
        "--max-messages-per-second",
        "1000000",
        "--history-size",
        "1",
        // The close handshake waits for the slow consumer to read up to the close frame,
        // so its code is checked on the wire.
        "--close-timeout-ms",
        "60000",
    ]);
    let addr = server.addr();
    let pid = server.pid();

    // The slow consumer: a small receive buffer, subscribed to the feed and to a bulk
    // channel, then never reads again.
    let mut slow = connect_from(2, addr, Some(4096));
    let mut slow_buf = upgrade(&mut slow, &client_handshake("/ws"));
    send_text_raw(&mut slow, r#"{"type":"subscribe","channel":"feed","id":1}"#);
    send_text_raw(&mut slow, r#"{"type":"subscribe","channel":"bulk","id":2}"#);
    let mut closed = None;
    for _ in 0..2 {
        let v = next_json(&mut slow, &mut slow_buf, &mut closed).expect("subscribed");
        assert_eq!(v["type"], "subscribed", "{v}");
    }

    let subs: Vec<Ws> = stream::iter(0..SUBS)
        .map(|i| async move {
            let mut ws = connect_ws(addr).await;
            subscribe(&mut ws, "feed", i as u64).await;
            ws
        })
        .buffer_unordered(64)
        .collect()
        .await;
    eprintln!("{SUBS} subscribers ready after {:?}", started.elapsed());
    let receivers: Vec<_> = subs
        .into_iter()
        .enumerate()
        .map(|(n, mut ws)| {
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(FEED as usize);
                for i in 0..FEED {
                    // Feed messages go out between bulk publishes: on a machine busy with
                    // other work, seconds can pass between two.
                    let raw = recv_text_within(&mut ws, Duration::from_secs(60)).await;
                    let v: Value = serde_json::from_str(&raw).unwrap();
                    assert_eq!(
                        (&v["type"], &v["channel"]),
                        (&json!("message"), &json!("feed")),
                        "{raw}"
                    );
                    let (seq, data) = (v["seq"].as_u64().unwrap(), &v["data"]);
                    assert_eq!(
                        seq,
                        i + 1,
                        "subscriber {n}: expected seq {}, got {raw}",
                        i + 1
                    );
                    let sent = data["t"].as_u64().unwrap_or_else(|| panic!("{raw}"));
                    times.push(now_micros().saturating_sub(sent));
                }
                (ws, times)
            })
        })
        .collect();

    let base_rss = process_rss_kib(pid);
    let sampler = RssSampler::start(pid);
    let mut publ = connect_ws(addr).await;
    let filler = "x".repeat(BULK_BYTES);
    let publish_started = Instant::now();
    // Publishes go out in windows of 16 awaiting their acks: this case is about the
    // slow reader, not about a publisher that pipelines without bound.
    let mut sent = 0u64;
    let mut acked = 0u64;
    for i in 0..BULK {
        let bulk =
            format!(r#"{{"type":"publish","channel":"bulk","data":"{filler}","id":{sent}}}"#);
        publ.feed(Message::text(bulk)).await.unwrap();
        sent += 1;
        if i % (BULK / FEED) == 0 {
            let feed = format!(
                r#"{{"type":"publish","channel":"feed","data":{{"i":{i},"t":{}}},"id":{sent}}}"#,
                now_micros()
            );
            publ.feed(Message::text(feed)).await.unwrap();
            sent += 1;
        }
        if i % 16 == 15 {
            publ.flush().await.unwrap();
            while acked < sent {
                let v = recv_json(&mut publ).await;
                assert_eq!(v["type"], "ack", "publisher: {v}");
                acked += 1;
            }
        }
    }
    publ.flush().await.unwrap();
    while acked < sent {
        let v = recv_json(&mut publ).await;
        assert_eq!(v["type"], "ack", "publisher: {v}");
        acked += 1;
    }
    eprintln!(
        "published {} MB in {:?}",
        BULK as usize * BULK_BYTES / 1_000_000,
        publish_started.elapsed()
    );

    let mut all_times = Vec::new();
    for h in receivers {
        let (ws, times) = h.await.expect("receiver");
        all_times.extend(times);
        drop(ws);
    }
    let peak = sampler.peak();
    drop(sampler);
    all_times.sort_unstable();
    let p99 = all_times[all_times.len() * 99 / 100];
    eprintln!(
        "RSS {base_rss} KiB before, peak {peak} KiB; feed latency p50 {} us, p99 {p99} us",
        all_times[all_times.len() / 2]
    );
    // How fast the others were served is for the benchmarks (it ran past 3 s here on a
    // machine loaded to 12): this test holds that they got everything, in order, while
    // the one that does not read was cut off and its memory bounded.
    // Unbounded, the slow consumer alone would hold ~24 MB of bulk frames.
    let grew = peak.saturating_sub(base_rss);
    assert!(
        grew < 20 * 1024,
        "server RSS grew by {grew} KiB while a consumer did not read (queue bound {QUEUE} bytes)"
    );

    // The slow consumer was cut off: what was queued for it, then close 4008.
    let slow_result = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut frames = 0u64;
        loop {
            assert!(Instant::now() < deadline, "slow consumer still open");
            match read_frame(&mut slow, &mut slow_buf, Duration::from_secs(5)) {
                None => return (None, frames),
                Some(f) if f.opcode == OP_CLOSE => return (f.close_code(), frames),
                Some(_) => frames += 1,
            }
        }
    })
    .await
    .unwrap();
    eprintln!("slow consumer: {slow_result:?} (close code, frames read before it)");
    assert_eq!(slow_result.0, Some(4008), "the slow consumer's close frame");
    assert!(
        slow_result.1 < BULK + FEED,
        "slow consumer received everything ({} frames): it was never cut off",
        slow_result.1
    );
    assert!(
        metric_settled(addr, "herald_slow_consumer_closes_total", |n| n >= 1.0) >= 1.0,
        "slow consumer close not counted"
    );
    let mut ws = connect_ws(addr).await;
    ping_pong(&mut ws).await;
    server.assert_healthy();
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

// ---------------------------------------------------------------------------------------
// Frame and message sizes
// ---------------------------------------------------------------------------------------

/// A masked frame header (no payload) announcing `len` bytes with the given first byte.
fn header_announcing(first: u8, len: u64) -> Vec<u8> {
    let mut out = vec![first];
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    out.extend_from_slice(&MASK.unwrap());
    out
}

#[test]
fn frame_announcing_more_than_the_limit_closes_with_1009_before_its_payload() {
    // One shard, warmed up by a first client, so the baseline includes its first
    // allocations.
    let mut server = Server::start(&["--threads", "1", "--max-message-bytes", "4096"]);
    let pid = server.pid();
    healthy_client(&mut server);
    let rss_before = process_rss_kib(pid);
    for (what, len) in [
        ("16-bit length 5000", 5000u64),
        ("64-bit length 1 GiB", 1 << 30),
        ("64-bit length 2^62", 1 << 62),
    ] {
        let (mut s, mut buf) = raw_ws(server.addr());
        // Only the header and a few bytes: the payload never comes, so a close at all
        // (with 1009, not an idle timeout's code) shows the answer did not wait for it.
        s.write_all(&header_announcing(0x81, len)).unwrap();
        s.write_all(b"{\"type\"").unwrap();
        let code = raw_expect_close(&mut s, &mut buf, RECV_TIMEOUT);
        assert_eq!(code, 1009, "{what}");
        assert_closed_within(&mut s, CLOSE_WAIT);
        eprintln!(
            "{what}: RSS {} KiB (baseline {rss_before})",
            process_rss_kib(pid)
        );
    }
    let grew = process_rss_kib(pid).saturating_sub(rss_before);
    assert!(
        grew < 1024,
        "RSS grew by {grew} KiB for announced giant frames"
    );
    healthy_client(&mut server);
}

#[test]
fn sixty_four_bit_length_with_top_bit_set_closes_with_1002() {
    let mut server = Server::start(&[]);
    let (mut s, mut buf) = raw_ws(server.addr());
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&(0x8000_0000_0000_0005u64).to_be_bytes());
    frame.extend_from_slice(&MASK.unwrap());
    frame.extend_from_slice(b"hello");
    s.write_all(&frame).unwrap();
    assert_eq!(
        raw_expect_close(&mut s, &mut buf, Duration::from_secs(2)),
        1002
    );
    assert_closed_within(&mut s, CLOSE_WAIT);
    healthy_client(&mut server);
}

#[test]
fn non_minimal_length_encoding_closes_with_1002() {
    let mut server = Server::start(&[]);
    for (what, header) in [
        ("16-bit form for 5 bytes", {
            let mut h = vec![0x81, 0x80 | 126, 0, 5];
            h.extend_from_slice(&MASK.unwrap());
            h
        }),
        ("64-bit form for 200 bytes", {
            let mut h = vec![0x81, 0x80 | 127];
            h.extend_from_slice(&200u64.to_be_bytes());
            h.extend_from_slice(&MASK.unwrap());
            h
        }),
    ] {
        let (mut s, mut buf) = raw_ws(server.addr());
        let len = if header[1] & 0x7F == 126 { 5 } else { 200 };
        let mut frame = header;
        frame.extend(std::iter::repeat_n(b' ' ^ 0x11, len)); // masked spaces (key starts 0x11)
        let _ = s.write_all(&frame);
        assert_eq!(
            raw_expect_close(&mut s, &mut buf, Duration::from_secs(2)),
            1002,
            "{what}"
        );
    }
    healthy_client(&mut server);
}

/// A masked frame with explicit FIN and opcode.
fn fragment(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = encode_frame(opcode, payload, MASK);
    if !fin {
        f[0] &= 0x7F;
    }
    f
}

#[test]
fn message_over_the_limit_built_from_small_fragments_closes_with_1009() {
    let mut server = Server::start(&["--max-message-bytes", "4096"]);
    let (mut s, mut buf) = raw_ws(server.addr());
    // Every fragment is far below the limit; the fifth takes the message past it.
    let piece = vec![b'a'; 1000];
    let mut frames = fragment(false, OP_TEXT, &piece);
    for _ in 0..9 {
        frames.extend(fragment(false, OP_CONT, &piece));
    }
    frames.extend(fragment(true, OP_CONT, &piece));
    let _ = s.write_all(&frames); // the server may close before reading it all
    assert_eq!(
        raw_expect_close(&mut s, &mut buf, Duration::from_secs(2)),
        1009
    );
    assert_closed_within(&mut s, CLOSE_WAIT);

    // Just under the limit in many fragments is fine (and is a real publish).
    let (mut s, mut buf) = raw_ws(server.addr());
    let text = format!(
        r#"{{"type":"publish","channel":"c","data":"{}","id":7}}"#,
        "b".repeat(3900)
    );
    assert!(text.len() <= 4096);
    let chunks: Vec<&[u8]> = text.as_bytes().chunks(100).collect();
    let mut frames = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let opcode = if i == 0 { OP_TEXT } else { OP_CONT };
        frames.extend(fragment(i + 1 == chunks.len(), opcode, c));
    }
    s.write_all(&frames).unwrap();
    let mut closed = None;
    let v = next_json(&mut s, &mut buf, &mut closed)
        .unwrap_or_else(|| panic!("closed ({closed:?}) on a message under the limit"));
    assert_eq!(
        (v["type"].as_str(), v["id"].as_u64()),
        (Some("ack"), Some(7)),
        "{v}"
    );
    healthy_client(&mut server);
}

/// D-02: one message as a flood of empty continuation frames. reliability.md §6.3 caps
/// frames per message at 1024 (close 1008 or 1009); each empty frame costs the server a
/// decode step while never growing the message, and no message is ever counted against
/// the inbound rate limit.
#[test]
fn flood_of_empty_fragments_is_cut_off_with_1008_or_1009() {
    const FRAGMENTS: usize = 200_000;
    let mut server = Server::start(&[]);
    let pid = server.pid();
    let cpu_before = process_cpu_time(pid);
    let (mut s, mut buf) = raw_ws(server.addr());
    let empty = fragment(false, OP_CONT, b"");
    let mut flood = fragment(false, OP_TEXT, b"{");
    for _ in 0..FRAGMENTS {
        flood.extend_from_slice(&empty);
    }
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&flood); // a close mid-way makes this fail; that is fine
    let cpu = process_cpu_time(pid).saturating_sub(cpu_before);
    eprintln!("server CPU for {FRAGMENTS} empty fragments: {cpu:?}");
    // Nothing else is sent: the only acceptable outcome is a close within a few seconds.
    let code = raw_expect_close(&mut s, &mut buf, Duration::from_secs(3));
    assert!(
        code == 1008 || code == 1009,
        "fragment flood closed with {code}"
    );
    healthy_client(&mut server);
}

/// A subscriber that stops reading on a channel with `policy` (`drop-oldest` or
/// `conflate`): messages are shed instead of closing it, each shed range is announced by a
/// `gap` notice in its place, so what it reads (messages and gaps) covers every seq
/// exactly once in order, ends with the latest message, and `herald_messages_shed_total`
/// counts exactly the seqs the gaps name.
fn shed_policy_keeps_the_subscriber_and_announces_every_gap(policy: &str) {
    const QUEUE: usize = 64 * 1024;
    let mut server = Server::start(&[
        "--slow-consumer-policy",
        policy,
        "--outbound-queue-bytes",
        &QUEUE.to_string(),
        "--max-messages-per-second",
        "1000000",
    ]);
    let addr = server.addr();
    let mut slow = connect_from(2, addr, Some(4096));
    let mut slow_buf = upgrade(&mut slow, &client_handshake("/ws"));
    send_text_raw(&mut slow, r#"{"type":"subscribe","channel":"shed","id":1}"#);
    let mut closed = None;
    let v = next_json(&mut slow, &mut slow_buf, &mut closed).expect("subscribed");
    assert_eq!(v["type"], "subscribed", "{v}");

    // Publishes 4 KiB messages until the server reports shedding (the socket buffers
    // take an unknown part first), then 20 more.
    let (mut publisher, mut pbuf) = raw_ws(addr);
    let data = format!("\"{}\"", "x".repeat(4096));
    let mut published = 0u64;
    let mut more = None;
    while more != Some(0) {
        for _ in 0..20 {
            published += 1;
            send_text_raw(
                &mut publisher,
                &format!(r#"{{"type":"publish","channel":"shed","data":{data},"id":{published}}}"#),
            );
            let ack = next_json(&mut publisher, &mut pbuf, &mut closed).expect("ack");
            assert_eq!(
                (ack["type"].as_str(), ack["seq"].as_u64()),
                (Some("ack"), Some(published)),
                "{ack}"
            );
        }
        more = match more {
            None if metric(addr, "herald_messages_shed_total") > 0.0 => Some(1),
            None => {
                assert!(published < 5000, "nothing shed after {published} messages");
                None
            }
            Some(n) => Some(n - 1),
        };
    }

    let (mut next, mut gaps, mut shed) = (1u64, 0, 0u64);
    while next <= published {
        let v = next_json(&mut slow, &mut slow_buf, &mut closed)
            .unwrap_or_else(|| panic!("{policy}: closed ({closed:?}) instead of shedding"));
        match v["type"].as_str() {
            Some("message") => {
                assert_eq!(v["seq"], next, "{policy}: message out of order");
                next += 1;
            }
            Some("gap") => {
                let (from, to) = (v["from"].as_u64().unwrap(), v["to"].as_u64().unwrap());
                assert_eq!(
                    (v["channel"].as_str(), from),
                    (Some("shed"), next),
                    "{policy}: {v}"
                );
                assert!(
                    to >= from && to < published,
                    "{policy}: the latest is never shed: {v}"
                );
                shed += to - from + 1;
                gaps += 1;
                next = to + 1;
            }
            _ => panic!("{policy}: unexpected {v}"),
        }
    }
    eprintln!("{policy}: {published} published, {shed} shed in {gaps} gaps");
    assert!(gaps > 0, "{policy}: nothing was shed");
    assert_eq!(
        metric_settled(addr, "herald_messages_shed_total", |n| n >= shed as f64),
        shed as f64,
        "{policy}: the metric counts exactly the seqs the gaps name"
    );
    assert_eq!(metric(addr, "herald_slow_consumer_closes_total"), 0.0);
    raw_ping(&mut slow, &mut slow_buf, "the shed subscriber");
    healthy_client(&mut server);
}

#[test]
fn drop_oldest_sheds_announces_gaps_and_counts_them() {
    shed_policy_keeps_the_subscriber_and_announces_every_gap("drop-oldest");
}

#[test]
fn conflate_sheds_announces_gaps_and_counts_them() {
    shed_policy_keeps_the_subscriber_and_announces_every_gap("conflate");
}

// ---------------------------------------------------------------------------------------
// Ping flood
// ---------------------------------------------------------------------------------------

#[test]
fn ping_flood_without_reading_keeps_server_memory_bounded() {
    const PINGS: usize = 40_000;
    let mut server = Server::start(&[]);
    let addr = server.addr();
    let pid = server.pid();

    // A probe on the same server measures its own ping round trips during the flood.
    let (mut probe, mut probe_buf) = raw_ws(addr);
    let mut flooder = connect_from(2, addr, Some(4096));
    let mut flood_buf = upgrade(&mut flooder, &client_handshake("/ws"));

    let rss_before = process_rss_kib(pid);
    let sampler = RssSampler::start(pid);
    let payload = [b'p'; 125];
    let ping = encode_frame(OP_PING, &payload, MASK);
    let batch: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 100)
        .collect();
    flooder
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let flood_started = Instant::now();
    let mut sent = 0;
    let mut stalled = false;
    let mut rtts = Vec::new();
    while sent < PINGS && flood_started.elapsed() < Duration::from_secs(4) {
        match flooder.write_all(&batch) {
            Ok(()) => sent += 100,
            Err(e) if is_timeout(&e) => {
                // The server stopped reading this client: back-pressure is acceptable.
                stalled = true;
                break;
            }
            Err(e) => panic!("flood write failed after {sent} pings: {e}"),
        }
        if sent % 2000 == 0 {
            let t = Instant::now();
            raw_ping(&mut probe, &mut probe_buf, "probe during the ping flood");
            rtts.push(t.elapsed());
        }
    }
    // Also while the flooder is stalled and unread, a normal client is answered.
    let t = Instant::now();
    raw_ping(&mut probe, &mut probe_buf, "probe after the ping flood");
    rtts.push(t.elapsed());
    let peak = sampler.peak();
    drop(sampler);
    let worst = rtts.iter().max().copied().unwrap_or_default();
    eprintln!(
        "ping flood: {sent} pings in {:?} (stalled: {stalled}); RSS {rss_before} -> peak {peak} KiB; \
         probe worst RTT {worst:?} over {} probes",
        flood_started.elapsed(),
        rtts.len()
    );
    let grew = peak.saturating_sub(rss_before);
    assert!(
        grew < 8 * 1024,
        "server RSS grew by {grew} KiB during a ping flood ({sent} pings, {} bytes of pongs)",
        sent * 127
    );

    // The flooder then reads: some pongs (not one per ping), then either its connection
    // still answers, or it was closed with a close frame (never silently dropped).
    flooder
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let ping_written = flooder
        .write_all(&client_text(r#"{"type":"ping"}"#))
        .is_ok();
    let mut pongs = 0usize;
    let outcome = loop {
        match read_frame(&mut flooder, &mut flood_buf, Duration::from_secs(5)) {
            None => panic!("flooder's connection ended without a close frame ({pongs} pongs)"),
            Some(f) if f.opcode == OP_PONG => {
                assert_eq!(f.payload, payload, "pong payload differs from the ping's");
                pongs += 1;
            }
            Some(f) if f.opcode == OP_CLOSE => break format!("close {:?}", f.close_code()),
            Some(f) if f.opcode == OP_TEXT => {
                let v: Value = serde_json::from_slice(&f.payload).unwrap();
                assert_eq!(v["type"], "pong", "{v}");
                break "app pong".to_owned();
            }
            Some(f) => panic!("unexpected frame {f:?}"),
        }
    };
    eprintln!(
        "flooder: {pongs} pongs for {sent} pings, then {outcome} (ping written: {ping_written})"
    );
    assert!(
        pongs < sent,
        "every ping got its pong: the pong queue was not bounded"
    );
    healthy_client(&mut server);
}

// ---------------------------------------------------------------------------------------
// Inbound message rate
// ---------------------------------------------------------------------------------------

#[test]
fn message_rate_over_the_limit_gets_rate_limited_then_close_1008() {
    let mut server = Server::start(&["--max-messages-per-second", "10"]);
    let addr = server.addr();

    // A short burst over the limit: refused messages, but the connection lives on.
    let (mut s, mut buf) = raw_ws(addr);
    let burst: Vec<u8> = (0..25)
        .flat_map(|id| client_text(&format!(r#"{{"type":"ping","id":{id}}}"#)))
        .collect();
    let started = Instant::now();
    s.write_all(&burst).unwrap();
    let mut closed = None;
    let replies: Vec<Value> = (0..25)
        .map(|_| next_json(&mut s, &mut buf, &mut closed).expect("reply"))
        .collect();
    let pongs = replies.iter().filter(|v| v["type"] == "pong").count();
    let limited = replies
        .iter()
        .filter(|v| v["type"] == "error" && v["code"] == "rate_limited")
        .count();
    assert_eq!(pongs + limited, 25, "{replies:?}");
    // Each reply names its command, a refusal too, in order.
    let ids: Vec<u64> = replies.iter().filter_map(|v| v["id"].as_u64()).collect();
    assert_eq!(ids, (0..25).collect::<Vec<_>>(), "{replies:?}");
    // The burst (20) plus what 10/s refilled while the server read them: bounded by the
    // time until the last reply, however slowly a busy machine ran.
    let refilled = (started.elapsed().as_millis() as usize * 10).div_ceil(1000);
    assert!(
        (20..=20 + refilled).contains(&pongs),
        "burst of 20 (+{refilled} refilled) expected, got {pongs} pongs"
    );
    thread::sleep(Duration::from_millis(1100));
    raw_ping(&mut s, &mut buf, "after the bucket refilled");

    // Persistent abuse: 50 refusals in a row, then 1008.
    let (mut abuser, mut abuf) = raw_ws(addr);
    let flood: Vec<u8> = (0..200)
        .flat_map(|_| client_text(r#"{"type":"ping"}"#))
        .collect();
    let started = Instant::now();
    let _ = abuser.write_all(&flood);
    // `true` for a pong, `false` for a refusal, in order.
    let mut replies = Vec::new();
    let mut closed = None;
    while let Some(v) = next_json(&mut abuser, &mut abuf, &mut closed) {
        match (v["type"].as_str(), v["code"].as_str()) {
            (Some("pong"), _) => replies.push(true),
            (Some("error"), Some("rate_limited")) => replies.push(false),
            _ => panic!("unexpected reply {v}"),
        }
    }
    let refilled = (started.elapsed().as_millis() as usize * 10).div_ceil(1000);
    let pongs = replies.iter().filter(|pong| **pong).count();
    eprintln!(
        "abuser: {pongs} pongs, {} rate_limited, close {closed:?}",
        replies.len() - pongs
    );
    assert_eq!(
        closed,
        Some(1008),
        "persistent abuse must end with close 1008"
    );
    assert!(
        (20..=20 + refilled).contains(&pongs),
        "{pongs} pongs: the burst of 20 (+{refilled} refilled)"
    );
    // A refill in between answers one and starts the count again: the close comes after
    // 50 refusals in a row, and not one later.
    assert!(
        replies.len() >= 50 && replies[replies.len() - 50..].iter().all(|pong| !pong),
        "the close must follow 50 refusals in a row: {replies:?}"
    );
    assert!(
        replies.len() == 50 || replies[replies.len() - 51],
        "closed only after more than 50 refusals in a row: {replies:?}"
    );
    // The client answers the close; the server then ends the TCP connection.
    let _ = abuser.write_all(&encode_frame(OP_CLOSE, &1008u16.to_be_bytes(), MASK));
    assert_closed_within(&mut abuser, CLOSE_WAIT);
    raw_ping(&mut s, &mut buf, "the well-behaved connection");
    healthy_client(&mut server);
}

// ---------------------------------------------------------------------------------------
// Connection limits
// ---------------------------------------------------------------------------------------

#[test]
fn per_ip_limit_gives_429_with_retry_after_and_other_addresses_are_unaffected() {
    let mut server = Server::start(&["--max-connections-per-ip", "5"]);
    let addr = server.addr();
    let mut held: Vec<(TcpStream, Vec<u8>)> = (0..5)
        .map(|i| {
            let (s, head) = upgrade_from(2, addr, &[]);
            assert_eq!(head.status, 101, "connection {i} from 127.0.0.2: {head:?}");
            (s, head.rest)
        })
        .collect();
    for _ in 0..3 {
        let (s, head) = upgrade_from(2, addr, &[]);
        expect_retry_after(s, &head, 429, "6th connection from 127.0.0.2");
    }
    // Another address is not affected.
    let (mut other, head) = upgrade_from(3, addr, &[]);
    assert_eq!(head.status, 101, "127.0.0.3: {head:?}");
    let mut other_buf = head.rest;
    raw_ping(&mut other, &mut other_buf, "127.0.0.3");
    // The held ones still work.
    let (s, b) = &mut held[0];
    raw_ping(s, b, "held connection from 127.0.0.2");
    // One leaves: 127.0.0.2 may connect again.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (s, head) = upgrade_from(2, addr, &[]);
        if head.status == 101 {
            break;
        }
        expect_retry_after(s, &head, 429, "after one left");
        assert!(
            Instant::now() < deadline,
            "127.0.0.2 still refused after one left"
        );
        thread::sleep(Duration::from_millis(100));
    }
    healthy_client(&mut server);
}

#[test]
fn global_limit_gives_503_with_retry_after() {
    let mut server = Server::start(&["--max-connections", "5"]);
    let addr = server.addr();
    let mut held: Vec<(TcpStream, Vec<u8>)> = (0..5)
        .map(|i| {
            let (s, head) = upgrade_from(2 + i as u8, addr, &[]);
            assert_eq!(head.status, 101, "connection {i}: {head:?}");
            (s, head.rest)
        })
        .collect();
    for last in [10u8, 11, 1] {
        let (s, head) = upgrade_from(last, addr, &[]);
        expect_retry_after(s, &head, 503, "6th connection");
    }
    let (s, b) = &mut held[4];
    raw_ping(s, b, "held connection at the global limit");
    drop(held.pop());
    let (mut s, mut buf) = upgrade_once_free(12, addr, "after one left");
    raw_ping(&mut s, &mut buf, "connection after one left");
    drop((s, held));
    let (mut s, mut buf) = upgrade_once_free(13, addr, "after all left");
    raw_ping(&mut s, &mut buf, "connection after all left");
    server.assert_healthy();
}

/// Upgrades from `127.0.0.N` once the server has a place again: a client's close reaches
/// the server after the client let go, so until the server has read it, the place is
/// still taken (503 with `Retry-After`); within 3 s it is free.
fn upgrade_once_free(source: u8, addr: SocketAddr, what: &str) -> (TcpStream, Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (s, head) = upgrade_from(source, addr, &[]);
        if head.status == 101 {
            return (s, head.rest);
        }
        expect_retry_after(s, &head, 503, what);
        assert!(Instant::now() < deadline, "still refused {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn accept_storm_over_the_accept_rate_gets_503_and_connected_clients_are_served() {
    const STORM: usize = 40;
    let mut server = Server::start(&["--threads", "1", "--accept-rate", "5"]);
    let addr = server.addr();
    let (mut existing, mut ebuf) = raw_ws(addr);
    raw_ping(&mut existing, &mut ebuf, "before the storm");
    // At least 1.1 s, however late: the bucket (5, refilled at 5/s) is full again.
    thread::sleep(Duration::from_millis(1100));

    let started = Instant::now();
    let conns: Vec<TcpStream> = (0..STORM)
        .map(|i| {
            let mut s = connect_from(2 + (i % 20) as u8, addr, None);
            s.write_all(upgrade_request("/ws").as_bytes()).unwrap();
            s
        })
        .collect();
    raw_ping(&mut existing, &mut ebuf, "during the storm");
    let mut upgraded = 0;
    let mut retry_afters = Vec::new();
    for mut s in conns {
        let head = read_head(&mut s);
        match head.status {
            101 => upgraded += 1,
            _ => retry_afters.push(expect_retry_after(s, &head, 503, "storm")),
        }
    }
    // Every accept happened between the first connect and the last answer read, so the
    // bucket can have refilled only for that long, however slowly a busy machine ran.
    let window = started.elapsed();
    eprintln!(
        "storm of {STORM} within {window:?}: {upgraded} upgraded, Retry-After {retry_afters:?}"
    );
    let allowed = 5 + (window.as_millis() as usize * 5).div_ceil(1000);
    assert!(
        (5..=allowed).contains(&upgraded),
        "{upgraded} upgrades in a storm with an accept rate of 5/s (burst 5) within {window:?}"
    );
    let distinct: HashSet<_> = retry_afters.iter().collect();
    assert!(
        distinct.len() >= 2,
        "Retry-After not spread: {retry_afters:?}"
    );
    raw_ping(&mut existing, &mut ebuf, "after the storm");
    // Once the bucket has refilled, /metrics can be asked.
    thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        metric_settled(
            addr,
            r#"herald_rejected_requests_total{status="503"}"#,
            |n| { n >= (STORM - upgraded) as f64 }
        ),
        (STORM - upgraded) as f64,
        "the server counts each refusal once"
    );
    healthy_client(&mut server);
}

#[test]
fn x_forwarded_for_counts_only_behind_a_trusted_proxy() {
    // Without trusted proxies the header is ignored: every connection from 127.0.0.2
    // counts as 127.0.0.2, whatever address it claims.
    let server = Server::start(&["--max-connections-per-ip", "2"]);
    let addr = server.addr();
    let mut held = Vec::new();
    for claimed in ["10.0.0.1", "10.0.0.2"] {
        let (s, head) = upgrade_from(2, addr, &[("X-Forwarded-For", claimed)]);
        assert_eq!(head.status, 101, "{claimed}: {head:?}");
        held.push(s);
    }
    let (s, head) = upgrade_from(2, addr, &[("X-Forwarded-For", "10.0.0.3")]);
    expect_retry_after(
        s,
        &head,
        429,
        "spoofed X-Forwarded-For without a trusted proxy",
    );
    drop(held);
    drop(server);

    // Behind the trusted proxy 127.0.0.1, the header names the client.
    let mut server = Server::start(&[
        "--max-connections-per-ip",
        "2",
        "--trusted-proxies",
        "127.0.0.1",
    ]);
    let addr = server.addr();
    let mut held = Vec::new();
    for _ in 0..2 {
        let (s, head) = upgrade_from(1, addr, &[("X-Forwarded-For", "198.51.100.7")]);
        assert_eq!(head.status, 101, "{head:?}");
        held.push(s);
    }
    let (s, head) = upgrade_from(1, addr, &[("X-Forwarded-For", "198.51.100.7")]);
    expect_retry_after(s, &head, 429, "third from 198.51.100.7 via the proxy");
    // Another client behind the same proxy is counted on its own; so is the proxy's
    // last hop when an earlier hop was added by the client itself.
    let (s, head) = upgrade_from(1, addr, &[("X-Forwarded-For", "198.51.100.8")]);
    assert_eq!(head.status, 101, "another client via the proxy: {head:?}");
    held.push(s);
    let (s, head) = upgrade_from(1, addr, &[("X-Forwarded-For", "198.51.100.7, 203.0.113.9")]);
    assert_eq!(head.status, 101, "client-supplied first hop: {head:?}");
    held.push(s);
    // An untrusted peer cannot borrow the header to dodge its own limit.
    for claimed in ["192.0.2.1", "192.0.2.2"] {
        let (s, head) = upgrade_from(5, addr, &[("X-Forwarded-For", claimed)]);
        assert_eq!(head.status, 101, "{head:?}");
        held.push(s);
    }
    let (s, head) = upgrade_from(5, addr, &[("X-Forwarded-For", "192.0.2.3")]);
    expect_retry_after(s, &head, 429, "untrusted peer with X-Forwarded-For");
    drop(held);
    healthy_client(&mut server);
}

// ---------------------------------------------------------------------------------------
// Out of file descriptors
// ---------------------------------------------------------------------------------------

#[test]
fn out_of_file_descriptors_keeps_serving_without_spinning_and_resumes_accepting() {
    const LIMIT: u64 = 64;
    const FLOOD: usize = 120;
    let mut server =
        Server::start_with_open_file_limit(LIMIT, &["--handshake-timeout-ms", "30000"]);
    let addr = server.addr();
    let pid = server.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("64")),
        "soft limit not applied:\n{limits}"
    );

    let (mut existing, mut ebuf) = raw_ws(addr);
    raw_ping(&mut existing, &mut ebuf, "before the flood");

    // More connections than descriptors: the kernel completes them all (backlog), the
    // server can take only some.
    let mut flood: Vec<TcpStream> = (0..FLOOD)
        .map(|i| {
            let mut s = connect_from(2 + (i % 50) as u8, addr, None);
            s.write_all(upgrade_request("/ws").as_bytes()).unwrap();
            s
        })
        .collect();
    // Waits for the server to say it ran out, then for the upgrades it could take.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.stderr().contains("out of file descriptors") {
        assert!(
            Instant::now() < deadline,
            "no log line about running out of descriptors"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let mut answered = vec![false; FLOOD];
    while !answered.contains(&true) && Instant::now() < deadline {
        for (s, answered) in flood.iter_mut().zip(&mut answered) {
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let mut b = [0u8; 12];
            if let Ok(n) = s.read(&mut b)
                && b[..n].starts_with(b"HTTP/1.1 101")
            {
                *answered = true;
            }
        }
    }
    let upgraded = answered.iter().filter(|a| **a).count();
    let fds = fd_count(pid);
    eprintln!("EMFILE: {upgraded}/{FLOOD} upgraded, server holds {fds} descriptors");
    assert!(
        upgraded < FLOOD,
        "all {FLOOD} connections fit under a limit of {LIMIT}"
    );
    assert!(upgraded > 0, "no connection accepted at all");

    // The held client is still served, and the server does not spin on accept.
    raw_ping(&mut existing, &mut ebuf, "while out of descriptors");
    let cpu_before = process_cpu_time(pid);
    thread::sleep(Duration::from_secs(2));
    let cpu = process_cpu_time(pid).saturating_sub(cpu_before);
    eprintln!("EMFILE: server CPU over 2 s: {cpu:?}");
    assert!(
        cpu < Duration::from_millis(300),
        "server used {cpu:?} of CPU in 2 s while out of descriptors (spinning on accept?)"
    );
    raw_ping(&mut existing, &mut ebuf, "after 2 s out of descriptors");

    // Descriptors free up: accepting resumes.
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = raw_connect(addr);
        s.write_all(upgrade_request("/ws").as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut b = [0u8; 12];
        if matches!(s.read(&mut b), Ok(12)) && b.starts_with(b"HTTP/1.1 101") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new connection accepted 5 s after descriptors were freed"
        );
    }
    raw_ping(&mut existing, &mut ebuf, "after accepting resumed");
    healthy_client(&mut server);
}
