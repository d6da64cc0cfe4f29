//! The many-connection client engine: one single-threaded mio loop holding thousands of
//! WebSocket client connections (non-blocking connect from a chosen source address, opening
//! handshake, frame reading through `herald::proto`), plus the pieces that spread a run over
//! worker processes and source addresses. Nothing here knows what a benchmark measures; the
//! subcommands plug in through [`Handler`].

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, BufRead as _, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs as _};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use herald::proto::client_handshake::{Answer, ClientHandshake};
use herald::proto::deflate::Inflater;
use herald::proto::frame::{FrameHeader, OpCode, encode_client_frame};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::ClientConfig;
use rustls::ClientConnection;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

use crate::stats::{
    Hist, Timeline, encode_histogram, monotonic_ns, new_histogram, sample_pids, self_cpu_ns,
};
use crate::tls;

/// Where to connect: a parsed `ws://host:port/path?query` (or `http://` for the publish URL;
/// `wss://` and `https://` for TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    /// Whether the connection speaks TLS (wss://, https://).
    pub(crate) tls: bool,
    /// The `Host` header value.
    pub(crate) host: String,
    /// Path and query.
    pub(crate) path: String,
}

impl Target {
    /// Parses and resolves `url` (`ws://`, `http://`, `wss://` or `https://`).
    ///
    /// # Errors
    /// Another scheme, a missing host, or a name that does not resolve.
    pub(crate) fn parse(url: &str) -> Result<Self> {
        let (rest, tls) = if let Some(rest) = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("http://"))
        {
            (rest, false)
        } else if let Some(rest) = url
            .strip_prefix("wss://")
            .or_else(|| url.strip_prefix("https://"))
        {
            (rest, true)
        } else {
            bail!("{url}: only ws://, wss://, http:// and https:// URLs are supported");
        };
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            bail!("{url}: no host");
        }
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
        {
            authority.to_owned()
        } else if tls {
            format!("{authority}:443")
        } else {
            format!("{authority}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .with_context(|| format!("resolving {authority}"))?
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("{authority} has no IPv4 address"))?;
        Ok(Self {
            addr,
            tls,
            host: authority.to_owned(),
            path: path.to_owned(),
        })
    }
}

/// Parses `--source-ips`: empty (let the kernel choose), `A-B` (an inclusive IPv4 range) or a
/// comma-separated list of addresses and ranges.
///
/// # Errors
/// A malformed address or a range that runs backwards.
pub(crate) fn parse_source_ips(spec: &str) -> Result<Vec<Ipv4Addr>> {
    let mut ips = Vec::new();
    for part in spec
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        if let Some((first, last)) = part.split_once('-') {
            let first: Ipv4Addr = first.trim().parse().context("bad source IP")?;
            let last: Ipv4Addr = last.trim().parse().context("bad source IP")?;
            let (first, last) = (u32::from(first), u32::from(last));
            if last < first {
                bail!("source IP range {part} runs backwards");
            }
            ips.extend((first..=last).map(Ipv4Addr::from));
        } else {
            ips.push(
                part.parse()
                    .with_context(|| format!("bad source IP {part}"))?,
            );
        }
    }
    Ok(ips)
}

/// Raises the soft open-file limit to the hard limit; returns the new soft limit.
pub(crate) fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit within the hard limit, so the call is allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    limit.rlim_cur
}

/// File descriptors kept free for things other than connections (stdio, epoll, pipes).
pub(crate) const SPARE_FDS: u64 = 64;

/// Appends a masked client text frame carrying `payload` to `out`.
pub(crate) fn push_text(out: &mut Vec<u8>, payload: &[u8]) {
    push_frame(out, OpCode::Text, payload);
}

fn push_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    // The mask only has to be unpredictable to browsers' scripts, not to us: any key will do.
    let mask = (monotonic_ns() as u32 ^ 0x5bd1_e995).to_le_bytes();
    out.extend_from_slice(&encode_client_frame(opcode, true, payload, mask));
}

/// Finds `needle` in `haystack` (both short: a frame payload and a marker).
#[must_use]
pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut start = 0;
    while start + needle.len() <= haystack.len() {
        let at = start + haystack[start..].iter().position(|&b| b == first)?;
        if haystack.get(at..at + needle.len())? == needle {
            return Some(at);
        }
        start = at + 1;
    }
    None
}

