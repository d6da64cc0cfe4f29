//! Who a client is and what it may do: JWT checks (Bearer header or `?token=`), channel
//! permissions from the claims, anonymous defaults, and the `Origin` allow-list.
//!
//! The algorithm is pinned by configuration: a token whose header names any other (HS256
//! against an RSA key, `none`) is refused before its signature is looked at.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Whether clients must, may, or need not present a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No tokens: everyone may subscribe and publish everywhere.
    Off,
    /// A token, when given, must be valid; clients without one get the anonymous
    /// permissions.
    Optional,
    /// Every WebSocket, stream and poll needs a valid token (401 otherwise).
    Required,
}

/// Channel name patterns, the grammar README documents and nothing else: `*`
/// (everything), `prefix.*` (names starting with `prefix.`), or an exact name. A `*`
/// anywhere else (`user.1*`, `a.*.b`, `*.x`) is refused where the pattern is read, so a
/// pattern never matches more than it reads as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns(Vec<Pattern>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Everything,
    /// `prefix.*`, kept as `prefix.`.
    Prefix(Box<str>),
    Exact(Box<str>),
}

impl Patterns {
    /// Reads `patterns`; the error names the first one outside the grammar.
    pub fn parse<S: AsRef<str>>(patterns: &[S]) -> Result<Self, String> {
        patterns
            .iter()
            .map(|p| {
                let p = p.as_ref().trim();
                match p.strip_suffix(".*") {
                    _ if p == "*" => Ok(Pattern::Everything),
                    Some(prefix) if !prefix.is_empty() && !prefix.contains('*') => {
                        Ok(Pattern::Prefix(p[..p.len() - 1].into()))
                    }
                    _ if !p.is_empty() && !p.contains('*') => Ok(Pattern::Exact(p.into())),
                    _ => Err(format!(
                        "channel pattern {p:?} is not valid: use an exact name, `prefix.*` or `*`"
                    )),
                }
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn everything() -> Self {
        Self(vec![Pattern::Everything])
    }

    pub fn allows(&self, channel: &str) -> bool {
        self.0.iter().any(|pattern| match pattern {
            Pattern::Everything => true,
            Pattern::Prefix(prefix) => channel.starts_with(&**prefix),
            Pattern::Exact(name) => **name == *channel,
        })
    }
}

/// The largest `info` claim (its JSON text): a connection holds it once, shared by every
/// home that lists the connection in a channel's presence.
pub const MAX_INFO_BYTES: usize = 1024;

/// What one connection may do, decided at its handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`; `None` for anonymous clients. Shared with the presence entries
    /// of the channels the connection joins.
    pub user: Option<Arc<str>>,
    /// The token's `info` claim: a JSON object of at most [`MAX_INFO_BYTES`], the
    /// connection's public info in presence and join/leave events.
    pub info: Option<Arc<str>>,
    pub subscribe: Patterns,
    pub publish: Patterns,
    /// The token's `exp` plus the leeway (seconds since the Unix epoch): the connection
    /// closes with 4001 then.
    pub expires_at: Option<u64>,
    /// The same moment on the monotonic clock, both clocks read together when the token
    /// was checked: a shard arms its 4001 at this instant, never before the handshake
    /// itself would refuse the token.
    pub runs_out: Option<Instant>,
}

/// Why a token was refused: a 401 before the upgrade, with this as the reason line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required (Authorization: Bearer TOKEN, or ?token=TOKEN)")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's algorithm is not the one this server accepts")]
    WrongAlgorithm,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token is malformed: {0}")]
    Malformed(String),
    /// A `channels` or `publish` claim holds a pattern outside the documented grammar.
    #[error("the token's permissions are not valid: {0}")]
    InvalidPattern(String),
    /// The `info` claim is not a JSON object, or larger than [`MAX_INFO_BYTES`].
    #[error("the token's info claim must be a JSON object of at most {MAX_INFO_BYTES} bytes")]
    InvalidInfo,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    info: Option<serde_json::Value>,
}

/// The `info` claim as the JSON text presence shows, if it is an object within bounds.
fn info_text(info: Option<serde_json::Value>) -> Result<Option<Arc<str>>, AuthError> {
    let Some(info) = info else {
        return Ok(None);
    };
    if !info.is_object() {
        return Err(AuthError::InvalidInfo);
    }
    let text = info.to_string();
    if text.len() > MAX_INFO_BYTES {
        return Err(AuthError::InvalidInfo);
    }
    Ok(Some(text.into()))
}

/// Checks tokens and origins for every shard (shared, read-only).
pub struct Authenticator {
    mode: AuthMode,
    verifier: Option<(DecodingKey, Validation)>,
    anonymous: Arc<Identity>,
    allowed_origins: Vec<Box<str>>,
}

/// The authentication settings, as configured.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    pub mode: Option<AuthMode>,
    pub algorithm: Option<String>,
    pub secret: Option<String>,
    pub public_key_file: Option<std::path::PathBuf>,
    pub leeway: Duration,
    pub anonymous_subscribe: Option<Vec<String>>,
    pub anonymous_publish: Option<Vec<String>>,
    pub allowed_origins: Vec<String>,
}

