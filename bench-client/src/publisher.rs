//! The fan-out benchmark's publisher: one connection (WebSocket, or HTTP `POST`s to the
//! publish URL) sending at the scheduled times, pacing with a precise sleep, and reading
//! the acks.

use std::io::{Read, Write as _};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use herald::proto::client_handshake::{Answer, ClientHandshake};
use herald::proto::frame::{FrameHeader, OpCode, encode_client_frame};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;

use crate::fanout::{FanoutArgs, PublishMode, first_url, scheduled_ns};
use crate::load::{Target, find};
use crate::message::{Template, message_data};
use crate::refusal::Refusal;
use crate::stats::monotonic_ns;
use crate::tls::{self, Wire, WireReader, WireWriter};

/// What the publisher did.
#[derive(Debug, Clone, Default)]
pub(crate) struct PublishOutcome {
    pub(crate) published: u64,
    pub(crate) per_channel: Vec<u64>,
    pub(crate) max_behind_ns: u64,
    pub(crate) errors: Vec<String>,
}

/// The paced publisher: before [`Publisher::connect`] only validated settings.
pub(crate) struct Publisher {
    target: Target,
    mode: PublishMode,
    api_key: Option<String>,
    template: Template,
    channels: Vec<String>,
    size: usize,
    /// Messages sharing one scheduled time.
    burst: u64,
    conn: Option<PublishConn>,
    /// Client configuration and server name for a wss:// or https:// target.
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    acked: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    /// How long connecting and the upgrade may take (`--connect-timeout-ms`).
    timeout: Duration,
}

enum PublishConn {
    Ws(Arc<Mutex<WireWriter>>),
    Http(Wire, Vec<u8>),
}

/// The ack reader thread holds the other half of the socket: shutting it down ends that
/// thread, and the server sees the publisher go (a sweep's next point starts only once
/// the server holds none of this point's connections).
impl Drop for Publisher {
    fn drop(&mut self) {
        if let Some(PublishConn::Ws(writer)) = &self.conn {
            writer.lock().expect("writer lock").shutdown();
        }
    }
}

impl Publisher {
    pub(crate) fn new(args: &FanoutArgs, channels: &[String]) -> Result<Self> {
        let run = &args.run;
        let url = match (&run.publish_url, run.publish) {
            (Some(url), _) => url.clone(),
            (None, PublishMode::Ws) => first_url(&run.url).to_owned(),
            (None, PublishMode::Http) => {
                let target = Target::parse(first_url(&run.url))?;
                let scheme = if target.tls { "https" } else { "http" };
                format!("{scheme}://{}/api/publish", target.host)
            }
        };
        let template = Template::parse(&run.publish_template);
        if run.publish == PublishMode::Ws && !template.has_data() {
            bail!("--publish-template must contain {{data}}");
        }
        let target = Target::parse(&url)?;
        let tls = if target.tls {
            Some((
                tls::client_config(run.load.insecure)?,
                tls::server_name(&target.host)?,
            ))
        } else {
            None
        };
        Ok(Self {
            target,
            tls,
            mode: run.publish,
            api_key: run.api_key.clone(),
            template,
            channels: channels.to_vec(),
            size: args.size,
            burst: args.burst,
            conn: None,
            acked: Arc::new(AtomicU64::new(0)),
            timeout: Duration::from_millis(run.load.connect_timeout_ms.max(1)),
            errors: Arc::new(Mutex::new(Vec::new())),
        })
    }

    pub(crate) fn connect(mut self) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&self.target.addr, self.timeout)
            .with_context(|| format!("publisher connecting to {}", self.target.addr))?;
        stream.set_nodelay(true)?;
        // A server that cannot accept (out of descriptors) leaves the connection in its
        // listen queue unanswered: wait only as long as the subscribers do.
        stream.set_read_timeout(Some(self.timeout))?;
        let control = stream.try_clone()?;
        let mut stream = Wire::new(stream, self.tls.clone())?;
        match self.mode {
            PublishMode::Ws => {
                let handshake = ClientHandshake::new(
                    &self.target.path,
                    &self.target.host,
                    *b"herald-bench-pub",
                );
                stream.write_all(&handshake.encode())?;
                let rest = upgrade(&mut stream, &handshake).with_context(|| {
                    format!(
                        "publisher handshake: no answer within {} ms (is the server at its \
                         open-file limit, or overloaded?)",
                        self.timeout.as_millis()
                    )
                })?;
                control.set_read_timeout(None)?;
                let (reader, writer) = stream.split()?;
                let writer = Arc::new(Mutex::new(writer));
                let (acked, errors, pong) =
                    (self.acked.clone(), self.errors.clone(), writer.clone());
                std::thread::spawn(move || read_acks(reader, rest, &acked, &errors, &pong));
                self.conn = Some(PublishConn::Ws(writer));
            }
            PublishMode::Http => self.conn = Some(PublishConn::Http(stream, Vec::new())),
        }
        Ok(self)
    }

    pub(crate) fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Whether every publish has been acknowledged.
    pub(crate) fn acks_done(&self, published: u64) -> bool {
        self.acked() >= published
    }

    /// Publishes `total` messages, message k scheduled at `t0 + k * interval`.
    pub(crate) fn run(&mut self, t0: u64, total: u64, interval_ns: f64) -> Result<PublishOutcome> {
        set_timer_slack_ns(1000);
        let mut outcome = PublishOutcome {
            per_channel: vec![0; self.channels.len()],
            ..PublishOutcome::default()
        };
        let mut payload = Vec::with_capacity(self.size + 128);
        for k in 0..total {
            let scheduled = scheduled_ns(t0, k, interval_ns, self.burst);
            let now = monotonic_ns();
            if now < scheduled {
                sleep_until_ns(scheduled);
            } else {
                outcome.max_behind_ns = outcome.max_behind_ns.max(now - scheduled);
            }
            let channel_index = (k % self.channels.len() as u64) as usize;
            let channel = &self.channels[channel_index];
            let data = message_data(k, scheduled, self.size);
            payload.clear();
            let result = match self.conn.as_mut().expect("connected") {
                PublishConn::Ws(writer) => {
                    self.template
                        .render_into(&mut payload, channel, &data, k + 1);
                    let frame =
                        encode_client_frame(OpCode::Text, true, &payload, (k as u32).to_le_bytes());
                    writer
                        .lock()
                        .expect("writer lock")
                        .write_all(&frame)
                        .context("publisher write")
                }
                PublishConn::Http(stream, buf) => {
                    let body = format!(
                        "{{\"channel\":{},\"data\":{}}}",
                        serde_json::to_string(channel)?,
                        String::from_utf8_lossy(&data)
                    );
                    http_publish(stream, buf, &self.target, self.api_key.as_deref(), &body).map(
                        |ok| {
                            if ok {
                                self.acked.fetch_add(1, Ordering::Relaxed);
                            }
                        },
                    )
                }
            };
            if let Err(error) = result {
                outcome.errors.push(format!("{error:#}"));
                break;
            }
            outcome.published += 1;
            outcome.per_channel[channel_index] += 1;
        }
        outcome
            .errors
            .extend(self.errors.lock().expect("errors lock").drain(..));
        Ok(outcome)
    }
}

