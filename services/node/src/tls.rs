//! Optional TLS on the HTTP endpoints this project serves (the `up` API, the stages' `/metrics`,
//! `/healthz` and `/readyz`), and the loading of the CA certificates the API client trusts.
//!
//! rustls on the ring provider: rustls' default provider, aws-lc-rs, needs cmake to build. The
//! endpoints `up` and the stages serve authenticate the server, and with `--tls-client-ca`
//! ([`ServerTls::requiring_client_certs`]) every client too: mutual TLS, as Fabric's
//! `clientAuthRequired`, and with `--tls-client-permissions` ([`ServerTls::with_permissions`])
//! each client may do only what its certificate's name is granted (see [`crate::permissions`]).
//! The tests' schema registry uses it as well, to check the Kafka adapter's mutual TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::permissions::{ClientIdentity, ClientPermissions};

/// How long a client may take over its handshake before its connection is dropped: a client that
/// connects and sends nothing must not keep a task and a socket forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate, key or CA file that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct TlsFileError {
    pub path: PathBuf,
    pub message: String,
}

fn file_error(path: &Path, message: impl Into<String>) -> TlsFileError {
    TlsFileError { path: path.to_path_buf(), message: message.into() }
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|e| file_error(path, e.to_string()))
}

/// `https` with TLS, else `http`: for the lines and logs that name an endpoint.
pub fn scheme(tls: Option<&ServerTls>) -> &'static str {
    if tls.is_some() {
        "https"
    } else {
        "http"
    }
}

/// Every item of one kind in a PEM file, at least one: `what` and `begin` name the kind in the
/// errors ("certificate", "-----BEGIN CERTIFICATE-----").
fn load_pem_items<T: PemObject>(path: &Path, what: &str, begin: &str) -> Result<Vec<T>, TlsFileError> {
    let bytes = read(path)?;
    let items: Vec<T> = T::pem_slice_iter(&bytes).collect::<Result<_, _>>().map_err(|e| file_error(path, format!("not a PEM {what} file: {e}")))?;
    if items.is_empty() {
        return Err(file_error(path, format!("no {what} in it (expected PEM: {begin})")));
    }
    Ok(items)
}

/// Every certificate of a PEM file (a chain, or a bundle of CAs), each checked to be a
/// well-formed X.509 certificate now: rustls would only find a broken one at the first handshake.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certs: Vec<CertificateDer<'static>> = load_pem_items(path, "certificate", "-----BEGIN CERTIFICATE-----")?;
    for (i, cert) in certs.iter().enumerate() {
        // Parsing it as a trust anchor is the cheapest full parse rustls offers.
        rustls::RootCertStore::empty()
            .add(cert.clone())
            .map_err(|e| file_error(path, format!("certificate {} of {} is not valid: {e}", i + 1, certs.len())))?;
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            file_error(path, "no private key in it (expected PEM: -----BEGIN PRIVATE KEY-----, or an RSA or EC one)")
        }
        e => file_error(path, format!("not a PEM private key: {e}")),
    })
}

/// Certificate revocation lists from a PEM file of one or more; webpki parses them when the
/// verifier is built.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsFileError> {
    load_pem_items(path, "CRL", "-----BEGIN X509 CRL-----")
}

/// The server side of TLS: a certificate chain and its private key.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    cert: PathBuf,
    /// Whether clients must present a certificate (mutual TLS): permissions need one.
    client_certs: bool,
    permissions: Option<Arc<ClientPermissions>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("cert", &self.cert).finish_non_exhaustive()
    }
}