impl Authenticator {
    /// Builds the checker; errors are configuration mistakes, said plainly.
    pub fn new(settings: &AuthSettings) -> Result<Self, String> {
        let key = match (&settings.secret, &settings.public_key_file) {
            (Some(_), Some(_)) => {
                return Err("give either jwt_secret or jwt_public_key, not both".into());
            }
            (Some(secret), None) => Some((KeyKind::Secret, secret.as_bytes().to_vec())),
            (None, Some(path)) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("cannot read jwt_public_key {}: {e}", path.display()))?;
                Some((KeyKind::Public, pem))
            }
            (None, None) => None,
        };
        let mode = settings.mode.unwrap_or(if key.is_some() {
            AuthMode::Required
        } else {
            AuthMode::Off
        });
        let verifier = match key {
            None if mode != AuthMode::Off => {
                return Err(format!(
                    "auth = {mode:?} needs jwt_secret (HS*) or jwt_public_key (RS*, ES*, EdDSA)"
                ));
            }
            None => None,
            Some((kind, material)) => Some(verifier(kind, &material, settings)?),
        };
        let anonymous_default = |list: &Option<Vec<String>>, default: Patterns| {
            list.as_ref().map_or(Ok(default), |l| {
                Patterns::parse(l).map_err(|e| format!("anonymous permissions: {e}"))
            })
        };
        let (subscribe_default, publish_default) = match mode {
            AuthMode::Off => (Patterns::everything(), Patterns::everything()),
            AuthMode::Optional => (Patterns::everything(), Patterns::default()),
            AuthMode::Required => (Patterns::default(), Patterns::default()),
        };
        Ok(Self {
            mode,
            verifier,
            anonymous: Arc::new(Identity {
                user: None,
                info: None,
                subscribe: anonymous_default(&settings.anonymous_subscribe, subscribe_default)?,
                publish: anonymous_default(&settings.anonymous_publish, publish_default)?,
                expires_at: None,
                runs_out: None,
            }),
            allowed_origins: settings
                .allowed_origins
                .iter()
                .map(|o| o.trim().trim_end_matches('/').into())
                .collect(),
        })
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Browsers send `Origin`; a page from a site not on the list must not ride on a
    /// user's connection (cross-site WebSocket hijacking). An empty list allows any
    /// origin; requests without `Origin` (non-browser clients) are not affected.
    pub fn check_origin(&self, origin: Option<&str>) -> Result<(), String> {
        match origin {
            Some(origin) if !self.allowed_origins.is_empty() => {
                let origin = origin.trim_end_matches('/');
                if self.allowed_origins.iter().any(|o| **o == *origin) {
                    Ok(())
                } else {
                    Err(format!("origin {origin:?} is not allowed"))
                }
            }
            _ => Ok(()),
        }
    }

    /// The identity of a client presenting `token` (from the header or the query).
    pub fn authenticate(&self, token: Option<&str>) -> Result<Arc<Identity>, AuthError> {
        let token = token.map(str::trim).filter(|t| !t.is_empty());
        match (self.mode, token) {
            (AuthMode::Off, _) | (AuthMode::Optional, None) => Ok(self.anonymous.clone()),
            (AuthMode::Required, None) => Err(AuthError::Missing),
            (_, Some(token)) => self.verify(token).map(Arc::new),
        }
    }

    fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let (key, validation) = self
            .verifier
            .as_ref()
            .expect("a verifier exists whenever auth is not off");
        let data =
            jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::WrongAlgorithm
                }
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                _ => AuthError::Malformed(e.to_string()),
            })?;
        let claims = data.claims;
        // The connection lives as long as the token was accepted for (exp plus the
        // leeway); from that second on the handshake refuses it too, so a client cannot
        // loop through accept-then-4001 with the same token.
        let expires_at = claims.exp.map(|exp| exp.saturating_add(validation.leeway));
        let (wall, monotonic) = (SystemTime::now(), Instant::now());
        let since_epoch = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
        if expires_at.is_some_and(|exp| exp <= since_epoch.as_secs()) {
            return Err(AuthError::Expired);
        }
        let runs_out =
            expires_at.map(|exp| monotonic + Duration::from_secs(exp).saturating_sub(since_epoch));
        Ok(Identity {
            user: claims.sub.map(Into::into),
            info: info_text(claims.info)?,
            subscribe: Patterns::parse(&claims.channels).map_err(AuthError::InvalidPattern)?,
            publish: Patterns::parse(&claims.publish).map_err(AuthError::InvalidPattern)?,
            expires_at,
            runs_out,
        })
    }
}

