//! A connection's socket as the io_uring backend keeps it, what a send in flight holds
//! (addresses the kernel reads until the send completes), and the socket options set
//! on an accepted one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{OwnedFd, RawFd};

use bytes::{Buf, Bytes};

use crate::backend::tls::TlsSession;

/// A connection's socket and the operations in flight on it: 12 bytes, held in the
/// ring's table itself. The frames of a send live in the ring's table of sends only while
/// the send is under way, and what TLS or a kernel without buffer rings needs lives in a
/// table of its own, so an idle plain connection holds nothing else.
pub(super) struct Socket {
    pub(super) fd: OwnedFd,
    /// Where the frames being sent are: a key in the ring's table of sends, the
    /// outbox's started lone frame ([`LONE_FRAME`]), or nowhere ([`NO_SEND`]).
    pub(super) send: u32,
    pub(super) send_in_flight: bool,
    /// A receive is armed (multishot: until a completion without `F_MORE`).
    pub(super) recv_in_flight: bool,
    /// A cancel was asked for the armed receive (the shard wants no more bytes for now).
    pub(super) recv_cancelled: bool,
    /// The shard is done with it: cancel what is in flight, then close.
    pub(super) closing: bool,
}

/// A socket with no frames being sent.
pub(super) const NO_SEND: u32 = u32::MAX;
/// A socket sending the one frame its outbox holds, from the outbox: the common send (a
/// broadcast to a subscriber that keeps up) takes no entry in the table of sends.
pub(super) const LONE_FRAME: u32 = u32::MAX - 1;

/// The state of the sockets that need more than the common case: every socket of a TLS
/// listener, and every socket where the kernel has no buffer rings.
#[derive(Default)]
pub(super) struct Rare {
    pub(super) tls: Option<TlsSession>,
    /// Shut down the write side once the records now being sent (`close_notify` last)
    /// are out.
    pub(super) shutdown_after_ciphertext: bool,
    /// Where single-shot receives land when there is no buffer ring.
    pub(super) recv_buf: Option<Box<[u8]>>,
}

/// The frames of a socket's send, taken out of its outbox, until the kernel has sent them
/// all. Most sends carry one frame (a broadcast to a subscriber), sent from its own bytes
/// with no vector; several small frames are copied into one buffer, sent the same way.
pub(super) enum Sending {
    One(Bytes),
    Many(Box<SendRecord>),
}

/// A send of several frames too large to copy: the frames, their vectors and the header
/// pointing to them, behind one pointer so their addresses stay put until the kernel is
/// done with them. Sized for its frames, so a fan-out that needs thousands at once holds
/// only what they carry.
pub(super) struct SendRecord {
    pub(super) frames: Vec<Bytes>,
    pub(super) iovecs: Vec<libc::iovec>,
    pub(super) msghdr: libc::msghdr,
}

impl Sending {
    /// The frames of `taken` (at least one; emptied) as one send: a lone frame as it is,
    /// frames that add up to at most `copy_limit` bytes copied into one buffer, larger
    /// ones behind vectors.
    pub(super) fn new(taken: &mut Vec<Bytes>, copy_limit: usize) -> Self {
        if taken.len() == 1 {
            return Self::One(taken.pop().expect("one frame"));
        }
        let total: usize = taken.iter().map(Bytes::len).sum();
        if total <= copy_limit {
            let mut buf = Vec::with_capacity(total);
            for frame in taken.drain(..) {
                buf.extend_from_slice(&frame);
            }
            return Self::One(Bytes::from(buf));
        }
        // Sized for these frames: `taken` keeps its room for the next send.
        let mut frames = Vec::with_capacity(taken.len());
        frames.append(taken);
        Self::Many(Box::new(SendRecord {
            frames,
            iovecs: Vec::new(),
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            msghdr: unsafe { std::mem::zeroed() },
        }))
    }

    /// Drops the first `sent` bytes; true once everything is sent.
    pub(super) fn advance(&mut self, mut sent: usize) -> bool {
        match self {
            Self::One(frame) => {
                frame.advance(sent);
                frame.is_empty()
            }
            Self::Many(record) => {
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
                record.frames.is_empty()
            }
        }
    }
}

impl Socket {
    pub(super) fn new(fd: OwnedFd) -> Self {
        Self {
            fd,
            send: NO_SEND,
            send_in_flight: false,
            recv_in_flight: false,
            recv_cancelled: false,
            closing: false,
        }
    }

    pub(super) fn in_flight(&self) -> bool {
        self.send_in_flight || self.recv_in_flight
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
            size_of::<Option<Socket>>() <= 12,
            "{}",
            size_of::<Option<Socket>>()
        );
    }

    fn frames(sizes: &[usize]) -> Vec<Bytes> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Bytes::from(vec![i as u8; n]))
            .collect()
    }

    #[test]
    fn small_frames_are_copied_into_one_send_in_order() {
        let mut taken = frames(&[3, 2, 4]);
        let Sending::One(bytes) = Sending::new(&mut taken, 16) else {
            panic!("copied");
        };
        assert!(taken.is_empty());
        assert_eq!(&bytes[..], &[0, 0, 0, 1, 1, 2, 2, 2, 2]);
    }

    #[test]
    fn large_frames_go_behind_vectors_and_advance_across_them() {
        let mut taken = frames(&[10, 10, 10]);
        let mut sending = Sending::new(&mut taken, 16);
        let Sending::Many(record) = &sending else {
            panic!("not copied");
        };
        assert_eq!(record.frames.len(), 3);
        assert_eq!(record.frames.capacity(), 3, "sized for its frames");
        assert!(!sending.advance(15), "a short send leaves the rest");
        let Sending::Many(record) = &sending else {
            unreachable!()
        };
        assert_eq!(record.frames.len(), 2);
        assert_eq!(&record.frames[0][..], &[1; 5]);
        assert!(sending.advance(15), "then everything is out");
    }

    #[test]
    fn a_lone_frame_is_sent_from_its_own_bytes() {
        let frame = Bytes::from(vec![7; 100]);
        let mut taken = vec![frame.clone()];
        let Sending::One(bytes) = Sending::new(&mut taken, 16) else {
            panic!("one");
        };
        assert_eq!(bytes.as_ptr(), frame.as_ptr(), "not copied");
    }
}