/// Parses the unsigned decimal number at the start of `bytes` (after optional spaces).
#[must_use]
pub(crate) fn parse_u64(bytes: &[u8]) -> Option<u64> {
    let digits = bytes.iter().position(|b| *b != b' ').unwrap_or(bytes.len());
    let bytes = &bytes[digits..];
    let len = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if len == 0 || len > 19 {
        return None;
    }
    bytes[..len].iter().try_fold(0u64, |n, b| {
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// The number after the first `"key":` in `payload`.
#[must_use]
pub(crate) fn field_u64(payload: &[u8], key_marker: &[u8]) -> Option<u64> {
    let at = find(payload, key_marker)?;
    parse_u64(&payload[at + key_marker.len()..])
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Never started, or closed and not restarted.
    Idle,
    /// TCP connect in progress.
    Connecting,
    /// Upgrade request sent, waiting for the 101.
    Handshaking,
    /// WebSocket open.
    Open,
}

/// One client connection.
#[derive(Debug)]
struct Conn {
    stream: Option<TcpStream>,
    /// The TLS session of a wss:// connection: `inbuf` and `outbuf` hold plaintext.
    tls: Option<Box<ClientConnection>>,
    state: ConnState,
    /// Received bytes not yet parsed (a partial frame or handshake response).
    inbuf: Vec<u8>,
    /// Bytes not yet written.
    outbuf: Vec<u8>,
    /// When the connection started its current attempt (for the connect/handshake timeout).
    started_ns: u64,
    /// Present once the server accepted permessage-deflate.
    inflater: Option<Inflater>,
}

impl Conn {
    const fn new() -> Self {
        Self {
            stream: None,
            tls: None,
            state: ConnState::Idle,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            started_ns: 0,
            inflater: None,
        }
    }
}

/// What a subcommand does with its connections. `out` collects bytes to send on that
/// connection (use [`push_text`]); the engine writes them when the callback returns.
pub(crate) trait Handler {
    /// The WebSocket handshake completed on connection `id`.
    fn on_open(&mut self, id: usize, out: &mut Vec<u8>);
    /// A data frame arrived on `id`; `recv_ns` is the monotonic time of the read that got it.
    fn on_message(&mut self, id: usize, payload: &[u8], recv_ns: u64, out: &mut Vec<u8>);
    /// Connection `id` failed or closed; `reason` is a short label for counting.
    fn on_close(&mut self, id: usize, state: ConnState, reason: String);
}

/// A mio loop over many client connections to one target; connection ids are dense indices
/// chosen by the caller.
#[derive(Debug)]
pub(crate) struct Engine {
    poll: Poll,
    events: Events,
    conns: Vec<Conn>,
    scratch: Vec<u8>,
    /// Plaintext decrypted from `scratch` on TLS connections.
    plain: Vec<u8>,
    target: Target,
    /// The client configuration and server name when the target speaks TLS.
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    /// The handshake every connection makes (one key for all: the server checks its
    /// form, and a benchmark gains nothing from fresh randomness), and its request bytes.
    handshake: ClientHandshake,
    request: Vec<u8>,
    /// Bytes read from every connection's socket, handshakes included.
    pub(crate) bytes_read: u64,
}

/// Largest message a benchmark connection inflates.
const MAX_INFLATED_BYTES: u64 = 64 << 20;

/// Size of the shared read buffer.
const SCRATCH_BYTES: usize = 64 * 1024;

impl Engine {
    /// An engine for `capacity` connections to `target`; `insecure` accepts any TLS
    /// certificate.
    ///
    /// # Errors
    /// epoll creation failure, or no CA certificates to verify the server with.
    pub(crate) fn new(target: Target, capacity: usize, insecure: bool) -> Result<Self> {
        let tls = if target.tls {
            Some((
                tls::client_config(insecure)?,
                tls::server_name(&target.host)?,
            ))
        } else {
            None
        };
        let nonce = monotonic_ns() ^ (u64::from(std::process::id()) << 32);
        let mut key_bytes = [0u8; 16];
        key_bytes[..8].copy_from_slice(&nonce.to_le_bytes());
        key_bytes[8..].copy_from_slice(&(!nonce).rotate_left(17).to_le_bytes());
        let handshake = ClientHandshake::new(&target.path, &target.host, key_bytes);
        Ok(Self {
            poll: Poll::new().context("creating epoll")?,
            events: Events::with_capacity(4096),
            conns: (0..capacity).map(|_| Conn::new()).collect(),
            scratch: vec![0; SCRATCH_BYTES],
            plain: Vec::new(),
            target,
            tls,
            request: handshake.encode(),
            handshake,
            bytes_read: 0,
        })
    }

    /// Offers permessage-deflate (no parameters, as a browser does) in every handshake;
    /// compressed messages are inflated before the handler sees them.
    pub(crate) fn offer_deflate(&mut self) {
        self.handshake = self.handshake.clone().extensions("permessage-deflate");
        self.request = self.handshake.encode();
    }

    /// Starts a non-blocking connect for `id` from `source` (port chosen by the kernel).
    ///
    /// # Errors
    /// Immediate failures (no socket, source address unusable, ports exhausted); the
    /// connection stays idle and the handler is not called.
    pub(crate) fn start(&mut self, id: usize, source: Option<IpAddr>) -> io::Result<()> {
        if id >= self.conns.len() {
            self.conns.resize_with(id + 1, Conn::new);
        }
        let socket = Socket::new(
            Domain::IPV4,
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        socket.set_tcp_nodelay(true)?;
        if let Some(source) = source {
            socket.bind(&SocketAddr::new(source, 0).into())?;
        }
        match socket.connect(&self.target.addr.into()) {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(error) => return Err(error),
        }
        let mut stream = TcpStream::from_std(socket.into());
        self.poll.registry().register(
            &mut stream,
            Token(id),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let conn = &mut self.conns[id];
        conn.stream = Some(stream);
        conn.tls = match &self.tls {
            Some((config, name)) => Some(Box::new(
                ClientConnection::new(config.clone(), name.clone()).map_err(io::Error::other)?,
            )),
            None => None,
        };
        conn.state = ConnState::Connecting;
        conn.inbuf.clear();
        conn.outbuf.clear();
        conn.inflater = None;
        conn.started_ns = monotonic_ns();
        Ok(())
    }

    /// Queues `bytes` (complete frames) on an open connection and tries to write them.
    pub(crate) fn send(&mut self, id: usize, bytes: &[u8], handler: &mut impl Handler) {
        let conn = &mut self.conns[id];
        if conn.state != ConnState::Open {
            return;
        }
        conn.outbuf.extend_from_slice(bytes);
        self.flush(id, handler);
    }

    /// Fails every connection that has been connecting or handshaking for longer than
    /// `timeout_ns`.
    pub(crate) fn expire(&mut self, timeout_ns: u64, handler: &mut impl Handler) {
        let now = monotonic_ns();
        for id in 0..self.conns.len() {
            let conn = &self.conns[id];
            if matches!(conn.state, ConnState::Connecting | ConnState::Handshaking)
                && now.saturating_sub(conn.started_ns) > timeout_ns
            {
                self.fail(id, "timeout".to_owned(), handler);
            }
        }
    }

    /// Registers a waker on this engine's poll, with a token no connection uses.
    ///
    /// # Errors
    /// eventfd creation failure.
    pub(crate) fn waker(&self) -> Result<mio::Waker> {
        Ok(mio::Waker::new(self.poll.registry(), Token(usize::MAX))?)
    }

    /// Closes every connection without telling the handler.
    pub(crate) fn close_all(&mut self) {
        for conn in &mut self.conns {
            conn.stream = None;
            conn.tls = None;
            conn.state = ConnState::Idle;
        }
    }

    /// Waits up to `timeout` for socket events and handles them.
    ///
    /// # Errors
    /// epoll_wait failure other than EINTR.
    pub(crate) fn turn(&mut self, handler: &mut impl Handler, timeout: Duration) -> io::Result<()> {
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(error) => return Err(error),
        }
        let ready: Vec<(usize, bool, bool)> = self
            .events
            .iter()
            .map(|event| {
                (
                    event.token().0,
                    event.is_readable() || event.is_read_closed() || event.is_error(),
                    event.is_writable(),
                )
            })
            .collect();
        for (id, readable, writable) in ready {
            if id >= self.conns.len() {
                continue; // a waker
            }
            if writable {
                self.on_writable(id, handler);
            }
            if readable {
                self.on_readable(id, handler);
            }
        }
        Ok(())
    }

    fn fail(&mut self, id: usize, reason: String, handler: &mut impl Handler) {
        let conn = &mut self.conns[id];
        let state = conn.state;
        if state == ConnState::Idle {
            return;
        }
        if let Some(mut stream) = conn.stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        conn.state = ConnState::Idle;
        conn.tls = None;
        conn.inbuf = Vec::new();
        conn.outbuf = Vec::new();
        handler.on_close(id, state, reason);
    }

    fn on_writable(&mut self, id: usize, handler: &mut impl Handler) {
        let conn = &mut self.conns[id];
        if conn.state == ConnState::Connecting {
            let Some(stream) = conn.stream.as_ref() else {
                return;
            };
            match stream.take_error() {
                Ok(None) => {}
                Ok(Some(error)) | Err(error) => {
                    return self.fail(id, io_reason(&error), handler);
                }
            }
            match stream.peer_addr() {
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::NotConnected => return,
                Err(error) => return self.fail(id, io_reason(&error), handler),
            }
            conn.state = ConnState::Handshaking;
            conn.outbuf.extend_from_slice(&self.request);
        }
        self.flush(id, handler);
    }

    fn flush(&mut self, id: usize, handler: &mut impl Handler) {
        let conn = &mut self.conns[id];
        let Some(stream) = conn.stream.as_mut() else {
            return;
        };
        let result = match conn.tls.as_deref_mut() {
            None => write_plain(stream, &mut conn.outbuf),
            Some(session) => write_tls(stream, session, &mut conn.outbuf),
        };
        if let Err(error) = result {
            self.fail(id, io_reason(&error), handler);
        }
    }

    fn on_readable(&mut self, id: usize, handler: &mut impl Handler) {
        loop {
            let conn = &mut self.conns[id];
            if matches!(conn.state, ConnState::Idle | ConnState::Connecting) {
                return;
            }
            let Some(stream) = conn.stream.as_mut() else {
                return;
            };
            let n = match stream.read(&mut self.scratch) {
                Ok(0) => {
                    return self.fail(id, "closed by server".to_owned(), handler);
                }
                Ok(n) => n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return self.fail(id, io_reason(&error), handler),
            };
            let recv_ns = monotonic_ns();
            self.bytes_read += n as u64;
            let data: &[u8] = match conn.tls.as_deref_mut() {
                None => &self.scratch[..n],
                Some(session) => match decrypt(session, &self.scratch[..n], &mut self.plain) {
                    Ok(true) => &self.plain,
                    Ok(false) => return self.fail(id, "closed by server".to_owned(), handler),
                    Err(error) => return self.fail(id, format!("tls: {error}"), handler),
                },
            };
            let mut out = Vec::new();
            let outcome = if conn.inbuf.is_empty() {
                let outcome = process(
                    conn.state,
                    &mut conn.inflater,
                    &self.handshake,
                    data,
                    id,
                    recv_ns,
                    handler,
                    &mut out,
                );
                if let Ok((_, consumed)) = outcome {
                    conn.inbuf.extend_from_slice(&data[consumed..]);
                }
                outcome
            } else {
                conn.inbuf.extend_from_slice(data);
                let inbuf = std::mem::take(&mut conn.inbuf);
                let outcome = process(
                    conn.state,
                    &mut conn.inflater,
                    &self.handshake,
                    &inbuf,
                    id,
                    recv_ns,
                    handler,
                    &mut out,
                );
                let conn = &mut self.conns[id];
                conn.inbuf = inbuf;
                if let Ok((_, consumed)) = outcome {
                    conn.inbuf.drain(..consumed);
                }
                outcome
            };
            let conn = &mut self.conns[id];
            match outcome {
                Ok((state, _)) => conn.state = state,
                Err(reason) => {
                    conn.outbuf.extend_from_slice(&out);
                    self.flush(id, handler);
                    return self.fail(id, reason, handler);
                }
            }
            let tls_records = conn.tls.as_ref().is_some_and(|s| s.wants_write());
            if !out.is_empty() || tls_records {
                conn.outbuf.extend_from_slice(&out);
                self.flush(id, handler);
            }
            // A short read drained the socket: with edge-triggered epoll, bytes that arrive
            // later raise a new event, so the extra read that would return EAGAIN is skipped.
            if n < self.scratch.len() {
                return;
            }
        }
    }
}

/// Writes `outbuf` until it is empty or the socket is full, dropping what was written.
fn write_plain(stream: &mut TcpStream, outbuf: &mut Vec<u8>) -> io::Result<()> {
    let mut written = 0;
    let result = loop {
        if written == outbuf.len() {
            break Ok(());
        }
        match stream.write(&outbuf[written..]) {
            Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => written += n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => break Ok(()),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => break Err(error),
        }
    };
    outbuf.drain(..written);
    result
}

/// Moves `outbuf` into TLS records and writes them until the socket is full.
fn write_tls(
    stream: &mut TcpStream,
    session: &mut ClientConnection,
    outbuf: &mut Vec<u8>,
) -> io::Result<()> {
    loop {
        if !outbuf.is_empty() {
            let taken = session.writer().write(outbuf)?;
            outbuf.drain(..taken);
        }
        if !session.wants_write() {
            return Ok(());
        }
        match session.write_tls(stream) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
}

/// Decrypts `ciphertext` into `plain` (replacing its contents). `Ok(false)`: the server
/// sent `close_notify`.
fn decrypt(
    session: &mut ClientConnection,
    mut ciphertext: &[u8],
    plain: &mut Vec<u8>,
) -> Result<bool, rustls::Error> {
    plain.clear();
    let mut open = true;
    while !ciphertext.is_empty() {
        session
            .read_tls(&mut ciphertext)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let state = session.process_new_packets()?;
        let ready = state.plaintext_bytes_to_read();
        if ready > 0 {
            let start = plain.len();
            plain.resize(start + ready, 0);
            session
                .reader()
                .read_exact(&mut plain[start..])
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        }
        open &= !state.peer_has_closed();
    }
    Ok(open)
}

/// Handles received bytes: the handshake response, then frames (inflating compressed ones
/// once permessage-deflate was accepted). Returns the new state and how many bytes were
/// consumed, or why the connection must close.
#[expect(clippy::too_many_arguments, reason = "one call site per buffer source")]
fn process(
    mut state: ConnState,
    inflater: &mut Option<Inflater>,
    handshake: &ClientHandshake,
    mut data: &[u8],
    id: usize,
    recv_ns: u64,
    handler: &mut impl Handler,
    out: &mut Vec<u8>,
) -> Result<(ConnState, usize), String> {
    let total = data.len();
    if state == ConnState::Handshaking {
        let (extensions, head_len) = match handshake.parse_response(data) {
            Ok(None) => return Ok((state, 0)),
            Ok(Some((Answer::Accepted { extensions, .. }, len))) => (extensions, len),
            Ok(Some((Answer::Refused { status, .. }, _))) => return Err(format!("http {status}")),
            Err(error) => return Err(format!("handshake: {error}")),
        };
        // permessage-deflate is the only extension offered, so the only one accepted.
        if extensions.is_some() {
            *inflater = Some(Inflater::default());
        }
        data = &data[head_len..];
        state = ConnState::Open;
        handler.on_open(id, out);
    }
    loop {
        let (header, header_len) = match FrameHeader::parse(data) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => break,
            Err(error) => return Err(format!("protocol error: {error}")),
        };
        let Ok(payload_len) = usize::try_from(header.payload_len) else {
            return Err("frame too long".to_owned());
        };
        let Some(payload) = data.get(header_len..header_len + payload_len) else {
            break;
        };
        match header.opcode {
            OpCode::Text | OpCode::Binary if header.rsv == 0b100 => {
                let Some(inflater) = inflater.as_mut() else {
                    return Err("compressed frame without permessage-deflate".to_owned());
                };
                let inflated = inflater
                    .inflate(payload, MAX_INFLATED_BYTES)
                    .map_err(|error| format!("inflate: {error}"))?;
                handler.on_message(id, &inflated, recv_ns, out);
            }
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                handler.on_message(id, payload, recv_ns, out);
            }
            OpCode::Ping => push_frame(out, OpCode::Pong, payload),
            OpCode::Pong => {}
            OpCode::Close => {
                let code = payload
                    .first_chunk::<2>()
                    .map_or(1005, |code| u16::from_be_bytes(*code));
                push_frame(out, OpCode::Close, payload.get(..2).unwrap_or_default());
                return Err(format!("close {code}"));
            }
        }
        data = &data[header_len + payload_len..];
    }
    Ok((state, total - data.len()))
}

/// A short label for an IO error, for counting failures by kind.
#[must_use]
pub(crate) fn io_reason(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::ECONNREFUSED) => "connection refused".to_owned(),
        Some(libc::ECONNRESET) => "connection reset".to_owned(),
        Some(libc::ETIMEDOUT) => "timeout".to_owned(),
        Some(libc::EADDRNOTAVAIL) => "no free source port (add --source-ips)".to_owned(),
        Some(libc::EMFILE | libc::ENFILE) => "too many open files".to_owned(),
        _ => error.kind().to_string(),
    }
}

/// A message template with `{channel}`, `{data}` and `{id}` placeholders; any other text,
/// JSON braces included, is copied as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Channel,
    Data,
    Id,
}

