//! Per-client permissions on an endpoint served with mutual TLS (`--tls-client-permissions`).
//!
//! Mutual TLS alone admits every client whose certificate the clients' CA signed, to everything
//! the port serves. A permissioned ledger wants less: a dashboard that reads, an application that
//! submits, a scraper that sees `/metrics`. Fabric decides this with channel ACLs over the signed
//! identity of each request; the signed proposals here are already checked that way by the
//! endorsers, so what is left to guard is the HTTP surface itself, and above all
//! `POST /v1/transactions`, where the node signs with its own client identity.
//!
//! A client is named by the common name (CN) of its certificate's subject, and may hold roles in
//! its organizational units (OU), as Fabric's NodeOUs put `client` or `admin` there. The file
//! (TOML):
//!
//! ```toml
//! default = ["read"]                      # a client matched below gets its own lists instead
//! [clients]
//! "dashboard" = ["read", "metrics"]
//! "payments-app" = ["read", "propose", "submit"]
//! [organizational_units]
//! "admin" = ["all"]
//! ```
//!
//! A client gets every permission of its CN's entry and of each of its OUs' entries; the default
//! only when none of them is listed.

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
}

/// The name the permissions file uses.
impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Permission::Read => "read",
            Permission::Propose => "propose",
            Permission::Submit => "submit",
            Permission::Metrics => "metrics",
            Permission::All => "all",
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PermissionsFile {
    #[serde(default)]
    default: BTreeSet<Permission>,
    #[serde(default)]
    clients: BTreeMap<String, BTreeSet<Permission>>,
    #[serde(default)]
    organizational_units: BTreeMap<String, BTreeSet<Permission>>,
}

/// Who may do what, as read from a `--tls-client-permissions` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientPermissions {
    file: PathBuf,
    default: BTreeSet<Permission>,
    clients: BTreeMap<String, BTreeSet<Permission>>,
    units: BTreeMap<String, BTreeSet<Permission>>,
}

/// What a connection's client certificate says of its holder (its subject's CN and OUs, those
/// that are text); empty without a certificate or for one that does not parse.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIdentity {
    pub common_name: Option<String>,
    pub units: Vec<String>,
}

