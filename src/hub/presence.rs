//! Who is in a channel: the members its home keeps (one per subscribed connection whose
//! channel has presence or join/leave on), their users and public info, pages of them
//! and their counts.
//!
//! # Memory
//! A member's user and info are the connection's own (`Arc`s shared with its identity,
//! the info at most 1 KiB per connection, held once however many homes list it), so an
//! entry costs the home a fixed ~80 bytes (its ordered-map slot plus a count per distinct
//! user). A channel holds at most one entry per subscribed connection: its presence is
//! bounded by the node's connections, as its subscriptions are.
//!
//! Members are ordered by connection id, so a page's cursor (the last id it listed) stays
//! valid while others come and go: the next page starts after it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Bound;
use std::str::FromStr;
use std::sync::Arc;

use crate::proto::pubsub::push_json_str;

/// A connection as presence, join/leave and the server API name it, node-wide: its shard,
/// its slot there and the slot's generation, written `shard.key.generation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId {
    pub shard: u32,
    pub key: u32,
    pub generation: u32,
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.shard, self.key, self.generation)
    }
}

impl FromStr for ConnId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a connection id (shard.key.generation)");
        // Digits only: `u32::from_str` also takes a sign (`+1`), which the documented
        // grammar (and the OpenAPI document's pattern) does not.
        let mut parts = s.split('.').map(|p| {
            p.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| p.parse::<u32>().ok())
                .flatten()
                .ok_or_else(bad)
        });
        let mut next = || parts.next().unwrap_or_else(|| Err(bad()));
        let id = Self {
            shard: next()?,
            key: next()?,
            generation: next()?,
        };
        match parts.next() {
            None => Ok(id),
            Some(_) => Err(bad()),
        }
    }
}

/// What presence shows of a member: the connection's user (`None`: anonymous) and info
/// (a JSON object's text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user: Option<Arc<str>>,
    pub info: Option<Arc<str>>,
}

/// One channel's members.
#[derive(Debug, Default)]
pub struct Presence {
    members: BTreeMap<ConnId, Member>,
    /// Connections per distinct (non-anonymous) user.
    users: HashMap<Arc<str>, u32>,
}

/// The most members one page lists.
pub const MAX_PAGE: usize = 1000;

/// How many members a page lists when the client does not say.
pub const DEFAULT_PAGE: usize = 100;

impl Presence {
    /// Adds `conn`; false if it was a member already.
    pub fn join(&mut self, conn: ConnId, member: Member) -> bool {
        if self.members.contains_key(&conn) {
            return false;
        }
        if let Some(user) = &member.user {
            *self.users.entry(user.clone()).or_insert(0) += 1;
        }
        self.members.insert(conn, member);
        true
    }

    /// Removes `conn`, returning what it was.
    pub fn leave(&mut self, conn: ConnId) -> Option<Member> {
        let member = self.members.remove(&conn)?;
        if let Some(user) = &member.user
            && let Some(count) = self.users.get_mut(user)
        {
            *count -= 1;
            if *count == 0 {
                self.users.remove(user);
            }
        }
        Some(member)
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Connections, and distinct users among them.
    pub fn stats(&self) -> (usize, usize) {
        (self.members.len(), self.users.len())
    }

    /// The members after `cursor` (from the first without one), in id order.
    fn after(&self, cursor: Option<ConnId>) -> impl Iterator<Item = (&ConnId, &Member)> {
        let start = cursor.map_or(Bound::Unbounded, Bound::Excluded);
        self.members.range((start, Bound::Unbounded))
    }
}

/// `{"type":"presence","channel":C,"members":[{"user":U,"conn":ID,"info":I},..],
/// "cursor":NEXT}`: the members after `cursor`, at most `limit` (clamped to
/// 1..=[`MAX_PAGE`]) and within `max_bytes` (at least one), `cursor` `null` on the last
/// page. Without members (`None`) the page is empty.
pub fn page_json(
    channel: &str,
    presence: Option<&Presence>,
    cursor: Option<ConnId>,
    (limit, max_bytes): (usize, usize),
) -> Vec<u8> {
    let limit = limit.clamp(1, MAX_PAGE);
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"type\":\"presence\",\"channel\":");
    push_json_str(&mut out, channel);
    out.extend_from_slice(b",\"members\":[");
    let mut listed: Option<ConnId> = None;
    let mut next = None;
    let members = presence.into_iter().flat_map(|p| p.after(cursor));
    for (count, (conn, member)) in members.enumerate() {
        let mark = out.len();
        if count > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"user\":");
        match &member.user {
            Some(user) => push_json_str(&mut out, user),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"conn\":");
        push_json_str(&mut out, &conn.to_string());
        if let Some(info) = &member.info {
            out.extend_from_slice(b",\"info\":");
            out.extend_from_slice(info.as_bytes());
        }
        out.push(b'}');
        if count == limit || (count > 0 && out.len() > max_bytes) {
            // A member that does not fit starts the next page.
            out.truncate(mark);
            next = listed;
            break;
        }
        listed = Some(*conn);
    }
    out.extend_from_slice(b"],\"cursor\":");
    match next {
        Some(next) => push_json_str(&mut out, &next.to_string()),
        None => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
    out
}