impl ServerTls {
    /// `cert`: PEM, the server's certificate first, then any intermediates. `key`: its private
    /// key in PEM (PKCS#8, PKCS#1 or SEC1). Errors name the file at fault, including a key that
    /// does not belong to the certificate.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsFileError> {
        Self::build(cert, key, None, None)
    }

    /// As [`ServerTls::load`], and every client must present a certificate that a CA of
    /// `client_ca` (PEM) signed, or its handshake fails.
    pub fn requiring_client_certs(cert: &Path, key: &Path, client_ca: &Path) -> Result<Self, TlsFileError> {
        Self::build(cert, key, Some(client_ca), None)
    }

    /// As [`ServerTls::requiring_client_certs`], and a client whose certificate a CRL in `crl`
    /// (PEM, one or more) lists is refused in its handshake (`CertificateRevoked`). A certificate
    /// whose issuer has no CRL in the file is not checked (`allow_unknown_revocation_status`), and
    /// a CRL past its next update still counts: a stale list still names what it revoked.
    pub fn requiring_unrevoked_client_certs(cert: &Path, key: &Path, client_ca: &Path, crl: &Path) -> Result<Self, TlsFileError> {
        Self::build(cert, key, Some(client_ca), Some(crl))
    }

    fn build(cert: &Path, key: &Path, client_ca: Option<&Path>, crl: Option<&Path>) -> Result<Self, TlsFileError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = load_certs(cert)?;
        let key_der = load_key(key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| file_error(cert, format!("TLS setup: {e}")))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in load_certs(ca)? {
                    roots.add(c).map_err(|e| file_error(ca, e.to_string()))?;
                }
                let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                if let Some(crl) = crl {
                    verifier = verifier.with_crls(load_crls(crl)?).allow_unknown_revocation_status();
                }
                let verifier = verifier.build().map_err(|e| {
                    // webpki parses the CRLs here: a bad one is the CRL file's fault.
                    let file = match (&e, crl) {
                        (rustls::server::VerifierBuilderError::InvalidCrl(_), Some(crl)) => crl,
                        _ => ca,
                    };
                    file_error(file, format!("cannot check client certificates with it: {e}"))
                })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(certs, key_der)
            .map_err(|e| file_error(key, format!("cannot serve {} with this key: {e}", cert.display())))?;
        Ok(Self { config: Arc::new(config), cert: cert.to_path_buf(), client_certs: client_ca.is_some(), permissions: None })
    }

    /// Per-client permissions (see [`crate::permissions`]): only with client certificates
    /// ([`ServerTls::requiring_client_certs`]), which name the clients; refused otherwise, naming
    /// the permissions file.
    pub fn with_permissions(mut self, permissions: ClientPermissions) -> Result<Self, TlsFileError> {
        if !self.client_certs {
            return Err(file_error(
                permissions.file(),
                "per-client permissions need client certificates to tell the clients apart: give a clients' CA (--tls-client-ca) too",
            ));
        }
        self.permissions = Some(Arc::new(permissions));
        Ok(self)
    }

    /// The per-client permissions the endpoint enforces, if any.
    pub fn permissions(&self) -> Option<Arc<ClientPermissions>> {
        self.permissions.clone()
    }

    /// Wraps a bound listener: what it accepts is TLS only.
    pub fn listener(&self, tcp: TcpListener) -> TlsListener {
        TlsListener { tcp, acceptor: TlsAcceptor::from(self.config.clone()), handshakes: JoinSet::new() }
    }
}

/// A listener for `axum::serve` that hands over only connections whose TLS handshake succeeded.
/// Each handshake runs in a task of its own, so a slow or silent client holds up no other; one
/// that fails (plain HTTP on this port, a client that does not trust the certificate) is logged
/// and dropped, and the server goes on. Dropping the listener (on shutdown) aborts the
/// handshakes in flight.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

async fn handshake(acceptor: TlsAcceptor, tcp: TcpStream, peer: SocketAddr) -> Option<(TlsStream<TcpStream>, SocketAddr)> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some((tls, peer)),
        // debug, not warn: any client that can connect could otherwise fill the log.
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "TLS handshake failed; connection dropped");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out; connection dropped");
            None
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // Both branches are cancel-safe, as axum needs (it drops this future on shutdown).
            tokio::select! {
                // axum's own accept for TCP: it retries on errors, pausing when out of sockets.
                (tcp, peer) = axum::serve::Listener::accept(&mut self.tcp) => {
                    self.handshakes.spawn(handshake(self.acceptor.clone(), tcp, peer));
                }
                Some(done) = self.handshakes.join_next() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// Read once per connection, when axum accepts it, for the per-client permissions: what the
/// client's certificate says of it (nothing without one).
impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for ClientIdentity {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        let (_, connection) = stream.io().get_ref();
        connection.peer_certificates().and_then(|chain| chain.first()).map(|der| ClientIdentity::from_der(der)).unwrap_or_default()
    }
}

