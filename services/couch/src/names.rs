//! Database names, as Fabric names them: `<channel>_<contract>` for a contract's state and
//! `<channel>_` for the channel's metadata (Fabric's `constructNamespaceDBName` and
//! `constructMetadataDBName`).
//!
//! CouchDB takes names matching `^[a-z][a-z0-9_$()+/-]*$`, at most 238 characters. Like Fabric,
//! an upper-case letter becomes `$` and the letter in lower case; other characters CouchDB does not
//! take (and `_` in the channel, which would blur the separator) become `(` + hex of their UTF-8
//! bytes + `)`, and the empty name `()`. The mapping is one-to-one: `$` is always followed by a
//! letter and `(...)` holds hex, so no two (prefix, channel, contract) give one name. A name over
//! 238 characters keeps its first 170 and gets `(` + SHA-256 of the whole name + `)`, as Fabric
//! truncates with a hash.

use sha2::{Digest, Sha256};

/// CouchDB's limit on database names.
pub const MAX_DB_NAME: usize = 238;
const TRUNCATED_TO: usize = 170;

fn escape(name: &str, escape_underscore: bool) -> String {
    if name.is_empty() {
        return "()".into();
    }
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            'a'..='z' | '0'..='9' | '-' => out.push(c),
            '_' if !escape_underscore => out.push(c),
            'A'..='Z' => {
                out.push('$');
                out.push(c.to_ascii_lowercase());
            }
            _ => {
                let mut buf = [0; 4];
                out.push('(');
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("{b:02x}"));
                }
                out.push(')');
            }
        }
    }
    out
}

/// Keeps a name within CouchDB's limit.
fn limit(name: String) -> String {
    if name.len() <= MAX_DB_NAME {
        return name;
    }
    let hash = hex::encode(Sha256::digest(name.as_bytes()));
    // Escaped names are ASCII, so any byte index is a character boundary.
    format!("{}({hash})", &name[..TRUNCATED_TO])
}

/// The part every database of a channel starts with: the optional prefix (which lets several
/// peers share one CouchDB), then the escaped channel.
fn channel_part(prefix: &str, channel: &str) -> String {
    let channel = escape(channel, true);
    if !prefix.is_empty() {
        // `+` never comes out of `escape`, so it separates unambiguously.
        return format!("{prefix}+{channel}");
    }
    if channel.starts_with(|c: char| c.is_ascii_lowercase()) {
        channel
    } else {
        // A name must start with a letter; `x$` followed by something other than a letter
        // never comes out of `escape`, so this stays one-to-one.
        format!("x${channel}")
    }
}

/// Is `prefix` usable as a database-name prefix: empty, or a lower-case letter followed by
/// lower-case letters, digits and `-`?
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    let ok = prefix.is_empty()
        || (prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && prefix.len() <= 40);
    if ok {
        Ok(())
    } else {
        Err(format!("database prefix {prefix:?} must be a-z followed by up to 39 of a-z 0-9 -"))
    }
}

/// The channel's metadata database: `<channel>_`.
pub fn metadata_db(prefix: &str, channel: &str) -> String {
    limit(format!("{}_", channel_part(prefix, channel)))
}

/// A contract's state database: `<channel>_<contract>`.
pub fn namespace_db(prefix: &str, channel: &str, namespace: &str) -> String {
    limit(format!("{}_{}", channel_part(prefix, channel), escape(namespace, false)))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn valid(name: &str) -> bool {
        name.len() <= MAX_DB_NAME
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.chars().all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '$' | '(' | ')' | '+' | '/' | '-'))
    }

    #[test]
    fn names_are_fabrics_where_fabric_has_them() {
        assert_eq!(namespace_db("", "mychannel", "transfer"), "mychannel_transfer");
        assert_eq!(metadata_db("", "mychannel"), "mychannel_");
        assert_eq!(namespace_db("", "mychannel", "myCC"), "mychannel_my$c$c");
        assert_eq!(namespace_db("", "mychannel", "kv_store"), "mychannel_kv_store");
    }

    #[test]
    fn every_name_is_valid_and_distinct() {
        let channels = ["mychannel", "a_b", "a", "A", "1ch", "_x", "x$a", "ch.1", "é", "", "b"];
        let namespaces = ["", "b_c", "c", "a\0", "a", "ab", "B", "$b", "(62)", "x.y", "😀", "_", "b"];
        let mut seen = HashSet::new();
        for prefix in ["", "org1-peer0", "org2"] {
            for ch in channels {
                assert!(valid(&metadata_db(prefix, ch)), "{prefix:?} {ch:?} {}", metadata_db(prefix, ch));
                assert!(seen.insert(metadata_db(prefix, ch)), "{prefix:?} {ch:?}");
                for ns in namespaces {
                    let name = namespace_db(prefix, ch, ns);
                    assert!(valid(&name), "{prefix:?} {ch:?} {ns:?}: {name}");
                    assert!(seen.insert(name.clone()), "{prefix:?} {ch:?} {ns:?} collides: {name}");
                }
            }
        }
    }

    #[test]
    fn long_names_are_truncated_with_a_hash() {
        let ns = "N".repeat(200);
        let name = namespace_db("", "mychannel", &ns);
        assert!(valid(&name) && name.len() < MAX_DB_NAME, "{name}");
        assert_ne!(name, namespace_db("", "mychannel", &"N".repeat(201)));
        assert!(name.starts_with("mychannel_$n$n"));
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(check_prefix("").is_ok());
        assert!(check_prefix("org1-peer0").is_ok());
        for bad in ["Org1", "1org", "org_1", "org.1", "-x", &"a".repeat(41)] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }
}
