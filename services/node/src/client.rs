//! An HTTP client for the node's API (the CLI's `submit`, `query` and `blocks` use it), with the
//! request and response types of [`crate::api`].
//!
//! Errors name the method, the URL and, when the server answered, its status and error text.
//!
//! `https://` URLs are verified against the CA certificates given with [`TrustedCa`] only: there
//! is no built-in root store, so an `https://` client needs the CA file of the node's certificate
//! (without one, the handshake fails and the error says so). A node that asks for client
//! certificates (`--tls-client-ca`) gets the one of [`ClientIdentity`].

use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;
use streamledger_core::crypto::Signer;
use streamledger_core::model::Proposal;
use streamledger_ports::error_chain;

use crate::api::{
    BlockResponse, ErrorBody, PeerQuery, RangeQuery, RangeResponse, RichQueryRequest, RichQueryResponse, SignedProposalRequest,
    StateEntry, StatusResponse,
    SubmitRequest, TxStatusResponse,
};

/// For requests that do not wait for a verdict.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Added to a submission's own timeout: the server answers 504 at its timeout, so the client
/// should wait a little longer than that to read the answer.
const WAIT_MARGIN: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of a non-JSON error body to quote.
const QUOTE_LIMIT: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("API address {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{method} {url}: {}{}", error_chain(source), tls_hint(source))]
    Transport { method: Method, url: String, source: reqwest::Error },
    #[error("{method} {url}: HTTP {status}: {message}")]
    Http { method: Method, url: String, status: StatusCode, message: String },
    #[error("{method} {url}: unexpected response (HTTP {status}): {reason}")]
    Decode { method: Method, url: String, status: StatusCode, reason: String },
}

impl ClientError {
    /// The HTTP status the server answered with, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Http { status, .. } | Self::Decode { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }

    /// Worth retrying: the server could not be reached, or said it is unavailable for now.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Transport { source, .. } => source.is_connect() || source.is_timeout(),
            Self::Http { status, .. } => *status == StatusCode::SERVICE_UNAVAILABLE,
            _ => false,
        }
    }
}

/// What to do about a failed TLS handshake, in rustls' words for it.
fn tls_hint(error: &reqwest::Error) -> &'static str {
    let text = error_chain(error);
    // A certificate no trusted CA signed (BadSignature: one of the same name).
    if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        " (the server's certificate is not signed by a trusted CA: give its CA file, --cacert FILE)"
    // The server's alerts: it asked for a client certificate and got none, or does not trust it.
    } else if text.contains("CertificateRequired") {
        " (the server asks for a client certificate: give --client-cert FILE and --client-key FILE)"
    } else if text.contains("CertificateRevoked") {
        " (the server refused the client certificate: it is revoked, listed in a CRL of the server's --tls-client-crl)"
    // UnknownCA, BadCertificate, CertificateExpired, CertificateUnknown and the like.
    } else if ["alert: UnknownCA", "alert: BadCertificate", "alert: Certificate", "alert: DecryptError"].iter().any(|a| text.contains(a)) {
        " (the server refused the client certificate: it must be valid now and signed by a CA of the server's --tls-client-ca)"
    } else {
        ""
    }
}

/// The CA certificates (a PEM file of one or more) that `https://` servers' certificates must
/// chain to.
#[derive(Debug, Clone)]
pub struct TrustedCa {
    certs: Vec<reqwest::Certificate>,
}

impl TrustedCa {
    /// Reads and checks the file; the error names it.
    pub fn load(path: &Path) -> Result<Self, crate::tls::TlsFileError> {
        let certs = crate::tls::load_certs(path)?
            .iter()
            .map(|der| reqwest::Certificate::from_der(der).map_err(|e| crate::tls::TlsFileError { path: path.to_path_buf(), message: e.to_string() }))
            .collect::<Result<_, _>>()?;
        Ok(Self { certs })
    }
}

/// This client's certificate and key, for a node that asks for one (`up --tls-client-ca`).
#[derive(Clone)]
pub struct ClientIdentity {
    identity: reqwest::Identity,
    cert: std::path::PathBuf,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity").field("cert", &self.cert).finish_non_exhaustive()
    }
}

impl ClientIdentity {
    /// `cert`: PEM, the client's certificate first, then any intermediates. `key`: its private key
    /// in PEM (PKCS#8, PKCS#1 or SEC1). Both are read and checked now; errors name the file.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, crate::tls::TlsFileError> {
        crate::tls::load_certs(cert)?;
        crate::tls::load_key(key)?;
        // reqwest takes the key and the chain as one PEM buffer.
        let mut pem = crate::tls::read(key)?;
        pem.push(b'\n');
        pem.extend(crate::tls::read(cert)?);
        let refused = |e: reqwest::Error| crate::tls::TlsFileError { path: cert.to_path_buf(), message: format!("with the key {}: {}", key.display(), error_chain(&e)) };
        let identity = reqwest::Identity::from_pem(&pem).map_err(refused)?;
        // rustls checks the certificate and the key's pairing only when a client is built: build
        // one now, so that the error names the files (an X.509 v1 certificate, a key of another
        // certificate) instead of a bare "builder error" later.
        reqwest::Client::builder().identity(identity.clone()).build().map_err(refused)?;
        Ok(Self { identity, cert: cert.to_path_buf() })
    }
}

