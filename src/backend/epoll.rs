//! The epoll backend (through mio): one `Poll` per shard, edge-triggered sockets, reads
//! into one scratch buffer per shard (what a read brings is appended to its connection's
//! buffer) and one vectored write per dirty socket per loop turn. On a TLS listener each
//! socket carries a [`TlsSession`] between the socket and the shard, which sees
//! plaintext only.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use crate::backend::tls::{Inbound, TlsAcceptor, TlsSession};
use crate::backend::turn::{Loop, Sockets};
use crate::http::ApiError;
use crate::shard::{Inbox, Post, Shard, Wake};

const LISTENER: Token = Token(usize::MAX - 1);
/// The token the shard's `mio::Waker` is registered with.
pub const WAKER: Token = Token(usize::MAX - 2);

/// Frames handed to one `writev`: enough to drain a burst of small broadcasts in one call,
/// well under `IOV_MAX` (1024).
const MAX_IOVECS: usize = 64;
/// The shard's scratch buffer, the most one read takes (plaintext, or ciphertext on a TLS
/// socket: several full records). Reading into it, zeroed once, instead of into a
/// connection's own buffer grown and zeroed for each read, makes an idle connection's
/// pong cost a copy of its 6 bytes rather than a 16 KiB allocation and memset.
const READ_SCRATCH: usize = 64 * 1024;
/// How long accepting pauses when the process is out of file descriptors: connected
/// clients keep being served, and the loop does not spin on a listener it cannot drain.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl Wake for mio::Waker {
    fn wake(&self) {
        if let Err(e) = Self::wake(self) {
            tracing::error!("cannot wake shard: {e}");
        }
    }
}

/// A connection's socket and whether it is registered for writability. Sockets are
/// registered for reading only; writability is asked for only while a write has hit
/// `EAGAIN`, because an edge-triggered writable interest would wake the loop once per
/// ACKed write on every socket of a broadcast.
struct Socket {
    stream: TcpStream,
    awaiting_writable: bool,
    /// On a TLS listener: the session the bytes on the wire belong to.
    tls: Option<Box<TlsSession>>,
    /// `close_notify` is queued: shut down the write side once the records are out.
    shutdown_after_ciphertext: bool,
}

impl Socket {
    /// Registers or drops writable interest.
    fn await_writable(&mut self, poll: &Poll, key: usize, on: bool) -> io::Result<()> {
        await_writable(&mut self.stream, &mut self.awaiting_writable, poll, key, on)
    }
}

