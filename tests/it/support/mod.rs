//! Shared helpers for Herald's integration tests: start the real `herald` binary on a
//! free port, talk to it as a tokio-tungstenite client, and speak raw HTTP/WebSocket
//! bytes over a blocking `TcpStream` for the handshake and framing cases.
//!
//! Every server it starts must run the IO backend the test asked for (`--io`, else
//! `HERALD_IO`, else epoll), and must still be whole when the test lets go of it: alive,
//! no panic in its log, answering on fresh connections, its `/metrics` naming that backend.
//!
//! Each test binary uses only part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use herald::proto::{Answer, ClientHandshake};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long the server may take to print its `listening on` line.
pub(crate) const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Default wait for one expected message.
pub(crate) const RECV_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------

/// A running `herald serve` process. On drop it is checked (see [`Server::check_whole`])
/// unless the test already failed, saw it exit or told it to stop, then killed with SIGKILL.
pub(crate) struct Server {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<Vec<u8>>>,
    exited: Option<ExitStatus>,
    /// `epoll` or `uring`: what the test asked for, and what the server said it runs.
    backend: String,
    /// TLS listener: the end-of-test probes cannot speak HTTP to it.
    tls: bool,
    /// The test sent a signal that ends the process (TERM, INT, KILL, QUIT).
    stopping: AtomicBool,
}

impl Server {
    /// `herald serve --listen 127.0.0.1:0 --threads 2` plus `extra` arguments (which may
    /// name another `--threads`).
    pub(crate) fn start(extra: &[&str]) -> Self {
        let mut args = Vec::new();
        if !extra.contains(&"--threads") {
            args.extend_from_slice(&["--threads", "2"]);
        }
        args.extend_from_slice(extra);
        Self::start_raw(&args)
    }

    /// Like [`Server::start`], with `env` set for the server process.
    pub(crate) fn start_with_env(env: &[(&str, &str)], extra: &[&str]) -> Self {
        let bin = env!("CARGO_BIN_EXE_herald");
        let mut cmd = Command::new(bin);
        cmd.arg("serve").args(["--listen", "127.0.0.1:0"]);
        if !extra.contains(&"--threads") {
            cmd.args(["--threads", "2"]);
        }
        cmd.args(extra).envs(env.iter().copied());
        Self::start_command(cmd, extra)
    }

    /// `herald serve --listen 127.0.0.1:0` plus exactly `extra` (no default `--threads`).
    pub(crate) fn start_raw(extra: &[&str]) -> Self {
        let bin = env!("CARGO_BIN_EXE_herald");
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(extra);
        Self::start_command(cmd, extra)
    }

