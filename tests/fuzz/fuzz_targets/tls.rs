//! `backend::tls::TlsSession` after a completed handshake with a rustls client, fed
//! record sequences: well-formed ones the client makes (data, key updates, close_notify)
//! mixed with raw bytes, delivered in chunks, while the server offers data of its own.
//!
//! Input layout: byte 0 picks TLS 1.2 (odd) or 1.3 (even), then operations, one byte
//! each (`op % 7`), some followed by a length byte:
//! 0 LEN DATA: the client sends LEN bytes of data; 1: the client sends close_notify;
//! 2: the client asks for a key update; 3 LEN BYTES: LEN raw bytes go on the wire;
//! 4 SIZE: the wire goes to the server in chunks of SIZE (0: at once); 5 N: the server
//! offers N * 128 bytes of data; 6: the client reads what the server wrote.
//! Whatever is left on the wire at the end goes to the server, then to the client.
//!
//! Invariants:
//! - every call returns (a spin is a libFuzzer timeout) and never panics;
//! - a call appends no more plaintext than the ciphertext it was given plus one record
//!   held from before, no more than all the ciphertext so far, and everything the server
//!   received is a prefix of what the client sent;
//! - after `PeerClosed` or an error, later calls append nothing and never say `Open`;
//! - the ciphertext waiting for the peer stays under the pending limit plus one record's
//!   overhead and a key update, however long the peer does not read.
#![no_main]

use std::io::{IoSlice, Read, Write};
use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use herald::backend::tls::{Inbound, PENDING_CIPHERTEXT_LIMIT, TlsAcceptor, TlsSession};
use herald::config::TlsFiles;
use libfuzzer_sys::fuzz_target;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

/// Most ciphertext the session may hold beyond [`PENDING_CIPHERTEXT_LIMIT`]: record
/// headers and tags of the data it took, an alert, a key update.
const PENDING_SLACK: usize = 2048;
/// The largest TLS record on the wire (TLS 1.2 allows 2048 bytes of expansion): the most
/// rustls holds back from one call to the next.
const MAX_RECORD: usize = 5 + 16 * 1024 + 2048;

/// What the server offers to send (op 5), allocated once: the fewer allocations per
/// input, the less AddressSanitizer's quarantine holds.
static OFFERED: [u8; 255 * 128] = [b'x'; 255 * 128];

/// One certificate for the whole run: a handshake per input is the cost, not key
/// generation.
struct Fixture {
    acceptor: TlsAcceptor,
    tls12: Arc<ClientConfig>,
    tls13: Arc<ClientConfig>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let dir = std::env::temp_dir().join(format!("herald-fuzz-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        let acceptor = TlsAcceptor::load(&files).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let der: CertificateDer<'static> = cert.der().clone();
        let client = |version| {
            let mut roots = RootCertStore::empty();
            roots.add(der.clone()).unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(config)
        };
        Fixture {
            acceptor,
            tls12: client(&rustls::version::TLS12),
            tls13: client(&rustls::version::TLS13),
        }
    })
}

/// The server side under test and what it has done so far.
struct Server {
    session: TlsSession,
    received: BytesMut,
    /// Ciphertext handed to the session so far.
    fed: usize,
    /// Set once a call said `PeerClosed` or failed.
    ended: bool,
}

impl Server {
    /// Hands `ciphertext` to the session in chunks of `size` (0: at once).
    fn feed(&mut self, ciphertext: &[u8], size: usize) {
        let size = if size == 0 {
            ciphertext.len().max(1)
        } else {
            size
        };
        for chunk in ciphertext.chunks(size) {
            let before = self.received.len();
            let result = self.session.handle_ciphertext(chunk, &mut self.received);
            let appended = self.received.len() - before;
            self.fed += chunk.len();
            assert!(
                appended <= chunk.len() + MAX_RECORD && self.received.len() <= self.fed,
                "{appended} bytes of plaintext from {} of ciphertext ({} of {} in all)",
                chunk.len(),
                self.received.len(),
                self.fed
            );
            if self.ended {
                assert_eq!(appended, 0, "plaintext after the session ended");
                assert!(
                    !matches!(result, Ok(Inbound::Open)),
                    "an ended session says Open"
                );
            }
            if !matches!(result, Ok(Inbound::Open)) {
                self.ended = true;
            }
        }
    }

    /// Everything the session has for the wire, checked against the pending bound.
    fn drain(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while self.session.wants_write() {
            self.session.write_ciphertext(&mut out).unwrap();
        }
        assert!(
            out.len() <= PENDING_CIPHERTEXT_LIMIT + PENDING_SLACK,
            "{} bytes of ciphertext waited for the peer",
            out.len()
        );
        out
    }
}

/// Moves records both ways until the handshake is over (or cannot finish).
fn handshake(client: &mut ClientConnection, server: &mut Server) -> bool {
    for _ in 0..10 {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        server.feed(&wire, 0);
        let back = server.drain();
        let mut back = &back[..];
        while !back.is_empty() {
            if client.read_tls(&mut back).is_err() || client.process_new_packets().is_err() {
                return false;
            }
        }
        if !client.is_handshaking() && !server.session.is_handshaking() && !client.wants_write() {
            return !server.ended;
        }
    }
    false
}

/// The client takes what the server wrote; its own errors are not under test.
fn client_reads(client: &mut ClientConnection, ciphertext: &[u8]) {
    let mut rest = ciphertext;
    while !rest.is_empty() {
        match client.read_tls(&mut rest) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if client.process_new_packets().is_err() {
            return;
        }
        let mut sink = [0u8; 4096];
        while matches!(client.reader().read(&mut sink), Ok(n) if n > 0) {}
    }
}

fuzz_target!(|data: &[u8]| {
    let [version, ops @ ..] = data else {
        return;
    };
    let fixture = fixture();
    let config = if version & 1 == 1 {
        fixture.tls12.clone()
    } else {
        fixture.tls13.clone()
    };
    let name = ServerName::try_from("localhost").unwrap();
    let mut client = ClientConnection::new(config, name).unwrap();
    let mut server = Server {
        session: fixture.acceptor.accept(),
        received: BytesMut::new(),
        fed: 0,
        ended: false,
    };
    assert!(handshake(&mut client, &mut server), "the handshake failed");

    let mut sent = Vec::new();
    let mut wire = Vec::new();
    let mut ops = ops.iter().copied();
    while let Some(op) = ops.next() {
        match op % 7 {
            0 => {
                let len = usize::from(ops.next().unwrap_or(0));
                let payload: Vec<u8> = ops.by_ref().take(len).collect();
                let taken = client.writer().write(&payload).unwrap_or(0);
                sent.extend_from_slice(&payload[..taken]);
            }
            1 => client.send_close_notify(),
            2 => {
                let _ = client.refresh_traffic_keys();
            }
            3 => {
                let len = usize::from(ops.next().unwrap_or(0));
                wire.extend(ops.by_ref().take(len));
            }
            4 => {
                let size = usize::from(ops.next().unwrap_or(0));
                server.feed(&std::mem::take(&mut wire), size);
            }
            5 => {
                let n = usize::from(ops.next().unwrap_or(0)) * 128;
                server.session.encrypt(&[IoSlice::new(&OFFERED[..n])]);
            }
            _ => {
                let out = server.drain();
                client_reads(&mut client, &out);
            }
        }
        // The client's records go on the wire in order with the raw bytes.
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
    }
    server.feed(&wire, 0);
    let out = server.drain();
    client_reads(&mut client, &out);
    assert!(
        sent.starts_with(&server.received),
        "the server received bytes the client never sent"
    );
});