/// [`Socket::await_writable`] for when the socket's session is borrowed too.
fn await_writable(
    stream: &mut TcpStream,
    awaiting_writable: &mut bool,
    poll: &Poll,
    key: usize,
    on: bool,
) -> io::Result<()> {
    if *awaiting_writable == on {
        return Ok(());
    }
    *awaiting_writable = on;
    let interest = if on {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    poll.registry().reregister(stream, Token(key), interest)
}

/// What a shard thread owns while it runs.
pub struct Reactor {
    pub shard: Shard,
    pub inbox: Inbox,
    pub post: Arc<Post>,
    pub poll: Poll,
    pub listener: std::net::TcpListener,
    pub stop: Arc<AtomicBool>,
    pub drain: Duration,
    /// Present when the listener speaks TLS.
    pub tls: Option<Arc<TlsAcceptor>>,
}

/// Runs the shard until it is stopped and drained (or the drain time runs out).
pub fn run(reactor: Reactor) -> io::Result<()> {
    let Reactor {
        shard,
        inbox,
        post,
        poll,
        listener,
        stop,
        drain,
        tls,
    } = reactor;
    let mut listener = TcpListener::from_std(listener);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut epoll = Epoll {
        poll,
        events: Events::with_capacity(1024),
        listener: Some(listener),
        accept_paused_until: None,
        sockets: Vec::with_capacity(shard.connection_capacity()),
        scratch: vec![0; READ_SCRATCH].into_boxed_slice(),
        tls,
    };
    Loop {
        shard,
        inbox,
        post,
        stop,
        drain,
    }
    .run(&mut epoll)
}

/// The shard's `Poll`, its listener and the sockets of its connections.
struct Epoll {
    poll: Poll,
    events: Events,
    /// Gone once the server drains.
    listener: Option<TcpListener>,
    /// Accepting ran out of file descriptors: try again then.
    accept_paused_until: Option<Instant>,
    /// Indexed by the shard's connection keys.
    sockets: Vec<Option<Socket>>,
    /// Every read lands here first ([`READ_SCRATCH`]).
    scratch: Box<[u8]>,
    tls: Option<Arc<TlsAcceptor>>,
}

impl Sockets for Epoll {
    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        match self.poll.poll(&mut self.events, timeout) {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => Err(e),
            _ => Ok(()),
        }
    }

    fn dispatch(&mut self, shard: &mut Shard, now: Instant) -> io::Result<()> {
        let Self {
            poll,
            events,
            listener,
            accept_paused_until,
            sockets,
            scratch,
            tls,
        } = self;
        for event in events.iter() {
            match event.token() {
                LISTENER => {
                    if let Some(l) = listener.as_ref()
                        && accept_paused_until.is_none()
                    {
                        *accept_paused_until =
                            accept_all(l, shard, poll, sockets, tls.as_deref(), now)?;
                    }
                }
                WAKER => {}
                Token(key) => {
                    if sockets.get(key).is_none_or(Option::is_none) {
                        continue;
                    }
                    if event.is_writable() {
                        if sockets[key].as_ref().is_some_and(|s| s.tls.is_some()) {
                            // Records may wait with the outbox empty (handshake, close_notify).
                            flush(shard, key, sockets, scratch, poll, now);
                        } else {
                            shard.handle_writable(key);
                        }
                    }
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        read(shard, key, sockets, scratch, poll, now);
                    }
                }
            }
        }
        if let Some(until) = *accept_paused_until
            && now >= until
        {
            // No new edge may come for connections already waiting: try again now.
            *accept_paused_until = match listener.as_ref() {
                Some(l) => accept_all(l, shard, poll, sockets, tls.as_deref(), now)?,
                None => None,
            };
        }
        Ok(())
    }

    fn next_wakeup(&self) -> Option<Instant> {
        self.accept_paused_until
    }

    fn has_pending(&self) -> bool {
        false
    }

    fn stop_accepting(&mut self) -> io::Result<()> {
        self.accept_paused_until = None;
        match self.listener.take() {
            Some(mut l) => self.poll.registry().deregister(&mut l),
            None => Ok(()),
        }
    }

    fn flush(&mut self, shard: &mut Shard, key: usize, now: Instant) -> io::Result<()> {
        flush(
            shard,
            key,
            &mut self.sockets,
            &mut self.scratch,
            &self.poll,
            now,
        );
        Ok(())
    }

    fn close(&mut self, shard: &mut Shard, key: usize) -> io::Result<()> {
        if let Some(mut socket) = self.sockets[key].take() {
            let _ = self.poll.registry().deregister(&mut socket.stream);
        }
        shard.remove(key);
        Ok(())
    }
}

/// Accepts until the backlog is empty. Returns when to try again if the process ran out
/// of file descriptors (`EMFILE`/`ENFILE`).
fn accept_all(
    listener: &TcpListener,
    shard: &mut Shard,
    poll: &Poll,
    sockets: &mut Vec<Option<Socket>>,
    tls: Option<&TlsAcceptor>,
    now: Instant,
) -> io::Result<Option<Instant>> {
    loop {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                let Some(key) = shard.accept(now, peer.ip()) else {
                    // Full or draining: closing at once is the clearest answer.
                    continue;
                };
                // Pushed frames must leave at once, not wait for Nagle.
                let _ = stream.set_nodelay(true);
                poll.registry()
                    .register(&mut stream, Token(key), Interest::READABLE)?;
                if sockets.len() <= key {
                    sockets.resize_with(key + 1, || None);
                }
                sockets[key] = Some(Socket {
                    stream,
                    awaiting_writable: false,
                    tls: tls.map(|acceptor| Box::new(acceptor.accept())),
                    shutdown_after_ciphertext: false,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                // The waiting connections stay in the backlog until descriptors free up.
                tracing::warn!(
                    shard = shard.id(),
                    connections = shard.connection_count(),
                    "out of file descriptors; pausing accept for {ACCEPT_BACKOFF:?}"
                );
                return Ok(Some(now + ACCEPT_BACKOFF));
            }
            // The client gave up before we took it: concerns that connection only.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                tracing::warn!(shard = shard.id(), "accept failed: {e}; pausing accept");
                return Ok(Some(now + ACCEPT_BACKOFF));
            }
        }
    }
}

