//! A connection's queue of outgoing bytes: shared frames (`Bytes` handles, never copied)
//! waiting for the next vectored write.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};

/// Outgoing frames of one connection, in order, with their total size.
#[derive(Debug, Default)]
pub struct Outbox {
    queue: VecDeque<Bytes>,
    bytes: usize,
    /// The front frame is partly written: it must be finished before anything else.
    front_started: bool,
}

impl Outbox {
    pub fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.bytes += chunk.len();
        self.queue.push_back(chunk);
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Bytes waiting to be written.
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    /// Fills `slices` with the front of the queue; returns how many were filled.
    pub fn io_slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, chunk) in slices.iter_mut().zip(&self.queue) {
            *slot = IoSlice::new(chunk);
            n += 1;
        }
        n
    }

    /// Drops `written` bytes from the front, splitting a partly written frame.
    pub fn advance(&mut self, mut written: usize) {
        self.bytes -= written;
        while written > 0 {
            let front = self
                .queue
                .front_mut()
                .expect("advance past the end of the outbox");
            if written < front.len() {
                front.advance(written);
                self.front_started = true;
                return;
            }
            written -= front.len();
            self.queue.pop_front();
            self.front_started = false;
        }
    }

    /// Drops everything not yet started, keeping a partly written frame so the stream
    /// stays well-formed; returns how many bytes remain.
    pub fn discard_unstarted(&mut self) -> usize {
        let keep = usize::from(self.front_started);
        while self.queue.len() > keep {
            let chunk = self.queue.pop_back().expect("len > keep");
            self.bytes -= chunk.len();
        }
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_writes_split_frames_in_order() {
        let mut outbox = Outbox::default();
        outbox.push(Bytes::from_static(b"abc"));
        outbox.push(Bytes::from_static(b""));
        outbox.push(Bytes::from_static(b"defg"));
        assert_eq!(outbox.len_bytes(), 7);
        outbox.advance(2);
        let mut slices = [IoSlice::new(&[]); 4];
        let n = outbox.io_slices(&mut slices);
        let joined: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(joined, b"cdefg");
        outbox.advance(5);
        assert!(outbox.is_empty());
        assert_eq!(outbox.len_bytes(), 0);
    }

    #[test]
    fn discard_keeps_a_started_frame() {
        let mut outbox = Outbox::default();
        outbox.push(Bytes::from_static(b"abc"));
        outbox.push(Bytes::from_static(b"def"));
        outbox.push(Bytes::from_static(b"ghi"));
        outbox.advance(1);
        assert_eq!(outbox.discard_unstarted(), 2);
        let mut fresh = Outbox::default();
        fresh.push(Bytes::from_static(b"abc"));
        assert_eq!(fresh.discard_unstarted(), 0);
    }
}
