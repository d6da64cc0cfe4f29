//! The compression policy: whether a channel's broadcasts go out compressed once for every
//! subscriber (`shared`), by each subscriber's own compressor (`per-connection`), or plain
//! (`off`); set globally with `--compression` and per channel prefix in the config file.
//! The protocol side (negotiation, compressors, inflating) is `proto::deflate`.

use crate::config::{ChannelPolicies, PrefixPolicy};

/// How a channel's messages are compressed for subscribers that negotiated
/// permessage-deflate; subscribers that did not always get the plain frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CompressionPolicy {
    /// Plain frames only.
    Off,
    /// The home compresses each message once, from an empty window, and every compressing
    /// subscriber shares that frame.
    Shared,
    /// Each compressing subscriber's own compressor (bounded window and memory) compresses
    /// the message, keeping its window between messages for a better ratio.
    PerConnection,
}

/// A compression policy for channels whose name starts with `prefix`.
pub type CompressionPrefix = PrefixPolicy<CompressionPolicy>;

/// The compression policy of every channel: the longest matching prefix, else the default.
///
/// The server offers permessage-deflate as soon as any policy is not `off`. The default
/// also decides a compressing connection's own compressor: with `per-connection` it keeps
/// its window between messages (and then compresses that connection's copy of `shared`
/// channels too, since a shared frame would not fit its window); otherwise it starts each
/// message afresh, so shared frames can go in between.
pub type CompressionPolicies = ChannelPolicies<CompressionPolicy>;

impl CompressionPolicies {
    /// Whether permessage-deflate is offered at all.
    pub fn negotiates(&self) -> bool {
        self.default != CompressionPolicy::Off
            || self
                .by_prefix
                .iter()
                .any(|p| p.policy != CompressionPolicy::Off)
    }

    /// Whether a compressing connection's own compressor keeps its window between messages.
    pub fn takes_over_context(&self) -> bool {
        self.default == CompressionPolicy::PerConnection
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_and_any_policy_turns_negotiation_on() {
        let policies = CompressionPolicies {
            default: CompressionPolicy::Off,
            by_prefix: vec![
                CompressionPrefix {
                    prefix: "prices.".into(),
                    policy: CompressionPolicy::Shared,
                },
                CompressionPrefix {
                    prefix: "prices.fx.".into(),
                    policy: CompressionPolicy::PerConnection,
                },
            ],
        };
        assert_eq!(policies.policy_for("news"), CompressionPolicy::Off);
        assert_eq!(policies.policy_for("prices.btc"), CompressionPolicy::Shared);
        assert_eq!(
            policies.policy_for("prices.fx.eur"),
            CompressionPolicy::PerConnection
        );
        assert!(policies.negotiates());
        assert!(!policies.takes_over_context());
        let off = CompressionPolicies {
            default: CompressionPolicy::Off,
            by_prefix: Vec::new(),
        };
        assert!(!off.negotiates());
    }
}