/// Reads an HTTP response head; returns it and the bytes after it.
/// Reads the answer to `handshake`'s request; the bytes after a 101's head.
fn upgrade(stream: &mut impl Read, handshake: &ClientHandshake) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match handshake
            .parse_response(&buf)
            .context("publisher handshake")?
        {
            Some((Answer::Accepted { .. }, len)) => return Ok(buf.split_off(len)),
            Some((Answer::Refused { status, body, .. }, _)) => {
                bail!(
                    "publisher handshake refused: {}",
                    Refusal::parse(status, &body)
                )
            }
            None => {}
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed during the HTTP response");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn read_head(stream: &mut impl Read) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed during the HTTP response");
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 64 * 1024 {
            bail!("HTTP response head too long");
        }
    }
}

/// POSTs one publish on a keep-alive connection; true on a 2xx answer.
fn http_publish(
    stream: &mut Wire,
    _buf: &mut Vec<u8>,
    target: &Target,
    api_key: Option<&str>,
    body: &str,
) -> Result<bool> {
    let auth = api_key.map_or(String::new(), |key| {
        format!("Authorization: Bearer {key}\r\n")
    });
    write!(
        stream,
        "POST {} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        target.path,
        target.host,
        body.len()
    )?;
    let (head, mut rest) = read_head(stream)?;
    let head_text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length: usize = head_text
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    let mut chunk = [0u8; 4096];
    while rest.len() < length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed during the HTTP response body");
        }
        rest.extend_from_slice(&chunk[..n]);
    }
    let ok = head_text.starts_with("http/1.1 2");
    if !ok {
        bail!(
            "publish answered {}: {}",
            head_text.lines().next().unwrap_or_default(),
            String::from_utf8_lossy(&rest)
        );
    }
    Ok(ok)
}

/// Counts acks on the publisher's connection and answers pings, until it closes.
fn read_acks(
    mut stream: WireReader,
    mut buf: Vec<u8>,
    acked: &AtomicU64,
    errors: &Mutex<Vec<String>>,
    writer: &Mutex<WireWriter>,
) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut consumed = 0;
        while let Ok(Some((header, header_len))) = FrameHeader::parse(&buf[consumed..]) {
            let start = consumed + header_len;
            let end = start + header.payload_len as usize;
            if end > buf.len() {
                break;
            }
            let payload = &buf[start..end];
            match header.opcode {
                OpCode::Ping => {
                    let pong = encode_client_frame(OpCode::Pong, true, payload, [1, 2, 3, 4]);
                    let _ = writer.lock().expect("writer lock").write_all(&pong);
                }
                OpCode::Close => return,
                _ if find(payload, br#""type":"ack""#).is_some() => {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                _ if find(payload, br#""type":"error""#).is_some() => {
                    let mut errors = errors.lock().expect("errors lock");
                    if errors.len() < 10 {
                        errors.push(String::from_utf8_lossy(payload).into_owned());
                    }
                }
                _ => {}
            }
            consumed = end;
        }
        buf.drain(..consumed);
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sleeps until CLOCK_MONOTONIC reaches `deadline_ns`.
fn sleep_until_ns(deadline_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
    };
    loop {
        // SAFETY: `ts` is a valid timespec; with TIMER_ABSTIME the remainder pointer may be null.
        let rc = unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_MONOTONIC,
                libc::TIMER_ABSTIME,
                &ts,
                std::ptr::null_mut(),
            )
        };
        if rc != libc::EINTR {
            return;
        }
    }
}

/// Lets the kernel wake this thread within `ns` of a timer instead of the default 50 µs.
fn set_timer_slack_ns(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes one unsigned long and affects only the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0);
    }
}