impl Template {
    /// Splits `text` at its placeholders.
    #[must_use]
    pub(crate) fn parse(text: &str) -> Self {
        let mut parts = Vec::new();
        let mut rest = text;
        loop {
            let next = [
                ("{channel}", Part::Channel),
                ("{data}", Part::Data),
                ("{id}", Part::Id),
            ]
            .into_iter()
            .filter_map(|(token, part)| rest.find(token).map(|at| (at, token.len(), part)))
            .min_by_key(|(at, _, _)| *at);
            let Some((at, len, part)) = next else {
                if !rest.is_empty() {
                    parts.push(Part::Text(rest.to_owned()));
                }
                return Self { parts };
            };
            if at > 0 {
                parts.push(Part::Text(rest[..at].to_owned()));
            }
            parts.push(part);
            rest = &rest[at + len..];
        }
    }

    /// Whether the template uses `{data}`.
    #[must_use]
    pub(crate) fn has_data(&self) -> bool {
        self.parts.contains(&Part::Data)
    }

    /// Appends the template with its placeholders filled in to `out`.
    pub(crate) fn render_into(&self, out: &mut Vec<u8>, channel: &str, data: &[u8], id: u64) {
        for part in &self.parts {
            match part {
                Part::Text(text) => out.extend_from_slice(text.as_bytes()),
                Part::Channel => out.extend_from_slice(channel.as_bytes()),
                Part::Data => out.extend_from_slice(data),
                Part::Id => out.extend_from_slice(id.to_string().as_bytes()),
            }
        }
    }

