//! Presence in Redis: who is subscribed to a channel on every node, kept so that a node
//! that dies drops out by itself. The keys, the Lua scripts that change and read them,
//! and the JSON answers built from what they return. No IO.
//!
//! Per channel `C` (all under the channel's hash tag, so a Redis Cluster keeps them in
//! the channel's slot, beside its stream):
//! - `herald:{C}:nodes`, a sorted set of the nodes with members, each scored with the
//!   time (Redis's clock, ms) until which it counts: the node's last refresh plus
//!   [`PRESENCE_TTL`];
//! - `herald:{C}:m:NODE`, the node's members, a sorted set of `CONN JSON` entries (score
//!   0, so they are ordered by connection and a page reads from a cursor with
//!   `ZRANGEBYLEX`), where `JSON` is `"user":U` and `,"info":I` if any;
//! - `herald:{C}:u:NODE`, the node's connections per user (a hash), for distinct users.
//!
//! Every node refreshes its entries every [`REFRESH_EVERY`]; each key expires
//! [`PRESENCE_TTL`] after its node's last refresh, and the readers skip (and remove) a
//! node whose score has passed. So a node killed with `kill -9` drops out of presence at
//! most [`PRESENCE_TTL`] after it died.
//!
//! A join or leave is announced on the channel's pub/sub key by the same script that
//! records it, in the place Redis gives it among the channel's publishes: `E ` then the
//! event's JSON (an ordered message is `SEQ EPOCH DATA`, never starting with `E`).

use std::time::Duration;

use ::redis::Value;

use crate::proto::pubsub::push_json_str;

/// How often a node refreshes its presence entries.
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// How long a node's presence entries count after its last refresh: the bound on how
/// long a dead node stays in presence.
pub const PRESENCE_TTL: Duration = Duration::from_secs(6);

/// The first byte of a join or leave announcement.
pub(super) const EVENT_MARK: &[u8] = b"E ";

pub(super) fn nodes_key(channel: &str) -> String {
    format!("herald:{{{}}}:nodes", super::script::tag(channel))
}

/// What precedes a node's id in its members' key (`..:m:NODE`).
pub(super) fn members_prefix(channel: &str) -> String {
    format!("herald:{{{}}}:m:", super::script::tag(channel))
}

/// What precedes a node's id in its users' key (`..:u:NODE`).
pub(super) fn users_prefix(channel: &str) -> String {
    format!("herald:{{{}}}:u:", super::script::tag(channel))
}

/// Redis's clock in ms, in a script (effects replication makes `TIME` safe there).
const NOW: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
";

/// Adds (`ARGV[6]` = `1`) or removes (`0`) one member and announces it. KEYS: nodes,
/// members, users, pub/sub channel. ARGV: node, entry, user (empty: anonymous), ttl ms,
/// event payload (empty: no announcement), join. The announcement is `SPUBLISH`ed on
/// a Redis Cluster (`sharded`), as the ordering script's.
pub(super) fn change_script(sharded: bool) -> String {
    let script = format!(
        "{NOW}{}",
        r"
local ttl = tonumber(ARGV[4])
if ARGV[6] == '1' then
  if redis.call('ZADD', KEYS[2], 0, ARGV[2]) == 1 and ARGV[3] ~= '' then
    redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
  end
elseif redis.call('ZREM', KEYS[2], ARGV[2]) == 1 and ARGV[3] ~= '' then
  if redis.call('HINCRBY', KEYS[3], ARGV[3], -1) <= 0 then
    redis.call('HDEL', KEYS[3], ARGV[3])
  end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
if ARGV[5] ~= '' then
  redis.call('PUBLISH', KEYS[4], ARGV[5])
end
return 1
"
    );
    if sharded {
        script.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
    } else {
        script
    }
}

/// Keeps a node's entries of one channel alive, or (`ARGV[3]` = `1`) first replaces
/// them with the entries given (after a Redis restart or a link loss). KEYS: nodes,
/// members, users. ARGV: node, ttl ms, reset, then entry and user (empty: anonymous)
/// pairs to add. Returns 0 when the node's members key was missing (Redis lost it), so
/// the node writes its members again.
pub(super) fn refresh_script() -> String {
    format!(
        "{NOW}{}",
        r"
local ttl = tonumber(ARGV[2])
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[2], KEYS[3])
end
for i = 4, #ARGV, 2 do
  if redis.call('ZADD', KEYS[2], 0, ARGV[i]) == 1 and ARGV[i + 1] ~= '' then
    redis.call('HINCRBY', KEYS[3], ARGV[i + 1], 1)
  end
end
local found = redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return found
"
    )
}

