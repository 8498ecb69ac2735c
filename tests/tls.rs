//! TLS and mutual TLS on both fronts (`ServerOptions::tls`): with a client CA, a client
//! without a certificate or with one from another CA cannot connect (gRPC or HTTP), and
//! the next client with a good certificate still gets its answer; without a client CA,
//! a client that trusts the server's CA needs no certificate, a plaintext client gets
//! nothing, and a client that stalls its handshake holds up no one else.
mod common;

use common::{generate, greedy, TestServer};
use hyper_util::rt::TokioIo;
use multilora::proto::v1 as pb;
use multilora::server::tls::TlsOptions;
use multilora::server::{RunningServer, ServerOptions};
use pb::generation_client::GenerationClient;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long a TLS exchange may take here: under the server's handshake timeout, so that
/// a handshake that blocked the accept loop would show.
const PROMPT: Duration = Duration::from_secs(5);

/// A certificate and its key.
struct Leaf {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Leaf {
    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::try_from(self.key.serialize_der()).unwrap()
    }
}

/// A self-signed CA named `name`.
fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate for `usage` (server: localhost and 127.0.0.1) signed by `ca`.
fn leaf(ca: &CertifiedIssuer<'static, KeyPair>, usage: ExtendedKeyUsagePurpose) -> Leaf {
    let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "test");
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    Leaf { cert, key }
}

/// The test's PKI: the server's CA (which also signs the good client) and another CA.
struct Pki {
    dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    good_client: Leaf,
    stranger: Leaf,
}

impl Pki {
    /// Mints the certificates and writes the server's files (cert.pem, key.pem, ca.pem).
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("multilora test CA");
        let server = leaf(&ca, ExtendedKeyUsagePurpose::ServerAuth);
        let good_client = leaf(&ca, ExtendedKeyUsagePurpose::ClientAuth);
        let stranger = leaf(&self::ca("another CA"), ExtendedKeyUsagePurpose::ClientAuth);
        std::fs::write(dir.path().join("cert.pem"), server.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), server.key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki {
            dir,
            ca,
            good_client,
            stranger,
        }
    }

    fn options(&self, mutual: bool) -> TlsOptions {
        let at = |name: &str| self.dir.path().join(name);
        TlsOptions {
            cert: at("cert.pem"),
            key: at("key.pem"),
            client_ca: mutual.then(|| at("ca.pem")),
        }
    }

    /// A client configuration trusting the test CA, presenting `identity` if any.
    fn client(&self, identity: Option<&Leaf>, alpn: &[u8]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match identity {
            Some(leaf) => builder
                .with_client_auth_cert(vec![leaf.cert.der().clone()], leaf.key_der())
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(config)
    }
}

/// Connects over TLS with `config` (the server's name: localhost).
async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(config).connect(name, tcp).await
}