    /// The template with its placeholders filled in.
    #[must_use]
    pub(crate) fn render(&self, channel: &str, data: &[u8], id: u64) -> Vec<u8> {
        let mut out = Vec::new();
        self.render_into(&mut out, channel, data, id);
        out
    }
}

/// The marker that starts the benchmark's own fields inside a message's `data`:
/// `{"hb":[k,scheduled_ns],"p":"xxx"}`.
pub(crate) const DATA_MARKER: &[u8] = b"\"hb\":[";
const SEQ_MARKER: &[u8] = b"\"seq\":";

/// The `data` JSON of message `k` scheduled at `scheduled_ns`, padded to `size` bytes when
/// `size` is larger than the bare fields.
#[must_use]
pub(crate) fn message_data(k: u64, scheduled_ns: u64, size: usize) -> Vec<u8> {
    let mut data = format!("{{\"hb\":[{k},{scheduled_ns}]").into_bytes();
    let bare = data.len() + 1;
    let padded = data.len() + ",\"p\":\"\"}".len();
    if size > padded {
        data.extend_from_slice(b",\"p\":\"");
        push_quote_text(&mut data, k, size - padded);
        data.extend_from_slice(b"\"}");
    } else {
        data.push(b'}');
        debug_assert_eq!(data.len(), bare);
    }
    data
}