/// The live nodes of a channel in id order, the expired ones removed first.
const LIVE_NODES: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local nodes = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(nodes)
";

/// A page of members: up to `ARGV[4]` `node, entry` pairs after the cursor (node
/// `ARGV[2]`, connection `ARGV[3]`; both empty: from the start), in (node, entry)
/// order. KEYS: nodes. ARGV: members prefix, cursor node, cursor conn, count.
pub(super) fn page_script() -> String {
    format!(
        "{NOW}{LIVE_NODES}{}",
        r"
local out, left = {}, tonumber(ARGV[4])
for _, node in ipairs(nodes) do
  if left <= 0 then break end
  if node >= ARGV[2] then
    local min = '-'
    if node == ARGV[2] and ARGV[3] ~= '' then
      -- Entries are 'CONN JSON': '!' sorts after the space, before any id character.
      min = '[' .. ARGV[3] .. '!'
    end
    local page = redis.call('ZRANGEBYLEX', ARGV[1] .. node, min, '+', 'LIMIT', 0, left)
    for _, entry in ipairs(page) do
      out[#out + 1] = node
      out[#out + 1] = entry
    end
    left = left - #page
  end
end
return out
"
    )
}

/// Connections and distinct users over the live nodes. KEYS: nodes. ARGV: members
/// prefix, users prefix.
pub(super) fn stats_script() -> String {
    format!(
        "{NOW}{LIVE_NODES}{}",
        r"
local connections, users, seen = 0, 0, {}
for _, node in ipairs(nodes) do
  connections = connections + redis.call('ZCARD', ARGV[1] .. node)
  for _, user in ipairs(redis.call('HKEYS', ARGV[2] .. node)) do
    if not seen[user] then
      seen[user] = true
      users = users + 1
    end
  end
end
return {connections, users}
"
    )
}

/// A member's entry: `CONN "user":U` and `,"info":I` if any.
pub(super) fn entry(conn: &str, user: Option<&str>, info: Option<&str>) -> String {
    let mut out = Vec::with_capacity(conn.len() + 16 + user.map_or(0, str::len));
    out.extend_from_slice(conn.as_bytes());
    out.extend_from_slice(b" \"user\":");
    match user {
        Some(user) => push_json_str(&mut out, user),
        None => out.extend_from_slice(b"null"),
    }
    if let Some(info) = info {
        out.extend_from_slice(b",\"info\":");
        out.extend_from_slice(info.as_bytes());
    }
    String::from_utf8(out).expect("JSON text is UTF-8")
}

/// A connection's cluster-wide id: its node's and its node-wide one, `NODE/CONN`.
pub fn cluster_conn(node: &str, conn: &str) -> String {
    format!("{node}/{conn}")
}

/// A cursor of a cluster presence page: `NODE/CONN`, as a page lists connections.
pub fn parse_cursor(cursor: &str) -> Result<(&str, &str), String> {
    cursor
        .split_once('/')
        .filter(|(node, conn)| !node.is_empty() && !conn.is_empty() && !conn.contains(' '))
        .ok_or_else(|| format!("{cursor:?} is not a cursor of this cluster (NODE/CONN)"))
}

/// The page JSON (as [`crate::hub::presence::page_json`] writes it, connections
/// `NODE/CONN`) from the page script's `node, entry` pairs: at most `limit` members
/// within `max_bytes` (at least one), the cursor set when more followed.
pub(super) fn page_json(channel: &str, pairs: Value, limit: usize, max_bytes: usize) -> Vec<u8> {
    let texts = texts(pairs);
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"type\":\"presence\",\"channel\":");
    push_json_str(&mut out, channel);
    out.extend_from_slice(b",\"members\":[");
    let mut listed: Option<String> = None;
    let mut next = None;
    for (count, pair) in texts.chunks_exact(2).enumerate() {
        let (node, entry) = (&pair[0], &pair[1]);
        let Some((conn, fields)) = entry.split_once(' ') else {
            continue;
        };
        let mark = out.len();
        if count > 0 {
            out.push(b',');
        }
        let id = cluster_conn(node, conn);
        out.extend_from_slice(b"{\"conn\":");
        push_json_str(&mut out, &id);
        out.push(b',');
        out.extend_from_slice(fields.as_bytes());
        out.push(b'}');
        if count == limit || (count > 0 && out.len() > max_bytes) {
            out.truncate(mark);
            next = listed;
            break;
        }
        listed = Some(id);
    }
    out.extend_from_slice(b"],\"cursor\":");
    match next {
        Some(next) => push_json_str(&mut out, &next),
        None => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
    out
}

/// A script's array of strings.
fn texts(value: Value) -> Vec<String> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| match item {
            Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
            Value::SimpleString(text) => Some(text),
            _ => None,
        })
        .collect()
}