/// A gRPC client over TLS with `config`.
async fn grpc_client(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<GenerationClient<Channel>, tonic::transport::Error> {
    let connector = tower::service_fn(move |_: Uri| {
        let config = config.clone();
        async move { tls_connect(addr, config).await.map(TokioIo::new) }
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(connector)
        .await?;
    Ok(GenerationClient::new(channel))
}

/// Whether a fresh gRPC client with `config` gets the model's info (Err: why not).
async fn grpc_info(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<String, String> {
    let attempt = async {
        let mut client = grpc_client(addr, config)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let info = client.get_model_info(pb::GetModelInfoRequest {}).await;
        info.map(|r| r.into_inner().model_name)
            .map_err(|s| s.to_string())
    };
    tokio::time::timeout(PROMPT, attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// `GET /v1/models` over a fresh TLS connection: the status (Err: why none).
async fn https_models(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<u16, String> {
    let attempt = async {
        let mut tls = tls_connect(addr, config).await.map_err(|e| e.to_string())?;
        let req = format!("GET /v1/models HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tls.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let read = tls.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf);
        match text.split(' ').nth(1).and_then(|s| s.parse().ok()) {
            Some(status) => Ok(status),
            None => Err(format!("no response ({read:?})")),
        }
    };
    tokio::time::timeout(PROMPT, attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// What a plaintext `GET /v1/models` gets back (nothing, or a TLS alert, over TLS).
async fn plaintext_http(addr: SocketAddr) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET /v1/models HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut buf = Vec::new();
    if tcp.write_all(req.as_bytes()).await.is_ok() {
        let read = tokio::time::timeout(PROMPT, tcp.read_to_end(&mut buf));
        let _ = read.await;
    }
    buf
}

/// `outcome` is a prompt refusal (not an answer, not a hang).
fn assert_refused<T: std::fmt::Debug>(outcome: &Result<T, String>, who: &str) {
    match outcome {
        Ok(answer) => panic!("{who}: answered {answer:?}"),
        Err(why) => assert_ne!(why, "timed out", "{who}: no prompt refusal"),
    }
}

/// The tiny model served with `tls` on both fronts.
async fn start(tls: TlsOptions) -> RunningServer {
    let options = ServerOptions {
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        tls: Some(tls),
        ..Default::default()
    };
    let service = TestServer::tiny().service();
    RunningServer::start(service, options).await.unwrap()
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_certified_by_the_client_ca() {
    let pki = Pki::new();
    let server = start(pki.options(true)).await;
    let (grpc, http) = (server.addr, server.http_addr.unwrap());
    let good = pki.client(Some(&pki.good_client), b"h2");
    let none = pki.client(None, b"h2");
    let stranger = pki.client(Some(&pki.stranger), b"h2");

    let mut client = grpc_client(grpc, good.clone()).await.unwrap();
    let out = generate(&mut client, greedy(vec![5, 6, 7], 4))
        .await
        .unwrap();
    assert_eq!(out.token_ids.len(), 4);
    for (who, config) in [("no certificate", none), ("another CA's", stranger)] {
        let refused = grpc_info(grpc, config).await;
        assert_refused(&refused, &format!("gRPC, {who}"));
    }
    let info = grpc_info(grpc, good).await;
    assert!(info.is_ok(), "gRPC after the refusals: {info:?}");
    // The connection opened before the refusals still serves.
    assert!(generate(&mut client, greedy(vec![8], 2)).await.is_ok());

    let good = pki.client(Some(&pki.good_client), b"http/1.1");
    let none = pki.client(None, b"http/1.1");
    let stranger = pki.client(Some(&pki.stranger), b"http/1.1");
    assert_eq!(https_models(http, good.clone()).await, Ok(200));
    for (who, config) in [("no certificate", none), ("another CA's", stranger)] {
        let refused = https_models(http, config).await;
        assert_refused(&refused, &format!("HTTP, {who}"));
    }
    assert_eq!(
        https_models(http, good).await,
        Ok(200),
        "HTTP after the refusals"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn plain_tls_needs_no_client_certificate_and_refuses_plaintext() {
    let pki = Pki::new();
    let server = start(pki.options(false)).await;
    let (grpc, http) = (server.addr, server.http_addr.unwrap());

    // A client that opens a connection and never starts its handshake holds up no one.
    let _stalled = TcpStream::connect(grpc).await.unwrap();
    let _stalled_http = TcpStream::connect(http).await.unwrap();
    let info = grpc_info(grpc, pki.client(None, b"h2")).await;
    assert!(info.is_ok(), "{info:?}");
    let status = https_models(http, pki.client(None, b"http/1.1")).await;
    assert_eq!(status, Ok(200));

    let plaintext = async {
        let mut client = GenerationClient::connect(server.endpoint()).await?;
        client.get_model_info(pb::GetModelInfoRequest {}).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    let plaintext = tokio::time::timeout(PROMPT, plaintext).await;
    assert!(
        !matches!(plaintext, Ok(Ok(()))),
        "a plaintext gRPC client got an answer"
    );
    let answer = plaintext_http(http).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "a plaintext HTTP client got an answer"
    );
    assert!(grpc_info(grpc, pki.client(None, b"h2")).await.is_ok());
    server.stop().await.unwrap();
}