    /// Like [`Server::start`], but the server runs with a soft open-file limit of `limit`
    /// (`sh -c 'ulimit -n LIMIT; exec herald serve ...'`: the process id stays the
    /// server's, so `/proc/PID` describes it).
    pub(crate) fn start_with_open_file_limit(limit: u64, extra: &[&str]) -> Self {
        let bin = env!("CARGO_BIN_EXE_herald");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "ulimit -n {limit} && exec \"$0\" serve --listen 127.0.0.1:0 \"$@\""
            ))
            .arg(bin);
        if !extra.contains(&"--threads") {
            cmd.args(["--threads", "2"]);
        }
        cmd.args(extra);
        Self::start_command(cmd, extra)
    }

    /// `herald serve --listen 127.0.0.1:0 --threads 2` plus `extra` in a process where
    /// `io_uring_setup` fails with `EPERM`, as under a container's default seccomp profile;
    /// it must run the `backend` named.
    pub(crate) fn start_without_io_uring(backend: &str, extra: &[&str]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--threads", "2"])
            .args(extra);
        block_io_uring_setup(&mut cmd);
        Self::start_as(cmd, extra, backend.to_owned())
    }

    /// Starts `cmd` (which must run `herald serve` in the end) and waits for its
    /// `listening on` line.
    fn start_command(mut cmd: Command, extra: &[&str]) -> Self {
        // The suite runs on the backend HERALD_IO names, else on epoll: its io_uring pass
        // is a second run (tests/run.sh), and `--io auto` has tests of its own.
        let backend = requested_backend(&cmd).unwrap_or_else(|| {
            cmd.env("HERALD_IO", "epoll");
            "epoll".into()
        });
        Self::start_as(cmd, extra, backend)
    }

    /// Starts `cmd`, which must run `backend`, and waits for its `listening on` line.
    fn start_as(mut cmd: Command, extra: &[&str], backend: String) -> Self {
        let bin = format!("{:?}", cmd.get_program());
        let tls = cmd.get_args().any(|a| a == "--tls-cert")
            || cmd.get_envs().any(|(k, _)| k == "HERALD_TLS_CERT")
            || std::env::var_os("HERALD_TLS_CERT").is_some();
        let mut child = cmd
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));

        // Drain stderr for the whole life of the process so it never blocks on a full pipe.
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut err_pipe = child.stderr.take().expect("stderr piped");
        let sink = Arc::clone(&stderr);
        let err_thread = thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match err_pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        });

        // Read stdout lines on a thread; the first one must be `listening on ADDR`.
        let out_pipe = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel::<String>();
        thread::spawn(move || {
            let mut reader = BufReader::new(out_pipe);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        // Later lines are drained and dropped.
                        let _ = tx.send(line.trim_end().to_owned());
                    }
                }
            }
        });

        let started = Instant::now();
        // Once the process has exited its stderr pipe reaches EOF: wait for all of it.
        let mut err_thread = Some(err_thread);
        let mut full_stderr = move || {
            if let Some(t) = err_thread.take() {
                let _ = t.join();
            }
        };
        let line = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => break line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        full_stderr();
                        let err = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
                        panic!(
                            "herald exited ({status}) before printing `listening on`; args {extra:?}\n--- stderr ---\n{err}"
                        );
                    }
                    if started.elapsed() > STARTUP_TIMEOUT {
                        let _ = child.kill();
                        let _ = child.wait();
                        let err = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
                        panic!(
                            "herald printed no `listening on` line within {STARTUP_TIMEOUT:?}; args {extra:?}\n--- stderr ---\n{err}"
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().ok();
                    full_stderr();
                    let err = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
                    panic!(
                        "herald closed stdout without a `listening on` line (exit {status:?}); args {extra:?}\n--- stderr ---\n{err}"
                    );
                }
            }
        };
        let addr: SocketAddr = line
            .strip_prefix("listening on ")
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("first stdout line should be `listening on 127.0.0.1:PORT`, got {line:?}")
            });
        assert_ne!(addr.port(), 0, "server reported port 0: {line:?}");
        // The second line names the backend the shards run on: a test asking for io_uring
        // (the suite's second pass sets HERALD_IO=uring) must not silently run on epoll.
        let line = rx.recv_timeout(STARTUP_TIMEOUT).unwrap_or_default();
        if line != format!("io backend {backend}") {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
            panic!(
                "herald should run the {backend} backend; its second stdout line is {line:?}; args {extra:?}\n--- stderr ---\n{err}"
            );
        }
        Self {
            child,
            addr,
            stderr,
            exited: None,
            backend,
            tls,
            stopping: AtomicBool::new(false),
        }
    }

    /// The backend this server runs (`epoll` or `uring`).
    pub(crate) fn backend(&self) -> &str {
        &self.backend
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Everything the server wrote to stderr so far.
    pub(crate) fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Sends a signal with the `kill` command (`TERM`, `INT`, ...). After one that ends
    /// the process the end-of-test check is left out: the test owns the outcome.
    pub(crate) fn signal(&self, name: &str) {
        if matches!(name, "TERM" | "INT" | "KILL" | "QUIT") {
            self.stopping.store(true, Ordering::Relaxed);
        }
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// Waits up to `limit` for the process to exit.
    pub(crate) fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        if self.exited.is_some() {
            return self.exited;
        }
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = Some(status);
                return Some(status);
            }
            if start.elapsed() >= limit {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// True while the process runs.
    pub(crate) fn is_running(&mut self) -> bool {
        self.exited.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// nginx-tests style implicit check: still running and no panic in the log.
    pub(crate) fn assert_healthy(&mut self) {
        assert!(
            self.is_running(),
            "herald is no longer running\n--- stderr ---\n{}",
            self.stderr()
        );
        let err = self.stderr();
        assert!(
            !err.contains("panicked at"),
            "herald panicked\n--- stderr ---\n{err}"
        );
    }

    /// The end-of-test check: the process still runs (a panic in any thread aborts it, see
    /// `abort_on_panic` in src/main.rs), logged no panic, answers `GET /healthz` on eight
    /// fresh connections (each may land on any shard: SO_REUSEPORT hashes the client port;
    /// a refusal at a limit is an answer too), and its `/metrics` names its backend.
    fn check_whole(&mut self) -> Result<(), String> {
        if self.exited.is_some() || self.stopping.load(Ordering::Relaxed) {
            return Ok(());
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            self.exited = Some(status);
            return Err(format!("herald exited ({status}) before the test ended"));
        }
        if self.stderr().contains("panicked at") {
            return Err("herald panicked".into());
        }
        for i in 0..8 {
            probe(self.addr, "/healthz").map_err(|e| format!("probe {i} of /healthz: {e}"))?;
        }
        if self.tls {
            return Ok(());
        }
        // A limit a test left exhausted (the accept rate) refuses for a moment.
        let want = format!("herald_io_backend{{backend=\"{}\"}} 1", self.backend);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match probe(self.addr, "/metrics")? {
                (200, body) if body.lines().any(|l| l == want) => return Ok(()),
                (200, body) => return Err(format!("/metrics lacks `{want}`:\n{body}")),
                (status, _) if Instant::now() > deadline => {
                    return Err(format!("/metrics still answers {status} after 10 s"));
                }
                _ => thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

/// The backend a server started by `cmd` must run: `--io`, else `HERALD_IO` (set for the
/// server or inherited); `None` when neither names one. `auto` is io_uring where it works
/// here, as the server decides.
fn requested_backend(cmd: &Command) -> Option<String> {
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let from_args = args
        .iter()
        .zip(args.iter().skip(1))
        .filter(|(flag, _)| *flag == "--io")
        .map(|(_, value)| value.clone())
        .chain(
            args.iter()
                .filter_map(|a| a.strip_prefix("--io=").map(str::to_owned)),
        )
        .last();
    let from_env = || {
        cmd.get_envs()
            .find(|(k, _)| *k == "HERALD_IO")
            .and_then(|(_, v)| v.map(|v| v.to_string_lossy().into_owned()))
            .or_else(|| std::env::var("HERALD_IO").ok())
    };
    match from_args.or_else(from_env).as_deref() {
        None | Some("") => None,
        Some("auto") if herald::backend::uring::probe().is_ok() => Some("uring".into()),
        Some("auto") => Some("epoll".into()),
        Some(other) => Some(other.to_owned()),
    }
}

/// `GET path` on a fresh connection (`Connection: close`), read to the end: the status
/// and body, status 0 when the server closed without answering. An error when the
/// connection is refused or nothing happens for 5 s (a stuck shard).
fn probe(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = StdTcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    // A write error means the server already closed: the read below says how.
    let _ = s.write_all(request.as_bytes());
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if is_timeout(&e) => {
            return Err(format!("no answer within 5 s; got {:?}", lossy(&got)));
        }
        // A reset after a refusal: what arrived before it is the answer.
        Err(_) => {}
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    if got.is_empty() {
        return Ok((0, text));
    }
    if got[0] == 0x15 || got[0] == 0x16 {
        // A TLS record (alert or handshake): a TLS listener answered plain text.
        return Ok((0, text));
    }
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {:?}", lossy(&got)))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

impl Drop for Server {
    fn drop(&mut self) {
        let verdict = if thread::panicking() {
            Ok(())
        } else {
            self.check_whole()
        };
        if self.exited.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill(); // SIGKILL
            let _ = self.child.wait();
        }
        if let Err(why) = verdict {
            // The process is gone: all of its stderr is there.
            panic!(
                "the server is not whole at the end of the test: {why}\n--- stderr ---\n{}",
                self.stderr()
            );
        }
        if thread::panicking() {
            let err = self.stderr();
            let tail: String = {
                let lines: Vec<&str> = err.lines().collect();
                lines[lines.len().saturating_sub(60)..].join("\n")
            };
            eprintln!("--- herald stderr (last 60 lines) ---\n{tail}\n--- end ---");
        }
    }
}

// ---------------------------------------------------------------------------------------
// tokio-tungstenite client
// ---------------------------------------------------------------------------------------

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket to `path` on the server (5 s limit).
pub(crate) async fn connect(addr: SocketAddr, path: &str) -> Ws {
    let url = format!("ws://{addr}{path}");
    match tokio::time::timeout(RECV_TIMEOUT, tokio_tungstenite::connect_async(url.as_str())).await {
        Ok(Ok((ws, _resp))) => ws,
        Ok(Err(e)) => panic!("connect {url}: {e}"),
        Err(_) => panic!("connect {url}: timed out after {RECV_TIMEOUT:?}"),
    }
}

/// Opens a WebSocket to `/ws`.
pub(crate) async fn connect_ws(addr: SocketAddr) -> Ws {
    connect(addr, "/ws").await
}

pub(crate) async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_owned()))
        .await
        .unwrap_or_else(|e| panic!("send {text}: {e}"));
}

pub(crate) async fn send_json(ws: &mut Ws, v: &Value) {
    send_text(ws, &v.to_string()).await;
}

/// What arrived instead of / besides a data message.
#[derive(Debug)]
pub(crate) enum Event {
    Text(String),
    Binary(Vec<u8>),
    Close(Option<(u16, String)>),
    /// The stream ended (TCP closed) without a close frame, or errored.
    Ended(String),
}

/// Next data message or close (WebSocket pings/pongs are skipped), or `None` on timeout.
pub(crate) async fn next_event(ws: &mut Ws, limit: Duration) -> Option<Event> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let Ok(item) = tokio::time::timeout_at(deadline, ws.next()).await else {
            return None;
        };
        return Some(match item {
            None => Event::Ended("stream ended".into()),
            Some(Err(e)) => Event::Ended(e.to_string()),
            Some(Ok(Message::Text(t))) => Event::Text(t.as_str().to_owned()),
            Some(Ok(Message::Binary(b))) => Event::Binary(b.to_vec()),
            Some(Ok(Message::Close(cf))) => Event::Close(cf.map(close_parts)),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
        });
    }
}

