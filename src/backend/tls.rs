//! TLS as a transport under the shard, with rustls: the shard keeps speaking plaintext
//! (`read_buffer`/`handle_read`, `outbox`/`handle_written`) and never learns that the
//! socket carries TLS records. This module does no IO of its own, so any backend can drive
//! a [`TlsSession`]: the epoll backend does, and an io_uring one can with owned buffers.
//!
//! Calling contract of a [`TlsSession`], per connection:
//! - **Inbound.** Every byte read from the socket goes to
//!   [`TlsSession::handle_ciphertext`], which appends the decrypted bytes to the shard's
//!   read buffer (then call `Shard::handle_read`). It may also queue handshake records or
//!   an alert: write them out (below) after each call. A call takes every byte or
//!   returns: after the peer's `close_notify` ([`Inbound::PeerClosed`]) the rest is
//!   discarded, and on `Err` the session is over; either way, end the connection.
//! - **Outbound.** [`TlsSession::encrypt`] takes plaintext from the outbox's slices and
//!   returns how much it took (tell the shard with `Shard::handle_written`). It takes no
//!   more than [`PENDING_CIPHERTEXT_LIMIT`] ahead of the socket, and nothing while records
//!   still wait for it, so everything else stays in the outbox where the shard's budget
//!   and slow-consumer policy see it.
//! - **Wire.** While [`TlsSession::wants_write`], call [`TlsSession::write_ciphertext`]
//!   with the socket (or a buffer the backend submits); partial writes and `EAGAIN` leave
//!   the rest queued for the next call.
//! - **Closing.** When the shard says the connection is flushed, call
//!   [`TlsSession::send_close_notify`], write the ciphertext out, then shut the socket's
//!   write side. A session still in its handshake has nothing to say: drop the socket.
//!
//! A broadcast frame is still encoded once by the hub: each connection only encrypts the
//! shared bytes, straight from the `Bytes` handles (several frames per record when they
//! are queued together).
//!
//! [`TlsAcceptor`] holds the server configuration that new sessions start from; SIGHUP
//! swaps it for one built from the files as they are now, and a file that does not load
//! leaves the old configuration in place. Sessions already running keep their own.

use std::io::{self, IoSlice, Read, Write};
use std::sync::{Arc, RwLock};

use bytes::BytesMut;
use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};

use crate::config::TlsFiles;

/// Most ciphertext a session holds ahead of the socket (two full records). Bytes the
/// session has taken are invisible to the shard's outbound budget, so this stays small.
pub const PENDING_CIPHERTEXT_LIMIT: usize = 32 * 1024;

/// The content type of a TLS handshake record: the first byte of every TLS client.
const HANDSHAKE_RECORD: u8 = 0x16;

/// Why a configuration could not be built from the files.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read TLS certificate {path}: {source}")]
    Certificate {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("no certificate in {0}")]
    NoCertificate(String),
    #[error("cannot read TLS private key {path}: {source}")]
    Key {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Why a session ended on something the peer sent.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The first byte is not a TLS handshake record: some other protocol, often plain
    /// HTTP (then the backend answers [`ApiError::TlsRequired`](crate::http::ApiError)).
    #[error("not TLS (first byte {first_byte:#04x})")]
    NotTls { first_byte: u8 },
    /// A handshake failure, a bad record, an alert from the peer. The session has queued
    /// the alert to send, if any.
    #[error("tls: {0}")]
    Protocol(#[from] rustls::Error),
    /// rustls took none of the bytes offered although the peer has not closed: nothing
    /// more can be read from this session.
    #[error("tls: the session takes no more input")]
    Stalled,
}

impl TlsError {
    /// Whether the peer most likely sent a plain-text HTTP request (starts with a method).
    pub fn is_plain_http(&self) -> bool {
        matches!(self, Self::NotTls { first_byte } if first_byte.is_ascii_uppercase())
    }
}

/// What the peer's records amounted to, besides the plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// More may come.
    Open,
    /// The peer sent `close_notify`: it will send nothing more (its end of stream).
    PeerClosed,
}

