//! A connection's queue of outgoing bytes: shared frames (`Bytes` handles, never copied)
//! waiting for the next vectored write.
//!
//! Two lanes. Pings and pongs go in the control lane and are written before any data
//! frame not yet started, so a busy connection still answers heartbeats at once and is
//! never taken for dead; they do not count toward the data budget (which decides slow
//! consumers). Everything else, close frames included, keeps its order in the data lane:
//! nothing may follow a close, so a close waits for the data queued before it.
//!
//! Published messages in the data lane carry their channel (a shard-local tag) and
//! sequence number, so a slow consumer's queue can shed them by policy: the oldest first
//! (`drop_oldest`) or all but the newest of a channel (`conflate`). What is shed is
//! announced by one gap notice per channel, placed before that channel's next message and
//! widened, not repeated, when more is shed.
//!
//! Most of the time a connection has nothing queued, or the one frame of this turn: that
//! frame is held inline, and the two lanes are allocated only while more than one frame
//! waits, and given back as soon as the outbox is empty. An idle connection, and a
//! subscriber that keeps up with its fan-out, hold no queue memory at all.
//!
//! A frame being written is *started*: partly written, or handed to a send that completes
//! later and reads its bytes until then (io_uring). It keeps its place at the front until
//! written: nothing goes before it, shedding passes it over, and a dead connection's
//! queue keeps it until the connection is removed.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};

/// Most bytes of pongs and pings held for one connection; a client that floods pings
/// without reading gets no more pongs queued (RFC 6455 §5.5.3 allows answering only the
/// latest).
const MAX_CONTROL_BYTES: usize = 16 * 1024;

/// What a data chunk is, for shedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Replies, responses, close frames: never shed.
    Plain,
    /// A published message of channel `tag`.
    Message { tag: u32, seq: u64 },
    /// The gap notice of channel `tag`, covering `from..=to`.
    Notice { tag: u32, from: u64, to: u64 },
}

#[derive(Debug)]
struct Chunk {
    bytes: Bytes,
    kind: Kind,
}

/// Messages shed from one channel: sequence numbers `from..=to` (with holes where
/// messages of it were kept, as under conflation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shed {
    pub tag: u32,
    pub from: u64,
    pub to: u64,
}

/// Outgoing frames of one connection.
#[derive(Debug, Default)]
pub struct Outbox(Queued);

/// What an outbox holds. A lone frame is inline, started or not. Inline, a frame takes
/// the room of its `Bytes` and a message's tag and seq: 48 bytes in every connection (a
/// lone frame is never a gap notice, which the lanes alone hold).
#[derive(Debug, Default)]
enum Queued {
    #[default]
    Empty,
    /// A reply, response or close frame.
    Plain(Bytes),
    /// A published message of channel `tag`.
    Message { bytes: Bytes, tag: u32, seq: u64 },
    /// A ping or pong.
    Control(Bytes),
    /// A frame being written (see the module doc); in the lanes it is the data front,
    /// with `data_started` set.
    Started(Bytes),
    /// More than one frame; never empty.
    Lanes(Box<Lanes>),
}