fn close_parts(cf: CloseFrame) -> (u16, String) {
    (u16::from(cf.code), cf.reason.as_str().to_owned())
}

/// The raw text of the next text message (panics on anything else or on timeout).
pub(crate) async fn recv_text(ws: &mut Ws) -> String {
    recv_text_within(ws, RECV_TIMEOUT).await
}

pub(crate) async fn recv_text_within(ws: &mut Ws, limit: Duration) -> String {
    match next_event(ws, limit).await {
        Some(Event::Text(t)) => t,
        None => panic!("no text message within {limit:?}"),
        Some(other) => panic!("expected a text message, got {other:?}"),
    }
}

/// The next text message parsed as JSON.
pub(crate) async fn recv_json(ws: &mut Ws) -> Value {
    let text = recv_text(ws).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("server sent invalid JSON {text:?}: {e}"))
}

/// Waits for the close frame and returns its code (panics if none arrives).
pub(crate) async fn recv_close_code(ws: &mut Ws, limit: Duration) -> u16 {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(ws, left).await {
            Some(Event::Close(Some((code, _)))) => return code,
            Some(Event::Close(None)) => panic!("close frame without a status code"),
            Some(Event::Ended(why)) => panic!("connection ended without a close frame: {why}"),
            // Data still in flight before the close is fine.
            Some(Event::Text(_) | Event::Binary(_)) => continue,
            None => panic!("no close frame within {limit:?}"),
        }
    }
}