enum KeyKind {
    Secret,
    Public,
}

fn verifier(
    kind: KeyKind,
    material: &[u8],
    settings: &AuthSettings,
) -> Result<(DecodingKey, Validation), String> {
    let default_alg = match kind {
        KeyKind::Secret => "HS256",
        KeyKind::Public => "RS256",
    };
    let name = settings.algorithm.as_deref().unwrap_or(default_alg);
    let algorithm: Algorithm = name
        .parse()
        .map_err(|_| format!("unknown jwt_alg {name:?}"))?;
    let bad_key =
        |e: jsonwebtoken::errors::Error| format!("jwt_public_key is not a {name} public key: {e}");
    let key = match (kind, algorithm) {
        (KeyKind::Secret, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) => {
            if material.len() < 32 {
                return Err("jwt_secret must be at least 32 bytes".into());
            }
            DecodingKey::from_secret(material)
        }
        (KeyKind::Public, Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512)
        | (KeyKind::Public, Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512) => {
            DecodingKey::from_rsa_pem(material).map_err(bad_key)?
        }
        (KeyKind::Public, Algorithm::ES256 | Algorithm::ES384) => {
            DecodingKey::from_ec_pem(material).map_err(bad_key)?
        }
        (KeyKind::Public, Algorithm::EdDSA) => {
            DecodingKey::from_ed_pem(material).map_err(bad_key)?
        }
        (KeyKind::Secret, _) => {
            return Err(format!(
                "jwt_alg {name} needs jwt_public_key, not jwt_secret"
            ));
        }
        (KeyKind::Public, _) => {
            return Err(format!(
                "jwt_alg {name} needs jwt_secret, not jwt_public_key"
            ));
        }
    };
    let mut validation = Validation::new(algorithm);
    validation.leeway = settings.leeway.as_secs();
    validation.validate_nbf = true;
    Ok((key, validation))
}

/// Whether `presented` is the API key. Both sides are hashed and the digests compared in
/// constant time: a plain comparison would return sooner on a wrong length or an early
/// difference, and the time it takes would tell the key's length and bytes.
pub fn api_key_matches(presented: &str, key: &str) -> bool {
    let digest = |s: &str| -> [u8; 32] { Sha256::digest(s.as_bytes()).into() };
    digest(presented)[..].ct_eq(&digest(key)[..]).into()
}

