//! The messages a benchmark sends and checks: templates for another server's protocol, the
//! `data` each message carries (its index and scheduled time, padded like real JSON), and
//! the order tracking that tells lost, duplicated and out-of-order deliveries apart.

use crate::load::{find, parse_u64};

/// A message template with `{channel}`, `{data}` and `{id}` placeholders; any other text,
/// JSON braces included, is copied as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Channel,
    Data,
    Id,
}

impl Template {
    /// Splits `text` at its placeholders.
    #[must_use]
    pub(crate) fn parse(text: &str) -> Self {
        let mut parts = Vec::new();
        let mut rest = text;
        loop {
            let next = [
                ("{channel}", Part::Channel),
                ("{data}", Part::Data),
                ("{id}", Part::Id),
            ]
            .into_iter()
            .filter_map(|(token, part)| rest.find(token).map(|at| (at, token.len(), part)))
            .min_by_key(|(at, _, _)| *at);
            let Some((at, len, part)) = next else {
                if !rest.is_empty() {
                    parts.push(Part::Text(rest.to_owned()));
                }
                return Self { parts };
            };
            if at > 0 {
                parts.push(Part::Text(rest[..at].to_owned()));
            }
            parts.push(part);
            rest = &rest[at + len..];
        }
    }

    /// Whether the template uses `{data}`.
    #[must_use]
    pub(crate) fn has_data(&self) -> bool {
        self.parts.contains(&Part::Data)
    }

    /// Appends the template with its placeholders filled in to `out`.
    pub(crate) fn render_into(&self, out: &mut Vec<u8>, channel: &str, data: &[u8], id: u64) {
        for part in &self.parts {
            match part {
                Part::Text(text) => out.extend_from_slice(text.as_bytes()),
                Part::Channel => out.extend_from_slice(channel.as_bytes()),
                Part::Data => out.extend_from_slice(data),
                Part::Id => out.extend_from_slice(id.to_string().as_bytes()),
            }
        }
    }

    /// The template with its placeholders filled in.
    #[must_use]
    pub(crate) fn render(&self, channel: &str, data: &[u8], id: u64) -> Vec<u8> {
        let mut out = Vec::new();
        self.render_into(&mut out, channel, data, id);
        out
    }
}

/// The marker that starts the benchmark's own fields inside a message's `data`:
/// `{"hb":[k,scheduled_ns],"p":"xxx"}`.
pub(crate) const DATA_MARKER: &[u8] = b"\"hb\":[";
pub(crate) const SEQ_MARKER: &[u8] = b"\"seq\":";

/// The `data` JSON of message `k` scheduled at `scheduled_ns`, padded to `size` bytes when
/// `size` is larger than the bare fields.
#[must_use]
pub(crate) fn message_data(k: u64, scheduled_ns: u64, size: usize) -> Vec<u8> {
    let mut data = format!("{{\"hb\":[{k},{scheduled_ns}]").into_bytes();
    let bare = data.len() + 1;
    let padded = data.len() + ",\"p\":\"\"}".len();
    if size > padded {
        data.extend_from_slice(b",\"p\":\"");
        push_quote_text(&mut data, k, size - padded);
        data.extend_from_slice(b"\"}");
    } else {
        data.push(b'}');
        debug_assert_eq!(data.len(), bare);
    }
    data
}

/// `len` bytes of text like a price feed's (`SYM07 bid 101.23 ask 101.25 x 3400; ...`),
/// different for every `k`: padding that compresses like real JSON values do, where a run
/// of one letter would flatter permessage-deflate.
fn push_quote_text(out: &mut Vec<u8>, k: u64, len: usize) {
    let end = out.len() + len;
    let mut x = k.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move |bound: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % bound
    };
    while out.len() < end {
        let price = 100 + next(900);
        let quote = format!(
            "SYM{:02} bid {price}.{:02} ask {price}.{:02} x {}; ",
            next(40),
            next(100),
            next(100),
            100 * (1 + next(99))
        );
        out.extend_from_slice(quote.as_bytes());
    }
    out.truncate(end);
}

