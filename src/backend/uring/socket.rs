//! A connection's socket as the io_uring backend keeps it, what a send in flight holds
//! (addresses the kernel reads until the send completes), and the socket options set
//! on an accepted one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{OwnedFd, RawFd};

use bytes::{Buf, Bytes};

use crate::backend::tls::TlsSession;

use super::MAX_IOVECS;

/// A connection's socket and the operations in flight on it: 56 bytes, held in the
/// ring's table itself. What a send needs beyond one frame comes from a per-ring pool
/// only while it is in flight, so an idle plain connection holds nothing else.
pub(super) struct Socket {
    pub(super) fd: OwnedFd,
    /// Frames taken out of the outbox and not yet all sent (the first may be partly sent).
    pub(super) sending: Sending,
    /// What few sockets have: TLS, a receive buffer of their own.
    pub(super) rare: Option<Box<Rare>>,
    pub(super) send_in_flight: bool,
    /// A receive is armed (multishot: until a completion without `F_MORE`).
    pub(super) recv_in_flight: bool,
    /// A cancel was asked for the armed receive (the shard wants no more bytes for now).
    pub(super) recv_cancelled: bool,
    /// The shard is done with it: cancel what is in flight, then close.
    pub(super) closing: bool,
}

/// The state of the sockets that need more than the common case.
#[derive(Default)]
pub(super) struct Rare {
    pub(super) tls: Option<TlsSession>,
    /// Shut down the write side once the records now being sent (`close_notify` last)
    /// are out.
    pub(super) shutdown_after_ciphertext: bool,
    /// Where single-shot receives land when there is no buffer ring.
    pub(super) recv_buf: Option<Box<[u8]>>,
}

/// The frames of a socket's send. Most sends carry one frame (a broadcast to a
/// subscriber), sent from its own bytes with no vector.
pub(super) enum Sending {
    Idle,
    One(Bytes),
    Many(Box<SendRecord>),
}

/// A send of several frames: the frames, their vectors and the header pointing to them,
/// behind one pointer so their addresses stay put until the kernel is done with them.
pub(super) struct SendRecord {
    pub(super) frames: Vec<Bytes>,
    pub(super) iovecs: [libc::iovec; MAX_IOVECS],
    pub(super) msghdr: libc::msghdr,
}

impl SendRecord {
    pub(super) fn new() -> Box<Self> {
        Box::new(Self {
            frames: Vec::with_capacity(MAX_IOVECS),
            iovecs: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOVECS],
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            msghdr: unsafe { std::mem::zeroed() },
        })
    }
}

impl Socket {
    pub(super) fn new(fd: OwnedFd, tls: Option<TlsSession>) -> Self {
        Self {
            fd,
            sending: Sending::Idle,
            rare: tls.map(|session| {
                Box::new(Rare {
                    tls: Some(session),
                    ..Rare::default()
                })
            }),
            send_in_flight: false,
            recv_in_flight: false,
            recv_cancelled: false,
            closing: false,
        }
    }

    pub(super) fn in_flight(&self) -> bool {
        self.send_in_flight || self.recv_in_flight
    }

    pub(super) fn tls(&mut self) -> Option<&mut TlsSession> {
        self.rare.as_mut().and_then(|rare| rare.tls.as_mut())
    }

    /// Drops the first `sent` bytes of the frames in flight; returns the send record once
    /// all of its frames are out, for the pool.
    pub(super) fn advance(&mut self, mut sent: usize) -> Option<Box<SendRecord>> {
        match &mut self.sending {
            Sending::Idle => None,
            Sending::One(frame) => {
                frame.advance(sent);
                if frame.is_empty() {
                    self.sending = Sending::Idle;
                }
                None
            }
            Sending::Many(record) => {
                let mut done = 0;
                for chunk in &mut record.frames {
                    if sent < chunk.len() {
                        chunk.advance(sent);
                        break;
                    }
                    sent -= chunk.len();
                    done += 1;
                }
                record.frames.drain(..done);
                if !record.frames.is_empty() {
                    return None;
                }
                match std::mem::replace(&mut self.sending, Sending::Idle) {
                    Sending::Many(record) => Some(record),
                    _ => unreachable!("matched above"),
                }
            }
        }
    }
}

/// The peer's address of an accepted socket (multishot accept does not report it).
pub(super) fn peer_ip(fd: RawFd) -> Option<IpAddr> {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are live and `len` says how big `addr` is.
    let rc = unsafe { libc::getpeername(fd, (&raw mut addr).cast(), &raw mut len) };
    if rc != 0 {
        return None;
    }
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says `addr` holds a sockaddr_in.
            let v4 = unsafe { &*(&raw const addr).cast::<libc::sockaddr_in>() };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says `addr` holds a sockaddr_in6.
            let v6 = unsafe { &*(&raw const addr).cast::<libc::sockaddr_in6>() };
            Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

/// Pushed frames must leave at once, not wait for Nagle.
pub(super) fn set_nodelay(fd: RawFd) {
    let on: libc::c_int = 1;
    // SAFETY: passes a live c_int of the size given.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection holds a socket entry in the ring's table (measured with
    /// `bench-client/memory.sh`): growing it costs each idle connection.
    #[test]
    fn a_socket_entry_is_compact() {
        assert!(
            size_of::<Option<Socket>>() <= 56,
            "{}",
            size_of::<Option<Socket>>()
        );
    }
}