/// `len` bytes of text like a price feed's (`SYM07 bid 101.23 ask 101.25 x 3400; ...`),
/// different for every `k`: padding that compresses like real JSON values do, where a run
/// of one letter would flatter permessage-deflate.
fn push_quote_text(out: &mut Vec<u8>, k: u64, len: usize) {
    let end = out.len() + len;
    let mut x = k.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move |bound: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % bound
    };
    while out.len() < end {
        let price = 100 + next(900);
        let quote = format!(
            "SYM{:02} bid {price}.{:02} ask {price}.{:02} x {}; ",
            next(40),
            next(100),
            next(100),
            100 * (1 + next(99))
        );
        out.extend_from_slice(quote.as_bytes());
    }
    out.truncate(end);
}

/// `(k, scheduled_ns)` from a payload carrying [`message_data`], and where the data starts.
#[must_use]
pub(crate) fn parse_message_data(payload: &[u8]) -> Option<(u64, u64)> {
    let at = find(payload, DATA_MARKER)? + DATA_MARKER.len();
    let rest = &payload[at..];
    let k = parse_u64(rest)?;
    let comma = rest.iter().position(|b| *b == b',')?;
    let scheduled = parse_u64(&rest[comma + 1..])?;
    Some((k, scheduled))
}

/// What one delivery was, judged from its index in its channel's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// First time seen, in order (possibly after a gap).
    New,
    /// First time seen, but after a later message.
    OutOfOrder,
    /// Seen before.
    Duplicate,
}

/// Order tracking for one subscription: the next expected index (1-based) and the ranges
/// skipped so far, so that memory grows with anomalies, not with messages.
#[derive(Debug, Clone, Default)]
pub(crate) struct Order {
    next: u64,
    missing: Vec<(u64, u64)>,
}

impl Order {
    /// Records the delivery of stream index `index` (1 = first message after subscribing).
    pub(crate) fn record(&mut self, index: u64) -> Delivery {
        if self.next == 0 {
            self.next = 1;
        }
        if index >= self.next {
            if index > self.next {
                self.missing.push((self.next, index));
            }
            self.next = index + 1;
            return Delivery::New;
        }
        let Some(pos) = self
            .missing
            .iter()
            .position(|&(start, end)| (start..end).contains(&index))
        else {
            return Delivery::Duplicate;
        };
        let (start, end) = self.missing[pos];
        self.missing.swap_remove(pos);
        if start < index {
            self.missing.push((start, index));
        }
        if index + 1 < end {
            self.missing.push((index + 1, end));
        }
        Delivery::OutOfOrder
    }
}

/// What a worker process is told to do, on its first stdin line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WorkerConfig {
    pub(crate) url: String,
    /// This worker's number, 0-based, and how many there are: it owns the connections
    /// `index, index + workers, ...` of `0..conns`.
    pub(crate) index: usize,
    pub(crate) workers: usize,
    pub(crate) conns: usize,
    pub(crate) channels: Vec<String>,
    pub(crate) source_ips: Vec<Ipv4Addr>,
    /// New connections per second for this worker; 0 = unlimited.
    pub(crate) connect_rate: f64,
    pub(crate) connect_retries: u32,
    pub(crate) connect_timeout_ms: u64,
    /// Largest number of connections between connect and subscribed at once.
    pub(crate) max_in_flight: usize,
    /// Subscribe template; None leaves the connections idle once open.
    pub(crate) subscribe_template: Option<String>,
    /// Text that marks the reply confirming a subscription; empty = don't wait for one.
    pub(crate) subscribe_reply: String,
    /// Offer permessage-deflate and inflate what arrives compressed.
    #[serde(default)]
    pub(crate) deflate: bool,
    /// Accept any TLS certificate (wss:// to a server with a self-signed one).
    #[serde(default)]
    pub(crate) insecure: bool,
}

/// Coordinator -> worker, one JSON line each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub(crate) enum Command {
    /// The measured phase starts; timeline buckets count from `t0_ns`.
    Measure { t0_ns: u64 },
    /// Report and exit.
    Stop,
}

/// Connection outcome of a worker's ramp.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Ready {
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    pub(crate) retries: u64,
    pub(crate) failures: BTreeMap<String, u64>,
    /// Confirmed subscriptions per channel index.
    pub(crate) subs_per_channel: Vec<u64>,
}

/// A worker's measurements at the end.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Done {
    pub(crate) received: u64,
    pub(crate) duplicated: u64,
    pub(crate) out_of_order: u64,
    /// Data frames that carried no benchmark message.
    pub(crate) other_frames: u64,
    /// Subscribed connections that closed before the end, by reason.
    pub(crate) disconnected: BTreeMap<String, u64>,
    pub(crate) first_recv_ns: u64,
    pub(crate) last_recv_ns: u64,
    /// CPU used by the worker between `Measure` and `Stop`.
    pub(crate) cpu_ns: u64,
    /// Peak RSS of the worker, bytes.
    pub(crate) rss_bytes: u64,
    /// Bytes read from the sockets between `Measure` and `Stop` (what crossed the wire).
    #[serde(default)]
    pub(crate) bytes_read: u64,
    pub(crate) histogram: String,
    pub(crate) timeline: Vec<String>,
}

/// Worker -> coordinator, one JSON line each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub(crate) enum Report {
    Progress {
        opened: u64,
        failed: u64,
        received: u64,
    },
    Ready(Ready),
    Done(Box<Done>),
    /// The worker hit an error and exits.
    Error {
        message: String,
    },
}

/// Per-connection state of a worker.
#[derive(Debug, Clone, Default)]
struct Track {
    channel: u32,
    attempts: u32,
    /// Resolved: subscribed (or open, for idle connections), or given up.
    resolved: bool,
    ok: bool,
    base_seq: Option<u64>,
    order: Order,
}