/// Reads until the socket is dry (edge-triggered) or the shard wants no more for now.
fn read(
    shard: &mut Shard,
    key: usize,
    sockets: &mut [Option<Socket>],
    scratch: &mut [u8],
    poll: &Poll,
    now: Instant,
) {
    let Some(socket) = sockets[key].as_mut() else {
        return;
    };
    if socket.tls.is_some() {
        read_tls(shard, key, socket, scratch, poll, now);
        return;
    }
    let socket = &mut socket.stream;
    while shard.wants_read(key) {
        match socket.read(scratch) {
            Ok(0) => {
                shard.handle_eof(key);
                return;
            }
            Ok(n) => {
                shard.read_buffer(key).extend_from_slice(&scratch[..n]);
                shard.handle_read(key, now);
                if n < scratch.len() {
                    // The socket had no more: reading again would only say so (EAGAIN).
                    // Whatever arrives later raises a new edge.
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Idle connections hold no read buffer.
                shard.release_read_buffer(key);
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                shard.handle_eof(key);
                return;
            }
        }
    }
}

/// Writes as much of `key`'s outbox as the socket takes, in vectored writes.
fn flush(
    shard: &mut Shard,
    key: usize,
    sockets: &mut [Option<Socket>],
    scratch: &mut [u8],
    poll: &Poll,
    now: Instant,
) {
    let Some(socket) = sockets[key].as_mut() else {
        return;
    };
    if socket.tls.is_some() {
        flush_tls(shard, key, socket, poll);
        if shard.resume_read(key) {
            shard.handle_read(key, now);
            read(shard, key, sockets, scratch, poll, now);
        }
        return;
    }
    let blocked = loop {
        let outbox = shard.outbox(key);
        if outbox.is_empty() {
            break false;
        }
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let count = outbox.io_slices(&mut slices);
        // One frame queued (the usual case below saturation): write(2) costs less in the
        // kernel than writev(2) with one vector.
        let result = if count == 1 {
            socket.stream.write(&slices[0])
        } else {
            socket.stream.write_vectored(&slices[..count])
        };
        match result {
            Ok(0) => {
                shard.handle_eof(key);
                return;
            }
            Ok(written) => shard.handle_written(key, written),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                shard.handle_eof(key);
                return;
            }
        }
    };
    if socket.await_writable(poll, key, blocked).is_err() {
        shard.handle_eof(key);
        return;
    }
    if shard.poll_flushed(key) && socket.stream.shutdown(Shutdown::Write).is_err() {
        shard.handle_eof(key);
        return;
    }
    if shard.resume_read(key) {
        // It stopped reading while its outbox was full; bytes may wait in its buffer and
        // in the kernel with no new edge to announce them.
        shard.handle_read(key, now);
        read(shard, key, sockets, scratch, poll, now);
    }
}