/// `(k, scheduled_ns)` from a payload carrying [`message_data`], and where the data starts.
#[must_use]
pub(crate) fn parse_message_data(payload: &[u8]) -> Option<(u64, u64)> {
    let at = find(payload, DATA_MARKER)? + DATA_MARKER.len();
    let rest = &payload[at..];
    let k = parse_u64(rest)?;
    let comma = rest.iter().position(|b| *b == b',')?;
    let scheduled = parse_u64(&rest[comma + 1..])?;
    Some((k, scheduled))
}

/// What one delivery was, judged from its index in its channel's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// First time seen, in order (possibly after a gap).
    New,
    /// First time seen, but after a later message.
    OutOfOrder,
    /// Seen before.
    Duplicate,
}

/// Order tracking for one subscription: the next expected index (1-based) and the ranges
/// skipped so far, so that memory grows with anomalies, not with messages.
#[derive(Debug, Clone, Default)]
pub(crate) struct Order {
    next: u64,
    missing: Vec<(u64, u64)>,
}

impl Order {
    /// Records the delivery of stream index `index` (1 = first message after subscribing).
    pub(crate) fn record(&mut self, index: u64) -> Delivery {
        if self.next == 0 {
            self.next = 1;
        }
        if index >= self.next {
            if index > self.next {
                self.missing.push((self.next, index));
            }
            self.next = index + 1;
            return Delivery::New;
        }
        let Some(pos) = self
            .missing
            .iter()
            .position(|&(start, end)| (start..end).contains(&index))
        else {
            return Delivery::Duplicate;
        };
        let (start, end) = self.missing[pos];
        self.missing.swap_remove(pos);
        if start < index {
            self.missing.push((start, index));
        }
        if index + 1 < end {
            self.missing.push((index + 1, end));
        }
        Delivery::OutOfOrder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_placeholders_and_keep_json_braces() {
        let template =
            Template::parse(r#"{"type":"publish","channel":"{channel}","data":{data},"id":{id}}"#);
        assert!(template.has_data());
        assert_eq!(
            template.render("news", br#"{"a":1}"#, 7),
            br#"{"type":"publish","channel":"news","data":{"a":1},"id":7}"#
        );
        let plain = Template::parse("{data}{data} {unknown}");
        assert_eq!(plain.render("c", b"x", 1), b"xx {unknown}");
        assert!(!Template::parse(r#"{"type":"subscribe"}"#).has_data());
    }

    #[test]
    fn message_data_is_padded_json_that_parses_back() {
        for size in [0, 10, 64, 1000] {
            let data = message_data(12, 3_000_000_123, size);
            let value: serde_json::Value = serde_json::from_slice(&data).unwrap();
            assert_eq!(value["hb"][0], 12);
            if size > 40 {
                assert_eq!(data.len(), size);
            }
            let envelope = [br#"{"type":"message","seq":5,"data":"#, &data[..], b"}"].concat();
            assert_eq!(parse_message_data(&envelope), Some((12, 3_000_000_123)));
        }
    }

    #[test]
    fn order_tells_lost_late_and_duplicated_deliveries_apart() {
        let mut order = Order::default();
        assert_eq!(order.record(1), Delivery::New);
        assert_eq!(order.record(2), Delivery::New);
        assert_eq!(order.record(6), Delivery::New);
        assert_eq!(order.record(4), Delivery::OutOfOrder);
        assert_eq!(order.record(4), Delivery::Duplicate);
        assert_eq!(order.record(2), Delivery::Duplicate);
        assert_eq!(order.record(3), Delivery::OutOfOrder);
        assert_eq!(order.record(5), Delivery::OutOfOrder);
        assert_eq!(order.record(5), Delivery::Duplicate);
        assert!(order.missing.is_empty());
        assert_eq!(order.record(7), Delivery::New);
    }
}