/// How a client speaks TLS: the CAs it trusts and, for a node that asks for one, its certificate.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    pub ca: Option<TrustedCa>,
    pub identity: Option<ClientIdentity>,
}

/// A client of one node's API.
#[derive(Debug, Clone)]
pub struct Client {
    base: Url,
    http: reqwest::Client,
}

impl Client {
    /// A client of the API at `base_url`, e.g. `http://127.0.0.1:7050` or `https://node:7050`;
    /// `https://` trusts no certificate (see [`Self::with_ca`]).
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        Self::with_ca(base_url, None)
    }

    /// A client whose `https://` connections trust `ca` and nothing else.
    pub fn with_ca(base_url: &str, ca: Option<&TrustedCa>) -> Result<Self, ClientError> {
        Self::with_tls(base_url, &ClientTls { ca: ca.cloned(), identity: None })
    }

    /// A client whose `https://` connections trust `tls.ca` and nothing else, and present
    /// `tls.identity` to a node that asks for a client certificate.
    pub fn with_tls(base_url: &str, tls: &ClientTls) -> Result<Self, ClientError> {
        let bad = |reason: String| ClientError::BadUrl { url: base_url.to_string(), reason };
        let base = Url::parse(base_url).map_err(|e| bad(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad(format!("scheme {:?} is not http or https", base.scheme())));
        }
        if base.cannot_be_a_base() || base.host().is_none() {
            return Err(bad("not an http://host:port address".into()));
        }
        let mut builder = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
        for cert in tls.ca.as_ref().map(|ca| ca.certs.as_slice()).unwrap_or_default() {
            builder = builder.add_root_certificate(cert.clone());
        }
        if let Some(id) = &tls.identity {
            builder = builder.identity(id.identity.clone());
        }
        let http = builder.build().map_err(|e| bad(format!("cannot build the HTTP client: {}", error_chain(&e))))?;
        Ok(Self { base, http })
    }

    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// The base URL with `segments` appended, each percent-encoded (a key may hold `/` or `?`).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        // `new` refused URLs that cannot be a base, the only case where this fails.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Runs `contract.function(args)` as the node's client identity. With `wait`, the answer
    /// has the verdict, or `pending` when none came within `timeout_ms` (HTTP 504).
    pub async fn submit(&self, req: &SubmitRequest) -> Result<TxStatusResponse, ClientError> {
        let timeout = if req.wait { Duration::from_millis(req.timeout_ms) + WAIT_MARGIN } else { REQUEST_TIMEOUT };
        self.submission(self.url(&["v1", "transactions"]), req, timeout).await
    }

    /// Submits a proposal signed with the client's own key (see [`Client::sign`]).
    pub async fn submit_signed(&self, req: &SignedProposalRequest) -> Result<TxStatusResponse, ClientError> {
        let timeout = if req.wait { Duration::from_millis(req.timeout_ms) + WAIT_MARGIN } else { REQUEST_TIMEOUT };
        self.submission(self.url(&["v1", "proposals"]), req, timeout).await
    }

    /// Builds and signs a proposal as `signer`, for [`Client::submit_signed`]. `nonce` should be
    /// fresh random bytes (24 is what the API uses): with the signer, it makes the tx id.
    pub fn sign(
        signer: &Signer,
        channel: &str,
        contract: &str,
        function: &str,
        args: Vec<String>,
        nonce: Vec<u8>,
        timestamp_ms: i64,
    ) -> Proposal {
        let mut p = Proposal {
            tx_id: String::new(),
            channel: channel.to_string(),
            contract: contract.to_string(),
            function: function.to_string(),
            args,
            creator: signer.identity().clone(),
            nonce,
            timestamp_ms,
            signature: Vec::new(),
        };
        signer.sign_proposal(&mut p);
        p
    }

    async fn submission<B: Serialize>(&self, url: Url, body: &B, timeout: Duration) -> Result<TxStatusResponse, ClientError> {
        // 202 (not waited) and 504 (no verdict in time) carry a pending status, not an error.
        let ok = [StatusCode::OK, StatusCode::ACCEPTED, StatusCode::GATEWAY_TIMEOUT];
        self.call(Method::POST, url, Some(body), &(), &ok, timeout).await
    }

    /// The outcome of a transaction; a 404 error when the node knows nothing of it yet.
    pub async fn tx_status(&self, tx_id: &str) -> Result<TxStatusResponse, ClientError> {
        self.get(self.url(&["v1", "transactions", tx_id]), &PeerQuery::default()).await
    }

    /// One key; a 404 error when it is absent (or the peer is unknown: the message says which).
    pub async fn get_state(&self, contract: &str, key: &str, peer: Option<&str>) -> Result<StateEntry, ClientError> {
        self.get(self.url(&["v1", "state", contract, key]), &PeerQuery { peer: peer.map(str::to_string) }).await
    }

    pub async fn range(&self, contract: &str, query: &RangeQuery) -> Result<RangeResponse, ClientError> {
        self.get(self.url(&["v1", "state", contract]), query).await
    }

    /// A Mango selector over a contract's state (CouchDB state only; 501 on the embedded store).
    pub async fn rich_query(&self, contract: &str, query: &RichQueryRequest) -> Result<RichQueryResponse, ClientError> {
        self.call(Method::POST, self.url(&["v1", "query", contract]), Some(query), &(), &[StatusCode::OK], REQUEST_TIMEOUT).await
    }

    pub async fn block(&self, number: i64, peer: Option<&str>) -> Result<BlockResponse, ClientError> {
        self.get(self.url(&["v1", "blocks", &number.to_string()]), &PeerQuery { peer: peer.map(str::to_string) }).await
    }

    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        self.get(self.url(&["v1", "status"]), &PeerQuery::default()).await
    }

    async fn get<Q: Serialize, T: DeserializeOwned>(&self, url: Url, query: &Q) -> Result<T, ClientError> {
        self.call::<(), Q, T>(Method::GET, url, None, query, &[StatusCode::OK], REQUEST_TIMEOUT).await
    }

    async fn call<B: Serialize, Q: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        mut url: Url,
        body: Option<&B>,
        query: &Q,
        ok: &[StatusCode],
        timeout: Duration,
    ) -> Result<T, ClientError> {
        // Encoded into the URL first, so that errors show the URL as sent.
        let pairs = query_pairs(query);
        if !pairs.is_empty() {
            url.query_pairs_mut().extend_pairs(pairs);
        }
        let mut request = self.http.request(method.clone(), url.clone()).timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let transport = |source| ClientError::Transport { method: method.clone(), url: url.to_string(), source };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let text = response.text().await.map_err(transport)?;
        if ok.contains(&status) {
            return serde_json::from_str(&text)
                .map_err(|e| ClientError::Decode { method, url: url.to_string(), status, reason: format!("{e} in {}", quote(&text)) });
        }
        let message = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => body.error,
            Err(_) if text.is_empty() => status.canonical_reason().unwrap_or("no message").to_string(),
            Err(_) => quote(&text),
        };
        Err(ClientError::Http { method, url: url.to_string(), status, message })
    }
}

