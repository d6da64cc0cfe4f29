//! The many-connection client engine: one single-threaded mio loop holding thousands of
//! WebSocket client connections (non-blocking connect from a chosen source address, opening
//! handshake, frame reading through `herald::proto`), plus the pieces that spread a run over
//! worker processes and source addresses. Nothing here knows what a benchmark measures; the
//! subcommands plug in through [`Handler`].

use std::fmt;
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs as _};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
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
use socket2::{Domain, Protocol, Socket, Type};

use crate::refusal::Refusal;
use crate::stats::monotonic_ns;
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
    /// Connection `id` failed or closed, and why.
    fn on_close(&mut self, id: usize, state: ConnState, failure: Failure);
}

/// Why a connection failed or closed. Its `Display` is a short label for counting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The server answered the upgrade with another status than 101.
    Refused(Refusal),
    /// Anything else.
    Other(String),
}

impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Self::Other(reason)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused(refusal) => refusal.fmt(f),
            Self::Other(reason) => f.write_str(reason),
        }
    }
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
            bind_address_no_port(&socket)?;
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

    fn fail(&mut self, id: usize, reason: impl Into<Failure>, handler: &mut impl Handler) {
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
        handler.on_close(id, state, reason.into());
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
) -> Result<(ConnState, usize), Failure> {
    let total = data.len();
    if state == ConnState::Handshaking {
        let (extensions, head_len) = match handshake.parse_response(data) {
            Ok(None) => return Ok((state, 0)),
            Ok(Some((Answer::Accepted { extensions, .. }, len))) => (extensions, len),
            Ok(Some((Answer::Refused { status, body, .. }, _))) => {
                return Err(Failure::Refused(Refusal::parse(status, &body)));
            }
            Err(error) => return Err(format!("handshake: {error}").into()),
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
            Err(error) => return Err(format!("protocol error: {error}").into()),
        };
        let Ok(payload_len) = usize::try_from(header.payload_len) else {
            return Err("frame too long".to_owned().into());
        };
        let Some(payload) = data.get(header_len..header_len + payload_len) else {
            break;
        };
        match header.opcode {
            OpCode::Text | OpCode::Binary if header.rsv == 0b100 => {
                let Some(inflater) = inflater.as_mut() else {
                    return Err("compressed frame without permessage-deflate"
                        .to_owned()
                        .into());
                };
                let inflated = inflater
                    .inflate(payload, MAX_INFLATED_BYTES)
                    .map_err(|error| Failure::Other(format!("inflate: {error}")))?;
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
                return Err(format!("close {code}").into());
            }
        }
        data = &data[header_len + payload_len..];
    }
    Ok((state, total - data.len()))
}

/// Leaves the port of a bound socket to `connect`, which picks it against the whole
/// address pair: an address then has its ports for each server, and on loopback
/// (`tcp_tw_reuse = 2`) it takes ports still in TIME_WAIT from an earlier run, which a
/// sweep's points on the same addresses would otherwise run out of.
fn bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the descriptor is an open socket for the call, and `on` is a live c_int
    // whose size is the length passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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

    /// Records the messages a connection receives.
    #[derive(Default)]
    struct Recorder(Vec<Vec<u8>>);

    impl Handler for Recorder {
        fn on_open(&mut self, _id: usize, _out: &mut Vec<u8>) {}
        fn on_message(&mut self, _id: usize, payload: &[u8], _recv_ns: u64, _out: &mut Vec<u8>) {
            self.0.push(payload.to_vec());
        }
        fn on_close(&mut self, _id: usize, _state: ConnState, _failure: Failure) {}
    }

    #[test]
    fn inflates_compressed_frames_once_deflate_was_accepted() {
        use herald::proto::deflate::{Compressor, CompressorSettings};

        use crate::message::message_data;
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
