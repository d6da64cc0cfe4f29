//! Channel namespaces: one `[[namespace]]` table in the config file, keyed by channel
//! prefix, sets what the channels of each namespace get. A channel belongs to the
//! namespace with the longest prefix it starts with (namespaces do not nest: a key the
//! entry leaves out takes the command-line default, not a shorter prefix's value), and a
//! channel no namespace matches gets the command-line defaults.

use serde::Deserialize;

use crate::compression::{CompressionPolicies, CompressionPolicy, CompressionPrefix};
use crate::config::PrefixPolicy;
use crate::hub::{HistoryLimits, HistoryPolicy};
use crate::limits::{SlowConsumerPolicies, SlowConsumerPolicy};

/// Who may publish to a namespace's channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishRule {
    /// Clients whose token's `publish` claim (or the anonymous patterns) allows it, and
    /// the server API.
    Token,
    /// Any client that may subscribe to the channel, and the server API.
    Subscribers,
    /// The server API only (`POST /api/publish`).
    Api,
}

/// What a subscriber without `since` gets first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recovery {
    /// Live messages only; `since` replays from history.
    Stream,
    /// The channel's latest message, then live ones: the channel holds a state. Its
    /// history is one message with no age limit unless the entry sets them.
    Latest,
}

/// The policy of the channels of one namespace, resolved (nothing left unset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Its home keeps who is subscribed, for `presence` and `presence_stats`.
    pub presence: bool,
    /// Subscribers get `join` and `leave` events as connections come and go.
    pub join_leave: bool,
    pub publish: PublishRule,
    /// A channel `name#user` is that user's alone, without a token listing it.
    pub personal_channels: bool,
    /// Messages a client published carry its user (`"publisher":U`).
    pub expose_publisher: bool,
    pub history: HistoryLimits,
}

impl Namespace {
    /// Whether the home must keep members (for presence, or for what a `leave` says).
    pub fn tracks_members(&self) -> bool {
        self.presence || self.join_leave
    }
}

/// Every namespace, and the defaults for channels none of them matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespaces {
    pub default: Namespace,
    /// (prefix, policy), any order, prefixes distinct.
    pub by_prefix: Vec<(Box<str>, Namespace)>,
}

impl Namespaces {
    /// Only the defaults.
    pub fn new(default: Namespace) -> Self {
        Self {
            default,
            by_prefix: Vec::new(),
        }
    }

    /// The namespace of `channel`: the longest prefix that matches, else the default.
    pub fn of(&self, channel: &str) -> &Namespace {
        self.by_prefix
            .iter()
            .filter(|(prefix, _)| channel.starts_with(&**prefix))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(&self.default, |(_, namespace)| namespace)
    }

    /// History limits per prefix, for the homes.
    pub fn history_by_prefix(&self) -> Vec<(Box<str>, HistoryLimits)> {
        self.by_prefix
            .iter()
            .map(|(prefix, namespace)| (prefix.clone(), namespace.history))
            .collect()
    }

    /// History limits of every channel, for the cluster.
    pub fn history_policy(&self) -> HistoryPolicy {
        HistoryPolicy {
            default: self.default.history,
            by_prefix: self.history_by_prefix(),
        }
    }
}

/// One `[[namespace]]` entry as written; every key but `prefix` is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceEntry {
    pub prefix: String,
    pub history_size: Option<usize>,
    pub history_ttl_ms: Option<u64>,
    pub recovery: Option<Recovery>,
    pub presence: Option<bool>,
    pub join_leave: Option<bool>,
    pub publish: Option<PublishRule>,
    pub personal_channels: Option<bool>,
    pub expose_publisher: Option<bool>,
    pub slow_consumer_policy: Option<SlowConsumerPolicy>,
    pub compression: Option<CompressionPolicy>,
}

/// The namespaces of a config that names none: `state.` recovers `latest`, so a shared
/// state (the demo page's counter) works with no config file at all.
pub(crate) fn built_in() -> Vec<NamespaceEntry> {
    vec![NamespaceEntry {
        prefix: "state.".into(),
        recovery: Some(Recovery::Latest),
        ..NamespaceEntry::default()
    }]
}

/// What the entries resolve to, over the command-line defaults: the namespaces, and the
/// slow-consumer and compression policies per prefix (one per namespace, so a channel
/// gets both from the namespace it belongs to).
pub(crate) struct Resolved {
    pub(crate) namespaces: Namespaces,
    pub(crate) slow_consumers: SlowConsumerPolicies,
    pub(crate) compression: CompressionPolicies,
}

