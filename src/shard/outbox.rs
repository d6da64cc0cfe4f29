//! A connection's queue of outgoing bytes: shared frames (`Bytes` handles, never copied)
//! waiting for the next vectored write.
//!
//! Two lanes. Pings and pongs go in the control lane and are written before any data
//! frame not yet started, so a busy connection still answers heartbeats at once and is
//! never taken for dead; they do not count toward the data budget (which decides slow
//! consumers). Everything else, close frames included, keeps its order in the data lane:
//! nothing may follow a close, so a close waits for the data queued before it.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};

/// Most bytes of pongs and pings held for one connection; a client that floods pings
/// without reading gets no more pongs queued (RFC 6455 §5.5.3 allows answering only the
/// latest).
const MAX_CONTROL_BYTES: usize = 16 * 1024;

/// Outgoing frames of one connection.
#[derive(Debug, Default)]
pub struct Outbox {
    control: VecDeque<Bytes>,
    data: VecDeque<Bytes>,
    control_bytes: usize,
    data_bytes: usize,
    /// The data front is partly written: it must be finished before anything else.
    data_started: bool,
}

#[derive(Clone, Copy)]
enum Lane {
    Control,
    Data,
}

impl Outbox {
    /// Queues a data frame (or any bytes that keep their order: responses, close frames).
    pub fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.data_bytes += chunk.len();
        self.data.push_back(chunk);
    }

    /// Queues a ping or pong ahead of unstarted data. Returns false (and drops it) when
    /// the control lane is full.
    pub fn push_control(&mut self, frame: Bytes) -> bool {
        if self.control_bytes + frame.len() > MAX_CONTROL_BYTES {
            return false;
        }
        self.control_bytes += frame.len();
        self.control.push_back(frame);
        true
    }

    pub fn is_empty(&self) -> bool {
        self.control.is_empty() && self.data.is_empty()
    }

    /// Data bytes waiting to be written (the slow-consumer budget).
    pub fn len_bytes(&self) -> usize {
        self.data_bytes
    }

    /// The lane the next byte comes from.
    fn current(&self) -> Lane {
        if self.data_started || self.control.is_empty() {
            Lane::Data
        } else {
            Lane::Control
        }
    }

    /// Fills `slices` in write order; returns how many were filled.
    pub fn io_slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let started = usize::from(self.data_started);
        let (first, rest_of_data) = (
            self.data.front().filter(|_| self.data_started),
            self.data.iter().skip(started),
        );
        let order = first.into_iter().chain(&self.control).chain(rest_of_data);
        let mut n = 0;
        for (slot, chunk) in slices.iter_mut().zip(order) {
            *slot = IoSlice::new(chunk);
            n += 1;
        }
        n
    }

    /// Drops `written` bytes in write order, splitting a partly written frame.
    pub fn advance(&mut self, mut written: usize) {
        while written > 0 {
            let lane = self.current();
            let (queue, bytes) = match lane {
                Lane::Control => (&mut self.control, &mut self.control_bytes),
                Lane::Data => (&mut self.data, &mut self.data_bytes),
            };
            let front = queue
                .front_mut()
                .expect("advance past the end of the outbox");
            if written < front.len() {
                front.advance(written);
                *bytes -= written;
                // A partly written control frame is at the control front and is finished
                // next anyway; only a started data frame changes the order.
                if let Lane::Data = lane {
                    self.data_started = true;
                }
                return;
            }
            written -= front.len();
            *bytes -= front.len();
            queue.pop_front();
            if let Lane::Data = lane {
                self.data_started = false;
            }
        }
    }

    /// Drops every data frame not yet started, keeping a partly written one so the stream
    /// stays well-formed; returns how many data bytes remain.
    pub fn discard_unstarted(&mut self) -> usize {
        let keep = usize::from(self.data_started);
        while self.data.len() > keep {
            let chunk = self.data.pop_back().expect("len > keep");
            self.data_bytes -= chunk.len();
        }
        self.data_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written_order(outbox: &Outbox) -> Vec<u8> {
        let mut slices = [IoSlice::new(&[]); 16];
        let n = outbox.io_slices(&mut slices);
        slices[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn partial_writes_split_frames_in_order() {
        let mut outbox = Outbox::default();
        outbox.push(Bytes::from_static(b"abc"));
        outbox.push(Bytes::from_static(b""));
        outbox.push(Bytes::from_static(b"defg"));
        assert_eq!(outbox.len_bytes(), 7);
        outbox.advance(2);
        assert_eq!(written_order(&outbox), b"cdefg");
        outbox.advance(5);
        assert!(outbox.is_empty());
        assert_eq!(outbox.len_bytes(), 0);
    }

    #[test]
    fn control_frames_overtake_unstarted_data_only() {
        let mut outbox = Outbox::default();
        outbox.push(Bytes::from_static(b"data1"));
        outbox.push(Bytes::from_static(b"data2"));
        outbox.advance(2);
        outbox.push_control(Bytes::from_static(b"PONG"));
        // The started frame finishes first, then the pong, then the rest.
        assert_eq!(written_order(&outbox), b"ta1PONGdata2");
        assert_eq!(outbox.len_bytes(), 8);
        outbox.advance(5);
        assert_eq!(written_order(&outbox), b"NGdata2");
        outbox.advance(2);
        assert_eq!(written_order(&outbox), b"data2");
        outbox.push_control(Bytes::from_static(b"P"));
        assert_eq!(written_order(&outbox), b"Pdata2");
        outbox.advance(6);
        assert!(outbox.is_empty());
    }

    #[test]
    fn control_lane_is_bounded() {
        let mut outbox = Outbox::default();
        let pong = Bytes::from(vec![0u8; 127]);
        let queued = (0..1000)
            .filter(|_| outbox.push_control(pong.clone()))
            .count();
        assert_eq!(queued, MAX_CONTROL_BYTES / 127);
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