/// The worker's [`Handler`]: subscribes, then checks and times every delivery.
#[derive(Debug)]
struct Subscriber {
    config: WorkerConfig,
    template: Option<Template>,
    tracks: Vec<Track>,
    retry: VecDeque<(usize, u64)>,
    in_flight: usize,
    ready: Ready,
    done: Done,
    opened: u64,
    t0_ns: Option<u64>,
    hist: Hist,
    timeline: Timeline,
}

impl Subscriber {
    fn global_id(&self, local: usize) -> usize {
        self.config.index + local * self.config.workers
    }

    fn resolve(&mut self, local: usize, ok: bool) {
        let track = &mut self.tracks[local];
        if track.resolved {
            return;
        }
        track.resolved = true;
        track.ok = ok;
        self.in_flight -= 1;
        if ok {
            self.ready.ok += 1;
            self.ready.subs_per_channel[track.channel as usize] += 1;
        } else {
            self.ready.failed += 1;
        }
    }

    /// A connection attempt failed before it was resolved: retry or give up.
    fn attempt_failed(&mut self, local: usize, reason: String) {
        let track = &mut self.tracks[local];
        track.attempts += 1;
        if track.attempts <= self.config.connect_retries {
            self.ready.retries += 1;
            self.in_flight -= 1;
            let backoff_ns = 50_000_000 * u64::from(track.attempts);
            self.retry.push_back((local, monotonic_ns() + backoff_ns));
        } else {
            *self.ready.failures.entry(reason).or_default() += 1;
            self.resolve(local, false);
        }
    }

    fn deliver(&mut self, local: usize, payload: &[u8], recv_ns: u64) {
        let Some((k, scheduled_ns)) = parse_message_data(payload) else {
            self.done.other_frames += 1;
            return;
        };
        let track = &mut self.tracks[local];
        let index = match (track.base_seq, field_u64(payload, SEQ_MARKER)) {
            (Some(base), Some(seq)) if seq > base => seq - base,
            (Some(_), Some(_)) => {
                self.done.other_frames += 1;
                return;
            }
            _ => k / self.config.channels.len() as u64 + 1,
        };
        match track.order.record(index) {
            Delivery::New => {}
            Delivery::OutOfOrder => self.done.out_of_order += 1,
            Delivery::Duplicate => {
                self.done.duplicated += 1;
                return;
            }
        }
        self.done.received += 1;
        if self.done.first_recv_ns == 0 {
            self.done.first_recv_ns = recv_ns;
        }
        self.done.last_recv_ns = recv_ns;
        let latency_us = recv_ns.saturating_sub(scheduled_ns) / 1000;
        self.hist.saturating_record(latency_us);
        let t0 = self.t0_ns.unwrap_or(recv_ns);
        self.timeline.record(recv_ns.saturating_sub(t0), latency_us);
    }
}

impl Handler for Subscriber {
    fn on_open(&mut self, id: usize, out: &mut Vec<u8>) {
        self.opened += 1;
        let Some(template) = &self.template else {
            return self.resolve(id, true);
        };
        let channel = &self.config.channels[self.tracks[id].channel as usize];
        let request_id = self.global_id(id) as u64 + 1;
        push_text(out, &template.render(channel, b"", request_id));
        if self.config.subscribe_reply.is_empty() {
            self.resolve(id, true);
        }
    }

    fn on_message(&mut self, id: usize, payload: &[u8], recv_ns: u64, _out: &mut Vec<u8>) {
        let track = &mut self.tracks[id];
        if track.resolved {
            if track.ok {
                self.deliver(id, payload, recv_ns);
            }
            return;
        }
        if find(payload, self.config.subscribe_reply.as_bytes()).is_some() {
            track.base_seq = field_u64(payload, SEQ_MARKER);
            self.resolve(id, true);
        } else if find(payload, b"\"type\":\"error\"").is_some() {
            let reason = format!("subscribe error: {}", String::from_utf8_lossy(payload));
            *self.ready.failures.entry(reason).or_default() += 1;
            self.resolve(id, false);
        } else {
            self.done.other_frames += 1;
        }
    }

    fn on_close(&mut self, id: usize, _state: ConnState, reason: String) {
        let track = &self.tracks[id];
        if !track.resolved {
            self.attempt_failed(id, reason);
        } else if track.ok {
            *self.done.disconnected.entry(reason).or_default() += 1;
        }
    }
}

/// Runs a worker: reads its [`WorkerConfig`] and commands on stdin, writes [`Report`] lines on
/// stdout, exits after `Stop` or when stdin closes.
///
/// # Errors
/// A bad configuration or an epoll failure (also reported as [`Report::Error`]).
pub(crate) fn run_worker() -> Result<()> {
    let result = worker_main();
    if let Err(error) = &result {
        emit(&Report::Error {
            message: format!("{error:#}"),
        });
    }
    result
}

fn emit(report: &Report) {
    let mut line = serde_json::to_string(report).expect("reports serialise");
    line.push('\n');
    let mut stdout = io::stdout().lock();
    let _ = stdout.write_all(line.as_bytes());
    let _ = stdout.flush();
}

