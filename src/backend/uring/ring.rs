//! Creating a shard's ring: whether io_uring can be used at all (`probe`), the ring with
//! the setup flags the kernel has, and the eventfd that wakes a shard blocked in
//! `io_uring_enter`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use io_uring::IoUring;

use crate::shard::Wake;

use super::{CQ_ENTRIES, SQ_ENTRIES};

/// Whether io_uring can be used here: the ring can be created and has the features this
/// backend relies on. The error says why not: `--io uring` stops with it, `--io auto` logs
/// it and serves on epoll.
pub fn probe() -> io::Result<()> {
    // A ring as the shards make: this asks whether io_uring may be used at all, and at the
    // size they need (the ring's memory is charged to the process).
    let (ring, _) = new_ring().map_err(|e| {
        let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map(|v| format!("/proc/sys/kernel/io_uring_disabled = {}", v.trim()))
            .unwrap_or_else(|_| "kernel before 5.1 or io_uring not built in".into());
        io::Error::new(
            e.kind(),
            format!(
                "io_uring is unavailable: io_uring_setup failed: {e} ({disabled}; a seccomp \
                 filter, e.g. a container's default profile, also blocks it)"
            ),
        )
    })?;
    let params = ring.params();
    if !(params.is_feature_nodrop() && params.is_feature_ext_arg() && params.is_feature_fast_poll())
    {
        return Err(io::Error::other(
            "io_uring is too old here (needs Linux 5.11: NODROP, EXT_ARG, FAST_POLL)",
        ));
    }
    Ok(())
}

/// Wakes a shard blocked in `io_uring_enter`: the ring keeps a read armed on this eventfd.
pub struct EventFd(pub(super) OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory arguments; a non-negative result is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

impl Wake for EventFd {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let n = unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8) };
        if n != 8 {
            tracing::error!("cannot wake shard: {}", io::Error::last_os_error());
        }
    }
}

/// Creates the shard's ring: single issuer with task work deferred to our own
/// `io_uring_enter` where the kernel has it (6.1), so completions are posted in batches
/// when the loop asks for them rather than by interrupting it.
pub(super) fn new_ring() -> io::Result<(IoUring, bool)> {
    let tuned = IoUring::builder()
        .setup_cqsize(CQ_ENTRIES)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(SQ_ENTRIES);
    match tuned {
        Ok(ring) => Ok((ring, true)),
        Err(_) => Ok((
            IoUring::builder()
                .setup_cqsize(CQ_ENTRIES)
                .build(SQ_ENTRIES)?,
            false,
        )),
    }
}