/// Both lanes, while more than one frame is queued.
#[derive(Debug, Default)]
struct Lanes {
    control: VecDeque<Bytes>,
    data: VecDeque<Chunk>,
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
        self.push_kind(chunk, Kind::Plain);
    }

    /// Queues a published message of channel `tag`.
    pub fn push_message(&mut self, frame: Bytes, tag: u32, seq: u64) {
        self.push_kind(frame, Kind::Message { tag, seq });
    }

    fn push_kind(&mut self, bytes: Bytes, kind: Kind) {
        if bytes.is_empty() {
            return;
        }
        self.0 = match (std::mem::take(&mut self.0), kind) {
            (Queued::Empty, Kind::Message { tag, seq }) => Queued::Message { bytes, tag, seq },
            (Queued::Empty, _) => Queued::Plain(bytes),
            (queued, kind) => {
                let mut lanes = Self::lanes_of(queued);
                lanes.push_chunk(Chunk { bytes, kind });
                Queued::Lanes(lanes)
            }
        };
    }

    /// The lanes, holding the frame queued alone if there was one.
    fn lanes(&mut self) -> &mut Lanes {
        if !matches!(self.0, Queued::Lanes(_)) {
            self.0 = Queued::Lanes(Self::lanes_of(std::mem::take(&mut self.0)));
        }
        match &mut self.0 {
            Queued::Lanes(lanes) => lanes,
            _ => unreachable!("lanes were just made"),
        }
    }

    fn lanes_of(queued: Queued) -> Box<Lanes> {
        let mut lanes = Box::<Lanes>::default();
        match queued {
            Queued::Empty => {}
            Queued::Plain(bytes) => lanes.push_chunk(Chunk {
                bytes,
                kind: Kind::Plain,
            }),
            Queued::Message { bytes, tag, seq } => lanes.push_chunk(Chunk {
                bytes,
                kind: Kind::Message { tag, seq },
            }),
            Queued::Control(frame) => {
                lanes.push_control(frame);
            }
            Queued::Started(bytes) => {
                lanes.push_chunk(Chunk {
                    bytes,
                    kind: Kind::Plain,
                });
                lanes.data_started = true;
            }
            Queued::Lanes(queued) => return queued,
        }
        lanes
    }

    /// Gives the lanes' memory back once they are empty.
    fn settle(&mut self) {
        if let Queued::Lanes(lanes) = &self.0
            && lanes.is_empty()
        {
            self.0 = Queued::Empty;
        }
    }

    /// Sheds published messages from the front (oldest first) until at most `target`
    /// data bytes remain or none is left to shed; returns what was shed per channel.
    pub fn drop_oldest(&mut self, target: usize) -> Vec<Shed> {
        if self.len_bytes() <= target {
            return Vec::new();
        }
        let shed = self.lanes().drop_oldest(target);
        self.settle();
        shed
    }

    /// Sheds every queued message of channel `tag` but the newest; returns the range.
    pub fn conflate(&mut self, tag: u32) -> Option<Shed> {
        let Queued::Lanes(lanes) = &mut self.0 else {
            return None;
        };
        let shed = lanes.conflate(tag);
        self.settle();
        shed
    }

    /// Announces `shed` with a notice placed before the channel's first queued message
    /// (or at the end when none is queued). An unstarted notice of the same channel is
    /// widened instead, so each channel has at most one. `encode` builds the notice
    /// for a range.
    pub fn announce(&mut self, shed: Shed, encode: impl Fn(u64, u64) -> Bytes) {
        self.lanes().announce(shed, encode);
    }

    /// Queues a ping or pong ahead of unstarted data. Returns false (and drops it) when
    /// the control lane is full.
    pub fn push_control(&mut self, frame: Bytes) -> bool {
        if self.is_empty() {
            if frame.len() > MAX_CONTROL_BYTES {
                return false;
            }
            self.0 = Queued::Control(frame);
            return true;
        }
        self.lanes().push_control(frame)
    }

    pub fn is_empty(&self) -> bool {
        matches!(self.0, Queued::Empty)
    }

    /// Data bytes waiting to be written (the slow-consumer budget), a started frame's
    /// included.
    pub fn len_bytes(&self) -> usize {
        match &self.0 {
            Queued::Plain(bytes) | Queued::Message { bytes, .. } | Queued::Started(bytes) => {
                bytes.len()
            }
            Queued::Lanes(lanes) => lanes.data_bytes,
            Queued::Empty | Queued::Control(_) => 0,
        }
    }

    /// Fills `slices` in write order; returns how many were filled.
    pub fn io_slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let one = match &self.0 {
            Queued::Plain(bytes)
            | Queued::Message { bytes, .. }
            | Queued::Control(bytes)
            | Queued::Started(bytes) => bytes,
            Queued::Lanes(lanes) => return lanes.io_slices(slices),
            Queued::Empty => return 0,
        };
        match slices.first_mut() {
            Some(slot) => {
                *slot = IoSlice::new(one);
                1
            }
            None => 0,
        }
    }

    /// Starts the frame queued alone and returns it, for a backend whose send of it
    /// completes later: the outbox keeps it in place (module doc) until
    /// [`advance`](Self::advance) passes it (the backend reports the send with
    /// `Shard::handle_written`). None when several frames wait (they are taken with
    /// [`take_chunks`](Self::take_chunks)) or none.
    pub fn start_lone(&mut self) -> Option<&Bytes> {
        self.0 = match std::mem::take(&mut self.0) {
            Queued::Plain(bytes)
            | Queued::Message { bytes, .. }
            | Queued::Control(bytes)
            | Queued::Started(bytes) => Queued::Started(bytes),
            queued => {
                self.0 = queued;
                return None;
            }
        };
        match &self.0 {
            Queued::Started(bytes) => Some(bytes),
            _ => unreachable!("just started"),
        }
    }

    /// Moves up to `max` whole chunks off the front, in write order, into `out`; returns
    /// their bytes. For a backend whose writes complete later: it keeps the bytes alive
    /// until then, while what stays queued may be shed or jumped by control frames as usual.
    pub fn take_chunks(&mut self, out: &mut Vec<Bytes>, max: usize) -> usize {
        if max == 0 {
            return 0;
        }
        let bytes = match std::mem::take(&mut self.0) {
            Queued::Plain(bytes)
            | Queued::Message { bytes, .. }
            | Queued::Control(bytes)
            | Queued::Started(bytes) => bytes,
            Queued::Empty => return 0,
            Queued::Lanes(mut lanes) => {
                let taken = lanes.take_chunks(out, max);
                self.0 = Queued::Lanes(lanes);
                self.settle();
                return taken;
            }
        };
        let taken = bytes.len();
        out.push(bytes);
        taken
    }

    /// Drops `written` bytes in write order, splitting a partly written frame.
    pub fn advance(&mut self, written: usize) {
        if written == 0 {
            return;
        }
        match &mut self.0 {
            // Partly written: a data frame is started now; a control frame is at the front
            // of its lane and finished next anyway.
            Queued::Plain(bytes) | Queued::Message { bytes, .. } if written < bytes.len() => {
                let mut rest = std::mem::take(bytes);
                rest.advance(written);
                self.0 = Queued::Started(rest);
            }
            Queued::Control(bytes) | Queued::Started(bytes) if written < bytes.len() => {
                bytes.advance(written);
            }
            Queued::Plain(bytes)
            | Queued::Message { bytes, .. }
            | Queued::Control(bytes)
            | Queued::Started(bytes) => {
                assert!(written == bytes.len(), "advance past the end of the outbox");
                self.0 = Queued::Empty;
            }
            Queued::Lanes(lanes) => {
                lanes.advance(written);
                self.settle();
            }
            Queued::Empty => panic!("advance past the end of the outbox"),
        }
    }

    /// Gives back what a long queue left unused: the lanes go with their last frame
    /// anyway, so this matters only for a queue that never empties.
    pub fn release_memory(&mut self) {
        if let Queued::Lanes(lanes) = &mut self.0 {
            lanes.control.shrink_to_fit();
            lanes.data.shrink_to_fit();
        }
    }

    /// Drops every data frame not yet started, keeping a started one so the stream
    /// stays well-formed; returns how many data bytes remain.
    pub fn discard_unstarted(&mut self) -> usize {
        match &mut self.0 {
            Queued::Plain(_) | Queued::Message { .. } => self.0 = Queued::Empty,
            Queued::Lanes(lanes) => {
                lanes.discard_unstarted();
                self.settle();
            }
            Queued::Empty | Queued::Control(_) | Queued::Started(_) => {}
        }
        self.len_bytes()
    }

    /// Drops everything but a started frame: the queue of a dead connection, whose
    /// socket's last send may still be reading that frame until it completes.
    pub fn discard_all_but_started(&mut self) {
        self.0 = match std::mem::take(&mut self.0) {
            Queued::Started(bytes) => Queued::Started(bytes),
            Queued::Lanes(mut lanes) if lanes.data_started => {
                let front = lanes.data.pop_front().expect("a started front");
                Queued::Started(front.bytes)
            }
            _ => Queued::Empty,
        };
    }
}