fn worker_main() -> Result<()> {
    let limit = raise_nofile_limit();
    let mut stdin = io::stdin().lock();
    let mut line = String::new();
    io::BufRead::read_line(&mut stdin, &mut line).context("reading worker config")?;
    let config: WorkerConfig = serde_json::from_str(&line).context("parsing worker config")?;
    drop(stdin);
    let local_conns = (config.conns + config.workers - 1 - config.index) / config.workers;
    if local_conns as u64 + SPARE_FDS > limit {
        bail!(
            "worker {} would hold {local_conns} connections but may open only {limit} files: \
             use more --procs",
            config.index
        );
    }
    let target = Target::parse(&config.url)?;
    let mut engine = Engine::new(target, local_conns, config.insecure)?;
    if config.deflate {
        engine.offer_deflate();
    }
    let waker = engine.waker()?;
    let (commands_tx, commands) = mpsc::channel();
    std::thread::spawn(move || {
        for line in io::stdin().lines() {
            let Ok(line) = line else { break };
            let Ok(command) = serde_json::from_str::<Command>(&line) else {
                continue;
            };
            if commands_tx.send(command).is_err() {
                return;
            }
            let _ = waker.wake();
        }
        // stdin closed: the coordinator is gone.
        let _ = commands_tx.send(Command::Stop);
        let _ = waker.wake();
    });

    let channels = config.channels.len();
    let tracks = (0..local_conns)
        .map(|local| Track {
            channel: ((config.index + local * config.workers) % channels) as u32,
            ..Track::default()
        })
        .collect();
    let mut sub = Subscriber {
        template: config.subscribe_template.as_deref().map(Template::parse),
        tracks,
        retry: VecDeque::new(),
        in_flight: 0,
        ready: Ready {
            subs_per_channel: vec![0; channels],
            ..Ready::default()
        },
        done: Done::default(),
        opened: 0,
        t0_ns: None,
        hist: new_histogram(),
        timeline: Timeline::default(),
        config,
    };

    let started_ns = monotonic_ns();
    let timeout_ns = sub.config.connect_timeout_ms * 1_000_000;
    let mut next_new = 0usize;
    let mut starts = 0u64;
    let mut ready_sent = false;
    let mut last_progress = started_ns;
    let mut last_expire = started_ns;
    let mut measure_cpu = 0;
    let mut measure_bytes = 0;
    loop {
        let now = monotonic_ns();
        // The ramp: retries that are due first, then new connections, at the bounded rate.
        let allowed = if sub.config.connect_rate > 0.0 {
            ((now - started_ns) as f64 / 1e9 * sub.config.connect_rate) as u64 + 1
        } else {
            u64::MAX
        };
        while starts < allowed && sub.in_flight < sub.config.max_in_flight {
            let local = match sub.retry.front() {
                Some(&(local, due)) if due <= now => {
                    sub.retry.pop_front();
                    local
                }
                _ if next_new < local_conns => {
                    next_new += 1;
                    next_new - 1
                }
                _ => break,
            };
            starts += 1;
            sub.in_flight += 1;
            let global = sub.global_id(local);
            let source = (!sub.config.source_ips.is_empty())
                .then(|| IpAddr::V4(sub.config.source_ips[global % sub.config.source_ips.len()]));
            if let Err(error) = engine.start(local, source) {
                sub.attempt_failed(local, io_reason(&error));
            }
        }
        let ramping = !ready_sent;
        engine.turn(
            &mut sub,
            Duration::from_millis(if ramping { 5 } else { 100 }),
        )?;
        let now = monotonic_ns();
        if ramping && now - last_expire > 100_000_000 {
            last_expire = now;
            engine.expire(timeout_ns, &mut sub);
        }
        if !ready_sent && (sub.ready.ok + sub.ready.failed) as usize == local_conns {
            ready_sent = true;
            emit(&Report::Ready(sub.ready.clone()));
        }
        if now - last_progress > 500_000_000 {
            last_progress = now;
            emit(&Report::Progress {
                opened: sub.opened,
                failed: sub.ready.failed,
                received: sub.done.received,
            });
        }
        while let Ok(command) = commands.try_recv() {
            match command {
                Command::Measure { t0_ns } => {
                    sub.t0_ns = Some(t0_ns);
                    measure_cpu = self_cpu_ns();
                    measure_bytes = engine.bytes_read;
                }
                Command::Stop => {
                    let mut done = std::mem::take(&mut sub.done);
                    done.cpu_ns = self_cpu_ns().saturating_sub(measure_cpu);
                    done.bytes_read = engine.bytes_read - measure_bytes;
                    done.rss_bytes = sample_pids(&[std::process::id()])
                        .map(|sample| sample.rss_bytes)
                        .unwrap_or(0);
                    done.histogram = encode_histogram(&sub.hist);
                    done.timeline = sub.timeline.encode();
                    emit(&Report::Done(Box::new(done)));
                    engine.close_all();
                    return Ok(());
                }
            }
        }
    }
}

/// The coordinator's handle on its worker processes.
#[derive(Debug)]
pub(crate) struct Fleet {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    reports: mpsc::Receiver<(usize, Report)>,
}

