//! The server API besides publishing (`--api-key`, JSON in and out): what each request
//! asks, read and bounded here, and the bodies of the answers the shards gather.
//!
//! | request | answer |
//! |---|---|
//! | `POST /api/disconnect` `{"user":U}` or `{"conn":ID}` (`NODE/ID` in a cluster), `"code"`, `"reason"`, `"reconnect"` | `{"disconnected":N}` |
//! | `POST /api/unsubscribe` `{"user":U,"channel":C}` | `{"unsubscribed":N}` |
//! | `GET /api/presence?channel=C&cursor=ID&limit=N` | a page of members |
//! | `GET /api/presence_stats?channel=C` | connections and distinct users |
//! | `GET /api/history?channel=C&since=N&limit=N&newest_first=true` | stored messages |
//! | `GET /api/channels?pattern=P&cursor=C&limit=N` | channels and subscriber counts |
//! | `GET /api/info` | this node: version, epoch, uptime, shards, connections |

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

use super::{ApiError, percent_decode, push_json_str};
use crate::auth::Patterns;
use crate::hub::presence::{DEFAULT_PAGE, MAX_PAGE};
use crate::hub::{ChannelName, ConnId};
use crate::proto::frame::server_frame_payload;
use crate::proto::handshake::Request;
use crate::proto::pubsub::validate_channel;

/// The close code of a disconnect that tells the client not to reconnect (`herald.js`
/// stops on it): 4003, forbidden.
pub const NO_RECONNECT_CODE: u16 = 4003;

/// The longest close reason: a close frame's payload is at most 125 bytes, 2 of them the
/// code (RFC 6455 §5.5).
pub const MAX_REASON_BYTES: usize = 123;

/// Which connections `POST /api/disconnect` closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every connection of this user.
    User(Arc<str>),
    /// This one connection.
    Conn(ConnId),
    /// A connection of a node of the cluster, as cluster presence names it
    /// (`NODE/shard.key.generation`).
    NodeConn { node: Arc<str>, conn: ConnId },
}

/// What a server API request asks for, read and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Disconnect {
        target: Target,
        code: u16,
        reason: Arc<str>,
    },
    Unsubscribe {
        user: Arc<str>,
        channel: ChannelName,
    },
    Presence {
        channel: ChannelName,
        /// The last connection of the page before, as the page named it (node-wide
        /// `shard.key.generation` alone, `NODE/shard.key.generation` in a cluster).
        cursor: Option<Box<str>>,
        limit: usize,
    },
    PresenceStats {
        channel: ChannelName,
    },
    History {
        channel: ChannelName,
        since: Option<u64>,
        limit: usize,
        newest_first: bool,
    },
    Channels {
        pattern: Arc<Patterns>,
        cursor: Option<ChannelName>,
        limit: usize,
    },
    Info,
}

/// Which server API endpoint a path names, before its request is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Disconnect,
    Unsubscribe,
    Presence,
    PresenceStats,
    History,
    Channels,
    Info,
}