/// Asserts that no data message arrives within `quiet`.
pub(crate) async fn expect_silence(ws: &mut Ws, quiet: Duration) {
    if let Some(ev) = next_event(ws, quiet).await {
        panic!("expected no message for {quiet:?}, got {ev:?}");
    }
}

/// `ping` → `pong`: the next text message after the ping must be the pong.
pub(crate) async fn ping_pong(ws: &mut Ws) {
    send_text(ws, r#"{"type":"ping"}"#).await;
    let v = recv_json(ws).await;
    assert_eq!(v["type"], "pong", "expected pong, got {v}");
}

/// Subscribes and returns the `subscribed` reply (checked for channel and id).
pub(crate) async fn subscribe(ws: &mut Ws, channel: &str, id: u64) -> Value {
    send_json(
        ws,
        &serde_json::json!({"type":"subscribe","channel":channel,"id":id}),
    )
    .await;
    let v = recv_json(ws).await;
    assert_eq!(v["type"], "subscribed", "subscribe {channel}: got {v}");
    assert_eq!(
        v["channel"], channel,
        "subscribed reply names another channel: {v}"
    );
    assert_eq!(v["id"], id, "subscribed reply does not echo id: {v}");
    assert!(
        v["seq"].is_u64(),
        "subscribed.seq missing or not an integer: {v}"
    );
    v
}

/// Publishes `data_raw` (raw JSON text, inserted verbatim) and returns the acked seq.
pub(crate) async fn publish_raw(ws: &mut Ws, channel: &str, data_raw: &str, id: u64) -> u64 {
    let chan = Value::String(channel.to_owned()).to_string();
    let text = format!(r#"{{"type":"publish","channel":{chan},"data":{data_raw},"id":{id}}}"#);
    send_text(ws, &text).await;
    let v = recv_json(ws).await;
    assert_eq!(
        v["type"], "ack",
        "publish to {channel}: expected ack, got {v}"
    );
    assert_eq!(v["id"], id, "ack does not echo id: {v}");
    v["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("ack without integer seq: {v}"))
}

/// Receives the next `message` frame and checks its channel; returns (seq, data, raw text).
pub(crate) async fn recv_message(ws: &mut Ws, channel: &str) -> (u64, Value, String) {
    let raw = recv_text(ws).await;
    let v: Value = serde_json::from_str(&raw).unwrap_or_else(|e| panic!("bad JSON {raw:?}: {e}"));
    assert_eq!(v["type"], "message", "expected a message frame, got {raw}");
    assert_eq!(v["channel"], channel, "message for another channel: {raw}");
    let seq = v["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("message without integer seq: {raw}"));
    (seq, v["data"].clone(), raw)
}

// ---------------------------------------------------------------------------------------
// Raw TCP: HTTP heads and WebSocket frames by hand
// ---------------------------------------------------------------------------------------

/// The RFC 6455 §1.3 sample key, the nonce it encodes, and its accept value.
pub(crate) const SAMPLE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub(crate) const SAMPLE_NONCE: [u8; 16] = *b"the sample nonce";
pub(crate) const SAMPLE_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// The opening handshake of a raw client for `path`, with the sample key; add headers and
/// offers with its builder methods.
pub(crate) fn client_handshake(path: &str) -> ClientHandshake {
    ClientHandshake::new(path, "127.0.0.1", SAMPLE_NONCE)
}

/// A valid upgrade request for `path` with the sample key, as text a test may bend.
pub(crate) fn upgrade_request(path: &str) -> String {
    String::from_utf8(client_handshake(path).encode()).expect("the request is ASCII")
}

/// Sends `handshake`'s request on `s` and reads the answer, which must accept it (101,
/// the right `Sec-WebSocket-Accept`). Returns the bytes read past the head (5 s limit).
pub(crate) fn upgrade(s: &mut StdTcpStream, handshake: &ClientHandshake) -> Vec<u8> {
    s.write_all(&handshake.encode()).expect("write upgrade");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match handshake.parse_response(&buf) {
            Ok(None) => {}
            Ok(Some((Answer::Accepted { .. }, len))) => return buf.split_off(len),
            other => panic!("upgrade failed: {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "no complete upgrade response within 5 s; got {:?}",
            lossy(&buf)
        );
        match s.read(&mut chunk) {
            Ok(0) => panic!(
                "connection closed during the upgrade; got {:?}",
                lossy(&buf)
            ),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("read error during the upgrade: {e}; got {:?}", lossy(&buf)),
        }
    }
}

/// A fresh connection upgraded on `path`, and the bytes read past the 101's head.
pub(crate) fn raw_upgrade(addr: SocketAddr, path: &str) -> (StdTcpStream, Vec<u8>) {
    let mut s = raw_connect(addr);
    let rest = upgrade(&mut s, &client_handshake(path));
    (s, rest)
}

pub(crate) fn raw_connect(addr: SocketAddr) -> StdTcpStream {
    let s = StdTcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A parsed HTTP response head plus any bytes that followed it in the same reads.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: u16,
    pub(crate) status_line: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) rest: Vec<u8>,
}

impl Head {
    /// First value of header `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one HTTP response head (5 s limit; panics on EOF/reset/timeout before it ends).
pub(crate) fn read_head(s: &mut StdTcpStream) -> Head {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    let end = loop {
        if let Some(pos) = find(&buf, b"\r\n\r\n") {
            break pos;
        }
        assert!(
            Instant::now() < deadline,
            "no complete HTTP response head within 5 s; got {:?}",
            lossy(&buf)
        );
        match s.read(&mut chunk) {
            Ok(0) => panic!(
                "connection closed before a complete HTTP response head; got {:?}",
                lossy(&buf)
            ),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => {
                panic!(
                    "no complete HTTP response head within 5 s (hang); got {:?}",
                    lossy(&buf)
                )
            }
            Err(e) => panic!(
                "read error before a complete HTTP response head: {e}; got {:?}",
                lossy(&buf)
            ),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let rest = buf[end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default().to_owned();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    assert!(
        status_line.starts_with("HTTP/1.1 "),
        "status line not HTTP/1.1: {status_line:?}"
    );
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Head {
        status,
        status_line,
        headers,
        rest,
    }
}

/// Sends `request` on a fresh connection and reads the response head.
pub(crate) fn request_head(addr: SocketAddr, request: &[u8]) -> (StdTcpStream, Head) {
    let mut s = raw_connect(addr);
    s.write_all(request).expect("write request");
    let head = read_head(&mut s);
    (s, head)
}

/// Asserts that the peer closes the connection within `limit` (EOF or reset), discarding
/// whatever it sends first (for example a response body). Returns those bytes.
pub(crate) fn assert_closed_within(s: &mut StdTcpStream, limit: Duration) -> Vec<u8> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "server did not close the connection within {limit:?}"
        );
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut chunk) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => {
                panic!("server did not close the connection within {limit:?}")
            }
            Err(_) => return got, // reset counts as closed
        }
    }
}

pub(crate) fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub(crate) fn lossy(b: &[u8]) -> String {
    let shown = &b[..b.len().min(512)];
    String::from_utf8_lossy(shown).into_owned()
}

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
pub(crate) fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

pub(crate) const OP_CONT: u8 = 0x0;
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// Encodes one final frame; `mask` = `Some(key)` for a client frame.
pub(crate) fn encode_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= 0xFFFF {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A masked client text frame.
pub(crate) fn client_text(text: &str) -> Vec<u8> {
    encode_frame(OP_TEXT, text.as_bytes(), Some([0x37, 0xfa, 0x21, 0x3d]))
}

/// One frame read from the server.
#[derive(Debug)]
pub(crate) struct RawFrame {
    pub(crate) fin: bool,
    pub(crate) opcode: u8,
    pub(crate) masked: bool,
    pub(crate) payload: Vec<u8>,
}

impl RawFrame {
    /// The status code of a close frame, if it has one.
    pub(crate) fn close_code(&self) -> Option<u16> {
        (self.opcode == OP_CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// Reads one frame, using and refilling `buf` (bytes already read). `None` on EOF/reset
/// before a whole frame; panics on timeout.
pub(crate) fn read_frame(
    s: &mut StdTcpStream,
    buf: &mut Vec<u8>,
    limit: Duration,
) -> Option<RawFrame> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some((frame, used)) = parse_frame(buf) {
            buf.drain(..used);
            return Some(frame);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no complete frame within {limit:?}; have {} bytes",
            buf.len()
        );
        s.set_read_timeout(Some(left)).unwrap();
        let mut chunk = [0u8; 8192];
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => panic!(
                "no complete frame within {limit:?}; have {} bytes",
                buf.len()
            ),
            Err(_) => return None,
        }
    }
}

fn parse_frame(b: &[u8]) -> Option<(RawFrame, usize)> {
    if b.len() < 2 {
        return None;
    }
    let fin = b[0] & 0x80 != 0;
    let opcode = b[0] & 0x0F;
    let masked = b[1] & 0x80 != 0;
    let mut pos = 2;
    let len = match b[1] & 0x7F {
        126 => {
            if b.len() < 4 {
                return None;
            }
            pos = 4;
            u16::from_be_bytes([b[2], b[3]]) as usize
        }
        127 => {
            if b.len() < 10 {
                return None;
            }
            pos = 10;
            u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize
        }
        n => n as usize,
    };
    let key = if masked {
        if b.len() < pos + 4 {
            return None;
        }
        let k = [b[pos], b[pos + 1], b[pos + 2], b[pos + 3]];
        pos += 4;
        Some(k)
    } else {
        None
    };
    if b.len() < pos + len {
        return None;
    }
    let mut payload = b[pos..pos + len].to_vec();
    if let Some(k) = key {
        payload
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x ^= k[i % 4]);
    }
    Some((
        RawFrame {
            fin,
            opcode,
            masked,
            payload,
        },
        pos + len,
    ))
}

/// Completes a raw handshake on `/ws`; returns the stream and any bytes after the head.
pub(crate) fn raw_ws(addr: SocketAddr) -> (StdTcpStream, Vec<u8>) {
    raw_upgrade(addr, "/ws")
}

/// Reads frames until a close frame arrives and returns its code; panics if the
/// connection ends first or nothing arrives in `limit`. Skips data and ping/pong frames.
pub(crate) fn raw_expect_close(s: &mut StdTcpStream, buf: &mut Vec<u8>, limit: Duration) -> u16 {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match read_frame(s, buf, left) {
            None => panic!("connection ended without a close frame"),
            Some(f) if f.opcode == OP_CLOSE => {
                assert!(!f.masked, "server frames must not be masked");
                return f
                    .close_code()
                    .unwrap_or_else(|| panic!("close frame without code: {f:?}"));
            }
            Some(_) => continue,
        }
    }
}

/// Runs a blocking closure without stalling the async runtime's workers.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

// ---------------------------------------------------------------------------------------
// What the server process holds and spends (/proc)
// ---------------------------------------------------------------------------------------

/// The resident set of process `pid`, in KiB (`VmRSS` of `/proc/PID/status`).
pub(crate) fn process_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The CPU time process `pid` has used so far (user + system), from `/proc/PID/stat`.
pub(crate) fn process_cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name, which is parenthesised and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the whole line, in clock ticks.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf reads a constant of the running system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second.max(1))
}

