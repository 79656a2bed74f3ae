//! A test PKI made with rcgen: a CA, and a server certificate it signed for 127.0.0.1 and
//! localhost, written as PEM files. Used by the TLS process tests, and included with `#[path]` by
//! streamledger-node's TLS unit tests, so that both make certificates the same way.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// The PEM files of one test PKI.
pub struct Pki {
    /// The CA's certificate: what a client trusts (`--cacert`).
    pub ca: PathBuf,
    /// The server's certificate (`--tls-cert`) and its key (`--tls-key`).
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes `NAME-ca.pem`, `NAME.pem` and `NAME.key` into `dir`; each call makes a new CA.
pub fn write_pki(dir: &Path, name: &str) -> Pki {
    write_pki_with_clients(dir, name, &[]).0
}

/// As [`write_pki`], and for each name in `clients` a client certificate of the same CA whose
/// subject's common name (CN) is that name, in `NAME-CLIENT.pem` and `NAME-CLIENT.key` (the
/// `ca` of each is the CA's file).
pub fn write_pki_with_clients(dir: &Path, name: &str, clients: &[&str]) -> (Pki, Vec<Pki>) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A name of its own: CAs with rcgen's one default name would be told apart only by signature.
    ca_params.distinguished_name.push(DnType::CommonName, format!("streamledger test CA {name}"));
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let ca = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    let leaf = |file: &str, common_name: Option<&str>| {
        let key = KeyPair::generate().unwrap();
        // rcgen makes "127.0.0.1" an IP address SAN, "localhost" a DNS name.
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        if let Some(cn) = common_name {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let cert = params.signed_by(&key, &issuer).unwrap();
        let pki = Pki { ca: ca.clone(), cert: dir.join(format!("{file}.pem")), key: dir.join(format!("{file}.key")) };
        std::fs::write(&pki.cert, cert.pem()).unwrap();
        std::fs::write(&pki.key, key.serialize_pem()).unwrap();
        pki
    };
    let server = leaf(name, None);
    let clients = clients.iter().map(|cn| leaf(&format!("{name}-{cn}"), Some(cn))).collect();
    (server, clients)
}