/// A query struct as name/value pairs, through serde_json (so that `None` and skipped fields
/// disappear and numbers print plainly), without another dependency.
fn query_pairs<Q: Serialize + ?Sized>(query: &Q) -> Vec<(String, String)> {
    match serde_json::to_value(query) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .filter_map(|(k, v)| match v {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some((k, s)),
                other => Some((k, other.to_string())),
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn quote(text: &str) -> String {
    if text.len() <= QUOTE_LIMIT {
        return format!("{text:?}");
    }
    let mut end = QUOTE_LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &text[..end], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_and_https_base_urls_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TrustedCa::load(&crate::tls::test_pki::write_pki(dir.path(), "node").ca).unwrap();
        assert!(Client::with_ca("https://node:7050", Some(&ca)).is_ok());
        assert!(Client::new("https://node:7050").is_ok(), "trusting no CA: refused at the handshake");
        for (url, expected) in [
            ("ftp://node", "not http or https"),
            ("127.0.0.1:7050", "API address"),
            ("http://", "API address"),
        ] {
            let err = Client::new(url).unwrap_err().to_string();
            assert!(err.contains(expected) && err.contains(url), "{url}: {err}");
        }
    }

    #[test]
    fn path_segments_are_escaped_and_a_base_path_is_kept() {
        let c = Client::new("http://node:7050").unwrap();
        assert_eq!(c.url(&["v1", "state", "kv", "a/b?c d"]).as_str(), "http://node:7050/v1/state/kv/a%2Fb%3Fc%20d");
        let behind_proxy = Client::new("http://node/ledger/").unwrap();
        assert_eq!(behind_proxy.url(&["v1", "status"]).as_str(), "http://node/ledger/v1/status");
    }

    #[test]
    fn query_pairs_skip_what_is_unset() {
        let q = RangeQuery { start: "a".into(), limit: Some(5), ..Default::default() };
        assert_eq!(query_pairs(&q), vec![("limit".to_string(), "5".to_string()), ("start".to_string(), "a".to_string())]);
        assert!(query_pairs(&PeerQuery::default()).is_empty());
    }

    #[tokio::test]
    async fn an_unreachable_server_is_named_in_the_error() {
        // Bind then drop a listener: its port is very likely closed right after.
        let addr = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let err = Client::new(&format!("http://{addr}")).unwrap().status().await.unwrap_err();
        assert!(err.to_string().contains(&format!("GET http://{addr}/v1/status")), "{err}");
        assert!(err.is_retryable(), "{err:?}");
    }
}