impl Endpoint {
    /// The endpoint at `path` and the method it takes.
    pub fn at(path: &str) -> Option<(Self, &'static str)> {
        Some(match path {
            "/api/disconnect" => (Self::Disconnect, "POST"),
            "/api/unsubscribe" => (Self::Unsubscribe, "POST"),
            "/api/presence" => (Self::Presence, "GET"),
            "/api/presence_stats" => (Self::PresenceStats, "GET"),
            "/api/history" => (Self::History, "GET"),
            "/api/channels" => (Self::Channels, "GET"),
            "/api/info" => (Self::Info, "GET"),
            _ => return None,
        })
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    #[serde(default, deserialize_with = "super::given")]
    user: Option<String>,
    #[serde(default, deserialize_with = "super::given")]
    conn: Option<String>,
    #[serde(default, deserialize_with = "super::given")]
    code: Option<u16>,
    #[serde(default, deserialize_with = "super::given")]
    reason: Option<String>,
    #[serde(default, deserialize_with = "super::given")]
    reconnect: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsubscribeBody {
    user: String,
    channel: String,
}

/// Reads the request for `endpoint` (its query, or its JSON body).
pub fn parse(endpoint: Endpoint, request: &Request, body: &[u8]) -> Result<Call, ApiError> {
    match endpoint {
        Endpoint::Disconnect => {
            let body: DisconnectBody = json_body(body)?;
            let target = match (body.user, body.conn) {
                (Some(user), None) if !user.is_empty() => Target::User(user.into()),
                (None, Some(conn)) => match conn.split_once('/') {
                    Some((node, id)) if !node.is_empty() => Target::NodeConn {
                        node: node.into(),
                        conn: id.parse().map_err(bad)?,
                    },
                    _ => Target::Conn(conn.parse().map_err(bad)?),
                },
                _ => return Err(bad("give either \"user\" or \"conn\"")),
            };
            let default_code = match body.reconnect {
                Some(false) => NO_RECONNECT_CODE,
                _ => 4000,
            };
            let code = body.code.unwrap_or(default_code);
            if !matches!(code, 1000 | 1001 | 1008 | 3000..=4999) {
                return Err(bad(
                    "code must be 1000, 1001, 1008 or from 3000 to 4999 (RFC 6455 §7.4)",
                ));
            }
            let reason = body
                .reason
                .unwrap_or_else(|| "disconnected by the server".into());
            if reason.len() > MAX_REASON_BYTES {
                return Err(bad(format!(
                    "reason must be at most {MAX_REASON_BYTES} bytes"
                )));
            }
            Ok(Call::Disconnect {
                target,
                code,
                reason: reason.into(),
            })
        }
        Endpoint::Unsubscribe => {
            let body: UnsubscribeBody = json_body(body)?;
            validate_channel(&body.channel).map_err(|m| ApiError::BadChannel(m.into()))?;
            if body.user.is_empty() {
                return Err(bad("user must not be empty"));
            }
            Ok(Call::Unsubscribe {
                user: body.user.into(),
                channel: body.channel.into(),
            })
        }
        Endpoint::Presence => Ok(Call::Presence {
            channel: channel(request)?,
            cursor: text(request, "cursor")?.map(Into::into),
            limit: limit(request, DEFAULT_PAGE, MAX_PAGE)?,
        }),
        Endpoint::PresenceStats => Ok(Call::PresenceStats {
            channel: channel(request)?,
        }),
        Endpoint::History => Ok(Call::History {
            channel: channel(request)?,
            since: number(request, "since")?,
            limit: limit(request, 100, 1000)?,
            newest_first: match request.query_param("newest_first") {
                None | Some("false") => false,
                Some("true") => true,
                Some(_) => return Err(bad("newest_first must be true or false")),
            },
        }),
        Endpoint::Channels => {
            let pattern = text(request, "pattern")?.unwrap_or_else(|| "*".into());
            if pattern.chars().any(|c| c.is_whitespace() || c.is_control()) {
                // Trimmed, it would read as another pattern than the one asked for.
                return Err(bad(
                    "pattern has whitespace or control characters, which no channel name has",
                ));
            }
            Ok(Call::Channels {
                pattern: Arc::new(Patterns::parse(&[pattern]).map_err(bad)?),
                cursor: text(request, "cursor")?.map(Into::into),
                limit: limit(request, 100, 1000)?,
            })
        }
        Endpoint::Info => Ok(Call::Info),
    }
}

fn json_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON body: {e}")))
}

fn channel(request: &Request) -> Result<ChannelName, ApiError> {
    super::sse::channel_param(request).map(Into::into)
}

fn text(request: &Request, name: &str) -> Result<Option<String>, ApiError> {
    request
        .query_param(name)
        .map(|raw| percent_decode(raw).ok_or_else(|| bad(format!("{name} is not valid UTF-8"))))
        .transpose()
}

fn number(request: &Request, name: &str) -> Result<Option<u64>, ApiError> {
    request
        .query_param(name)
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| bad(format!("{name} must be a non-negative integer")))
        })
        .transpose()
}

/// `limit`, `default` when absent, refused above `max` (a page is bounded).
fn limit(request: &Request, default: usize, max: usize) -> Result<usize, ApiError> {
    match number(request, "limit")? {
        None => Ok(default),
        Some(n @ 1..) if n as usize <= max => Ok(n as usize),
        Some(_) => Err(bad(format!("limit must be from 1 to {max}"))),
    }
}

/// `{"<key>":N}`
pub fn count_json(key: &str, n: u64) -> Vec<u8> {
    format!("{{\"{key}\":{n}}}").into_bytes()
}

/// `{"channels":[{"channel":C,"subscribers":N},..],"cursor":LAST}`, `cursor` `null` on
/// the last page.
pub fn channels_json(channels: &[(ChannelName, u32)], cursor: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + channels.len() * 48);
    out.extend_from_slice(b"{\"channels\":[");
    for (i, (channel, subscribers)) in channels.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"channel\":");
        push_json_str(&mut out, channel);
        out.extend_from_slice(format!(",\"subscribers\":{subscribers}}}").as_bytes());
    }
    out.extend_from_slice(b"],\"cursor\":");
    match cursor {
        Some(cursor) => push_json_str(&mut out, cursor),
        None => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
    out
}

