//! Per-client permissions on an endpoint served with mutual TLS (`--tls-client-permissions`).
//!
//! Mutual TLS alone admits every client whose certificate the clients' CA signed, to everything
//! the port serves. A permissioned ledger wants less: a dashboard that reads, an application that
//! submits, a scraper that sees `/metrics`. Fabric decides this with channel ACLs over the signed
//! identity of each request; the signed proposals here are already checked that way by the
//! endorsers, so what is left to guard is the HTTP surface itself, and above all
//! `POST /v1/transactions`, where the node signs with its own client identity.
//!
//! A client is named by the common name (CN) of its certificate's subject. The file (TOML):
//!
//! ```toml
//! default = ["read"]                      # a client named below gets its own list instead
//! [clients]
//! "dashboard" = ["read", "metrics"]
//! "payments-app" = ["read", "propose", "submit"]
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use axum::http::Method;
use serde::Deserialize;

use crate::tls::TlsFileError;

/// What a client may do. Each request needs one at most (see [`Permission::needed_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Status, state, blocks, transaction status, rich queries.
    Read,
    /// `POST /v1/proposals`: proposals the client signed itself.
    Propose,
    /// `POST /v1/transactions`: proposals the node signs with its own client identity.
    Submit,
    /// `GET /metrics`.
    Metrics,
    /// Every permission above.
    All,
}

impl Permission {
    /// The permission a request needs: `None` for the health probes (any client the CA admitted
    /// may ask whether the process is up) and for paths nothing serves (answered 404 as before).
    pub fn needed_for(method: &Method, path: &str) -> Option<Permission> {
        match path {
            "/metrics" => Some(Permission::Metrics),
            "/v1/transactions" if method == Method::POST => Some(Permission::Submit),
            "/v1/proposals" => Some(Permission::Propose),
            _ if path.starts_with("/v1/") => Some(Permission::Read),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Propose => "propose",
            Permission::Submit => "submit",
            Permission::Metrics => "metrics",
            Permission::All => "all",
        }
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PermissionsFile {
    #[serde(default)]
    default: BTreeSet<Permission>,
    #[serde(default)]
    clients: BTreeMap<String, BTreeSet<Permission>>,
}

/// Who may do what, as read from a `--tls-client-permissions` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientPermissions {
    file: PathBuf,
    default: BTreeSet<Permission>,
    clients: BTreeMap<String, BTreeSet<Permission>>,
}

impl ClientPermissions {
    /// Reads and checks the file; an error names it and what is wrong (TOML's own message names
    /// the line, and an unknown permission the ones there are).
    pub fn load(path: &Path) -> Result<Self, TlsFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| TlsFileError { path: path.to_path_buf(), message: e.to_string() })?;
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, TlsFileError> {
        let bad = |message: String| TlsFileError { path: path.to_path_buf(), message };
        let file: PermissionsFile = toml::from_str(text).map_err(|e| {
            bad(format!("not a permissions file (expected `default = [...]` and a [clients] table of CN = [...]; permissions: read, propose, submit, metrics, all): {e}"))
        })?;
        if let Some(name) = file.clients.keys().find(|name| name.is_empty()) {
            return Err(bad(format!("a client with an empty name {name:?}: clients are named by their certificate's CN")));
        }
        Ok(Self { file: path.to_path_buf(), default: file.default, clients: file.clients })
    }

    /// The file the permissions were read from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Whether the client named `common_name` (`None`: a certificate without a CN) may do `what`.
    pub fn allows(&self, common_name: Option<&str>, what: Permission) -> bool {
        let granted = common_name.and_then(|cn| self.clients.get(cn)).unwrap_or(&self.default);
        granted.contains(&what) || granted.contains(&Permission::All)
    }

    /// Why a request was refused, in the words the client gets back: not the file's path, which
    /// is the server's business (the server's log names it).
    pub fn refusal(&self, common_name: Option<&str>, what: Permission, method: &Method, path: &str) -> String {
        let who = match common_name {
            Some(cn) if self.clients.contains_key(cn) => format!("the client certificate CN={cn:?}"),
            Some(cn) => format!("the client certificate CN={cn:?} (not listed: the default permissions apply)"),
            None => "a client certificate without a CN (the default permissions apply)".to_string(),
        };
        format!("{who} lacks the permission \"{what}\" for {method} {path} (granted by the node's --tls-client-permissions)")
    }
}

