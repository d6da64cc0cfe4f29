//! Which local address each of a worker's connections binds to.
//!
//! With `--source-ips`, connections take the listed addresses round-robin. By default
//! (`auto`) on a loopback target, where every 127.0.0.0/8 address is this machine's own, a
//! worker fills one address at a time from 127.0.0.2 up (127.0.0.1 stays the publisher's)
//! and moves to the next when the address is full: at its share of the ephemeral ports, or
//! when the server refuses one more connection from it (Herald's per-address cap, HTTP 429),
//! which also tells the worker how many the server lets one address hold.

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

/// The first address an automatic spread uses.
const FIRST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The last address of the loopback network.
const LAST: Ipv4Addr = Ipv4Addr::new(127, 255, 255, 254);

/// How a worker spread its connections over source addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SpreadReport {
    /// Addresses used.
    pub(crate) addresses: u32,
    pub(crate) first: Ipv4Addr,
    pub(crate) last: Ipv4Addr,
    /// The most connections the server let one address hold, once it refused one more.
    pub(crate) per_address_cap: Option<u32>,
    /// The most connections put on one address for its ephemeral ports.
    pub(crate) port_budget: u32,
    /// Worker processes reporting (each takes addresses of its own).
    pub(crate) workers: u32,
}

impl SpreadReport {
    /// The reports of several workers as one.
    #[must_use]
    pub(crate) fn merge(reports: impl IntoIterator<Item = Self>) -> Option<Self> {
        reports.into_iter().reduce(|a, b| Self {
            addresses: a.addresses + b.addresses,
            first: a.first.min(b.first),
            last: a.last.max(b.last),
            per_address_cap: match (a.per_address_cap, b.per_address_cap) {
                (Some(x), Some(y)) => Some(x.min(y)),
                (x, y) => x.or(y),
            },
            port_budget: a.port_budget.min(b.port_budget),
            workers: a.workers + b.workers,
        })
    }

    /// The announcement, when there was more than one address to use.
    #[must_use]
    pub(crate) fn announce(&self, conns: u64) -> Option<String> {
        if self.addresses < 2 && self.per_address_cap.is_none() {
            return None;
        }
        let why = match self.per_address_cap {
            Some(cap) => format!(
                "the server refused more than {cap} from one address (HTTP 429: its \
                 --max-connections-per-ip)"
            ),
            None if self.addresses > self.workers => format!(
                "at most {} per address for its ephemeral ports",
                self.port_budget
            ),
            None => "one address per worker process".to_owned(),
        };
        Some(format!(
            "spread {conns} connections over {} source addresses {}-{}: {why}",
            self.addresses, self.first, self.last
        ))
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// Connections from this address in progress or open.
    held: u32,
    /// Of those, the open ones.
    open: u32,
    full: bool,
}

/// The automatic spread of one worker over its share of 127.0.0.2 and up: worker `index`
/// of `workers` takes every `workers`-th address, so workers never share one.
#[derive(Debug, Clone)]
pub(crate) struct Spread {
    index: u32,
    workers: u32,
    slots: Vec<Slot>,
    current: usize,
    port_budget: u32,
    cap: Option<u32>,
}

impl Spread {
    #[must_use]
    pub(crate) fn new(index: usize, workers: usize, port_budget: u32) -> Self {
        Self {
            index: index as u32,
            workers: workers.max(1) as u32,
            slots: Vec::new(),
            current: 0,
            port_budget: port_budget.max(1),
            cap: None,
        }
    }

    fn address(&self, slot: usize) -> Option<Ipv4Addr> {
        let offset = u32::try_from(slot)
            .ok()?
            .checked_mul(self.workers)?
            .checked_add(self.index)?;
        let address = u32::from(FIRST).checked_add(offset)?;
        (address <= u32::from(LAST)).then(|| Ipv4Addr::from(address))
    }

    /// An address for one more connection, and its slot; None when the loopback network
    /// is used up.
    pub(crate) fn take(&mut self) -> Option<(usize, Ipv4Addr)> {
        let limit = self.cap.unwrap_or(u32::MAX).min(self.port_budget);
        loop {
            let address = self.address(self.current)?;
            if self.slots.len() <= self.current {
                self.slots.resize(self.current + 1, Slot::default());
            }
            let slot = &mut self.slots[self.current];
            if !slot.full && slot.held < limit {
                slot.held += 1;
                return Some((self.current, address));
            }
            self.current += 1;
        }
    }

    /// A connection from `slot` completed its upgrade.
    pub(crate) fn opened(&mut self, slot: usize) {
        self.slots[slot].open += 1;
    }

    /// A connection from `slot` ended (`was_open`: after its upgrade).
    pub(crate) fn release(&mut self, slot: usize, was_open: bool) {
        let slot = &mut self.slots[slot];
        slot.held -= 1;
        if was_open {
            slot.open -= 1;
        }
    }