/// The current server configuration, from which every new session starts.
pub struct TlsAcceptor {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsAcceptor {
    /// Loads the certificate chain and key, or says what is wrong with them.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsSetupError> {
        Ok(Self {
            current: RwLock::new(server_config(files)?),
            files: files.clone(),
        })
    }

    /// Rebuilds the configuration from the files; on error the old one stays in use.
    pub fn reload(&self) -> Result<(), TlsSetupError> {
        let fresh = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// A session for a newly accepted connection.
    pub fn accept(&self) -> TlsSession {
        let config = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut conn = ServerConnection::new(config)
            .expect("a server session needs nothing that can fail at start");
        conn.set_buffer_limit(Some(PENDING_CIPHERTEXT_LIMIT));
        TlsSession {
            conn,
            seen_first_byte: false,
        }
    }
}

/// TLS 1.3 and 1.2 with forward-secret (ECDHE) key exchange and AEAD ciphers only, ALPN
/// `http/1.1`. rustls has no renegotiation, compression or export suites; 0-RTT stays off
/// (its default), since a replayed WebSocket upgrade or publish is not harmless.
fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let cert_path = files.cert.display().to_string();
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsSetupError::Certificate {
            path: cert_path.clone(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsSetupError::NoCertificate(cert_path));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsSetupError::Key {
        path: files.key.display().to_string(),
        source,
    })?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// ring builds with a C compiler alone (aws-lc-rs also needs cmake and takes minutes);
/// the suites are listed here so the policy is visible, strongest first.
fn provider() -> CryptoProvider {
    use ring::cipher_suite::*;
    CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_256_GCM_SHA384,
            TLS13_AES_128_GCM_SHA256,
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        ..ring::default_provider()
    }
}

/// One connection's TLS state (see the module doc for the calling contract).
pub struct TlsSession {
    conn: ServerConnection,
    seen_first_byte: bool,
}

impl TlsSession {
    /// Decrypts `ciphertext`, appending the plaintext to `plaintext`. On `Err` the
    /// plaintext already appended is still valid, and the session may have an alert to
    /// write before the socket is dropped.
    pub fn handle_ciphertext(
        &mut self,
        mut ciphertext: &[u8],
        plaintext: &mut BytesMut,
    ) -> Result<Inbound, TlsError> {
        if !self.seen_first_byte
            && let Some(&first_byte) = ciphertext.first()
        {
            if first_byte != HANDSHAKE_RECORD {
                return Err(TlsError::NotTls { first_byte });
            }
            self.seen_first_byte = true;
        }
        // Every turn either takes bytes from `ciphertext` or returns: once the peer has
        // closed, rustls takes nothing more, and waiting for it to would spin forever.
        while !ciphertext.is_empty() {
            // From a slice this fails only on a full buffer inside rustls, which the
            // plaintext drain below never lets happen: either way the session is over.
            let taken = self
                .conn
                .read_tls(&mut ciphertext)
                .map_err(|e| TlsError::Protocol(rustls::Error::General(e.to_string())))?;
            let state = self.conn.process_new_packets()?;
            let ready = state.plaintext_bytes_to_read();
            if ready > 0 {
                let start = plaintext.len();
                plaintext.resize(start + ready, 0);
                self.conn
                    .reader()
                    .read_exact(&mut plaintext[start..])
                    .expect("rustls said this much plaintext is ready");
            }
            if state.peer_has_closed() {
                // What follows `close_notify` is not part of the session (RFC 8446,
                // 6.1): the rest of `ciphertext` is dropped unread.
                return Ok(Inbound::PeerClosed);
            }
            if taken == 0 {
                return Err(TlsError::Stalled);
            }
        }
        Ok(Inbound::Open)
    }