impl Lanes {
    fn push_chunk(&mut self, chunk: Chunk) {
        self.data_bytes += chunk.bytes.len();
        self.data.push_back(chunk);
    }

    fn is_empty(&self) -> bool {
        self.control.is_empty() && self.data.is_empty()
    }

    /// Index of the first data chunk that may be removed or inserted before.
    fn first_unstarted(&self) -> usize {
        usize::from(self.data_started)
    }

    fn drop_oldest(&mut self, target: usize) -> Vec<Shed> {
        let mut shed: Vec<Shed> = Vec::new();
        let mut i = self.first_unstarted();
        while self.data_bytes > target && i < self.data.len() {
            let Kind::Message { tag, seq } = self.data[i].kind else {
                i += 1;
                continue;
            };
            let chunk = self.data.remove(i).expect("index in range");
            self.data_bytes -= chunk.bytes.len();
            record(&mut shed, tag, seq);
        }
        shed
    }

    fn conflate(&mut self, tag: u32) -> Option<Shed> {
        let newest = self
            .data
            .iter()
            .rposition(|c| matches!(c.kind, Kind::Message { tag: t, .. } if t == tag))?;
        let mut shed = Vec::new();
        let mut removed = 0;
        let mut i = self.first_unstarted();
        while i < newest - removed {
            match self.data[i].kind {
                Kind::Message { tag: t, seq } if t == tag => {
                    let chunk = self.data.remove(i).expect("index in range");
                    self.data_bytes -= chunk.bytes.len();
                    removed += 1;
                    record(&mut shed, tag, seq);
                }
                _ => i += 1,
            }
        }
        shed.pop()
    }