/// `{"type":"history","channel":C,"epoch":E,"seq":S,"oldest":O,"messages":[..]}`: the
/// stored messages (each as subscribers received it), `seq` the channel's latest and
/// `oldest` the first a `since` can still reach.
pub fn history_json(
    channel: &str,
    epoch: &str,
    (seq, oldest): (u64, u64),
    frames: &[Bytes],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + frames.iter().map(Bytes::len).sum::<usize>());
    out.extend_from_slice(b"{\"type\":\"history\",\"channel\":");
    push_json_str(&mut out, channel);
    out.extend_from_slice(b",\"epoch\":");
    push_json_str(&mut out, epoch);
    out.extend_from_slice(format!(",\"seq\":{seq},\"oldest\":{oldest},\"messages\":[").as_bytes());
    for (i, frame) in frames.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&server_frame_payload(frame));
    }
    out.extend_from_slice(b"]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::handshake::{HandshakeLimits, parse_request};

    fn get(target: &str) -> Request {
        let head = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
        parse_request(head.as_bytes(), &HandshakeLimits::default())
            .unwrap()
            .unwrap()
            .0
    }

    fn call(endpoint: Endpoint, target: &str, body: &str) -> Result<Call, ApiError> {
        parse(endpoint, &get(target), body.as_bytes())
    }

    #[test]
    fn disconnect_takes_a_user_or_a_connection_and_a_valid_close() {
        assert_eq!(
            call(
                Endpoint::Disconnect,
                "/",
                r#"{"user":"ann","code":4009,"reason":"bye"}"#
            ),
            Ok(Call::Disconnect {
                target: Target::User("ann".into()),
                code: 4009,
                reason: "bye".into()
            })
        );
        let for_good = call(
            Endpoint::Disconnect,
            "/",
            r#"{"user":"a","reconnect":false}"#,
        );
        assert!(matches!(for_good, Ok(Call::Disconnect { code: 4003, .. })));
        let by_node = call(Endpoint::Disconnect, "/", r#"{"conn":"k3x9/1.2.3"}"#).unwrap();
        assert!(matches!(
            by_node,
            Call::Disconnect {
                target: Target::NodeConn { node, conn: ConnId { shard: 1, key: 2, generation: 3 } },
                ..
            } if &*node == "k3x9"
        ));
        let by_conn = call(Endpoint::Disconnect, "/", r#"{"conn":"1.2.3"}"#).unwrap();
        assert!(matches!(
            by_conn,
            Call::Disconnect {
                target: Target::Conn(_),
                code: 4000,
                ..
            }
        ));
        let long = format!(r#"{{"user":"a","reason":"{}"}}"#, "x".repeat(124));
        for body in [
            r#"{"user":"a","conn":"1.2.3"}"#,
            r#"{}"#,
            r#"{"user":"a","code":1006}"#,
            r#"{"user":"a","cod":4000}"#,
            r#"{"conn":"x"}"#,
            r#"{"user":"a","conn":null}"#,
            r#"{"user":null,"conn":"1.2.3"}"#,
            r#"{"user":"a","code":null}"#,
            r#"{"conn":"k3x9/x"}"#,
            r#"{"conn":"/1.2.3"}"#,
            long.as_str(),
        ] {
            let err = call(Endpoint::Disconnect, "/", body).unwrap_err();
            assert_eq!(err.code(), "bad_request", "{body}: {err}");
        }
    }

    #[test]
    fn queries_are_read_and_bounded() {
        assert_eq!(
            call(
                Endpoint::History,
                "/api/history?channel=a%2Eb&since=3&limit=5",
                ""
            ),
            Ok(Call::History {
                channel: "a.b".into(),
                since: Some(3),
                limit: 5,
                newest_first: false
            })
        );
        for target in [
            "/api/history?channel=a&limit=1001",
            "/api/history?channel=a&limit=0",
            "/api/history?since=1",
            "/api/channels?pattern=a*b",
            "/api/channels?pattern=",
            "/api/channels?pattern=a%20b",
            "/api/channels?pattern=%20chat.*",
        ] {
            let endpoint = Endpoint::at(target.split('?').next().unwrap()).unwrap().0;
            assert!(call(endpoint, target, "").is_err(), "{target}");
        }
        let Ok(Call::Channels { pattern, limit, .. }) =
            call(Endpoint::Channels, "/api/channels?pattern=chat.*", "")
        else {
            panic!("channels");
        };
        assert!(pattern.allows("chat.a") && !pattern.allows("news"));
        assert_eq!(limit, 100);
    }

    #[test]
    fn bodies_are_json() {
        let list = channels_json(&[("a".into(), 2)], Some("a"));
        assert_eq!(
            String::from_utf8(list).unwrap(),
            r#"{"channels":[{"channel":"a","subscribers":2}],"cursor":"a"}"#
        );
        assert_eq!(count_json("disconnected", 3), br#"{"disconnected":3}"#);
    }
}