/// Reads ciphertext until the socket is dry or the shard wants no more for now, and hands
/// the shard the plaintext. Handshake records and alerts go out at once; the outbox waits
/// for this turn's flush.
fn read_tls(
    shard: &mut Shard,
    key: usize,
    socket: &mut Socket,
    ciphertext: &mut [u8],
    poll: &Poll,
    now: Instant,
) {
    let Socket {
        stream,
        awaiting_writable,
        tls: Some(session),
        ..
    } = socket
    else {
        return;
    };
    while shard.wants_read(key) {
        let n = match stream.read(ciphertext) {
            Ok(0) => {
                shard.handle_eof(key);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                shard.release_read_buffer(key);
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                shard.handle_eof(key);
                return;
            }
        };
        let buf = shard.read_buffer(key);
        let before = buf.len();
        let inbound = session.handle_ciphertext(&ciphertext[..n], buf);
        if shard.read_buffer(key).len() > before {
            shard.handle_read(key, now);
        }
        match inbound {
            Ok(Inbound::Open) => {}
            Ok(Inbound::PeerClosed) => {
                // Answer in kind, best effort, and end: whatever the peer sent after its
                // `close_notify` was discarded, and no more is read.
                session.send_close_notify();
                let _ = session.write_ciphertext(stream);
                shard.handle_eof(key);
                return;
            }
            Err(e) => {
                tracing::debug!(shard = shard.id(), key, "closing: {e}");
                if e.is_plain_http() {
                    // One best-effort write: a client that cannot take 200 bytes at once
                    // is not one to wait for.
                    let _ = stream.write(&ApiError::TlsRequired.response(false));
                } else {
                    // The alert, if the session has one for the peer.
                    let _ = session.write_ciphertext(stream);
                }
                shard.handle_eof(key);
                return;
            }
        }
        if session.wants_write() {
            if let Err(()) = write_ciphertext(session, stream) {
                shard.handle_eof(key);
                return;
            }
            let blocked = session.wants_write();
            if await_writable(stream, awaiting_writable, poll, key, blocked).is_err() {
                shard.handle_eof(key);
                return;
            }
        }
        if !shard.outbox(key).is_empty() {
            // Plaintext held back during the handshake can leave now.
            shard.handle_writable(key);
        }
        if n < ciphertext.len() {
            // The socket had no more; what arrives later raises a new edge.
            shard.release_read_buffer(key);
            return;
        }
    }
}

/// Writes queued records until none are left or the socket is full. `Err` means the
/// connection is gone.
fn write_ciphertext(session: &mut TlsSession, stream: &mut TcpStream) -> Result<(), ()> {
    while session.wants_write() {
        match session.write_ciphertext(stream) {
            Ok(0) => return Err(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
    Ok(())
}

/// The TLS flush: moves plaintext from the outbox into records no faster than the socket
/// takes them, so the shard's outbound budget still counts all but
/// [`PENDING_CIPHERTEXT_LIMIT`](super::tls::PENDING_CIPHERTEXT_LIMIT) of what is not on the wire. Then closes the session
/// when the shard is done with the connection.
fn flush_tls(shard: &mut Shard, key: usize, socket: &mut Socket, poll: &Poll) {
    let Socket {
        stream,
        awaiting_writable,
        tls: Some(session),
        shutdown_after_ciphertext,
    } = socket
    else {
        return;
    };
    loop {
        if write_ciphertext(session, stream).is_err() {
            shard.handle_eof(key);
            return;
        }
        if session.wants_write() {
            break;
        }
        let outbox = shard.outbox(key);
        if outbox.is_empty() {
            break;
        }
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let count = outbox.io_slices(&mut slices);
        let taken = session.encrypt(&slices[..count]);
        if taken == 0 {
            // Still in the handshake with the session's buffer full: the rest waits in
            // the outbox until the handshake ends (see `read_tls`).
            break;
        }
        shard.handle_written(key, taken);
    }
    let blocked = session.wants_write();
    if !blocked && *shutdown_after_ciphertext {
        *shutdown_after_ciphertext = false;
        if stream.shutdown(Shutdown::Write).is_err() {
            shard.handle_eof(key);
            return;
        }
    }
    if await_writable(stream, awaiting_writable, poll, key, blocked).is_err() {
        shard.handle_eof(key);
        return;
    }
    if blocked || !shard.poll_flushed(key) {
        return;
    }
    if session.is_handshaking() {
        // Nothing can reach a peer that never finished the handshake (a stalled one is
        // what the request deadline just ended).
        shard.handle_eof(key);
        return;
    }
    session.send_close_notify();
    if write_ciphertext(session, stream).is_err() {
        shard.handle_eof(key);
        return;
    }
    if session.wants_write() {
        *shutdown_after_ciphertext = true;
        if await_writable(stream, awaiting_writable, poll, key, true).is_err() {
            shard.handle_eof(key);
        }
    } else if stream.shutdown(Shutdown::Write).is_err() {
        shard.handle_eof(key);
    }
}
