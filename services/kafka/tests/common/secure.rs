//! A tansu broker that requires SASL, TLS, or both, for `security.rs`.
//!
//! SASL is tansu's own (`--authentication`, SCRAM users created through the broker before it
//! requires authentication, since tansu's user command cannot authenticate). TLS is not: tansu
//! 0.6.0 refuses `--cert` with `--key` and never uses the TLS acceptor it would build (see
//! tests/tansu.sh), so a TLS front in this process (rustls, the test PKI's server certificate)
//! terminates TLS and forwards the bytes to the broker, which advertises the front's address so
//! that librdkafka's later connections go through it too. What librdkafka does is then real: the
//! handshake, checking the certificate against `ssl.ca.location` and the broker's address, and
//! SASL inside the TLS session.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

// The tansu harness (services/kafka/tests/common/mod.rs) is `common` in services/kafka's tests
// and `kafka` in the process tests: each includer brings its `Broker` into scope at its root, and
// declares tests/tests/common/pki.rs as `pki`.
use super::pki::{write_pki, Pki};
use super::Broker;

/// A SCRAM user to create: name, password, and `scram256` or `scram512` (tests/tansu.sh user).
pub struct User<'a>(pub &'a str, pub &'a str, pub &'a str);

/// A broker with SASL (when `users` is not empty) and a TLS front (when `tls` names a server
/// certificate and key).
pub struct SecureBroker {
    pub broker: Broker,
    front: Option<TlsFront>,
}

impl SecureBroker {
    pub fn start(users: &[User<'_>], tls: Option<(&Path, &Path)>) -> SecureBroker {
        let mut broker = Broker::start();
        for User(name, password, mechanism) in users {
            broker.create_user(name, password, mechanism);
        }
        let mut flags = Vec::new();
        if !users.is_empty() {
            flags.push("--authentication".to_string());
        }
        let front = tls.map(|(cert, key)| TlsFront::start(cert, key, broker.port));
        if let Some(front) = &front {
            flags.extend(["--advertised-port".to_string(), front.addr.port().to_string()]);
        }
        broker.restart_with(&flags);
        SecureBroker { broker, front }
    }

    /// A broker with one SCRAM-SHA-512 user, behind a TLS front with a certificate from a new test
    /// PKI in `dir` (whose CA clients are to trust).
    pub fn scram_over_tls(dir: &Path, user: &str, password: &str) -> (SecureBroker, Pki) {
        let pki = write_pki(dir, "kafka");
        let broker = SecureBroker::start(&[User(user, password, "scram512")], Some((&pki.cert, &pki.key)));
        (broker, pki)
    }

    /// What clients connect to: the TLS front when there is one, else the broker.
    pub fn bootstrap(&self) -> String {
        match &self.front {
            Some(front) => front.addr.to_string(),
            None => self.broker.bootstrap(),
        }
    }
}

/// Accepts TLS on a port of its own and forwards each connection's plaintext to the broker, on a
/// thread with its own runtime (it outlives any one test's runtime), until dropped.
struct TlsFront {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl TlsFront {
    fn start(cert: &Path, key: &Path, broker_port: u16) -> TlsFront {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect())
            .unwrap_or_else(|e| panic!("read {}: {e}", cert.display()));
        let key = PrivateKeyDer::from_pem_file(key).unwrap_or_else(|e| panic!("read {}: {e}", key.display()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("TLS front certificate and key");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the TLS front");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let addr = listener.local_addr().expect("TLS front address");
        let (stop, mut stopped) = oneshot::channel::<()>();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("TLS front runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("TLS front listener");
                loop {
                    let tcp = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => match accepted {
                            Ok((tcp, _)) => tcp,
                            Err(e) => { eprintln!("TLS front {addr}: accept: {e}"); continue; }
                        },
                    };
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        // A client that does not trust the certificate aborts here, many times a
                        // second: what the untrusted-CA test wants, so it is not reported.
                        let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                        let Ok(mut plain) = TcpStream::connect(("127.0.0.1", broker_port)).await else {
                            return eprintln!("TLS front {addr}: the broker on port {broker_port} refused the connection");
                        };
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    });
                }
            });
        });
        TlsFront { addr, stop: Some(stop) }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
