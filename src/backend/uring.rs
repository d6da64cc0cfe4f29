//! The io_uring backend (`--io uring`): one ring per shard thread, driving the shard
//! through the same calling contract as the epoll backend.
//!
//! It owns each connection's socket and the operations in flight on it. Every loop turn
//! ends in one `io_uring_enter` that submits the turn's sends and waits for completions.
//! Accept is multishot; receive is multishot into a provided buffer ring (single-shot into
//! a per-socket buffer where the kernel lacks either); a socket has at most one send in
//! flight, so bytes are never lost or reordered. A lone frame (a broadcast to a
//! subscriber that keeps up) is sent from the outbox, which keeps it started until the
//! send completes; several frames are taken out of the outbox and kept alive here.
//! A dead connection's operations are cancelled and its socket is closed, and the shard
//! told, only once the last of them has completed, so no completion can reach a reused key.
//! TLS runs over the same operations: received ciphertext goes through the connection's
//! session on its way to the shard, and sends carry the session's records (`tls.rs`).

mod bufring;
mod ring;
mod socket;
mod tls;

use std::collections::VecDeque;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use bytes::Bytes;
use io_uring::types::{CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};
use slab::Slab;

use crate::backend::tls::TlsAcceptor;
use crate::backend::turn::{Loop, Sockets};
use crate::shard::{Inbox, Post, Shard};

use bufring::BufRing;
use ring::new_ring;
pub use ring::{EventFd, probe};
use socket::{LONE_FRAME, NO_SEND, Rare, Sending, Socket, peer_ip, set_nodelay};

/// Submission queue entries per ring: a turn's sends for thousands of sockets fit in a
/// few submissions; when it is full the queued entries are submitted early.
const SQ_ENTRIES: u32 = 4096;
/// Completion queue entries: 256 KiB per shard, mapped and resident from start. A turn
/// with more completions than this (a broadcast to more subscribers on one shard)
/// overflows, which costs the kernel an allocation per completion past it
/// (`IORING_FEAT_NODROP` keeps them until we drain); at 18,000 subscribers on one shard
/// that measured the same CPU per delivery as the kernel's maximum of 64 Ki entries,
/// which held 1 MiB per shard.
const CQ_ENTRIES: u32 = 16 * 1024;
/// Frames handed to one send, as in the epoll backend.
const MAX_IOVECS: usize = 64;
/// Several frames adding up to at most this many bytes are copied into one buffer and
/// sent like one frame: no vectors for the kernel to copy in, and one allocation.
const SEND_COPY_LIMIT: usize = 4096;
/// Entries of the table of sends kept once no send is under way; past that, the table a
/// fan-out or a round of pings grew to is given back.
const SENDS_KEPT_AT_REST: usize = 64;
/// Completions handled per batch: what is copied out of the queue at a time, so the
/// scratch for them does not grow with the largest turn.
const COMPLETION_BATCH: usize = 256;
/// Provided buffers per shard and their size: 128 KiB shared by every connection. The
/// kernel takes them in ring order, so every buffer of the ring is touched (resident)
/// soon after start, whatever the load: the ring is what a shard holds for receiving,
/// and small messages (commands, pongs) are what a push server receives.
const RECV_BUFFERS: u16 = 64;
const RECV_BUFFER_SIZE: usize = 2048;
/// Receives re-armed per turn for sockets that found the ring empty: at most half the
/// ring, so they cannot empty it again at once and each turn makes progress.
const STARVED_REARMS_PER_TURN: usize = RECV_BUFFERS as usize / 2;
const RECV_GROUP: u16 = 0;
/// The per-socket receive buffer where provided buffers are not available.
const FALLBACK_RECV_SIZE: usize = 16 * 1024;
/// How long accepting pauses when the process is out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Set to `1`, runs the code path of kernels before 5.19 (single-shot accept and receive,
/// no buffer ring) on any kernel: for the tests, and to compare the two.
pub const SINGLE_SHOT_ENV: &str = "HERALD_URING_SINGLE_SHOT";