/// `{"type":"join"|"leave","channel":C,"user":U,"conn":ID,"info":I}` as announced:
/// [`EVENT_MARK`] and the JSON.
pub(super) fn event_payload(kind: &str, channel: &str, id: &str, fields: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + channel.len() + fields.len());
    out.extend_from_slice(EVENT_MARK);
    out.extend_from_slice(b"{\"type\":");
    push_json_str(&mut out, kind);
    out.extend_from_slice(b",\"channel\":");
    push_json_str(&mut out, channel);
    out.extend_from_slice(b",\"conn\":");
    push_json_str(&mut out, id);
    out.push(b',');
    out.extend_from_slice(fields.as_bytes());
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn entries_and_events_are_json() {
        let entry = entry("0.1.2", Some("ann"), Some(r#"{"a":1}"#));
        assert_eq!(entry, r#"0.1.2 "user":"ann","info":{"a":1}"#);
        let fields = entry.split_once(' ').unwrap().1;
        let event = event_payload("join", "c", "n/0.1.2", fields);
        let json: serde_json::Value = serde_json::from_slice(&event[2..]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type":"join","channel":"c","conn":"n/0.1.2","user":"ann","info":{"a":1}})
        );
        assert!(event.starts_with(EVENT_MARK));
        assert_eq!(super::entry("0.1.3", None, None), r#"0.1.3 "user":null"#);
    }

    #[test]
    fn a_page_is_bounded_and_names_its_cursor() {
        let pairs = || {
            Value::Array(vec![
                bulk("a"),
                bulk(r#"0.1.1 "user":"x""#),
                bulk("a"),
                bulk(r#"0.1.2 "user":null"#),
                bulk("b"),
                bulk(r#"0.1.1 "user":"y""#),
            ])
        };
        let page: serde_json::Value =
            serde_json::from_slice(&page_json("c", pairs(), 2, 1 << 20)).unwrap();
        assert_eq!(page["members"].as_array().unwrap().len(), 2);
        assert_eq!(page["members"][1]["conn"], "a/0.1.2");
        assert_eq!(page["cursor"], "a/0.1.2");
        let all: serde_json::Value =
            serde_json::from_slice(&page_json("c", pairs(), 3, 1 << 20)).unwrap();
        assert_eq!(all["members"][2]["user"], "y");
        assert_eq!(all["cursor"], serde_json::Value::Null);
        let small: serde_json::Value =
            serde_json::from_slice(&page_json("c", pairs(), 3, 10)).unwrap();
        assert_eq!(
            small["members"].as_array().unwrap().len(),
            1,
            "one at least"
        );
        assert_eq!(small["cursor"], "a/0.1.1");
    }

    #[test]
    fn cursors_name_a_node_and_a_connection() {
        assert_eq!(parse_cursor("ab1/0.1.2"), Ok(("ab1", "0.1.2")));
        for bad in ["", "0.1.2", "/0.1.2", "n/", "n/a b"] {
            assert!(parse_cursor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_key_of_a_channel_shares_its_slot() {
        for channel in ["news", "}odd", "a{b}c"] {
            let tag = |key: &str| {
                let open = key.find('{').unwrap();
                let close = open + key[open..].find('}').unwrap();
                key[open + 1..close].to_string()
            };
            let meta = super::super::script::meta_key(channel);
            for key in [
                nodes_key(channel),
                members_prefix(channel) + "n",
                users_prefix(channel) + "n",
            ] {
                assert_eq!(tag(&key), tag(&meta), "{key}");
            }
        }
    }
}
