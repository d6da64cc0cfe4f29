//! wss:// and https:// for the benchmark, with rustls (ring, as the server uses): the
//! client configuration (verified against SSL_CERT_FILE or the system bundle, or not at
//! all with `--insecure`), and a blocking connection that a reader thread and a writer
//! thread can share (the publisher's). The many-connection engine drives
//! `rustls::ClientConnection` itself, sans-IO, in `load.rs`.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, StreamOwned};

/// Debian's CA bundle, used when SSL_CERT_FILE is not set.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The client configuration for every TLS connection of a run.
///
/// # Errors
/// No readable CA file when the certificate is to be verified.
pub(crate) fn client_config(insecure: bool) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?;
    let mut config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        let file = std::env::var_os("SSL_CERT_FILE")
            .map_or_else(|| PathBuf::from(SYSTEM_BUNDLE), PathBuf::from);
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&file)
            .with_context(|| format!("reading CA certificates from {}", file.display()))?
        {
            let cert = cert.with_context(|| format!("parsing {}", file.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("a CA certificate in {}", file.display()))?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The server name to verify and send as SNI: the URL's host without its port.
///
/// # Errors
/// A host that is neither a DNS name nor an IP address.
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>> {
    let bare = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let bare = bare.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_owned()).with_context(|| format!("{bare:?} as a TLS server name"))
}

/// `--insecure`: accepts any certificate (self-signed test ones), but still checks that the
/// server holds the key of the certificate it sent.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A blocking connection, plain or TLS, used by one thread (read and write).
pub(crate) enum Wire {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Wire {
    /// Wraps a connected socket; `tls` gives the configuration and server name for wss.
    ///
    /// # Errors
    /// A session that cannot start (an unusable configuration).
    pub(crate) fn new(
        stream: TcpStream,
        tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    ) -> Result<Self> {
        Ok(match tls {
            None => Self::Plain(stream),
            Some((config, name)) => Self::Tls(Box::new(StreamOwned::new(
                ClientConnection::new(config, name).context("TLS session")?,
                stream,
            ))),
        })
    }

    /// Splits into a reader for one thread and a writer for others.
    ///
    /// # Errors
    /// The socket cannot be duplicated.
    pub(crate) fn split(self) -> io::Result<(WireReader, WireWriter)> {
        match self {
            Self::Plain(stream) => Ok((
                WireReader::Plain(stream.try_clone()?),
                WireWriter::Plain(stream),
            )),
            Self::Tls(owned) => {
                let StreamOwned { conn, sock } = *owned;
                let session = Arc::new(Mutex::new(conn));
                Ok((
                    WireReader::Tls {
                        session: session.clone(),
                        socket: sock.try_clone()?,
                        writer: sock.try_clone()?,
                        ciphertext: vec![0; 32 * 1024],
                    },
                    WireWriter::Tls {
                        session,
                        socket: sock,
                    },
                ))
            }
        }
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(stream) => stream.read(buf),
            Self::Tls(owned) => owned.read(buf),
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(stream) => stream.write(buf),
            Self::Tls(owned) => owned.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(stream) => stream.flush(),
            Self::Tls(owned) => owned.flush(),
        }
    }
}

/// The reading half of a split [`Wire`]: reads ciphertext without holding the session, so
/// the writer is never blocked by a read waiting for the server.
pub(crate) enum WireReader {
    Plain(TcpStream),
    Tls {
        session: Arc<Mutex<ClientConnection>>,
        socket: TcpStream,
        /// For records the session must answer (alerts, key updates).
        writer: TcpStream,
        ciphertext: Vec<u8>,
    },
}

impl Read for WireReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (session, socket, writer, ciphertext) = match self {
            Self::Plain(stream) => return stream.read(buf),
            Self::Tls {
                session,
                socket,
                writer,
                ciphertext,
            } => (session, socket, writer, ciphertext),
        };
        loop {
            {
                let mut session = session.lock().expect("session lock");
                match session.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    done => return done,
                }
            }
            let n = socket.read(ciphertext)?;
            let mut session = session.lock().expect("session lock");
            if n == 0 {
                return Ok(0);
            }
            let mut fed = &ciphertext[..n];
            while !fed.is_empty() {
                session.read_tls(&mut fed)?;
                session
                    .process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
            while session.wants_write() {
                session.write_tls(writer)?;
            }
        }
    }
}

/// The writing half of a split [`Wire`].
pub(crate) enum WireWriter {
    Plain(TcpStream),
    Tls {
        session: Arc<Mutex<ClientConnection>>,
        socket: TcpStream,
    },
}

impl WireWriter {
    /// Shuts the socket down both ways: a reader blocked on the other half returns.
    pub(crate) fn shutdown(&self) {
        let socket = match self {
            Self::Plain(stream) | Self::Tls { socket: stream, .. } => stream,
        };
        let _ = socket.shutdown(std::net::Shutdown::Both);
    }
}

impl Write for WireWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(stream) => stream.write(buf),
            Self::Tls { session, socket } => {
                let mut session = session.lock().expect("session lock");
                let n = session.writer().write(buf)?;
                while session.wants_write() {
                    session.write_tls(socket)?;
                }
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(stream) => stream.flush(),
            Self::Tls { .. } => Ok(()),
        }
    }
}
