//! TLS on io_uring, driving a [`TlsSession`] through the ring's operations (see
//! `backend::tls` for the session's calling contract): received ciphertext is decrypted
//! into the shard's read buffer; a flush encrypts plaintext from the outbox, no more than
//! the session takes ahead of the wire, and sends the session's records as one owned
//! buffer, with at most one send in flight as for plaintext. The last bytes of a dying
//! session (an alert, a `close_notify` answered in kind, the 400 to plain HTTP) go out
//! with one best-effort non-blocking `send(2)`, and only when no send is in flight, so
//! nothing can interleave with records already on their way.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use bytes::Bytes;

use crate::backend::tls::{Inbound, TlsSession};
use crate::http::ApiError;
use crate::shard::Shard;

use super::{MAX_IOVECS, NO_SEND, Sending, Uring, send_key};

/// Hands `ciphertext` received on `key`'s socket to its session, and the plaintext to
/// the shard. Returns false when the connection ends (the shard was told).
pub(super) fn receive(
    shard: &mut Shard,
    key: usize,
    fd: &OwnedFd,
    may_write: bool,
    session: &mut TlsSession,
    ciphertext: &[u8],
    now: Instant,
) -> bool {
    let buf = shard.read_buffer(key);
    let before = buf.len();
    let inbound = session.handle_ciphertext(ciphertext, buf);
    if shard.read_buffer(key).len() > before {
        shard.handle_read(key, now);
    } else {
        shard.release_read_buffer(key);
    }
    match inbound {
        Ok(Inbound::Open) => return true,
        Ok(Inbound::PeerClosed) => {
            // Answered in kind; what the peer sent after its `close_notify` was dropped.
            session.send_close_notify();
            if may_write {
                send_records_now(fd, session);
            }
        }
        Err(e) => {
            tracing::debug!(shard = shard.id(), key, "closing: {e}");
            if may_write {
                if e.is_plain_http() {
                    send_now(fd, &ApiError::TlsRequired.response(false));
                } else {
                    // The alert, if the session has one for the peer.
                    send_records_now(fd, session);
                }
            }
        }
    }
    shard.handle_eof(key);
    false
}

impl Uring {
    /// The TLS flush of `key` (no send in flight): plaintext from the outbox into records,
    /// no faster than the socket takes them, so the shard's outbound budget still counts
    /// what is not on the wire; the records out as one send; once the shard is done with
    /// the connection, `close_notify`, then the write side shut down.
    pub(super) fn flush_tls(
        &mut self,
        shard: &mut Shard,
        key: usize,
        now: Instant,
    ) -> io::Result<()> {
        let socket = self.sockets[key].as_mut().expect("flushing a live socket");
        let Some(rare) = self.rare.get_mut(key).and_then(Option::as_deref_mut) else {
            return Ok(());
        };
        let Some(session) = rare.tls.as_mut() else {
            return Ok(());
        };
        if socket.send != NO_SEND {
            // The rest of a short send goes first.
            return self.submit_send(shard, key, now);
        }
        if !session.wants_write() {
            let outbox = shard.outbox(key);
            if !outbox.is_empty() {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let count = outbox.io_slices(&mut slices);
                // Nothing is taken while the handshake's buffer is full: the rest waits
                // in the outbox until a received record moves the handshake on.
                let taken = session.encrypt(&slices[..count]);
                if taken > 0 {
                    shard.handle_written(key, taken);
                }
            }
        }
        if !session.wants_write() {
            if rare.shutdown_after_ciphertext {
                rare.shutdown_after_ciphertext = false;
                // SAFETY: shuts down the write side of a socket we own.
                if unsafe { libc::shutdown(socket.fd.as_raw_fd(), libc::SHUT_WR) } != 0 {
                    shard.handle_eof(key);
                    return Ok(());
                }
                return self.resume(shard, key, now);
            }
            if !shard.poll_flushed(key) {
                return self.resume(shard, key, now);
            }
            if session.is_handshaking() {
                // Nothing can reach a peer that never finished the handshake (a stalled
                // one is what the request deadline just ended).
                shard.handle_eof(key);
                return Ok(());
            }
            session.send_close_notify();
            rare.shutdown_after_ciphertext = true;
        }
        let mut records = Vec::new();
        while session.wants_write() {
            // Into memory: never short, never blocked.
            session.write_ciphertext(&mut records)?;
        }
        socket.send = send_key(self.sends.insert(Sending::One(Bytes::from(records))));
        self.submit_send(shard, key, now)
    }
}

/// Writes the session's queued records at once, as far as the socket takes them.
fn send_records_now(fd: &OwnedFd, session: &mut TlsSession) {
    let mut records = Vec::new();
    while session.wants_write() {
        if session.write_ciphertext(&mut records).is_err() {
            break;
        }
    }
    send_now(fd, &records);
}

/// One non-blocking `send(2)` of `bytes`; what the socket does not take is dropped.
fn send_now(fd: &OwnedFd, bytes: &[u8]) {
    // SAFETY: sends from a live slice of the given length on a socket we own.
    unsafe {
        libc::send(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}
