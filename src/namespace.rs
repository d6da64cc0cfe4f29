//! Channel namespaces: what a channel gets (presence, join/leave) by the longest prefix of
//! its name that a namespace names, else the defaults the command line sets.

/// The policy of the channels of one namespace, resolved (nothing left unset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Its home keeps who is subscribed, for `presence` and `presence_stats`.
    pub presence: bool,
    /// Subscribers get `join` and `leave` events as connections come and go.
    pub join_leave: bool,
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
    /// (prefix, policy), any order.
    pub by_prefix: Vec<(Box<str>, Namespace)>,
}

impl Namespaces {
    /// The namespace of `channel`: the longest prefix that matches, else the default.
    pub fn of(&self, channel: &str) -> &Namespace {
        self.by_prefix
            .iter()
            .filter(|(prefix, _)| channel.starts_with(&**prefix))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(&self.default, |(_, namespace)| namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_prefix_wins_else_the_default() {
        let on = Namespace {
            presence: true,
            join_leave: false,
        };
        let both = Namespace {
            presence: true,
            join_leave: true,
        };
        let off = Namespace {
            presence: false,
            join_leave: false,
        };
        let namespaces = Namespaces {
            default: off.clone(),
            by_prefix: vec![
                ("chat.".into(), on.clone()),
                ("chat.vip.".into(), both.clone()),
            ],
        };
        assert_eq!(namespaces.of("news"), &off);
        assert_eq!(namespaces.of("chat.a"), &on);
        assert_eq!(namespaces.of("chat.vip.a"), &both);
    }
}