impl ClientIdentity {
    pub fn from_der(der: &[u8]) -> Self {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Self::default() };
        fn text(attribute: &x509_parser::x509::AttributeTypeAndValue) -> Option<String> {
            attribute.as_str().ok().map(str::to_string)
        }
        let subject = cert.subject();
        let common_name = subject.iter_common_name().find_map(text);
        let units = subject.iter_organizational_unit().filter_map(text).collect();
        Self { common_name, units }
    }

    /// `CN="app", OU="client"`, as a refusal names the client.
    fn describe(&self) -> String {
        let cn = self.common_name.iter().map(|cn| format!("CN={cn:?}"));
        let units = self.units.iter().map(|ou| format!("OU={ou:?}"));
        cn.chain(units).collect::<Vec<_>>().join(", ")
    }
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
            bad(format!(
                "not a permissions file (expected `default = [...]`, a [clients] table of CN = [...] and an [organizational_units] table of \
                 OU = [...]; permissions: read, propose, submit, metrics, all): {e}"
            ))
        })?;
        if file.clients.contains_key("") {
            return Err(bad("a client with an empty name \"\": clients are named by their certificate's CN".into()));
        }
        if file.organizational_units.contains_key("") {
            return Err(bad("an organizational unit with an empty name \"\" in [organizational_units]".into()));
        }
        Ok(Self { file: path.to_path_buf(), default: file.default, clients: file.clients, units: file.organizational_units })
    }

    /// What the entries of the client's CN and OUs grant together; `None` when none is listed.
    fn granted(&self, client: &ClientIdentity) -> Option<BTreeSet<Permission>> {
        let by_name = client.common_name.as_deref().and_then(|cn| self.clients.get(cn));
        let by_unit = client.units.iter().filter_map(|ou| self.units.get(ou));
        let entries: Vec<&BTreeSet<Permission>> = by_name.into_iter().chain(by_unit).collect();
        (!entries.is_empty()).then(|| entries.into_iter().flatten().copied().collect())
    }

    /// The file the permissions were read from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Whether `client` may do `what`.
    pub fn allows(&self, client: &ClientIdentity, what: Permission) -> bool {
        let granted = self.granted(client);
        let granted = granted.as_ref().unwrap_or(&self.default);
        granted.contains(&what) || granted.contains(&Permission::All)
    }

    /// Why a request was refused, in the words the client gets back: not the file's path, which
    /// is the server's business (the server's log names it).
    pub fn refusal(&self, client: &ClientIdentity, what: Permission, method: &Method, path: &str) -> String {
        let who = match (client.describe(), self.granted(client).is_some()) {
            (named, true) => format!("the client certificate {named}"),
            (named, false) if client.common_name.is_some() => {
                format!("the client certificate {named} (not listed: the default permissions apply)")
            }
            (_, false) => "a client certificate without a CN (the default permissions apply)".to_string(),
        };
        format!("{who} lacks the permission \"{what}\" for {method} {path} (granted by the node's --tls-client-permissions)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(cn: &str, units: &[&str]) -> ClientIdentity {
        ClientIdentity { common_name: Some(cn.to_string()), units: units.iter().map(|u| u.to_string()).collect() }
    }

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
        let anonymous = ClientIdentity::default();
        assert!(p.allows(&named("app", &[]), Permission::Submit));
        assert!(!p.allows(&named("app", &[]), Permission::Read), "a listed client's list replaces the default");
        assert!(p.allows(&named("stranger", &[]), Permission::Read));
        assert!(!p.allows(&named("stranger", &[]), Permission::Submit));
        assert!(p.allows(&anonymous, Permission::Read));
        assert!(!p.allows(&anonymous, Permission::Metrics));
        for what in [Permission::Read, Permission::Propose, Permission::Submit, Permission::Metrics] {
            assert!(p.allows(&named("ops", &[]), what), "all grants {what}");
        }
        let none = parsed("").unwrap();
        assert!(!none.allows(&named("anyone", &[]), Permission::Read), "an empty file grants nothing");
    }

    #[test]
    fn organizational_units_grant_to_every_client_in_them_together_with_its_name() {
        let p = parsed(
            "default = [\"read\"]\n[clients]\n\"app\" = [\"propose\"]\n[organizational_units]\n\"admin\" = [\"metrics\"]\n\"client\" = [\"submit\"]\n",
        )
        .unwrap();
        let both = named("app", &["client", "admin"]);
        for what in [Permission::Propose, Permission::Submit, Permission::Metrics] {
            assert!(p.allows(&both, what), "the CN's and both OUs' grants add up: {what}");
        }
        assert!(!p.allows(&both, Permission::Read), "a matched client does not get the default");
        let unit_only = named("someone", &["admin"]);
        assert!(p.allows(&unit_only, Permission::Metrics) && !p.allows(&unit_only, Permission::Read), "an OU alone is a match");
        let unlisted = named("someone", &["peer"]);
        assert!(p.allows(&unlisted, Permission::Read) && !p.allows(&unlisted, Permission::Metrics), "an OU not listed: the default");
        let anonymous_admin = ClientIdentity { common_name: None, units: vec!["admin".into()] };
        assert!(p.allows(&anonymous_admin, Permission::Metrics), "a certificate without a CN is matched by its OU");
        let m = p.refusal(&named("someone", &["admin"]), Permission::Submit, &Method::POST, "/v1/transactions");
        assert!(m.starts_with("the client certificate CN=\"someone\", OU=\"admin\" lacks the permission \"submit\""), "{m}");
    }

    #[test]
    fn a_refusal_names_the_client_the_permission_and_the_request() {
        let p = parsed("default = []\n[clients]\n\"app\" = [\"read\"]\n").unwrap();
        let m = p.refusal(&named("app", &[]), Permission::Submit, &Method::POST, "/v1/transactions");
        assert_eq!(m, "the client certificate CN=\"app\" lacks the permission \"submit\" for POST /v1/transactions (granted by the node's --tls-client-permissions)");
        let m = p.refusal(&named("x", &["client"]), Permission::Read, &Method::GET, "/v1/status");
        assert!(m.contains("CN=\"x\", OU=\"client\" (not listed: the default permissions apply)"), "{m}");
        let m = p.refusal(&ClientIdentity::default(), Permission::Metrics, &Method::GET, "/metrics");
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
            ("[organizational_units]\n\"\" = [\"read\"]", "organizational unit with an empty name"),
            ("[organizational_units]\n\"admin\" = [\"root\"]", "unknown variant `root`"),
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
