//! A provided buffer ring: a pool of receive buffers the kernel picks from for multishot
//! receives, so idle connections hold no receive buffer and one armed receive serves every
//! arrival on its socket.

use std::alloc::{self, Layout};
use std::io;
use std::ptr::addr_of_mut;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::Submitter;
use io_uring::types::BufRingEntry;

/// One descriptor as the kernel lays it out (`struct io_uring_buf`). The first one's
/// `resv` is the ring's tail, which the kernel reads at any time: descriptors are written
/// field by field through raw pointers, never through a `&mut` that would claim the tail
/// too (the io-uring crate's `BufRingEntry` setters take `&mut self`).
#[repr(C)]
struct Descriptor {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

const _: () = assert!(size_of::<Descriptor>() == size_of::<BufRingEntry>());

/// The ring of buffer descriptors (shared with the kernel) and the buffers they describe.
pub(super) struct BufRing {
    /// `entries` descriptors, page aligned as the kernel requires.
    ring: *mut Descriptor,
    ring_layout: Layout,
    /// `entries * buffer_size` bytes the kernel writes into; a raw allocation because the
    /// kernel writes behind Rust's back.
    buffers: *mut u8,
    buffers_layout: Layout,
    buffer_size: usize,
    entries: u16,
    group: u16,
    /// Our copy of the tail the kernel reads; published after each recycled buffer.
    tail: u16,
}

impl BufRing {
    /// Allocates `entries` buffers of `buffer_size` bytes and registers them as `group`.
    /// Fails where the kernel has no buffer rings (before 5.19).
    pub(super) fn register(
        submitter: &Submitter<'_>,
        group: u16,
        entries: u16,
        buffer_size: usize,
    ) -> io::Result<Self> {
        assert!(
            entries.is_power_of_two(),
            "a buffer ring's size is a power of two"
        );
        let ring_layout =
            Layout::from_size_align(usize::from(entries) * size_of::<Descriptor>(), 4096)
                .map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size (entries >= 1).
        let ring = unsafe { alloc::alloc_zeroed(ring_layout) }.cast::<Descriptor>();
        if ring.is_null() {
            alloc::handle_alloc_error(ring_layout);
        }
        let buffers_layout = Layout::from_size_align(usize::from(entries) * buffer_size, 4096)
            .map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size (entries and buffer_size are >= 1).
        let buffers = unsafe { alloc::alloc(buffers_layout) };
        if buffers.is_null() {
            alloc::handle_alloc_error(buffers_layout);
        }
        // Resident from the start: the kernel takes the buffers in ring order and touches
        // every one soon after start whatever the load, so they are the shard's fixed cost,
        // not a cost of the first connections. A byte per page, written volatile: a plain
        // zeroing of a fresh allocation is turned into a zeroed allocation, which the
        // allocator serves from untouched pages.
        for offset in (0..buffers_layout.size()).step_by(4096) {
            // SAFETY: `offset` is inside the fresh allocation of `buffers_layout.size()`.
            unsafe { buffers.add(offset).write_volatile(0) };
        }
        let mut this = Self {
            ring,
            ring_layout,
            buffers,
            buffers_layout,
            buffer_size,
            entries,
            group,
            tail: 0,
        };
        // SAFETY: `ring` points to `entries` zeroed descriptors that live until `Drop`,
        // which the caller runs only after the ring that uses them is gone.
        unsafe { submitter.register_buf_ring_with_flags(ring as u64, entries, group, 0) }?;
        for bid in 0..entries {
            this.push(bid);
        }
        this.publish();
        Ok(this)
    }

    pub(super) fn group(&self) -> u16 {
        self.group
    }

    /// The first `len` bytes of buffer `bid`, which a receive completion handed us.
    pub(super) fn filled(&self, bid: u16, len: usize) -> &[u8] {
        assert!(bid < self.entries, "buffer id {bid} out of range");
        // SAFETY: buffer `bid` lies inside the allocation; the kernel wrote its first `len`
        // bytes before posting the completion and does not touch it again until recycled.
        unsafe {
            std::slice::from_raw_parts(
                self.buffers.add(usize::from(bid) * self.buffer_size),
                len.min(self.buffer_size),
            )
        }
    }

    /// Gives buffer `bid` back to the kernel once its bytes are copied out.
    pub(super) fn recycle(&mut self, bid: u16) {
        self.push(bid);
        self.publish();
    }

    fn push(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (self.entries - 1));
        let addr = self.buffers as u64 + (usize::from(bid) * self.buffer_size) as u64;
        // SAFETY: `slot` < `entries`, so the descriptor is inside the allocation and
        // aligned. The kernel reads only descriptors between its head and our published
        // tail, and this one is past the tail until `publish`, so nobody reads these three
        // fields meanwhile. Each is written through a raw pointer: `resv` (the tail, in
        // slot 0) is neither written nor covered by a reference.
        unsafe {
            let entry = self.ring.add(slot);
            addr_of_mut!((*entry).addr).write(addr);
            addr_of_mut!((*entry).len).write(self.buffer_size as u32);
            addr_of_mut!((*entry).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the descriptors written so far visible to the kernel.
    fn publish(&self) {
        // SAFETY: `ring` is the ring's first descriptor, whose `resv` is the tail the
        // kernel reads; it is an aligned u16 for the ring's lifetime, and only ever accessed
        // atomically (here) by us, never through a reference to the descriptor.
        let tail = unsafe { AtomicU16::from_ptr(addr_of_mut!((*self.ring).resv)) };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both allocated in `register` with these layouts; the owner drops the
        // io_uring (which unregisters the group) first.
        unsafe {
            alloc::dealloc(self.ring.cast(), self.ring_layout);
            alloc::dealloc(self.buffers, self.buffers_layout);
        }
    }
}