    /// Takes plaintext from `slices` (in order) into TLS records, no more than the pending
    /// ciphertext limit allows, and nothing while records still wait for the wire;
    /// returns how many bytes it took. Before the handshake ends the plaintext waits
    /// inside the session, under the same limit.
    pub fn encrypt(&mut self, slices: &[IoSlice<'_>]) -> usize {
        if self.conn.wants_write() {
            // rustls limits the records it makes from data, but not the key update it
            // owes a peer that asked for one, which goes out with the next data: a peer
            // asking again and again without reading would grow the backlog forever.
            return 0;
        }
        // Writing into a session never blocks or fails before it is closed; a closed one
        // takes nothing, and the connection ends by its own path.
        self.conn.writer().write_vectored(slices).unwrap_or(0)
    }

    /// Whether records wait to be written to the socket.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Writes queued records to `wire` (one vectored write); keeps what was not taken.
    pub fn write_ciphertext(&mut self, wire: &mut dyn Write) -> io::Result<usize> {
        self.conn.write_tls(wire)
    }

    /// Queues `close_notify`: nothing more will be sent in this session.
    pub fn send_close_notify(&mut self) {
        self.conn.send_close_notify();
    }

    /// Whether the handshake has not finished yet.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    use super::*;

    /// A server session and a client that trusts it, with the files they came from.
    struct Pair {
        server: TlsSession,
        client: ClientConnection,
        dir: PathBuf,
    }

    impl Drop for Pair {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn files(dir: &std::path::Path) -> TlsFiles {
        TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }

    fn pair(name: &str) -> Pair {
        let dir =
            std::env::temp_dir().join(format!("herald-tls-unit-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        let acceptor = TlsAcceptor::load(&files(&dir)).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client =
            ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
                .unwrap();
        Pair {
            server: acceptor.accept(),
            client,
            dir,
        }
    }

    impl Pair {
        /// Moves records both ways until neither side has any; returns the plaintext the
        /// server received and what the last server call said.
        fn drive(&mut self) -> (BytesMut, Inbound) {
            let mut received = BytesMut::new();
            let mut inbound = Inbound::Open;
            for _ in 0..20 {
                let mut to_server = Vec::new();
                while self.client.wants_write() {
                    self.client.write_tls(&mut to_server).unwrap();
                }
                if !to_server.is_empty() {
                    inbound = self
                        .server
                        .handle_ciphertext(&to_server, &mut received)
                        .unwrap();
                }
                let mut to_client = Vec::new();
                while self.server.wants_write() {
                    self.server.write_ciphertext(&mut to_client).unwrap();
                }
                if to_server.is_empty() && to_client.is_empty() {
                    break;
                }
                let mut slice = &to_client[..];
                while !slice.is_empty() {
                    self.client.read_tls(&mut slice).unwrap();
                    self.client.process_new_packets().unwrap();
                }
            }
            (received, inbound)
        }
    }

    #[test]
    fn plaintext_flows_both_ways_and_close_notify_ends_the_stream() {
        let mut pair = pair("flow");
        pair.client
            .writer()
            .write_all(b"GET /ws HTTP/1.1\r\n")
            .unwrap();
        let (received, inbound) = pair.drive();
        assert!(!pair.server.is_handshaking());
        assert_eq!(&received[..], b"GET /ws HTTP/1.1\r\n");
        assert_eq!(inbound, Inbound::Open);

        let frames = [&b"first "[..], b"second"];
        let slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
        assert_eq!(pair.server.encrypt(&slices), 12);
        pair.drive();
        let mut got = vec![0; 12];
        pair.client.reader().read_exact(&mut got).unwrap();
        assert_eq!(got, b"first second");

        pair.client.send_close_notify();
        let (_, inbound) = pair.drive();
        assert_eq!(inbound, Inbound::PeerClosed);
    }

    /// Runs `f` on a thread and fails the test if it has not returned within 5 s: a
    /// session that spins must fail here, not hang the test run.
    fn returns_promptly<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("the session did not return within 5 s: it spins")
    }

    #[test]
    fn bytes_after_close_notify_are_discarded_and_every_call_returns() {
        let mut pair = pair("closejunk");
        pair.drive();
        pair.client.writer().write_all(b"last words").unwrap();
        pair.client.send_close_notify();
        let mut wire = Vec::new();
        while pair.client.wants_write() {
            pair.client.write_tls(&mut wire).unwrap();
        }
        // Junk after the alert in the same write: some of it looks like records.
        wire.extend((0..4096u32).map(|i| (i * 31 % 251) as u8));
        wire.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x10]);
        let mut server = std::mem::replace(
            &mut pair.server,
            TlsAcceptor::load(&files(&pair.dir)).unwrap().accept(),
        );
        let (server, received, inbound) = returns_promptly(move || {
            let mut received = BytesMut::new();
            let inbound = server.handle_ciphertext(&wire, &mut received).unwrap();
            (server, received, inbound)
        });
        assert_eq!(inbound, Inbound::PeerClosed);
        assert_eq!(&received[..], b"last words");
        // More bytes on a closed session: the same answer at once, and nothing read.
        let (_, received, inbound) = returns_promptly(move || {
            let mut server = server;
            let mut received = BytesMut::new();
            let inbound = server.handle_ciphertext(&[0x17; 9000], &mut received);
            (server, received, inbound.unwrap())
        });
        assert_eq!(inbound, Inbound::PeerClosed);
        assert!(received.is_empty());
    }

    #[test]
    fn a_peer_that_never_reads_cannot_grow_the_pending_ciphertext() {
        let mut pair = pair("backlog");
        pair.drive();
        let payload = vec![9u8; 1000];
        let mut sent = 0;
        let mut received = BytesMut::new();
        // Data, and each time a key update that asks for one back, while the server
        // keeps offering data of its own and nothing it writes is ever taken.
        for _ in 0..2000 {
            pair.client.writer().write_all(&payload).unwrap();
            sent += payload.len();
            pair.client.refresh_traffic_keys().unwrap();
            let mut wire = Vec::new();
            while pair.client.wants_write() {
                pair.client.write_tls(&mut wire).unwrap();
            }
            assert_eq!(
                pair.server.handle_ciphertext(&wire, &mut received).unwrap(),
                Inbound::Open
            );
            pair.server.encrypt(&[IoSlice::new(&payload)]);
        }
        assert_eq!(received.len(), sent);
        let mut pending = Vec::new();
        while pair.server.wants_write() {
            pair.server.write_ciphertext(&mut pending).unwrap();
        }
        assert!(
            pending.len() <= PENDING_CIPHERTEXT_LIMIT + 1024,
            "{} bytes of ciphertext waited for the peer",
            pending.len()
        );
    }

    #[test]
    fn encrypt_takes_no_more_than_the_pending_limit_until_the_wire_drains() {
        let mut pair = pair("limit");
        pair.drive();
        let big = vec![7u8; 4 * PENDING_CIPHERTEXT_LIMIT];
        let taken = pair.server.encrypt(&[IoSlice::new(&big)]);
        assert!(
            taken > 0 && taken <= PENDING_CIPHERTEXT_LIMIT,
            "took {taken}"
        );
        assert_eq!(pair.server.encrypt(&[IoSlice::new(&big[taken..])]), 0);
        let mut wire = Vec::new();
        while pair.server.wants_write() {
            pair.server.write_ciphertext(&mut wire).unwrap();
        }
        assert!(pair.server.encrypt(&[IoSlice::new(&big[taken..])]) > 0);
    }

    #[test]
    fn bytes_that_are_not_tls_are_refused_and_plain_http_is_recognised() {
        let mut pair = pair("nottls");
        let err = pair
            .server
            .handle_ciphertext(b"GET / HTTP/1.1\r\n", &mut BytesMut::new())
            .unwrap_err();
        assert!(err.is_plain_http(), "{err}");
        let mut other = TlsAcceptor::load(&files(&pair.dir)).unwrap().accept();
        let err = other
            .handle_ciphertext(&[0x00, 0x01], &mut BytesMut::new())
            .unwrap_err();
        assert!(!err.is_plain_http());
    }

    #[test]
    fn bad_files_are_errors_and_a_reload_keeps_the_old_configuration() {
        let pair = pair("files");
        let acceptor = TlsAcceptor::load(&files(&pair.dir)).unwrap();
        std::fs::write(pair.dir.join("cert.pem"), "no PEM here").unwrap();
        let err = acceptor.reload().unwrap_err();
        assert!(matches!(err, TlsSetupError::NoCertificate(_)), "{err}");
        // Sessions still start from the configuration loaded before.
        drop(acceptor.accept());
        let missing = TlsFiles {
            cert: pair.dir.join("absent.pem"),
            key: pair.dir.join("key.pem"),
        };
        let err = TlsAcceptor::load(&missing).err().unwrap();
        assert!(err.to_string().contains("absent.pem"), "{err}");
    }
}