/// The token a request carries: `Authorization: Bearer`, else `?token=`.
pub fn token_of<'a>(
    authorization: Option<&'a str>,
    query_token: Option<&'a str>,
) -> Option<&'a str> {
    authorization
        .and_then(|a| {
            a.strip_prefix("Bearer ")
                .or_else(|| a.strip_prefix("bearer "))
        })
        .or(query_token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn settings() -> AuthSettings {
        AuthSettings {
            secret: Some(SECRET.into()),
            leeway: Duration::from_secs(5),
            ..AuthSettings::default()
        }
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(alg: Algorithm, secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn patterns_match_exact_prefix_and_all() {
        let p = Patterns::parse(&["news", "chat.*", " user.7 "]).unwrap();
        assert!(p.allows("news"));
        assert!(p.allows("chat.room1"));
        assert!(!p.allows("chat"));
        assert!(!p.allows("newsroom"));
        assert!(p.allows("user.7") && !p.allows("user.70"));
        assert!(Patterns::parse(&["*"]).unwrap().allows("anything"));
        assert!(Patterns::everything().allows("anything"));
        assert!(!Patterns::default().allows("x"));
    }

    #[test]
    fn patterns_outside_the_grammar_are_refused_by_name() {
        for bad in ["user.1*", "*.x", "a.*.b", "a**", ".*", "", "**", "a*.*"] {
            let err = Patterns::parse(&["news", bad]).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }

    #[test]
    fn token_with_a_pattern_outside_the_grammar_is_refused() {
        let auth = Authenticator::new(&settings()).unwrap();
        for claims in [
            serde_json::json!({"sub":"u","exp":now()+60,"channels":["user.1*"]}),
            serde_json::json!({"sub":"u","exp":now()+60,"channels":["news"],"publish":["a*b"]}),
        ] {
            let t = token(Algorithm::HS256, SECRET, claims);
            let err = auth.authenticate(Some(&t)).unwrap_err();
            assert!(matches!(err, AuthError::InvalidPattern(_)), "{err:?}");
            assert!(err.to_string().contains("is not valid"), "{err}");
        }
        let bad_anonymous = Authenticator::new(&AuthSettings {
            mode: Some(AuthMode::Optional),
            anonymous_subscribe: Some(vec!["public*".into()]),
            ..settings()
        });
        assert!(bad_anonymous.err().unwrap().contains("\"public*\""));
    }

    #[test]
    fn valid_token_gives_its_permissions() {
        let auth = Authenticator::new(&settings()).unwrap();
        assert_eq!(auth.mode(), AuthMode::Required);
        let t = token(
            Algorithm::HS256,
            SECRET,
            serde_json::json!({"sub":"u1","exp":now()+60,"channels":["news","chat.*"],"publish":["chat.*"]}),
        );
        let id = auth.authenticate(Some(&t)).unwrap();
        assert_eq!(id.user.as_deref(), Some("u1"));
        assert!(id.subscribe.allows("chat.x") && !id.publish.allows("news"));
        assert!(id.runs_out.unwrap() > Instant::now() + Duration::from_secs(50));
    }

    #[test]
    fn info_claim_is_a_bounded_object() {
        let auth = Authenticator::new(&settings()).unwrap();
        let with_info = |info: serde_json::Value| {
            let claims = serde_json::json!({"sub":"u1","exp":now()+60,"info":info});
            auth.authenticate(Some(&token(Algorithm::HS256, SECRET, claims)))
        };
        let id = with_info(serde_json::json!({"name":"Ann"})).unwrap();
        assert_eq!(id.info.as_deref(), Some(r#"{"name":"Ann"}"#));
        for bad in [
            serde_json::json!("Ann"),
            serde_json::json!([1]),
            serde_json::json!({"name": "x".repeat(MAX_INFO_BYTES)}),
        ] {
            let err = with_info(bad).unwrap_err();
            assert_eq!(err, AuthError::InvalidInfo);
            assert!(err.to_string().contains("info claim"), "{err}");
        }
        let claims = serde_json::json!({"sub":"u1","exp":now()+60});
        let plain = auth.authenticate(Some(&token(Algorithm::HS256, SECRET, claims)));
        assert_eq!(plain.unwrap().info, None);
    }

    #[test]
    fn refuses_bad_tokens_with_the_reason() {
        let auth = Authenticator::new(&settings()).unwrap();
        let claims = |exp: u64| serde_json::json!({"sub":"u","exp":exp});
        assert_eq!(auth.authenticate(None).unwrap_err(), AuthError::Missing);
        let expired = token(Algorithm::HS256, SECRET, claims(now() - 60));
        assert_eq!(
            auth.authenticate(Some(&expired)).unwrap_err(),
            AuthError::Expired
        );
        let forged = token(
            Algorithm::HS256,
            "another-secret-another-secret-xx",
            claims(now() + 60),
        );
        assert_eq!(
            auth.authenticate(Some(&forged)).unwrap_err(),
            AuthError::BadSignature
        );
        let other_alg = token(Algorithm::HS512, SECRET, claims(now() + 60));
        assert_eq!(
            auth.authenticate(Some(&other_alg)).unwrap_err(),
            AuthError::WrongAlgorithm
        );
        let early = token(
            Algorithm::HS256,
            SECRET,
            serde_json::json!({"sub":"u","exp":now()+600,"nbf":now()+300}),
        );
        assert_eq!(
            auth.authenticate(Some(&early)).unwrap_err(),
            AuthError::NotYetValid
        );
        // alg "none": header {"alg":"none"}, claims, empty signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert!(matches!(
            auth.authenticate(Some(none)).unwrap_err(),
            AuthError::WrongAlgorithm | AuthError::Malformed(_)
        ));
        assert!(matches!(
            auth.authenticate(Some("x.y")).unwrap_err(),
            AuthError::Malformed(_)
        ));
    }

    #[test]
    fn modes_and_anonymous_permissions() {
        let off = Authenticator::new(&AuthSettings::default()).unwrap();
        assert_eq!(off.mode(), AuthMode::Off);
        assert!(off.authenticate(None).unwrap().publish.allows("x"));
        let optional = Authenticator::new(&AuthSettings {
            mode: Some(AuthMode::Optional),
            anonymous_subscribe: Some(vec!["public.*".into()]),
            ..settings()
        })
        .unwrap();
        let anon = optional.authenticate(None).unwrap();
        assert!(anon.subscribe.allows("public.a") && !anon.subscribe.allows("private"));
        assert!(!anon.publish.allows("public.a"));
        let err = Authenticator::new(&AuthSettings {
            mode: Some(AuthMode::Required),
            ..AuthSettings::default()
        });
        assert!(err.err().unwrap().contains("needs jwt_secret"));
        let short = Authenticator::new(&AuthSettings {
            secret: Some("short".into()),
            ..AuthSettings::default()
        });
        assert!(short.err().unwrap().contains("at least 32 bytes"));
    }

    #[test]
    fn origin_allow_list() {
        let auth = Authenticator::new(&AuthSettings {
            allowed_origins: vec!["https://app.example".into()],
            ..AuthSettings::default()
        })
        .unwrap();
        assert!(auth.check_origin(Some("https://app.example")).is_ok());
        assert!(auth.check_origin(Some("https://evil.example")).is_err());
        assert!(auth.check_origin(None).is_ok());
        let open = Authenticator::new(&AuthSettings::default()).unwrap();
        assert!(open.check_origin(Some("https://evil.example")).is_ok());
    }

    #[test]
    fn api_key_compares_by_content_whatever_the_length() {
        let key = "k3y-0123456789";
        assert!(api_key_matches(key, key));
        for wrong in [
            "",
            "k",
            "k3y-012345678",
            "k3y-0123456788",
            "k3y-01234567890",
            "K3Y-0123456789",
        ] {
            assert!(!api_key_matches(wrong, key), "{wrong:?}");
        }
    }

    #[test]
    fn token_from_header_or_query() {
        assert_eq!(token_of(Some("Bearer abc"), Some("q")), Some("abc"));
        assert_eq!(token_of(None, Some("q")), Some("q"));
        assert_eq!(token_of(Some("Basic x"), None), None);
    }
}