impl Fleet {
    /// Spawns one worker per config (this executable, hidden `worker` subcommand).
    ///
    /// # Errors
    /// The executable cannot be found or started.
    pub(crate) fn spawn(configs: &[WorkerConfig]) -> Result<Self> {
        let exe = std::env::current_exe().context("locating herald-bench itself")?;
        let (tx, reports) = mpsc::channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        for (index, config) in configs.iter().enumerate() {
            let mut child = std::process::Command::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting worker {index}"))?;
            let mut stdin = child.stdin.take().expect("piped");
            let stdout = child.stdout.take().expect("piped");
            let mut line = serde_json::to_string(config)?;
            line.push('\n');
            stdin.write_all(line.as_bytes())?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut finished = false;
                for line in io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let report =
                        serde_json::from_str(&line).unwrap_or_else(|error| Report::Error {
                            message: format!("bad report line {line:?}: {error}"),
                        });
                    finished |= matches!(report, Report::Done(_));
                    if tx.send((index, report)).is_err() {
                        return;
                    }
                }
                if !finished {
                    let message = "worker exited before reporting".to_owned();
                    let _ = tx.send((index, Report::Error { message }));
                }
            });
            children.push(child);
            stdins.push(stdin);
        }
        Ok(Self {
            children,
            stdins,
            reports,
        })
    }

    /// Sends `command` to every worker.
    ///
    /// # Errors
    /// A worker's stdin is closed.
    pub(crate) fn send(&mut self, command: Command) -> Result<()> {
        let mut line = serde_json::to_string(&command)?;
        line.push('\n');
        for (index, stdin) in self.stdins.iter_mut().enumerate() {
            stdin
                .write_all(line.as_bytes())
                .with_context(|| format!("worker {index} is gone"))?;
        }
        Ok(())
    }

    /// The next report from any worker, or None after `timeout`.
    #[must_use]
    pub(crate) fn recv(&self, timeout: Duration) -> Option<(usize, Report)> {
        self.reports.recv_timeout(timeout).ok()
    }

    /// Waits for every worker to exit.
    pub(crate) fn wait(mut self) {
        self.stdins.clear();
        for child in &mut self.children {
            let _ = child.wait();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stdins.clear();
        for child in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_source_ranges() {
        let target = Target::parse("ws://127.0.0.1:8080/ws?token=x").unwrap();
        assert_eq!(target.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(target.host, "127.0.0.1:8080");
        assert_eq!(target.path, "/ws?token=x");
        assert_eq!(Target::parse("ws://127.0.0.1").unwrap().path, "/");
        let secure = Target::parse("wss://127.0.0.1/ws").unwrap();
        assert!(secure.tls);
        assert_eq!(secure.addr.port(), 443);
        assert!(!Target::parse("ws://127.0.0.1/ws").unwrap().tls);
        assert!(
            Target::parse("https://127.0.0.1:8443/api/publish")
                .unwrap()
                .tls
        );
        assert!(Target::parse("ftp://127.0.0.1/ws").is_err());

        let ips = parse_source_ips("127.0.0.2-127.0.0.4, 10.0.0.1").unwrap();
        assert_eq!(ips.len(), 4);
        assert_eq!(ips[2], Ipv4Addr::new(127, 0, 0, 4));
        assert!(parse_source_ips("").unwrap().is_empty());
        assert!(parse_source_ips("127.0.0.9-127.0.0.2").is_err());
    }

    #[test]
    fn templates_fill_placeholders_and_keep_json_braces() {
        let template =
            Template::parse(r#"{"type":"publish","channel":"{channel}","data":{data},"id":{id}}"#);
        assert!(template.has_data());
        assert_eq!(
            template.render("news", br#"{"a":1}"#, 7),
            br#"{"type":"publish","channel":"news","data":{"a":1},"id":7}"#
        );
        let plain = Template::parse("{data}{data} {unknown}");
        assert_eq!(plain.render("c", b"x", 1), b"xx {unknown}");
        assert!(!Template::parse(r#"{"type":"subscribe"}"#).has_data());
    }

    #[test]
    fn message_data_is_padded_json_that_parses_back() {
        for size in [0, 10, 64, 1000] {
            let data = message_data(12, 3_000_000_123, size);
            let value: serde_json::Value = serde_json::from_slice(&data).unwrap();
            assert_eq!(value["hb"][0], 12);
            if size > 40 {
                assert_eq!(data.len(), size);
            }
            let envelope = [br#"{"type":"message","seq":5,"data":"#, &data[..], b"}"].concat();
            assert_eq!(parse_message_data(&envelope), Some((12, 3_000_000_123)));
        }
    }

    /// Records the messages a connection receives.
    #[derive(Default)]
    struct Recorder(Vec<Vec<u8>>);

    impl Handler for Recorder {
        fn on_open(&mut self, _id: usize, _out: &mut Vec<u8>) {}
        fn on_message(&mut self, _id: usize, payload: &[u8], _recv_ns: u64, _out: &mut Vec<u8>) {
            self.0.push(payload.to_vec());
        }
        fn on_close(&mut self, _id: usize, _state: ConnState, _reason: String) {}
    }

    #[test]
    fn inflates_compressed_frames_once_deflate_was_accepted() {
        use herald::proto::deflate::{Compressor, CompressorSettings};
        let data = message_data(3, 99, 1024);
        let mut compressor = Compressor::new(CompressorSettings::SHARED, true);
        let compressed = compressor.encode_frame(OpCode::Text, &data);
        assert!(
            compressed.len() < data.len() * 2 / 3,
            "padding compresses like JSON"
        );
        let handshake = ClientHandshake::new("/ws", "h", [1; 16]).extensions("permessage-deflate");
        let accept = herald::proto::accept_key(handshake.key());
        let mut bytes = herald::proto::upgrade_response(&accept, None, Some("permessage-deflate"));
        bytes.extend_from_slice(&compressed);
        bytes.extend_from_slice(&herald::proto::encode_frame(OpCode::Text, b"plain"));
        let (mut inflater, mut recorder, mut out) = (None, Recorder::default(), Vec::new());
        let (state, used) = process(
            ConnState::Handshaking,
            &mut inflater,
            &handshake,
            &bytes,
            0,
            0,
            &mut recorder,
            &mut out,
        )
        .unwrap();
        assert_eq!((state, used), (ConnState::Open, bytes.len()));
        assert_eq!(recorder.0, [data, b"plain".to_vec()]);

        let mut refused = None;
        let result = process(
            ConnState::Open,
            &mut refused,
            &handshake,
            &compressed,
            0,
            0,
            &mut recorder,
            &mut out,
        );
        assert!(result.is_err(), "RSV1 without negotiation is an error");
    }

    #[test]
    fn order_tells_lost_late_and_duplicated_deliveries_apart() {
        let mut order = Order::default();
        assert_eq!(order.record(1), Delivery::New);
        assert_eq!(order.record(2), Delivery::New);
        assert_eq!(order.record(6), Delivery::New);
        assert_eq!(order.record(4), Delivery::OutOfOrder);
        assert_eq!(order.record(4), Delivery::Duplicate);
        assert_eq!(order.record(2), Delivery::Duplicate);
        assert_eq!(order.record(3), Delivery::OutOfOrder);
        assert_eq!(order.record(5), Delivery::OutOfOrder);
        assert_eq!(order.record(5), Delivery::Duplicate);
        assert!(order.missing.is_empty());
        assert_eq!(order.record(7), Delivery::New);
    }

    #[test]
    fn finds_fields_cheaply() {
        let payload = br#"{"type":"message","channel":"c","seq":42,"data":{"hb":[7,99]}}"#;
        assert_eq!(field_u64(payload, b"\"seq\":"), Some(42));
        assert_eq!(field_u64(payload, b"\"hb\":["), Some(7));
        assert_eq!(field_u64(payload, b"\"nope\":"), None);
        assert_eq!(find(b"aab", b"ab"), Some(1));
        assert_eq!(parse_u64(b" 123,"), Some(123));
        assert_eq!(parse_u64(b"99999999999999999999"), None);
    }
}