/// The common name of a DER certificate's subject, if it has one that is text.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<ClientPermissions, String> {
        ClientPermissions::parse(Path::new("perms.toml"), text).map_err(|e| format!("{}: {}", e.path.display(), e.message))
    }

    #[test]
    fn each_request_needs_the_permission_of_its_endpoint() {
        let needed = |m: Method, p: &str| Permission::needed_for(&m, p);
        assert_eq!(needed(Method::POST, "/v1/transactions"), Some(Permission::Submit));
        assert_eq!(needed(Method::POST, "/v1/proposals"), Some(Permission::Propose));
        assert_eq!(needed(Method::GET, "/v1/transactions/abc"), Some(Permission::Read));
        assert_eq!(needed(Method::GET, "/v1/status"), Some(Permission::Read));
        assert_eq!(needed(Method::POST, "/v1/query/transfer"), Some(Permission::Read));
        assert_eq!(needed(Method::GET, "/v1/state/transfer/alice"), Some(Permission::Read));
        assert_eq!(needed(Method::GET, "/metrics"), Some(Permission::Metrics));
        assert_eq!(needed(Method::GET, "/healthz"), None);
        assert_eq!(needed(Method::GET, "/readyz"), None);
        assert_eq!(needed(Method::GET, "/nothing"), None);
    }

    #[test]
    fn a_listed_client_gets_its_own_list_and_others_the_default() {
        let p = parsed("default = [\"read\"]\n[clients]\n\"app\" = [\"propose\", \"submit\"]\n\"ops\" = [\"all\"]\n").unwrap();
        assert!(p.allows(Some("app"), Permission::Submit));
        assert!(!p.allows(Some("app"), Permission::Read), "a listed client's list replaces the default");
        assert!(p.allows(Some("stranger"), Permission::Read));
        assert!(!p.allows(Some("stranger"), Permission::Submit));
        assert!(p.allows(None, Permission::Read));
        assert!(!p.allows(None, Permission::Metrics));
        for what in [Permission::Read, Permission::Propose, Permission::Submit, Permission::Metrics] {
            assert!(p.allows(Some("ops"), what), "all grants {what}");
        }
        let none = parsed("").unwrap();
        assert!(!none.allows(Some("anyone"), Permission::Read), "an empty file grants nothing");
    }

    #[test]
    fn a_refusal_names_the_client_the_permission_and_the_request() {
        let p = parsed("default = []\n[clients]\n\"app\" = [\"read\"]\n").unwrap();
        let m = p.refusal(Some("app"), Permission::Submit, &Method::POST, "/v1/transactions");
        assert_eq!(m, "the client certificate CN=\"app\" lacks the permission \"submit\" for POST /v1/transactions (granted by the node's --tls-client-permissions)");
        let m = p.refusal(Some("x"), Permission::Read, &Method::GET, "/v1/status");
        assert!(m.contains("CN=\"x\" (not listed: the default permissions apply)"), "{m}");
        let m = p.refusal(None, Permission::Metrics, &Method::GET, "/metrics");
        assert!(m.starts_with("a client certificate without a CN"), "{m}");
    }

    #[test]
    fn bad_files_are_refused_naming_the_file_and_what_is_wrong() {
        for (text, expected) in [
            ("default = [\"write\"]", "unknown variant `write`"),
            ("[clients]\n\"app\" = \"read\"", "invalid type"),
            ("defaults = [\"read\"]", "unknown field `defaults`"),
            ("default = [\"read\"", "not a permissions file"),
            ("[clients]\n\"\" = [\"read\"]", "empty name"),
        ] {
            let err = parsed(text).unwrap_err();
            assert!(err.starts_with("perms.toml: "), "{text:?}: {err}");
            assert!(err.contains(expected), "{text:?}: {err}");
        }
        let missing = ClientPermissions::load(Path::new("/nonexistent/perms.toml")).unwrap_err();
        assert_eq!(missing.path, Path::new("/nonexistent/perms.toml"));
        assert!(missing.message.contains("No such file"), "{}", missing.message);
    }
}
