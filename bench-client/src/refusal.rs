//! A server's refusal of a WebSocket upgrade, told apart by status and Herald's JSON body
//! (`{"code":..,"message":..}`, src/http/error.rs), so a benchmark says which limit
//! refused and which `herald serve` option raises it instead of a bare status.

use std::fmt;

use herald::limits::Refusal as Limit;

/// A non-101 answer to an upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    /// Herald's machine-readable `code`, when the body was its JSON.
    pub(crate) code: Option<String>,
    /// Herald's human `message`, when the body was its JSON.
    pub(crate) message: Option<String>,
}

impl Refusal {
    /// Reads `status` and the body bytes received with the head (Herald writes its
    /// refusals in one piece; a body that is not its JSON leaves code and message empty).
    #[must_use]
    pub(crate) fn parse(status: u16, body: &[u8]) -> Self {
        #[derive(serde::Deserialize)]
        struct Body {
            code: String,
            message: String,
        }
        let body = serde_json::from_slice::<Body>(body).ok();
        Self {
            status,
            code: body.as_ref().map(|body| body.code.clone()),
            message: body.map(|body| body.message),
        }
    }

    /// The connection limit that refused, if it was one of Herald's.
    #[must_use]
    pub(crate) fn limit(&self) -> Option<Limit> {
        Limit::ALL.into_iter().find(|limit| {
            limit.status() == self.status
                && self
                    .message
                    .as_deref()
                    .is_none_or(|message| message == limit.reason())
                && (self.message.is_some() || *limit == Limit::PerIp)
        })
    }

    /// Whether the server refused because this source address holds its share already:
    /// another source address gets in.
    #[must_use]
    pub(crate) fn is_per_address(&self) -> bool {
        self.limit() == Some(Limit::PerIp)
    }

    /// What the status means and what to change, for statuses that are not a limit.
    fn meaning(&self) -> &'static str {
        match self.status {
            400 => "a malformed request",
            401 => "no valid token: pass one with ?token= in --url",
            403 => "origin or permission refused (the server's --allowed-origins, --auth)",
            404 => "no such path: Herald's WebSocket endpoints are /ws and /echo",
            426 => "the server wants another WebSocket version",
            429 => "too many requests from this address",
            431 => "request headers too large",
            503 => "the server is draining or overloaded",
            _ => "refused",
        }
    }
}

/// One line, also the label failures are counted under: the status, what it means and the
/// option that raises the limit.
impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http {}", self.status)?;
        if let Some(code) = &self.code {
            write!(f, " {code}")?;
        }
        match self.limit() {
            Some(limit) => write!(
                f,
                ": {} (raise the server's {}",
                limit.reason(),
                limit.flag()
            )?,
            None => write!(
                f,
                ": {}",
                self.message.as_deref().unwrap_or_else(|| self.meaning())
            )?,
        }
        match self.limit() {
            Some(Limit::PerIp) => f.write_str(", or spread over more --source-ips)"),
            Some(_) => f.write_str(")"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn herald(limit: Limit) -> Refusal {
        let body = format!(r#"{{"code":"retry_later","message":"{}"}}"#, limit.reason());
        Refusal::parse(limit.status(), body.as_bytes())
    }

    #[test]
    fn names_the_limit_and_the_option_that_raises_it() {
        for limit in Limit::ALL {
            let refusal = herald(limit);
            assert_eq!(refusal.limit(), Some(limit));
            let line = refusal.to_string();
            assert!(line.starts_with(&format!("http {} retry_later: ", limit.status())));
            assert!(line.contains(limit.flag()), "{line}");
        }
        assert!(herald(Limit::PerIp).is_per_address());
        assert!(!herald(Limit::Full).is_per_address());
    }

    #[test]
    fn a_bare_429_is_the_per_address_cap_and_other_statuses_say_what_they_mean() {
        assert!(Refusal::parse(429, b"").is_per_address());
        let unavailable = Refusal::parse(503, b"");
        assert_eq!(unavailable.limit(), None);
        assert_eq!(
            unavailable.to_string(),
            "http 503: the server is draining or overloaded"
        );
        let token = Refusal::parse(401, br#"{"code":"unauthorized","message":"token expired"}"#);
        assert_eq!(token.to_string(), "http 401 unauthorized: token expired");
        assert!(
            Refusal::parse(404, b"nope")
                .to_string()
                .contains("/ws and /echo")
        );
    }
}
