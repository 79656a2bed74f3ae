//! [`CouchConfig`]: where CouchDB is and how to talk to it, named after Fabric's `couchDBConfig`
//! (`core.yaml`: `maxRetries`, `maxRetriesOnStartup`, `requestTimeout`, `internalQueryLimit`,
//! `maxBatchUpdateSize`), with Fabric's defaults.

use std::fmt;
use std::time::Duration;

use url::Url;

use crate::names;

#[derive(Clone)]
pub struct CouchConfig {
    /// `couchdb://user:pass@host:5984`, `http://user:pass@host:5984` or without credentials
    /// (`couchdbs://` and `https://` need the crate's `tls` feature).
    pub url: String,
    /// Retries of a request that failed for a reason that may pass (connection refused or reset,
    /// timeout, 5xx), with exponential backoff from 125 ms. Fabric: `maxRetries`, 3.
    pub max_retries: u32,
    /// The same while opening the store, when CouchDB may still be starting. Fabric:
    /// `maxRetriesOnStartup`, 10.
    pub max_retries_on_startup: u32,
    /// Time limit of one HTTP request. Fabric: `requestTimeout`, 35 s.
    pub request_timeout: Duration,
    /// Documents per `_bulk_docs` request, and keys per `_all_docs` request. Fabric:
    /// `maxBatchUpdateSize`, 1000.
    pub max_batch_update_size: usize,
    /// Rows per request of a range read. Fabric: `internalQueryLimit`, 1000.
    pub internal_query_limit: usize,
    /// How long a commit whose block is half applied keeps retrying before it gives up (see
    /// [`crate::CouchStore`]): then the error is not retryable, and the next open of the store
    /// finishes the block. Not in Fabric, whose peer panics at once.
    pub commit_retry_timeout: Duration,
    /// Prepended to every database name with `+`, so that several peers can share one CouchDB
    /// (Fabric gives each peer its own). Empty, or a-z followed by a-z 0-9 `-`.
    pub db_prefix: String,
    /// TEST ONLY: the fault hook. `commit` returns a non-retryable error right after the state
    /// writes, before the tx-id index and the savepoint, as a crash there would leave it.
    pub fail_after_state_writes: bool,
}

impl CouchConfig {
    /// Fabric's defaults for the CouchDB at `url`.
    pub fn new(url: impl Into<String>) -> CouchConfig {
        CouchConfig {
            url: url.into(),
            max_retries: 3,
            max_retries_on_startup: 10,
            request_timeout: Duration::from_secs(35),
            max_batch_update_size: 1000,
            internal_query_limit: 1000,
            commit_retry_timeout: Duration::from_secs(300),
            db_prefix: String::new(),
            fail_after_state_writes: false,
        }
    }

    /// Checks every value; the error names the bad one.
    pub fn validate(&self) -> Result<Endpoint, String> {
        if self.request_timeout.is_zero() {
            return Err("couchdb requestTimeout must be more than 0".into());
        }
        if self.max_batch_update_size == 0 {
            return Err("couchdb maxBatchUpdateSize must be at least 1".into());
        }
        if self.internal_query_limit == 0 {
            return Err("couchdb internalQueryLimit must be at least 1".into());
        }
        names::check_prefix(&self.db_prefix)?;
        Endpoint::parse(&self.url)
    }
}

/// The configuration without the password.
impl fmt::Debug for CouchConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = Endpoint::parse(&self.url).map_or_else(|_| "<invalid url>".to_string(), |e| e.to_string());
        f.debug_struct("CouchConfig")
            .field("url", &url)
            .field("max_retries", &self.max_retries)
            .field("max_retries_on_startup", &self.max_retries_on_startup)
            .field("request_timeout", &self.request_timeout)
            .field("max_batch_update_size", &self.max_batch_update_size)
            .field("internal_query_limit", &self.internal_query_limit)
            .field("commit_retry_timeout", &self.commit_retry_timeout)
            .field("db_prefix", &self.db_prefix)
            .field("fail_after_state_writes", &self.fail_after_state_writes)
            .finish()
    }
}