    /// The server refused a connection from `slot` for its per-address cap: the address
    /// holds what it may, and no later one is given more. False when the address holds
    /// nothing open, so another address would be refused as well.
    pub(crate) fn refused(&mut self, slot: usize) -> bool {
        let open = self.slots[slot].open;
        if open == 0 {
            return false;
        }
        self.slots[slot].full = true;
        self.cap.get_or_insert(open);
        true
    }

    #[must_use]
    pub(crate) fn report(&self) -> Option<SpreadReport> {
        let used = self.slots.len();
        Some(SpreadReport {
            addresses: used as u32,
            first: self.address(0)?,
            last: self.address(used.checked_sub(1)?)?,
            per_address_cap: self.cap,
            port_budget: self.port_budget,
            workers: 1,
        })
    }
}

/// Where a worker's connections come from.
#[derive(Debug, Clone)]
pub(crate) enum Sources {
    /// The kernel chooses.
    Kernel,
    /// `--source-ips`, round-robin by connection number.
    List(Vec<Ipv4Addr>),
    Spread(Spread),
}

impl Sources {
    /// The address for connection `global` (its number over all workers) and, when spread,
    /// its slot to hand back to [`Spread::release`].
    pub(crate) fn take(&mut self, global: usize) -> (Option<IpAddr>, Option<usize>) {
        match self {
            Self::Kernel => (None, None),
            Self::List(ips) => (Some(IpAddr::V4(ips[global % ips.len()])), None),
            Self::Spread(spread) => match spread.take() {
                Some((slot, address)) => (Some(IpAddr::V4(address)), Some(slot)),
                None => (None, None),
            },
        }
    }
}

/// How many connections to put on one source address: nine tenths of the ephemeral port
/// range, leaving ports for everything else on the machine.
#[must_use]
pub(crate) fn port_budget() -> u32 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut numbers = text.split_whitespace().map(str::parse::<u32>);
            match (numbers.next(), numbers.next()) {
                (Some(Ok(low)), Some(Ok(high))) if high >= low => Some(high - low + 1),
                _ => None,
            }
        })
        .unwrap_or(28_232);
    range / 10 * 9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_one_address_then_moves_on_and_workers_never_share_one() {
        let mut spread = Spread::new(1, 3, 2);
        let taken: Vec<_> = (0..5).map(|_| spread.take().unwrap()).collect();
        let addresses: Vec<String> = taken.iter().map(|(_, ip)| ip.to_string()).collect();
        assert_eq!(
            addresses,
            [
                "127.0.0.3",
                "127.0.0.3",
                "127.0.0.6",
                "127.0.0.6",
                "127.0.0.9"
            ]
        );
        let report = spread.report().unwrap();
        assert_eq!((report.addresses, report.per_address_cap), (3, None));
        assert_eq!(report.last, Ipv4Addr::new(127, 0, 0, 9));
        let announced = report.announce(5).unwrap();
        assert!(announced.contains("over 3 source addresses 127.0.0.3-127.0.0.9"));
        assert!(announced.contains("ephemeral ports"), "{announced}");
    }

    #[test]
    fn a_per_address_refusal_teaches_the_cap() {
        let mut spread = Spread::new(0, 1, 1000);
        for _ in 0..4 {
            let (slot, _) = spread.take().unwrap();
            spread.opened(slot);
        }
        let (refused, _) = spread.take().unwrap();
        spread.release(refused, false);
        assert!(spread.refused(refused));
        // Later addresses get the four the first one held, no more.
        let next: Vec<_> = (0..5).map(|_| spread.take().unwrap().1).collect();
        assert_eq!(next[0], Ipv4Addr::new(127, 0, 0, 3));
        assert_eq!(next[3], Ipv4Addr::new(127, 0, 0, 3));
        assert_eq!(next[4], Ipv4Addr::new(127, 0, 0, 4));
        let report = spread.report().unwrap();
        assert_eq!(report.per_address_cap, Some(4));
        let merged = SpreadReport::merge([
            report.clone(),
            SpreadReport {
                per_address_cap: None,
                ..report
            },
        ])
        .unwrap();
        assert_eq!((merged.addresses, merged.per_address_cap), (6, Some(4)));
        assert!(merged.announce(30).unwrap().contains("refused more than 4"));
        let mut one_each = Spread::new(0, 2, 1000);
        one_each.take().unwrap();
        let one_each = one_each.report().unwrap();
        let two = SpreadReport::merge([one_each.clone(), one_each]).unwrap();
        assert!(
            two.announce(2)
                .unwrap()
                .ends_with("one address per worker process")
        );
    }

    #[test]
    fn a_refusal_with_nothing_open_is_not_the_per_address_cap() {
        let mut spread = Spread::new(0, 1, 1000);
        let (slot, _) = spread.take().unwrap();
        assert!(!spread.refused(slot));
        let (slot, _) = spread.take().unwrap();
        assert_eq!(slot, 0);
    }
}