/// What an operation is for; the low byte of its `user_data`, above it the connection key.
const OP_ACCEPT: u64 = 1;
const OP_WAKE: u64 = 2;
const OP_RECV: u64 = 3;
const OP_SEND: u64 = 4;
const OP_CANCEL: u64 = 5;

fn user_data(op: u64, key: usize) -> u64 {
    (key as u64) << 8 | op
}

/// A key of the table of sends as a socket holds it: there are never more sends than
/// connections, which are counted in `u32`.
fn send_key(slot: usize) -> u32 {
    u32::try_from(slot)
        .ok()
        .filter(|&key| key != NO_SEND && key != LONE_FRAME)
        .expect("fewer sends than connections")
}

/// A send of one frame from its own bytes, with no vector.
fn send_one(fd: Fd, frame: &Bytes) -> squeue::Entry {
    opcode::Send::new(fd, frame.as_ptr(), frame.len() as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build()
}

/// What a shard thread owns while it runs.
pub struct Reactor {
    pub shard: Shard,
    pub inbox: Inbox,
    pub post: Arc<Post>,
    pub wake: Arc<EventFd>,
    pub listener: TcpListener,
    pub stop: Arc<AtomicBool>,
    pub drain: Duration,
    /// Present when the listener speaks TLS.
    pub tls: Option<Arc<TlsAcceptor>>,
}

/// One completion, copied out so the handlers may queue new entries.
#[derive(Clone, Copy)]
struct Completion {
    user_data: u64,
    result: i32,
    flags: u32,
}

/// The ring and everything its operations point into.
struct Uring {
    // Field order is drop order: the ring goes first, so the kernel has let go of the
    // buffers, sockets and wake counter below before they are freed.
    ring: IoUring,
    bufs: Option<BufRing>,
    sockets: Vec<Option<Socket>>,
    /// What the sockets of a TLS listener, or of a kernel without buffer rings, hold
    /// besides their entry, by connection key; empty for the others.
    rare: Vec<Option<Box<Rare>>>,
    /// The frames of the sends under way, by the key in each socket's `send`. A `Sending`
    /// does not move while the kernel reads it (a lone frame's bytes are on the heap, a
    /// record is boxed), so the table may grow meanwhile.
    sends: Slab<Sending>,
    /// Where a socket's frames are taken out of its outbox.
    taken: Vec<Bytes>,
    /// Sockets whose receive ended because the buffer ring was empty: re-armed a few per
    /// turn once buffers are back ([`STARVED_REARMS_PER_TURN`]), not at once, which would
    /// have every one of them fail again while the ring is short. A socket is here at most
    /// once while it lives (its receive is not armed until it leaves).
    starved: VecDeque<usize>,
    wake: Arc<EventFd>,
    wake_count: Box<u64>,
    tls: Option<Arc<TlsAcceptor>>,
    listener: Option<TcpListener>,
    accept_in_flight: bool,
    accept_paused_until: Option<Instant>,
    /// Stopped accepting for good (the server is draining).
    draining: bool,
    multishot_accept: bool,
    multishot_recv: bool,
    /// Completions taken off the queue to make room, not yet handled.
    backlog: Vec<Completion>,
    /// Scratch for one batch of at most [`COMPLETION_BATCH`] completions.
    batch: Vec<Completion>,
}

/// Runs the shard until it is stopped and drained (or the drain time runs out).
pub fn run(reactor: Reactor) -> io::Result<()> {
    let Reactor {
        shard,
        inbox,
        post,
        wake,
        listener,
        stop,
        drain,
        tls,
    } = reactor;
    // io_uring waits on blocking sockets itself; a non-blocking one would answer EAGAIN.
    listener.set_nonblocking(false)?;
    // Made before the ring, so dropped after it: sends read frames the outboxes hold.
    let mut turns = Loop {
        shard,
        inbox,
        post,
        stop,
        drain,
    };
    let shard = &turns.shard;
    let (ring, deferred_taskrun) = new_ring()?;
    let bufs = if std::env::var_os(SINGLE_SHOT_ENV).is_some_and(|v| v == "1") {
        tracing::info!(
            shard = shard.id(),
            "{SINGLE_SHOT_ENV}=1: single-shot accept and receive"
        );
        None
    } else {
        match BufRing::register(
            &ring.submitter(),
            RECV_GROUP,
            RECV_BUFFERS,
            RECV_BUFFER_SIZE,
        ) {
            Ok(bufs) => Some(bufs),
            Err(e) => {
                tracing::info!(shard = shard.id(), "no provided buffer ring ({e})");
                None
            }
        }
    };
    // Buffer rings and multishot accept came together (5.19); multishot receive (6.0) is
    // found out by its first completion.
    let found = bufs.is_some();
    tracing::info!(
        shard = shard.id(),
        buffer_ring = found,
        multishot_accept = found,
        multishot_recv = found,
        deferred_taskrun,
        "io_uring features"
    );
    let mut uring = Uring {
        ring,
        bufs,
        // Reserved as the shard's table is (address space, touched as connections come).
        sockets: Vec::with_capacity(shard.connection_capacity()),
        rare: Vec::new(),
        sends: Slab::new(),
        taken: Vec::with_capacity(MAX_IOVECS),
        starved: VecDeque::new(),
        wake,
        wake_count: Box::new(0),
        tls,
        listener: Some(listener),
        accept_in_flight: false,
        accept_paused_until: None,
        draining: false,
        multishot_accept: found,
        multishot_recv: found,
        backlog: Vec::new(),
        batch: Vec::with_capacity(COMPLETION_BATCH),
    };
    uring.arm_wake()?;
    uring.arm_accept()?;
    let result = turns.run(&mut uring);
    uring.cancel_all();
    result
}

impl Uring {
    /// Queues `entry`, submitting what is queued first when the submission queue is full.
    ///
    /// # Safety
    /// Every buffer `entry` points to must stay valid until its completion is handled.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller keeps the entry's buffers alive (see above).
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.spill(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves the completions waiting in the queue to the backlog (the kernel refused to
    /// take more work until the completion queue has room).
    fn spill(&mut self) {
        let backlog = &mut self.backlog;
        backlog.extend(self.ring.completion().map(|c| Completion {
            user_data: c.user_data(),
            result: c.result(),
            flags: c.flags(),
        }));
    }

    /// The turn's one system call: submits what the turn queued and waits for a
    /// completion, a wake-up or the timeout.
    fn enter(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let result = match timeout {
            None => self.ring.submit_and_wait(1),
            Some(timeout) => {
                let ts = Timespec::new()
                    .sec(timeout.as_secs())
                    .nsec(timeout.subsec_nanos());
                let args = SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                self.spill();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Handles every completion waiting, including those its handlers cause to be
    /// spilled, in batches: the spilled ones first, as they left the queue first.
    fn complete(&mut self, shard: &mut Shard, now: Instant) -> io::Result<()> {
        loop {
            let mut batch = std::mem::take(&mut self.batch);
            let spilled = self.backlog.len().min(COMPLETION_BATCH);
            batch.extend(self.backlog.drain(..spilled));
            let room = COMPLETION_BATCH - batch.len();
            batch.extend(self.ring.completion().take(room).map(|c| Completion {
                user_data: c.user_data(),
                result: c.result(),
                flags: c.flags(),
            }));
            if batch.is_empty() {
                self.batch = batch;
                if self.backlog.capacity() > COMPLETION_BATCH {
                    self.backlog = Vec::new();
                }
                return Ok(());
            }
            for completion in batch.drain(..) {
                self.handle(shard, completion, now)?;
            }
            self.batch = batch;
        }
    }

    fn handle(&mut self, shard: &mut Shard, c: Completion, now: Instant) -> io::Result<()> {
        let key = (c.user_data >> 8) as usize;
        match c.user_data & 0xff {
            OP_ACCEPT => self.accepted(shard, c, now),
            OP_WAKE => {
                if c.result < 0 && c.result != -libc::EINTR {
                    return Err(io::Error::from_raw_os_error(-c.result));
                }
                self.arm_wake()
            }
            OP_RECV => self.received(shard, key, c, now),
            OP_SEND => self.sent(shard, key, c.result, now),
            // Whether a cancel found its target shows in the target's own completion.
            OP_CANCEL => Ok(()),
            op => unreachable!("completion for unknown operation {op}"),
        }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let entry = opcode::Read::new(
            Fd(self.wake.0.as_raw_fd()),
            (&raw mut *self.wake_count).cast(),
            8,
        )
        .build()
        .user_data(user_data(OP_WAKE, 0));
        // SAFETY: `wake_count` is boxed and lives as long as the ring.
        unsafe { self.push(&entry) }
    }

    fn arm_accept(&mut self) -> io::Result<()> {
        let Some(listener) = self.listener.as_ref() else {
            return Ok(());
        };
        if self.accept_in_flight || self.draining {
            return Ok(());
        }
        let fd = Fd(listener.as_raw_fd());
        let entry = if self.multishot_accept {
            opcode::AcceptMulti::new(fd)
                .flags(libc::SOCK_CLOEXEC)
                .build()
        } else {
            opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
                .flags(libc::SOCK_CLOEXEC)
                .build()
        };
        self.accept_in_flight = true;
        // SAFETY: accept writes no peer address (null pointers); the listener outlives
        // the operation (it is dropped only after its last completion).
        unsafe { self.push(&entry.user_data(user_data(OP_ACCEPT, 0))) }
    }

    fn accepted(&mut self, shard: &mut Shard, c: Completion, now: Instant) -> io::Result<()> {
        let more = self.multishot_accept && cqueue::more(c.flags);
        if !more {
            self.accept_in_flight = false;
        }
        if c.result >= 0 {
            // SAFETY: a successful accept's result is a new socket nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(c.result) };
            self.admit(shard, fd, now)?;
            if !more {
                self.arm_accept()?;
            }
            return Ok(());
        }
        let err = -c.result;
        match err {
            libc::EINVAL if self.multishot_accept && self.listener.is_some() => {
                tracing::info!(
                    shard = shard.id(),
                    "no multishot accept; accepting one by one"
                );
                self.multishot_accept = false;
                self.arm_accept()
            }
            // We cancelled it: draining (close the listener now that the kernel let go of
            // it) or pausing (armed again when the pause is over).
            libc::ECANCELED if !more => {
                if self.draining {
                    self.listener = None;
                    Ok(())
                } else if self.accept_paused_until.is_none() {
                    self.arm_accept()
                } else {
                    Ok(())
                }
            }
            libc::EMFILE | libc::ENFILE => {
                tracing::warn!(
                    shard = shard.id(),
                    connections = shard.connection_count(),
                    "out of file descriptors; pausing accept for {ACCEPT_BACKOFF:?}"
                );
                self.pause_accept(now, more)
            }
            // The client gave up before we took it: concerns that connection only.
            libc::ECONNABORTED | libc::EINTR | libc::EAGAIN => {
                if more {
                    Ok(())
                } else {
                    self.arm_accept()
                }
            }
            _ => {
                tracing::warn!(
                    shard = shard.id(),
                    "accept failed: {}; pausing accept",
                    io::Error::from_raw_os_error(err)
                );
                self.pause_accept(now, more)
            }
        }
    }

    fn pause_accept(&mut self, now: Instant, more: bool) -> io::Result<()> {
        self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
        if more {
            // Still armed: stop it; it is armed again when the pause is over.
            let entry = opcode::AsyncCancel::new(user_data(OP_ACCEPT, 0))
                .build()
                .user_data(user_data(OP_CANCEL, 0));
            // SAFETY: a cancel points to no memory.
            unsafe { self.push(&entry) }?;
        }
        Ok(())
    }

    fn admit(&mut self, shard: &mut Shard, fd: OwnedFd, now: Instant) -> io::Result<()> {
        let Some(peer) = peer_ip(fd.as_raw_fd()) else {
            // Already gone (getpeername fails on a reset socket).
            return Ok(());
        };
        let Some(key) = shard.accept(now, peer) else {
            // Full or draining: closing at once is the clearest answer.
            return Ok(());
        };
        set_nodelay(fd.as_raw_fd());
        if self.sockets.len() <= key {
            self.sockets.resize_with(key + 1, || None);
        }
        debug_assert!(
            self.sockets[key].is_none(),
            "key {key} reused while in flight"
        );
        self.sockets[key] = Some(Socket::new(fd));
        if self.tls.is_some() || self.bufs.is_none() {
            if self.rare.len() <= key {
                self.rare.resize_with(key + 1, || None);
            }
            self.rare[key] = Some(Box::new(Rare {
                tls: self.tls.as_ref().map(|acceptor| acceptor.accept()),
                ..Rare::default()
            }));
        }
        self.arm_recv(key, shard.reads_in_bulk(key))
    }

    /// Arms a receive: multishot for a connection that reads in `bulk`, otherwise one
    /// buffer at a time, so a connection whose reading pauses often (HTTP requests, a
    /// parked poll) takes at most one buffer past its read budget, not a ring's worth of
    /// completions before the cancel lands.
    fn arm_recv(&mut self, key: usize, bulk: bool) -> io::Result<()> {
        let Some(socket) = self.sockets[key].as_mut() else {
            return Ok(());
        };
        if socket.recv_in_flight || socket.closing {
            return Ok(());
        }
        let fd = Fd(socket.fd.as_raw_fd());
        let entry = match self.bufs.as_ref() {
            Some(bufs) if self.multishot_recv && bulk => {
                opcode::RecvMulti::new(fd, bufs.group()).build()
            }
            Some(bufs) => opcode::Recv::new(fd, std::ptr::null_mut(), RECV_BUFFER_SIZE as u32)
                .buf_group(bufs.group())
                .build()
                .flags(squeue::Flags::BUFFER_SELECT),
            None => {
                let buf = self.rare[key]
                    .as_mut()
                    .expect("a socket without buffer rings has its rare state")
                    .recv_buf
                    .get_or_insert_with(|| vec![0; FALLBACK_RECV_SIZE].into_boxed_slice());
                opcode::Recv::new(fd, buf.as_mut_ptr(), FALLBACK_RECV_SIZE as u32).build()
            }
        };
        socket.recv_in_flight = true;
        socket.recv_cancelled = false;
        // SAFETY: a multishot receive writes into the buffer ring, which outlives the
        // ring; a single-shot one into `recv_buf`, which is neither resized nor freed while
        // `recv_in_flight` (the socket is dropped only when nothing is in flight).
        unsafe { self.push(&entry.user_data(user_data(OP_RECV, key))) }
    }

    fn received(
        &mut self,
        shard: &mut Shard,
        key: usize,
        c: Completion,
        now: Instant,
    ) -> io::Result<()> {
        let Some(socket) = self.sockets[key].as_mut() else {
            unreachable!("receive completion for a closed socket {key}");
        };
        let selected = cqueue::buffer_select(c.flags);
        // Only a multishot receive sets `F_MORE`: it stays armed.
        let more = cqueue::more(c.flags);
        if !more {
            socket.recv_in_flight = false;
        }
        if socket.closing {
            if let (Some(bid), Some(bufs)) = (selected, self.bufs.as_mut()) {
                bufs.recycle(bid);
            }
            return self.finish_close(shard, key);
        }
        if c.result > 0 {
            let len = c.result as usize;
            let (session, own_buf) = match self.rare.get_mut(key).and_then(Option::as_deref_mut) {
                Some(Rare { tls, recv_buf, .. }) => (tls.as_mut(), recv_buf.as_deref()),
                None => (None, None),
            };
            let data = match (selected, self.bufs.as_ref()) {
                (Some(bid), Some(bufs)) => bufs.filled(bid, len),
                _ => &own_buf.expect("armed with a buffer")[..len],
            };
            let open = match session {
                Some(session) => {
                    let may_write = !socket.send_in_flight;
                    tls::receive(shard, key, &socket.fd, may_write, session, data, now)
                }
                None => {
                    shard.read_buffer(key).extend_from_slice(data);
                    shard.handle_read(key, now);
                    true
                }
            };
            if let (Some(bid), Some(bufs)) = (selected, self.bufs.as_mut()) {
                bufs.recycle(bid);
            }
            if !open {
                return Ok(());
            }
            if self.tls.is_some() {
                // Handshake records to answer, plaintext held back during the handshake.
                self.flush(shard, key, now)?;
            }
        } else if let (Some(bid), Some(bufs)) = (selected, self.bufs.as_mut()) {
            bufs.recycle(bid);
        }
        let socket = self.sockets[key].as_mut().expect("checked above");
        match c.result {
            0 => {
                shard.handle_eof(key);
                return Ok(());
            }
            r if r > 0 => {}
            r if -r == libc::EINVAL && self.multishot_recv && !socket.recv_cancelled => {
                tracing::info!(
                    shard = shard.id(),
                    "no multishot receive; receiving one by one"
                );
                self.multishot_recv = false;
            }
            // The ring ran out of buffers: armed again once there are some.
            r if -r == libc::ENOBUFS => {
                self.starved.push_back(key);
                return Ok(());
            }
            r if -r == libc::ECANCELED || -r == libc::EINTR => {}
            _ => {
                shard.handle_eof(key);
                return Ok(());
            }
        }
        if shard.wants_read(key) {
            if !socket.recv_in_flight {
                self.arm_recv(key, shard.reads_in_bulk(key))?;
            }
        } else if socket.recv_in_flight && !socket.recv_cancelled {
            // The shard stopped reading (its outbox is full): leave the bytes in the
            // kernel, as the epoll backend does, until `resume_read`.
            socket.recv_cancelled = true;
            let entry = opcode::AsyncCancel::new(user_data(OP_RECV, key))
                .build()
                .user_data(user_data(OP_CANCEL, key));
            // SAFETY: a cancel points to no memory.
            unsafe { self.push(&entry) }?;
        }
        Ok(())
    }

    fn sent(&mut self, shard: &mut Shard, key: usize, result: i32, now: Instant) -> io::Result<()> {
        let Some(socket) = self.sockets[key].as_mut() else {
            unreachable!("send completion for a closed socket {key}");
        };
        socket.send_in_flight = false;
        if socket.closing {
            return self.finish_close(shard, key);
        }
        match result {
            // A short send leaves the rest at the front: it goes next.
            n if n > 0 && socket.send == LONE_FRAME => {
                shard.handle_written(key, n as usize);
                socket.send = NO_SEND;
                self.flush(shard, key, now)
            }
            n if n > 0 => {
                let slot = socket.send as usize;
                if self.sends[slot].advance(n as usize) {
                    self.sends.remove(slot);
                    socket.send = NO_SEND;
                }
                self.flush(shard, key, now)
            }
            n if n == -libc::EINTR => {
                // Nothing went; a lone frame is sent again from the outbox, which may hold
                // more by now.
                if socket.send == LONE_FRAME {
                    socket.send = NO_SEND;
                }
                self.flush(shard, key, now)
            }
            _ => {
                shard.handle_eof(key);
                Ok(())
            }
        }
    }

    /// Reading paused on a full outbox that has drained: process what waits and receive.
    fn resume(&mut self, shard: &mut Shard, key: usize, now: Instant) -> io::Result<()> {
        if shard.resume_read(key) {
            shard.handle_read(key, now);
            if shard.wants_read(key) {
                return self.arm_recv(key, shard.reads_in_bulk(key));
            }
        }
        Ok(())
    }

    /// Submits the send of the frames `key`'s socket holds in the table of sends (no send
    /// in flight).
    fn submit_send(&mut self, shard: &mut Shard, key: usize, now: Instant) -> io::Result<()> {
        let socket = self.sockets[key]
            .as_mut()
            .expect("sending from a live socket");
        if socket.send == NO_SEND {
            return Ok(());
        }
        let fd = Fd(socket.fd.as_raw_fd());
        let entry = match &mut self.sends[socket.send as usize] {
            Sending::One(frame) => send_one(fd, frame),
            Sending::Many(record) => {
                record.iovecs.clear();
                record
                    .iovecs
                    .extend(record.frames.iter().map(|chunk| libc::iovec {
                        iov_base: chunk.as_ptr().cast_mut().cast(),
                        iov_len: chunk.len(),
                    }));
                record.msghdr.msg_iov = record.iovecs.as_mut_ptr();
                record.msghdr.msg_iovlen = record.iovecs.len();
                opcode::SendMsg::new(fd, &raw const record.msghdr)
                    .flags(libc::MSG_NOSIGNAL as u32)
                    .build()
            }
        };
        // SAFETY: the bytes are the send's (a frame's own heap bytes, or the record's
        // frames with the record's boxed vectors and header), held by the table of sends,
        // whose pointers stay put when it grows; none is touched, moved or freed before
        // the send completes (`send_in_flight`).
        unsafe { self.start_send(shard, key, entry, now) }
    }

    /// Marks `key`'s send in flight and queues `entry`.
    ///
    /// # Safety
    /// As for [`Uring::push`]: what `entry` points to stays valid until it completes.
    unsafe fn start_send(
        &mut self,
        shard: &mut Shard,
        key: usize,
        entry: squeue::Entry,
        now: Instant,
    ) -> io::Result<()> {
        self.sockets[key]
            .as_mut()
            .expect("sending from a live socket")
            .send_in_flight = true;
        // SAFETY: the caller keeps the entry's bytes alive (see above).
        unsafe { self.push(&entry.user_data(user_data(OP_SEND, key))) }?;
        // Taking frames out of the outbox may have brought it below budget.
        self.resume(shard, key, now)
    }

    /// Re-arms the receives of sockets that found the buffer ring empty, a few per turn.
    fn rearm_starved(&mut self, shard: &mut Shard) -> io::Result<()> {
        let mut rearmed = 0;
        while rearmed < STARVED_REARMS_PER_TURN
            && let Some(key) = self.starved.pop_front()
        {
            let waiting = self
                .sockets
                .get(key)
                .and_then(Option::as_ref)
                .is_some_and(|s| !s.closing && !s.recv_in_flight);
            // One that stopped reading meanwhile is armed again by `resume`.
            if waiting && shard.wants_read(key) {
                self.arm_recv(key, shard.reads_in_bulk(key))?;
                rearmed += 1;
            }
        }
        Ok(())
    }

    fn finish_close(&mut self, shard: &mut Shard, key: usize) -> io::Result<()> {
        if self.sockets[key].as_ref().is_some_and(|s| !s.in_flight()) {
            let socket = self.sockets[key].take().expect("checked above");
            if socket.send != NO_SEND && socket.send != LONE_FRAME {
                self.sends.remove(socket.send as usize);
            }
            if let Some(rare) = self.rare.get_mut(key) {
                *rare = None;
            }
            shard.remove(key);
        }
        Ok(())
    }

    /// Gives back the table of sends a fan-out grew once no send is under way. A busy
    /// shard always has sends under way and keeps it; a quiet one grows it again at each
    /// broadcast, a few reallocations, against thousands of sends.
    fn rest_sends(&mut self) {
        if self.sends.is_empty() && self.sends.capacity() > SENDS_KEPT_AT_REST {
            self.sends = Slab::with_capacity(SENDS_KEPT_AT_REST);
        }
    }

    /// Stopping with operations in flight: cancels them all and waits (bounded) so the
    /// kernel is done with our buffers before they are freed.
    fn cancel_all(&mut self) {
        let _ = self.ring.submit();
        let timeout = Timespec::new().sec(1);
        if let Err(e) = self
            .ring
            .submitter()
            .register_sync_cancel(Some(timeout), CancelBuilder::any())
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            tracing::warn!("cancelling io_uring operations at exit: {e}");
        }
    }
}

impl Sockets for Uring {
    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.enter(timeout)
    }

    fn dispatch(&mut self, shard: &mut Shard, now: Instant) -> io::Result<()> {
        self.complete(shard, now)?;
        self.rearm_starved(shard)?;
        self.rest_sends();
        if let Some(until) = self.accept_paused_until
            && now >= until
        {
            self.accept_paused_until = None;
            self.arm_accept()?;
        }
        Ok(())
    }

    fn next_wakeup(&self) -> Option<Instant> {
        self.accept_paused_until
    }

    fn has_pending(&self) -> bool {
        !self.backlog.is_empty() || !self.starved.is_empty()
    }

    /// Draining: cancels the accept; the listener is closed once that completes.
    fn stop_accepting(&mut self) -> io::Result<()> {
        self.draining = true;
        self.accept_paused_until = None;
        if !self.accept_in_flight {
            self.listener = None;
            return Ok(());
        }
        let entry = opcode::AsyncCancel::new(user_data(OP_ACCEPT, 0))
            .build()
            .user_data(user_data(OP_CANCEL, 0));
        // SAFETY: a cancel points to no memory.
        unsafe { self.push(&entry) }
    }

    /// Starts a send of `key`'s outbox unless one is in flight (its completion continues).
    fn flush(&mut self, shard: &mut Shard, key: usize, now: Instant) -> io::Result<()> {
        let Some(socket) = self.sockets[key].as_mut() else {
            return Ok(());
        };
        if socket.send_in_flight || socket.closing {
            return Ok(());
        }
        if self.tls.is_some() {
            return self.flush_tls(shard, key, now);
        }
        if socket.send == NO_SEND {
            if let Some(frame) = shard.outbox(key).start_lone() {
                socket.send = LONE_FRAME;
                let entry = send_one(Fd(socket.fd.as_raw_fd()), frame);
                // SAFETY: the frame is the outbox's started one, which stays, unmoved, until
                // `handle_written` passes it (a dead connection's too, until
                // `Shard::remove`; the shard outlives the ring).
                return unsafe { self.start_send(shard, key, entry, now) };
            }
            // The outbox forgets them now; the table of sends keeps them until they are out.
            shard.take_outbox(key, &mut self.taken, MAX_IOVECS);
            if !self.taken.is_empty() {
                let sending = Sending::new(&mut self.taken, SEND_COPY_LIMIT);
                socket.send = send_key(self.sends.insert(sending));
            }
        }
        if socket.send == NO_SEND {
            if shard.poll_flushed(key) {
                // SAFETY: shuts down the write side of a socket we own.
                if unsafe { libc::shutdown(socket.fd.as_raw_fd(), libc::SHUT_WR) } != 0 {
                    shard.handle_eof(key);
                    return Ok(());
                }
            }
            return self.resume(shard, key, now);
        }
        self.submit_send(shard, key, now)
    }

    /// The shard is done with `key`: cancel what is in flight; close when nothing is.
    fn close(&mut self, shard: &mut Shard, key: usize) -> io::Result<()> {
        let Some(socket) = self.sockets[key].as_mut() else {
            shard.remove(key);
            return Ok(());
        };
        socket.closing = true;
        if socket.in_flight() {
            let entry =
                opcode::AsyncCancel2::new(CancelBuilder::fd(Fd(socket.fd.as_raw_fd())).all())
                    .build()
                    .user_data(user_data(OP_CANCEL, key));
            // SAFETY: a cancel points to no memory.
            unsafe { self.push(&entry) }?;
        }
        self.finish_close(shard, key)
    }
}