/// A parsed CouchDB URL: the base URL without credentials, and the credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `http://host:port` (or `https://`), no credentials, no trailing slash.
    pub base: String,
    /// `None` when the URL has none: then requests carry no `Authorization` header at all
    /// (pouchdb-server answers 401 to empty basic-auth credentials).
    pub credentials: Option<(String, String)>,
}

impl Endpoint {
    pub fn parse(text: &str) -> Result<Endpoint, String> {
        let bad = |why: &str| format!("CouchDB URL {:?}: {why}", redact(text));
        let url = Url::parse(text).map_err(|e| bad(&e.to_string()))?;
        let scheme = match url.scheme() {
            "couchdb" | "http" => "http",
            "couchdbs" | "https" => "https",
            other => return Err(bad(&format!("scheme {other:?} is not couchdb, couchdbs, http or https"))),
        };
        if scheme == "https" && !cfg!(feature = "tls") {
            return Err(bad("https needs streamledger-couch built with its `tls` feature"));
        }
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad("no host"))?.to_string();
        // `couchdb://` has no known default port: CouchDB's is 5984.
        let port = url.port_or_known_default().unwrap_or(5984);
        let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
        let user = decode(url.username());
        let password = url.password().map(decode).unwrap_or_default();
        let credentials = (!user.is_empty() || !password.is_empty()).then_some((user, password));
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("a query or fragment is not allowed"));
        }
        let path = url.path().trim_end_matches('/').to_string();
        if !path.is_empty() {
            // couch_rs sets each request's path from the root, so a path prefix would be lost.
            return Err(bad("a path is not supported: give the server's root URL"));
        }
        let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host };
        Ok(Endpoint { base: format!("{scheme}://{host}:{port}"), credentials })
    }
}

/// Shows the URL without the password.
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.credentials {
            Some((user, _)) => {
                let (scheme, rest) = self.base.split_once("://").unwrap_or(("http", &self.base));
                write!(f, "{scheme}://{user}:***@{rest}")
            }
            None => f.write_str(&self.base),
        }
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A URL for error messages: the password replaced.
fn redact(text: &str) -> String {
    match Url::parse(text) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        Ok(url) => url.to_string(),
        Err(_) => "<unparsable>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_and_without_credentials() {
        let e = Endpoint::parse("couchdb://admin:s%40cret@couch.example:5984").unwrap();
        assert_eq!(e.base, "http://couch.example:5984");
        assert_eq!(e.credentials, Some(("admin".into(), "s@cret".into())));
        assert_eq!(e.to_string(), "http://admin:***@couch.example:5984");

        let e = Endpoint::parse("couchdb://couch").unwrap();
        assert_eq!((e.base.as_str(), e.credentials), ("http://couch:5984", None));
        let e = Endpoint::parse("http://127.0.0.1:15984/").unwrap();
        assert_eq!((e.base.as_str(), e.credentials), ("http://127.0.0.1:15984", None));
        let e = Endpoint::parse("http://[::1]:5984").unwrap();
        assert_eq!(e.base, "http://[::1]:5984");
    }

    #[test]
    fn bad_urls_are_named_without_the_password() {
        for (url, why) in [
            ("ftp://h:1", "scheme"),
            ("couchdb://u:pw@h:1/db", "path"),
            ("couchdb://u:pw@h:1?x=1", "query"),
            ("not a url", "relative URL"),
        ] {
            let err = Endpoint::parse(url).unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
            assert!(!err.contains("pw"), "{err}");
        }
        if !cfg!(feature = "tls") {
            assert!(Endpoint::parse("couchdbs://h").unwrap_err().contains("tls"));
        }
    }

    #[test]
    fn config_is_validated_and_debug_hides_the_password() {
        let mut c = CouchConfig::new("couchdb://admin:hunter2@h:5984");
        assert!(c.validate().is_ok());
        assert!(!format!("{c:?}").contains("hunter2"));
        c.max_batch_update_size = 0;
        assert!(c.validate().unwrap_err().contains("maxBatchUpdateSize"));
        c.max_batch_update_size = 1;
        c.db_prefix = "Org1".into();
        assert!(c.validate().unwrap_err().contains("Org1"));
    }
}
