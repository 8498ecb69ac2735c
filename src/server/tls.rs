//! Optional TLS, and mutual TLS, for both fronts: a PEM certificate chain and key (and,
//! for mutual TLS, the PEM CA certificates that must have signed every client's
//! certificate) loaded once into one rustls server configuration over the ring
//! provider (installed explicitly, not process-wide), offered as `h2` to gRPC and as
//! `http/1.1` to the HTTP front.
//! Invariant: a handshake runs in its own task under [`HANDSHAKE_TIMEOUT`]; one that
//! fails or stalls drops only its own connection, never the accept loop.
use anyhow::{bail, ensure, Context, Result};
use futures::Stream;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client may take over its handshake before its connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server's TLS material lives (PEM files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsOptions {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that must have signed a client's certificate; None: clients
    /// need none (plain TLS).
    pub client_ca: Option<PathBuf>,
}

impl TlsOptions {
    /// Reads the files and builds the server configuration (no ALPN protocols yet).
    pub fn server_config(&self) -> Result<ServerConfig> {
        let chain = read_certs(&self.cert).context("reading the TLS certificate chain")?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| {
            anyhow::anyhow!("reading the TLS private key {}: {e}", self.key.display())
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("choosing the TLS protocol versions")?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let roots = read_roots(path)?;
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .with_context(|| format!("client CA certificates {}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        builder.with_single_cert(chain, key).with_context(|| {
            format!(
                "the TLS key {} does not serve the certificate {}",
                self.key.display(),
                self.cert.display()
            )
        })
    }
}

/// Every certificate in the PEM file at `path` (at least one).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    ensure!(
        !certs.is_empty(),
        "{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
        path.display()
    );
    Ok(certs)
}

/// The client CA certificates at `path` as trust anchors.
fn read_roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path).context("reading the client CA certificates")? {
        if let Err(e) = roots.add(cert) {
            bail!(
                "{}: a client CA certificate is unusable: {e}",
                path.display()
            );
        }
    }
    Ok(roots)
}

/// One acceptor per front over the same configuration.
#[derive(Clone)]
pub struct TlsAcceptors {
    /// Offers `h2`.
    pub grpc: TlsAcceptor,
    /// Offers `http/1.1` (the HTTP front speaks HTTP/1 only).
    pub http: TlsAcceptor,
}

impl TlsAcceptors {
    pub fn load(opts: &TlsOptions) -> Result<Self> {
        let config = opts.server_config()?;
        let with_alpn = |proto: &[u8]| {
            let mut c = config.clone();
            c.alpn_protocols = vec![proto.to_vec()];
            TlsAcceptor::from(Arc::new(c))
        };
        Ok(Self {
            grpc: with_alpn(b"h2"),
            http: with_alpn(b"http/1.1"),
        })
    }
}

type Handshake = (
    Result<io::Result<TlsStream<TcpStream>>, tokio::time::error::Elapsed>,
    SocketAddr,
);

/// A TCP listener whose connections come out after a successful TLS handshake: an
/// [`axum::serve::Listener`] for the HTTP front, a stream for tonic
/// ([`Self::into_incoming`]). Handshakes still running when it is dropped are aborted.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Handshake>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> Self {
        Self {
            tcp,
            acceptor,
            handshakes: JoinSet::new(),
        }
    }

    /// The connections as a never-ending stream (gRPC's incoming connections).
    pub fn into_incoming(self) -> impl Stream<Item = io::Result<TlsStream<TcpStream>>> + Send {
        futures::stream::unfold(self, |mut listener| async move {
            let (io, _) = axum::serve::Listener::accept(&mut listener).await;
            Some((Ok(io), listener))
        })
    }

    /// Starts the handshake of a new connection in its own task.
    fn start_handshake(&mut self, tcp: TcpStream, peer: SocketAddr) {
        let accept = self.acceptor.accept(tcp);
        self.handshakes.spawn(async move {
            let done = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await;
            (done, peer)
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    /// The next connection whose handshake succeeds; failed ones are logged (debug) and
    /// dropped. Cancel-safe: both awaited futures are.
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                (tcp, peer) = axum::serve::Listener::accept(&mut self.tcp) => {
                    self.start_handshake(tcp, peer);
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    match done {
                        Ok((Ok(Ok(io)), peer)) => return (io, peer),
                        Ok((Ok(Err(e)), peer)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Ok((Err(_), peer)) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                        Err(e) => tracing::debug!(error = %e, "TLS handshake task failed"),
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> TlsOptions {
        TlsOptions {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            client_ca: None,
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!("{:#}", opts(dir.path()).server_config().unwrap_err());
        assert!(err.contains("certificate chain"), "{err}");
        assert!(err.contains("cert.pem"), "{err}");
    }

    #[test]
    fn a_file_without_pem_blocks_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), "not a certificate\n").unwrap();
        let err = format!("{:#}", opts(dir.path()).server_config().unwrap_err());
        assert!(err.contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn a_key_that_does_not_fit_and_a_bad_client_ca_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string()];
        let a = rcgen::generate_simple_self_signed(names.clone()).unwrap();
        let b = rcgen::generate_simple_self_signed(names).unwrap();
        std::fs::write(dir.path().join("cert.pem"), a.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), b.signing_key.serialize_pem()).unwrap();
        let err = format!("{:#}", opts(dir.path()).server_config().unwrap_err());
        assert!(err.contains("does not serve the certificate"), "{err}");

        std::fs::write(dir.path().join("key.pem"), a.signing_key.serialize_pem()).unwrap();
        assert!(opts(dir.path()).server_config().is_ok());
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "").unwrap();
        let with_ca = TlsOptions {
            client_ca: Some(ca),
            ..opts(dir.path())
        };
        let err = format!("{:#}", with_ca.server_config().unwrap_err());
        assert!(err.contains("client CA") && err.contains("ca.pem"), "{err}");
    }
}