/// The process tests' certificate maker, so that both make certificates the same way.
#[cfg(test)]
#[path = "../../../tests/tests/common/pki.rs"]
pub(crate) mod test_pki;

#[cfg(test)]
mod tests {
    use super::test_pki::{self as pki, write_pki};
    use super::*;

    /// An HTTPS client trusting `server_ca` and presenting `client`'s certificate.
    fn client_of(server_ca: &Path, client: &pki::Pki) -> reqwest::Client {
        let identity = [std::fs::read(&client.key).unwrap(), std::fs::read(&client.cert).unwrap()].join(&b'\n');
        let mut builder = reqwest::Client::builder().identity(reqwest::Identity::from_pem(&identity).unwrap());
        for der in load_certs(server_ca).unwrap() {
            builder = builder.add_root_certificate(reqwest::Certificate::from_der(&der).unwrap());
        }
        builder.build().unwrap()
    }

    type Serving = tokio::task::JoinHandle<std::io::Result<()>>;

    /// Serves `app` over `tls` through [`crate::api::serve_router`] on a free loopback port, with
    /// the sender that stops it.
    async fn serve(app: axum::Router, tls: &ServerTls, metrics: Option<&Arc<streamledger_stages::Metrics>>) -> (SocketAddr, tokio::sync::watch::Sender<bool>, Serving) {
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let (addr, serving) = crate::api::serve_router("127.0.0.1:0".parse().unwrap(), app, Some(tls), metrics, shutdown).await.unwrap();
        (addr, stop, serving)
    }