pub(crate) fn resolve(
    entries: Vec<NamespaceEntry>,
    default: Namespace,
    slow_consumer: SlowConsumerPolicy,
    compression: CompressionPolicy,
) -> Result<Resolved, String> {
    let mut resolved = Resolved {
        namespaces: Namespaces::new(default.clone()),
        slow_consumers: SlowConsumerPolicies {
            default: slow_consumer,
            by_prefix: Vec::new(),
        },
        compression: CompressionPolicies {
            default: compression,
            by_prefix: Vec::new(),
        },
    };
    for entry in entries {
        let prefix = entry.prefix;
        if prefix.is_empty() {
            return Err("a [[namespace]] needs a non-empty prefix".into());
        }
        if resolved
            .namespaces
            .by_prefix
            .iter()
            .any(|(p, _)| **p == *prefix)
        {
            return Err(format!("[[namespace]] prefix {prefix:?} is given twice"));
        }
        let latest = entry.recovery == Some(Recovery::Latest);
        // A `latest` channel's message is its state: kept (one of them) until replaced.
        let (size, ttl) = if latest {
            (1, std::time::Duration::MAX)
        } else {
            (default.history.size, default.history.ttl)
        };
        let history = HistoryLimits {
            size: entry.history_size.unwrap_or(size),
            ttl: entry
                .history_ttl_ms
                .map_or(ttl, std::time::Duration::from_millis),
            latest,
        };
        if history.size > 100_000 {
            return Err(format!(
                "[[namespace]] {prefix:?}: history_size must be at most 100000"
            ));
        }
        if latest && history.size == 0 {
            return Err(format!(
                "[[namespace]] {prefix:?}: recovery = \"latest\" needs a history_size of at least 1"
            ));
        }
        resolved.namespaces.by_prefix.push((
            prefix.as_str().into(),
            Namespace {
                presence: entry.presence.unwrap_or(default.presence),
                join_leave: entry.join_leave.unwrap_or(default.join_leave),
                publish: entry.publish.unwrap_or(default.publish),
                personal_channels: entry.personal_channels.unwrap_or(default.personal_channels),
                expose_publisher: entry.expose_publisher.unwrap_or(default.expose_publisher),
                history,
            },
        ));
        resolved.slow_consumers.by_prefix.push(PrefixPolicy {
            prefix: prefix.clone(),
            policy: entry.slow_consumer_policy.unwrap_or(slow_consumer),
        });
        resolved.compression.by_prefix.push(CompressionPrefix {
            prefix,
            policy: entry.compression.unwrap_or(compression),
        });
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn defaults() -> Namespace {
        Namespace {
            presence: false,
            join_leave: false,
            publish: PublishRule::Token,
            personal_channels: true,
            expose_publisher: false,
            history: HistoryLimits {
                size: 100,
                ttl: Duration::from_secs(300),
                latest: false,
            },
        }
    }

    #[test]
    fn the_longest_prefix_wins_and_unset_keys_take_the_defaults() {
        let entries = vec![
            NamespaceEntry {
                prefix: "chat.".into(),
                presence: Some(true),
                slow_consumer_policy: Some(SlowConsumerPolicy::Conflate),
                ..NamespaceEntry::default()
            },
            NamespaceEntry {
                prefix: "chat.vip.".into(),
                join_leave: Some(true),
                history_size: Some(5),
                ..NamespaceEntry::default()
            },
        ];
        let resolved = resolve(
            entries,
            defaults(),
            SlowConsumerPolicy::Disconnect,
            CompressionPolicy::Off,
        )
        .unwrap();
        let namespaces = &resolved.namespaces;
        assert_eq!(namespaces.of("news"), &defaults());
        assert!(namespaces.of("chat.a").presence && !namespaces.of("chat.a").join_leave);
        let vip = namespaces.of("chat.vip.a");
        assert!(vip.join_leave && !vip.presence, "namespaces do not nest");
        assert_eq!(vip.history.size, 5);
        let slow = &resolved.slow_consumers;
        assert_eq!(slow.policy_for("chat.a"), SlowConsumerPolicy::Conflate);
        assert_eq!(
            slow.policy_for("chat.vip.a"),
            SlowConsumerPolicy::Disconnect
        );
    }

    #[test]
    fn latest_recovery_keeps_one_message_without_an_age_limit_unless_told() {
        let entries = vec![
            NamespaceEntry {
                prefix: "state.".into(),
                recovery: Some(Recovery::Latest),
                ..NamespaceEntry::default()
            },
            NamespaceEntry {
                prefix: "board.".into(),
                recovery: Some(Recovery::Latest),
                history_size: Some(10),
                history_ttl_ms: Some(1000),
                ..NamespaceEntry::default()
            },
        ];
        let resolved = resolve(
            entries,
            defaults(),
            SlowConsumerPolicy::Disconnect,
            CompressionPolicy::Off,
        )
        .unwrap();
        let policy = resolved.namespaces.history_policy();
        let state = policy.of("state.counter");
        assert_eq!(
            (state.size, state.ttl, state.latest),
            (1, Duration::MAX, true)
        );
        let board = policy.of("board.x");
        let ttl = Duration::from_millis(1000);
        assert_eq!((board.size, board.ttl, board.latest), (10, ttl, true));
        assert!(!policy.of("news").latest);
        let zero = NamespaceEntry {
            prefix: "z.".into(),
            recovery: Some(Recovery::Latest),
            history_size: Some(0),
            ..NamespaceEntry::default()
        };
        let error = resolve(
            vec![zero],
            defaults(),
            SlowConsumerPolicy::Disconnect,
            CompressionPolicy::Off,
        )
        .err()
        .unwrap();
        assert!(error.contains("at least 1"), "{error}");
    }

    #[test]
    fn empty_and_repeated_prefixes_are_errors() {
        let entry = |prefix: &str| NamespaceEntry {
            prefix: prefix.into(),
            ..NamespaceEntry::default()
        };
        let resolve = |entries| {
            resolve(
                entries,
                defaults(),
                SlowConsumerPolicy::Disconnect,
                CompressionPolicy::Off,
            )
            .err()
        };
        assert!(
            resolve(vec![entry("")])
                .unwrap()
                .contains("non-empty prefix")
        );
        assert!(
            resolve(vec![entry("a."), entry("a.")])
                .unwrap()
                .contains("twice")
        );
    }
}
