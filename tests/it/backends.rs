//! Each IO backend (`--io epoll`, `--io uring`) under the conditions where a backend can
//! lose, reorder or hold on to bytes: pipelined frames bigger than one receive buffer,
//! a client that does not read (full socket buffers, short sends, reading paused on a
//! full outbox), and clients that vanish with operations in flight.
//!
//! The rest of the integration suite runs on whichever backend `HERALD_IO` names;
//! tests/run.sh runs it once per backend.

use crate::support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use support::{
    OP_BINARY, Server, encode_frame, pseudo_random_bytes, raw_upgrade, read_frame, request_head,
};

/// `uring-single-shot` is io_uring without multishot operations and the buffer ring: the
/// path taken on kernels before 5.19, forced with `HERALD_URING_SINGLE_SHOT=1`.
const BACKENDS: [&str; 3] = ["epoll", "uring", "uring-single-shot"];

/// `--io` and `HERALD_URING_SINGLE_SHOT` for one of [`BACKENDS`].
fn io_and_single_shot(backend: &str) -> (&str, &str) {
    match backend {
        "uring-single-shot" => ("uring", "1"),
        io => (io, "0"),
    }
}

fn start(backend: &str, extra: &[&str]) -> Server {
    let (io, single_shot) = io_and_single_shot(backend);
    let mut args = vec!["--io", io];
    args.extend_from_slice(extra);
    let server = Server::start_with_env(&[("HERALD_URING_SINGLE_SHOT", single_shot)], &args);
    if single_shot == "1" {
        // Each shard logs it as it starts, which may be just after `listening on`.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !server.stderr().contains("single-shot accept and receive") {
            assert!(Instant::now() < deadline, "{}", server.stderr());
            thread::sleep(Duration::from_millis(10));
        }
    }
    server
}

fn echo_client(server: &Server) -> (TcpStream, Vec<u8>) {
    raw_upgrade(server.addr(), "/echo")
}

/// What a fresh `/echo` client gets back for one masked binary `payload`.
fn echoed(server: &Server, payload: &[u8]) -> Vec<u8> {
    let (mut ws, mut buf) = echo_client(server);
    ws.write_all(&encode_frame(OP_BINARY, payload, Some([1, 2, 3, 4])))
        .unwrap();
    read_frame(&mut ws, &mut buf, Duration::from_secs(10))
        .expect("echo")
        .payload
}

/// Frame `i` of the pipelined run: 1 byte to ~48 KiB, so most span several receive
/// buffers and several frames share one.
fn payload(i: u64) -> Vec<u8> {
    let len = 1 + (i * 7919 % 48_000) as usize;
    pseudo_random_bytes(i, len)
}

#[test]
fn pipelined_frames_to_a_client_that_reads_late_come_back_whole_and_in_order() {
    const FRAMES: u64 = 240;
    for io in BACKENDS {
        // 240 messages at once: past /echo's default rate, which this test is not about.
        let mut server = start(io, &["--echo-max-messages-per-second", "100000"]);
        let (stream, mut buf) = echo_client(&server);
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        // ~5.7 MB: more than the socket buffers and the 1 MiB outbox budget hold, so the
        // server must pause reading and send in pieces while the client is not reading.
        let sender = thread::spawn(move || {
            for i in 0..FRAMES {
                let frame = encode_frame(OP_BINARY, &payload(i), Some([1, 2, 3, (i % 251) as u8]));
                writer.write_all(&frame).unwrap();
            }
        });
        thread::sleep(Duration::from_millis(300));
        let mut reader = stream;
        for i in 0..FRAMES {
            let frame = read_frame(&mut reader, &mut buf, Duration::from_secs(20))
                .unwrap_or_else(|| panic!("{io}: connection ended before echo {i}"));
            assert_eq!(frame.opcode, OP_BINARY, "{io}: echo {i}");
            assert!(frame.payload == payload(i), "{io}: echo {i} differs");
        }
        sender.join().unwrap();
        server.assert_healthy();
    }
}

/// More sockets sending at once than io_uring's buffer ring has buffers (64): receives
/// that find the ring empty wait for buffers and are armed again a few per turn. Every
/// echo comes back whole, and the server does not spin meanwhile (its CPU time bounded).
#[test]
fn a_burst_from_more_sockets_than_the_ring_has_buffers_is_received_whole() {
    const CLIENTS: usize = 400;
    for io in BACKENDS {
        let mut server = start(io, &[]);
        let mut clients: Vec<_> = (0..CLIENTS).map(|_| echo_client(&server)).collect();
        let cpu_before = support::process_cpu_time(server.pid());
        // Every client's message is written before any echo is read: 400 receives
        // complete at once, six times the ring.
        for (i, (s, _)) in clients.iter_mut().enumerate() {
            let frame = encode_frame(OP_BINARY, &payload(i as u64 % 8), Some([4, 3, 2, 1]));
            s.write_all(&frame).unwrap();
        }
        for (i, (s, buf)) in clients.iter_mut().enumerate() {
            let frame = read_frame(s, buf, Duration::from_secs(20))
                .unwrap_or_else(|| panic!("{io}: client {i} got no echo"));
            assert!(
                frame.payload == payload(i as u64 % 8),
                "{io}: echo {i} differs"
            );
        }
        let cpu = support::process_cpu_time(server.pid()) - cpu_before;
        assert!(
            cpu < Duration::from_secs(3),
            "{io}: {cpu:?} of CPU for 400 echoes"
        );
        drop(clients);
        server.assert_healthy();
    }
}