/// `GET /metrics` and the value of the sample `series`: a bare name matches its first
/// sample, a name with labels (`herald_rejected_requests_total{status="408"}`) that one
/// series. `None` when there is no such sample.
pub(crate) fn metric_value(addr: SocketAddr, series: &str) -> Option<f64> {
    let (mut s, head) = request_head(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, 200, "GET /metrics: {head:?}");
    let mut body = head.rest;
    body.extend(assert_closed_within(&mut s, RECV_TIMEOUT));
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split([' ', '{']).next() == Some(series) || l.split(' ').next() == Some(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The value of `series` once `done` holds, or its last value after five seconds. A shard
/// publishes its counters at the end of the loop turn that changed them, just after it
/// flushed what the turn answered: a client can see an answer before the count behind it.
pub(crate) fn metric_settled(addr: SocketAddr, series: &str, done: impl Fn(f64) -> bool) -> f64 {
    let start = Instant::now();
    loop {
        let value = metric_value(addr, series).unwrap_or_else(|| panic!("no metric {series}"));
        if done(value) || start.elapsed() > Duration::from_secs(5) {
            return value;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

impl Server {
    /// `herald serve --listen LISTEN` plus `extra` (with `--threads 2` unless `extra`
    /// names it): for processes that must serve one known port.
    pub(crate) fn start_listening(listen: &str, extra: &[&str]) -> Self {
        Self::start_listening_with_env(&[], listen, extra)
    }

    /// Like [`Server::start_listening`], with `env` set for the server process.
    pub(crate) fn start_listening_with_env(
        env: &[(&str, &str)],
        listen: &str,
        extra: &[&str],
    ) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.arg("serve").args(["--listen", listen]);
        if !extra.contains(&"--threads") {
            cmd.args(["--threads", "2"]);
        }
        cmd.args(extra).envs(env.iter().copied());
        Self::start_command(cmd, extra)
    }
}

/// Makes `io_uring_setup` fail with `EPERM` in the process `cmd` starts, through a seccomp
/// filter installed between fork and exec, as a container's default profile does; every
/// other system call is allowed.
pub(crate) fn block_io_uring_setup(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;

    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xc000_003e;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xc000_00b7;
    // Offsets in `struct seccomp_data`.
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump_if_equal = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    let filter = [
        stmt(load, ARCH),
        jump_if_equal(AUDIT_ARCH, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        stmt(load, NR),
        jump_if_equal(libc::SYS_io_uring_setup as u32, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ];
    // SAFETY: between fork and exec the closure makes two `prctl` calls, which are
    // async-signal-safe, and allocates nothing: the filter was built before the fork and
    // is moved in; the program only points into it for the duration of the call.
    unsafe {
        cmd.pre_exec(move || {
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &raw const program,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// An HS256 token signed with `secret` for `claims`, valid for ten minutes from now (its
/// `exp` is set here).
pub(crate) fn fresh_token(secret: &str, mut claims: Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is past 1970");
    claims["exp"] = serde_json::json!(now.as_secs() + 600);
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("an HS256 token")
}
