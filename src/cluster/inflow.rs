//! What Redis pushes to the node (announcements, subscription changes, disconnections),
//! on its way from the `redis` crate's connection task to the cluster thread. The crate
//! reads its socket as fast as Redis writes, whatever the thread does with what it read;
//! this queue is where that stops: it holds at most `max_bytes` of pushes (and
//! [`MAX_PUSHES`] of them), and a push past either bound is dropped and remembered, so the
//! thread catches every held channel up from its stream instead (the history keeps what
//! was dropped). A burst costs reads, never unbounded memory or a silent loss.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use ::redis::{PushInfo, Value};
use tokio::sync::{Notify, mpsc};

/// Most pushes queued, whatever their size (a flood of empty ones).
pub(super) const MAX_PUSHES: usize = 64 * 1024;

/// The sending side, called by the crate for each push.
#[derive(Clone)]
pub(super) struct PushSender {
    queue: mpsc::Sender<(PushInfo, usize)>,
    shared: Arc<Shared>,
}

/// The receiving side, the cluster thread's.
pub(super) struct Inflow {
    queue: mpsc::Receiver<(PushInfo, usize)>,
    shared: Arc<Shared>,
}

struct Shared {
    bytes: AtomicUsize,
    max_bytes: usize,
    overflowed: AtomicBool,
    /// Wakes the reader for an overflow that left nothing queued (one push larger than
    /// the bound).
    dropped: Notify,
}

/// A queue that holds at most `max_bytes` of pushes.
pub(super) fn inflow(max_bytes: usize) -> (PushSender, Inflow) {
    let (tx, rx) = mpsc::channel(MAX_PUSHES);
    let shared = Arc::new(Shared {
        bytes: AtomicUsize::new(0),
        max_bytes,
        overflowed: AtomicBool::new(false),
        dropped: Notify::new(),
    });
    let sender = PushSender {
        queue: tx,
        shared: shared.clone(),
    };
    (sender, Inflow { queue: rx, shared })
}

impl PushSender {
    /// Queues `push`, or drops it and records the overflow. Never blocks (the crate's
    /// connection task calls it).
    pub(super) fn push(&self, push: PushInfo) {
        let cost = push_bytes(&push);
        let shared = &self.shared;
        let before = shared.bytes.fetch_add(cost, Ordering::AcqRel);
        if before + cost > shared.max_bytes || self.queue.try_send((push, cost)).is_err() {
            shared.bytes.fetch_sub(cost, Ordering::AcqRel);
            shared.overflowed.store(true, Ordering::Release);
            shared.dropped.notify_one();
        }
    }
}

impl Inflow {
    /// The next push, or `None` once after pushes were dropped (the reader then catches
    /// every channel up). Pending forever once every sender is gone.
    pub(super) async fn next(&mut self) -> Option<PushInfo> {
        loop {
            if self.shared.overflowed.swap(false, Ordering::AcqRel) {
                return None;
            }
            tokio::select! {
                biased;
                () = self.shared.dropped.notified() => {}
                queued = self.queue.recv() => match queued {
                    Some((push, cost)) => {
                        self.shared.bytes.fetch_sub(cost, Ordering::AcqRel);
                        return Some(push);
                    }
                    None => std::future::pending::<()>().await,
                },
            }
        }
    }
}

/// What a push holds: its values' bytes, plus a fixed share for the containers.
fn push_bytes(push: &PushInfo) -> usize {
    fn size(value: &Value) -> usize {
        const OVERHEAD: usize = size_of::<Value>();
        OVERHEAD
            + match value {
                Value::BulkString(bytes) => bytes.len(),
                Value::SimpleString(text) => text.len(),
                Value::Array(values) | Value::Set(values) => values.iter().map(size).sum(),
                _ => 0,
            }
    }
    size_of::<PushInfo>() + push.data.iter().map(size).sum::<usize>()
}

#[cfg(test)]
mod tests {
    use ::redis::PushKind;

    use super::*;

    fn message(payload: usize) -> PushInfo {
        PushInfo {
            kind: PushKind::Message,
            data: vec![
                Value::BulkString(b"herald:{news}".to_vec()),
                Value::BulkString(vec![b'x'; payload]),
            ],
        }
    }

    #[tokio::test]
    async fn pushes_past_the_byte_bound_are_dropped_and_remembered() {
        let (sender, mut inflow) = inflow(64 * 1024);
        for _ in 0..100 {
            sender.push(message(1024));
        }
        assert!(inflow.next().await.is_none(), "the overflow comes first");
        let mut held = 0;
        let wait = std::time::Duration::from_millis(10);
        while let Ok(next) = tokio::time::timeout(wait, inflow.next()).await {
            assert!(next.is_some(), "the overflow is reported once");
            held += 1;
        }
        assert!(
            held < 64,
            "{held} pushes of 1 KiB held under a 64 KiB bound"
        );
        assert!(held > 40, "only {held} pushes held under a 64 KiB bound");
    }

    #[tokio::test]
    async fn a_push_larger_than_the_bound_wakes_the_reader() {
        let (sender, mut inflow) = inflow(4096);
        let reader = tokio::spawn(async move { inflow.next().await.is_none() });
        tokio::task::yield_now().await;
        sender.push(message(10_000));
        assert!(reader.await.unwrap(), "the dropped push is reported");
    }

    #[tokio::test]
    async fn taking_a_push_gives_its_bytes_back() {
        let (sender, mut inflow) = inflow(8 * 1024);
        for _ in 0..1000 {
            sender.push(message(4000));
            assert!(
                inflow.next().await.is_some(),
                "one push at a time never overflows"
            );
        }
        assert_eq!(inflow.shared.bytes.load(Ordering::Acquire), 0);
    }
}
