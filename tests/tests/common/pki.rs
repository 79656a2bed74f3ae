//! A test PKI made with rcgen: a CA, and a server certificate it signed for 127.0.0.1 and
//! localhost, written as PEM files. Used by the TLS process tests, and included with `#[path]` by
//! streamledger-node's TLS unit tests, so that both make certificates the same way.

use std::path::{Path, PathBuf};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer, KeyIdMethod, KeyPair, RevocationReason,
    RevokedCertParams, SerialNumber,
};

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
/// `ca` of each is the CA's file). `CLIENT:UNIT` also puts UNIT in the subject's organizational
/// unit (OU), as Fabric's NodeOUs do (`NAME-CLIENT-UNIT.pem`).
pub fn write_pki_with_clients(dir: &Path, name: &str, clients: &[&str]) -> (Pki, Vec<Pki>) {
    let (server, clients, _) = write_pki_revoking(dir, name, clients, &[]);
    (server, clients)
}

/// As [`write_pki_with_clients`], and a CRL of the CA revoking the clients named in `revoked`,
/// in `NAME-crl.pem` (returned last).
pub fn write_pki_revoking(dir: &Path, name: &str, clients: &[&str], revoked: &[&str]) -> (Pki, Vec<Pki>, PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A name of its own: CAs with rcgen's one default name would be told apart only by signature.
    ca_params.distinguished_name.push(DnType::CommonName, format!("streamledger test CA {name}"));
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let ca = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    // The CRL names certificates by serial number: the server's is 1, client i's is i + 2.
    let client_serial = |i: usize| SerialNumber::from(i as u64 + 2);
    let leaf = |file: &str, common_name: Option<&str>, serial: SerialNumber| {
        let key = KeyPair::generate().unwrap();
        // rcgen makes "127.0.0.1" an IP address SAN, "localhost" a DNS name.
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.serial_number = Some(serial);
        if let Some(spec) = common_name {
            let (cn, unit) = spec.split_once(':').map_or((spec, None), |(cn, unit)| (cn, Some(unit)));
            params.distinguished_name.push(DnType::CommonName, cn);
            if let Some(unit) = unit {
                params.distinguished_name.push(DnType::OrganizationalUnitName, unit);
            }
        }
        let cert = params.signed_by(&key, &issuer).unwrap();
        let pki = Pki { ca: ca.clone(), cert: dir.join(format!("{file}.pem")), key: dir.join(format!("{file}.key")) };
        std::fs::write(&pki.cert, cert.pem()).unwrap();
        std::fs::write(&pki.key, key.serialize_pem()).unwrap();
        pki
    };
    let server = leaf(name, None, SerialNumber::from(1u64));
    let made: Vec<Pki> =
        clients.iter().enumerate().map(|(i, spec)| leaf(&format!("{name}-{}", spec.replace(':', "-")), Some(spec), client_serial(i))).collect();
    let crl = CertificateRevocationListParams {
        this_update: date_time_ymd(2026, 1, 1),
        next_update: date_time_ymd(2099, 1, 1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|spec| {
                let index = clients.iter().position(|c| c == spec).expect("a revoked client is one of the clients");
                RevokedCertParams {
                    serial_number: client_serial(index),
                    revocation_time: date_time_ymd(2026, 1, 1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                }
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl_file = dir.join(format!("{name}-crl.pem"));
    std::fs::write(&crl_file, crl.signed_by(&issuer).unwrap().pem().unwrap()).unwrap();
    (server, made, crl_file)
}