    fn announce(&mut self, shed: Shed, encode: impl Fn(u64, u64) -> Bytes) {
        let start = self.first_unstarted();
        let existing = (start..self.data.len())
            .find(|&i| matches!(self.data[i].kind, Kind::Notice { tag, .. } if tag == shed.tag));
        let (from, to, at) = match existing {
            Some(i) => {
                let Kind::Notice { from, to, .. } = self.data[i].kind else {
                    unreachable!("found a notice");
                };
                let old = self.data.remove(i).expect("index in range");
                self.data_bytes -= old.bytes.len();
                (from.min(shed.from), to.max(shed.to), i)
            }
            None => {
                let first_message = (start..self.data.len()).find(
                    |&i| matches!(self.data[i].kind, Kind::Message { tag, .. } if tag == shed.tag),
                );
                (shed.from, shed.to, first_message.unwrap_or(self.data.len()))
            }
        };
        let bytes = encode(from, to);
        self.data_bytes += bytes.len();
        self.data.insert(
            at,
            Chunk {
                bytes,
                kind: Kind::Notice {
                    tag: shed.tag,
                    from,
                    to,
                },
            },
        );
    }

    fn push_control(&mut self, frame: Bytes) -> bool {
        if self.control_bytes + frame.len() > MAX_CONTROL_BYTES {
            return false;
        }
        self.control_bytes += frame.len();
        self.control.push_back(frame);
        true
    }

    /// The lane the next byte comes from.
    fn current(&self) -> Lane {
        if self.data_started || self.control.is_empty() {
            Lane::Data
        } else {
            Lane::Control
        }
    }

    fn io_slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let started = usize::from(self.data_started);
        let (first, rest_of_data) = (
            self.data.front().filter(|_| self.data_started),
            self.data.iter().skip(started),
        );
        let order = first
            .map(|c| &c.bytes)
            .into_iter()
            .chain(&self.control)
            .chain(rest_of_data.map(|c| &c.bytes));
        let mut n = 0;
        for (slot, chunk) in slices.iter_mut().zip(order) {
            *slot = IoSlice::new(chunk);
            n += 1;
        }
        n
    }

    fn take_chunks(&mut self, out: &mut Vec<Bytes>, max: usize) -> usize {
        let mut taken = 0;
        for _ in 0..max {
            let bytes = match self.current() {
                Lane::Control => match self.pop_control() {
                    Some(bytes) => {
                        self.control_bytes -= bytes.len();
                        bytes
                    }
                    None => break,
                },
                Lane::Data => match self.data.pop_front() {
                    Some(chunk) => {
                        self.data_bytes -= chunk.bytes.len();
                        self.data_started = false;
                        chunk.bytes
                    }
                    None => break,
                },
            };
            taken += bytes.len();
            out.push(bytes);
        }
        taken
    }

    fn advance(&mut self, mut written: usize) {
        while written > 0 {
            let lane = self.current();
            let (front, bytes) = match lane {
                Lane::Control => (self.control.front_mut(), &mut self.control_bytes),
                Lane::Data => (
                    self.data.front_mut().map(|c| &mut c.bytes),
                    &mut self.data_bytes,
                ),
            };
            let front = front.expect("advance past the end of the outbox");
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
            match lane {
                Lane::Control => {
                    self.pop_control();
                }
                Lane::Data => {
                    self.data.pop_front();
                    self.data_started = false;
                }
            }
        }
    }

    fn pop_control(&mut self) -> Option<Bytes> {
        self.control.pop_front()
    }

    fn discard_unstarted(&mut self) {
        let keep = usize::from(self.data_started);
        while self.data.len() > keep {
            let chunk = self.data.pop_back().expect("len > keep");
            self.data_bytes -= chunk.bytes.len();
        }
    }
}

/// Adds `seq` of `tag` to the shed ranges.
fn record(shed: &mut Vec<Shed>, tag: u32, seq: u64) {
    match shed.iter_mut().find(|s| s.tag == tag) {
        Some(range) => {
            range.from = range.from.min(seq);
            range.to = range.to.max(seq);
        }
        None => shed.push(Shed {
            tag,
            from: seq,
            to: seq,
        }),
    }
}

#[cfg(test)]
mod tests;