    /// Stops a server started by [`serve`] and checks that it ends, cleanly, in time.
    async fn stops_cleanly(stop: tokio::sync::watch::Sender<bool>, serving: Serving) {
        stop.send(true).unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), serving).await.expect("stopped in time");
        assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
    }

    fn error_of<T: std::fmt::Debug>(result: Result<T, TlsFileError>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn bad_files_are_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let pki::Pki { ca, cert, key } = write_pki(dir.path(), "server");
        assert!(ServerTls::load(&cert, &key).is_ok());
        assert!(ServerTls::requiring_client_certs(&cert, &key, &ca).is_ok());
        assert_eq!(load_certs(&ca).unwrap().len(), 1);

        let missing = dir.path().join("missing.pem");
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "just some text\n").unwrap();
        let broken = dir.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n").unwrap();
        let broken_crl = dir.path().join("broken-crl.pem");
        std::fs::write(&broken_crl, "-----BEGIN X509 CRL-----\naGVsbG8=\n-----END X509 CRL-----\n").unwrap();
        let other_key = dir.path().join("other.key");
        std::fs::write(&other_key, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();

        for (what, err, file, expected) in [
            ("missing certificate", error_of(ServerTls::load(&missing, &key)), &missing, "No such file"),
            ("missing key", error_of(ServerTls::load(&cert, &missing)), &missing, "No such file"),
            ("certificate not PEM", error_of(ServerTls::load(&not_pem, &key)), &not_pem, "no certificate in it"),
            ("key not PEM", error_of(ServerTls::load(&cert, &not_pem)), &not_pem, "no private key in it"),
            // A certificate file given as the key, and a key file given as the certificate.
            ("certificate as key", error_of(ServerTls::load(&cert, &cert)), &cert, "no private key in it"),
            ("key as certificate", error_of(ServerTls::load(&key, &key)), &key, "no certificate in it"),
            ("broken certificate", error_of(ServerTls::load(&broken, &key)), &broken, "certificate 1 of 1 is not valid"),
            ("key of another certificate", error_of(ServerTls::load(&cert, &other_key)), &other_key, "cannot serve"),
            ("CA not PEM", error_of(load_certs(&not_pem)), &not_pem, "no certificate in it"),
            ("missing client CA", error_of(ServerTls::requiring_client_certs(&cert, &key, &missing)), &missing, "No such file"),
            ("client CA not PEM", error_of(ServerTls::requiring_client_certs(&cert, &key, &not_pem)), &not_pem, "no certificate in it"),
            ("missing CRL", error_of(ServerTls::requiring_unrevoked_client_certs(&cert, &key, &ca, &missing)), &missing, "No such file"),
            ("CRL not PEM", error_of(ServerTls::requiring_unrevoked_client_certs(&cert, &key, &ca, &not_pem)), &not_pem, "no CRL in it"),
            ("certificate as CRL", error_of(ServerTls::requiring_unrevoked_client_certs(&cert, &key, &ca, &cert)), &cert, "no CRL in it"),
            ("broken CRL", error_of(ServerTls::requiring_unrevoked_client_certs(&cert, &key, &ca, &broken_crl)), &broken_crl, "cannot check client certificates"),
        ] {
            assert!(err.starts_with(&format!("{}: ", file.display())) && err.contains(expected), "{what}: {err}");
        }
    }

    /// Over HTTPS through [`crate::api::serve_router`]: a client trusting the CA is served; plain
    /// HTTP and a client trusting nothing fail their handshake and the server goes on; shutdown
    /// ends the server.
    #[tokio::test]
    async fn serves_https_survives_failed_handshakes_and_shuts_down() {
        let dir = tempfile::tempdir().unwrap();
        let pki = write_pki(dir.path(), "server");
        let tls = ServerTls::load(&pki.cert, &pki.key).unwrap();
        let app = axum::Router::new().route("/ping", axum::routing::get(|| async { "pong" }));
        let (addr, stop, serving) = serve(app, &tls, None).await;

        let mut trusting = reqwest::Client::builder();
        for der in load_certs(&pki.ca).unwrap() {
            trusting = trusting.add_root_certificate(reqwest::Certificate::from_der(&der).unwrap());
        }
        let trusting = trusting.build().unwrap();
        let https = format!("https://localhost:{}/ping", addr.port());
        let ping = || async { trusting.get(&https).send().await.unwrap().text().await.unwrap() };
        assert_eq!(ping().await, "pong");

        let plain = reqwest::get(format!("http://{addr}/ping")).await;
        assert!(plain.is_err(), "plain HTTP on the TLS port: {plain:?}");
        let untrusting = reqwest::Client::new().get(&https).send().await.unwrap_err();
        assert!(format!("{:?}", untrusting).contains("UnknownIssuer"), "{untrusting:?}");
        // A client that connects and says nothing holds up no one.
        let _silent = TcpStream::connect(addr).await.unwrap();
        assert_eq!(ping().await, "pong", "still serving");

        stops_cleanly(stop, serving).await;
    }

    /// Per-client permissions over real mutual TLS: each client gets what its certificate's CN and
    /// OU are granted, a client not listed the default, and a refusal is a 403 naming what is missing;
    /// the health probe is open to every client the CA admitted. Without client certificates the
    /// permissions are refused, naming the file.
    #[tokio::test]
    async fn each_client_certificate_gets_the_permissions_of_its_common_name_and_units() {
        let dir = tempfile::tempdir().unwrap();
        let server = write_pki(dir.path(), "server");
        let (clients, named) = pki::write_pki_with_clients(dir.path(), "clients", &["reader", "submitter", "stranger", "auditor:admin"]);
        let file = dir.path().join("perms.toml");
        let perms = "default = []\n[clients]\n\"reader\" = [\"read\"]\n\"submitter\" = [\"read\", \"submit\"]\n[organizational_units]\nadmin = [\"metrics\"]\n";
        std::fs::write(&file, perms).unwrap();
        let permissions = crate::permissions::ClientPermissions::load(&file).unwrap();
        let refused = ServerTls::load(&server.cert, &server.key).unwrap().with_permissions(permissions.clone()).unwrap_err().to_string();
        assert!(refused.starts_with(&format!("{}: ", file.display())) && refused.contains("--tls-client-ca"), "{refused}");
        let tls = ServerTls::requiring_client_certs(&server.cert, &server.key, &clients.ca).unwrap().with_permissions(permissions).unwrap();
        let ok = || async { "ok" };
        let app = axum::Router::new()
            .route("/v1/status", axum::routing::get(ok))
            .route("/v1/transactions", axum::routing::post(ok))
            .route("/metrics", axum::routing::get(ok))
            .route("/healthz", axum::routing::get(ok));
        let metrics = streamledger_stages::Metrics::detached("ch");
        let (addr, stop, serving) = serve(app, &tls, Some(&metrics)).await;

        let as_client = |client: &pki::Pki| client_of(&server.ca, client);
        let url = |path: &str| format!("https://localhost:{}{path}", addr.port());
        let (reader, submitter, stranger, auditor) = (as_client(&named[0]), as_client(&named[1]), as_client(&named[2]), as_client(&named[3]));
        let status = |r: reqwest::Response| r.status().as_u16();

        assert_eq!(status(reader.get(url("/v1/status")).send().await.unwrap()), 200);
        let denied = reader.post(url("/v1/transactions")).send().await.unwrap();
        assert_eq!(denied.status().as_u16(), 403);
        let body: serde_json::Value = denied.json().await.unwrap();
        assert_eq!(
            body["error"],
            "the client certificate CN=\"reader\" lacks the permission \"submit\" for POST /v1/transactions (granted by the node's --tls-client-permissions)"
        );
        assert_eq!(status(submitter.post(url("/v1/transactions")).send().await.unwrap()), 200);
        assert_eq!(status(submitter.get(url("/v1/status")).send().await.unwrap()), 200);
        let denied = stranger.get(url("/v1/status")).send().await.unwrap();
        assert_eq!(denied.status().as_u16(), 403, "a client not listed gets the default, here nothing");
        let body: serde_json::Value = denied.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("CN=\"stranger\" (not listed"), "{body}");
        assert_eq!(status(stranger.get(url("/healthz")).send().await.unwrap()), 200, "the health probe needs no permission");
        // Granted by the OU in its certificate, as Fabric's NodeOUs put roles there.
        assert_eq!(status(auditor.get(url("/metrics")).send().await.unwrap()), 200);
        let denied: serde_json::Value = auditor.get(url("/v1/status")).send().await.unwrap().json().await.unwrap();
        assert!(denied["error"].as_str().unwrap().starts_with("the client certificate CN=\"auditor\", OU=\"admin\" lacks"), "{denied}");
        assert_eq!(status(reader.get(url("/metrics")).send().await.unwrap()), 403);
        // The refusals are counted with the requests served.
        let count = |route: &str, method: &str, code: &str| metrics.http_requests.with_label_values(&["ch", route, method, code]).get();
        assert_eq!((count("/v1/transactions", "POST", "403"), count("/v1/transactions", "POST", "200")), (1, 1));
        assert_eq!((count("/v1/status", "GET", "403"), count("/v1/status", "GET", "200")), (2, 2), "the stranger and the auditor refused");

        stops_cleanly(stop, serving).await;
    }

    /// A CRL over real mutual TLS: the client it lists fails its handshake with rustls'
    /// `CertificateRevoked`; the CA's other client is served.
    #[tokio::test]
    async fn a_client_certificate_a_crl_lists_is_refused_in_its_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let server = write_pki(dir.path(), "server");
        let (clients, named, crl) = pki::write_pki_revoking(dir.path(), "clients", &["kept", "revoked"], &["revoked"]);
        let tls = ServerTls::requiring_unrevoked_client_certs(&server.cert, &server.key, &clients.ca, &crl).unwrap();
        let app = axum::Router::new().route("/ping", axum::routing::get(|| async { "pong" }));
        let (addr, stop, serving) = serve(app, &tls, None).await;
        let as_client = |client: &pki::Pki| client_of(&server.ca, client);
        let url = format!("https://localhost:{}/ping", addr.port());
        assert_eq!(as_client(&named[0]).get(&url).send().await.unwrap().text().await.unwrap(), "pong");
        let refused = as_client(&named[1]).get(&url).send().await.unwrap_err();
        assert!(streamledger_ports::error_chain(&refused).contains("CertificateRevoked"), "{refused:?}");
        assert_eq!(as_client(&named[0]).get(&url).send().await.unwrap().status(), 200, "still serving");

        stops_cleanly(stop, serving).await;
    }
}