/// `{"type":"presence_stats","channel":C,"connections":N,"users":M}`
pub fn stats_json(channel: &str, presence: Option<&Presence>) -> Vec<u8> {
    let (connections, users) = presence.map_or((0, 0), Presence::stats);
    let mut out = Vec::with_capacity(96 + channel.len());
    out.extend_from_slice(b"{\"type\":\"presence_stats\",\"channel\":");
    push_json_str(&mut out, channel);
    out.extend_from_slice(format!(",\"connections\":{connections},\"users\":{users}}}").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(key: u32) -> ConnId {
        ConnId {
            shard: 0,
            key,
            generation: 1,
        }
    }

    fn member(user: Option<&str>) -> Member {
        Member {
            user: user.map(Into::into),
            info: None,
        }
    }

    #[test]
    fn conn_ids_read_back_what_they_write() {
        let conn = ConnId {
            shard: 3,
            key: 17,
            generation: 9,
        };
        assert_eq!(conn.to_string(), "3.17.9");
        assert_eq!("3.17.9".parse::<ConnId>(), Ok(conn));
        for bad in [
            "",
            "1.2",
            "1.2.3.4",
            "a.b.c",
            "-1.2.3",
            "+1.2.3",
            "1. 2.3",
            "4294967296.0.0",
        ] {
            assert!(bad.parse::<ConnId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn counts_connections_and_distinct_users() {
        let mut presence = Presence::default();
        assert!(presence.join(id(1), member(Some("ann"))));
        assert!(presence.join(id(2), member(Some("ann"))));
        assert!(presence.join(id(3), member(None)));
        assert!(!presence.join(id(3), member(None)), "a member once");
        assert_eq!(presence.stats(), (3, 1));
        assert_eq!(presence.leave(id(1)), Some(member(Some("ann"))));
        assert_eq!(presence.leave(id(1)), None);
        assert_eq!(presence.stats(), (2, 1));
        presence.leave(id(2));
        presence.leave(id(3));
        assert!(presence.is_empty() && presence.users.is_empty());
    }

    #[test]
    fn pages_and_stats_are_json() {
        let mut presence = Presence::default();
        presence.join(
            id(1),
            Member {
                user: Some("ann".into()),
                info: Some(r#"{"n":"A"}"#.into()),
            },
        );
        presence.join(id(2), member(None));
        let page = String::from_utf8(page_json("c", Some(&presence), None, (1, 1 << 20))).unwrap();
        assert_eq!(
            page,
            r#"{"type":"presence","channel":"c","members":[{"user":"ann","conn":"0.1.1","info":{"n":"A"}}],"cursor":"0.1.1"}"#
        );
        let last =
            String::from_utf8(page_json("c", Some(&presence), Some(id(1)), (1, 1 << 20))).unwrap();
        assert!(
            last.ends_with(r#"[{"user":null,"conn":"0.2.1"}],"cursor":null}"#),
            "{last}"
        );
        assert_eq!(
            String::from_utf8(stats_json("c", Some(&presence))).unwrap(),
            r#"{"type":"presence_stats","channel":"c","connections":2,"users":1}"#
        );
        assert!(
            String::from_utf8(page_json("c", None, None, (5, 1 << 20)))
                .unwrap()
                .contains(r#""members":[],"cursor":null"#)
        );
    }

    /// The keys of the members on the page from `cursor`, and the next cursor.
    fn keys(
        presence: &Presence,
        cursor: Option<ConnId>,
        bounds: (usize, usize),
    ) -> (Vec<u32>, Option<ConnId>) {
        let json = page_json("c", Some(presence), cursor, bounds);
        let page: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let keys = page["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["conn"].as_str().unwrap().parse::<ConnId>().unwrap().key)
            .collect();
        let next = page["cursor"].as_str().map(|c| c.parse().unwrap());
        (keys, next)
    }

    #[test]
    fn pages_follow_the_cursor_while_members_come_and_go() {
        let mut presence = Presence::default();
        for key in 0..10 {
            presence.join(id(key), member(Some("u")));
        }
        let (first, next) = keys(&presence, None, (4, usize::MAX));
        assert_eq!(first, [0, 1, 2, 3]);
        assert_eq!(next, Some(id(3)));
        // The cursor's own member leaving does not lose the place.
        presence.leave(id(3));
        presence.join(id(20), member(None));
        let (second, next) = keys(&presence, next, (4, usize::MAX));
        assert_eq!(second, [4, 5, 6, 7]);
        let (last, next) = keys(&presence, next, (4, usize::MAX));
        assert_eq!(last, [8, 9, 20]);
        assert_eq!(next, None);
        assert_eq!(keys(&presence, None, (usize::MAX, usize::MAX)).0.len(), 10);
    }

    #[test]
    fn a_page_stays_within_its_bytes_but_lists_at_least_one() {
        let mut presence = Presence::default();
        let info: Arc<str> = format!(r#"{{"bio":"{}"}}"#, "x".repeat(1000)).into();
        for key in 0..10 {
            let member = Member {
                user: Some("u".into()),
                info: Some(info.clone()),
            };
            presence.join(id(key), member);
        }
        let json = page_json("c", Some(&presence), None, (1000, 3500));
        assert!(json.len() <= 3500, "{}", json.len());
        let (listed, next) = keys(&presence, None, (1000, 3500));
        assert_eq!((listed.len(), next), (3, Some(id(2))));
        assert_eq!(
            keys(&presence, None, (1000, 10)).0,
            [0],
            "one, however small"
        );
    }
}