#[test]
fn clients_vanishing_with_sends_and_receives_in_flight_leave_the_server_drainable() {
    for io in BACKENDS {
        // 400 kB messages: past /echo's default 64 KiB, raised as a conformance run does.
        let mut server = start(
            io,
            &["--drain-ms", "30000", "--echo-max-message-bytes", "1048576"],
        );
        let big = encode_frame(
            OP_BINARY,
            &pseudo_random_bytes(9, 400_000),
            Some([9, 8, 7, 6]),
        );
        let clients: Vec<_> = (0..40)
            .map(|i| {
                let (mut s, _) = echo_client(&server);
                // Echoes pile up unread: sends stall on full buffers, then the client goes.
                s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
                for _ in 0..3 {
                    if s.write_all(&big).is_err() {
                        break;
                    }
                }
                if i % 2 == 0 {
                    // A reset (unread bytes at close), not an orderly end.
                    let _ = s.set_read_timeout(Some(Duration::from_millis(1)));
                    let _ = s.read(&mut [0; 1]);
                } else {
                    let _ = s.shutdown(Shutdown::Write);
                }
                s
            })
            .collect();
        drop(clients);
        // Still serving: a fresh client gets its echo.
        assert_eq!(echoed(&server, b"still here"), b"still here", "{io}");
        server.assert_healthy();
        // Every connection, including those with operations in flight when they went,
        // must be released: draining then finishes at once instead of timing out.
        server.signal("TERM");
        let status = server.wait_exit(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "{io}: did not drain in 10 s ({status:?})\n{}",
            server.stderr()
        );
    }
}

/// Each server names the backend it runs, on its second stdout line (the harness checks
/// it at start) and in `/metrics` (checked here and at the end of every test).
#[test]
fn a_server_names_its_backend_in_metrics() {
    for io in ["epoll", "uring"] {
        let server = start(io, &[]);
        assert_eq!(server.backend(), io);
        let (mut s, head) = request_head(
            server.addr(),
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(head.status, 200, "{head:?}");
        let mut body = head.rest;
        s.read_to_end(&mut body).unwrap();
        let body = String::from_utf8(body).unwrap();
        let gauge: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with("herald_io_backend{"))
            .collect();
        assert_eq!(
            gauge,
            [format!("herald_io_backend{{backend=\"{io}\"}} 1")],
            "{body}"
        );
    }
}

/// Without `--io` or `HERALD_IO`, a server runs on io_uring where it works.
#[test]
fn auto_serves_on_io_uring_where_it_works() {
    herald::backend::uring::probe().expect("these tests run where io_uring works");
    let server = Server::start_with_env(&[("HERALD_IO", "auto")], &[]);
    assert_eq!(server.backend(), "uring");
    let mut bare = std::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    bare.args(["serve", "--listen", "127.0.0.1:0", "--threads", "1"])
        .env_remove("HERALD_IO");
    assert_eq!(second_line(bare).as_deref(), Some("io backend uring"));
}

/// Where io_uring is blocked (a seccomp filter, as in a container), `auto` serves on epoll
/// and logs why; `--io uring` refuses to start and says what to do.
#[test]
fn auto_falls_back_to_epoll_with_the_reason_where_io_uring_is_blocked() {
    let server = Server::start_without_io_uring("epoll", &["--io", "auto"]);
    // stderr is read on a thread of its own: the line may land just after `listening on`.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.stderr().contains("--io auto serves on epoll") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let log = server.stderr();
    assert!(
        log.contains("io_uring is unavailable: io_uring_setup failed")
            && log.contains("Operation not permitted")
            && log.contains("--io auto serves on epoll"),
        "{log}"
    );
    assert_eq!(echoed(&server, b"served"), b"served");

    let mut refused = std::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    refused.args(["serve", "--listen", "127.0.0.1:0", "--io", "uring"]);
    support::block_io_uring_setup(&mut refused);
    let out = refused.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("io_uring is unavailable") && err.contains("use --io epoll"),
        "{err}"
    );
}

/// A server killed with SIGKILL can be started again on its port at once, on every
/// backend: an io_uring server's listener outlives it until the kernel has torn its ring
/// down, and the new one waits for that instead of failing with "Address already in use".
#[test]
fn a_killed_server_is_replaced_on_its_port_at_once() {
    for io in BACKENDS {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let (io, single_shot) = io_and_single_shot(io);
        for _ in 0..3 {
            let mut killed = Server::start_listening_with_env(
                &[("HERALD_URING_SINGLE_SHOT", single_shot)],
                &listen,
                &["--io", io, "--threads", "1"],
            );
            // An upgraded connection, so the listener is not all the ring holds.
            let _held = echo_client(&killed);
            killed.signal("KILL");
            assert!(killed.wait_exit(Duration::from_secs(5)).is_some());
        }
        let server = Server::start_listening(&listen, &["--io", io, "--threads", "1"]);
        assert_eq!(echoed(&server, b"here"), b"here", "{io}");
    }
}

/// The second stdout line of `herald serve` started by `cmd` (which names the backend),
/// the server killed after it.
fn second_line(mut cmd: std::process::Command) -> Option<String> {
    use std::io::BufRead as _;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let second = lines.nth(1).map(Result::unwrap);
    let _ = child.kill();
    let _ = child.wait();
    second
}
