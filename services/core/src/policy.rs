//! Endorsement policies: Fabric's policy language (`AND`, `OR`, `OutOf` over `'ORG.ROLE'`
//! principals), parsed from the text operators write in config, and evaluated the way Fabric's
//! `cauthdsl` does.
//!
//! Evaluation copies Fabric exactly, quirks included, for two reasons: the verdict is written into
//! the ledger (ENDORSEMENT_POLICY_FAILURE), so every peer must reach the same one, and people moving
//! from Fabric must get the answers they already get there for the same policy and endorsements.
//!
//! The parser takes text that may come from anyone who can submit config, so everything it builds
//! is bounded ([`MAX_POLICY_BYTES`], [`MAX_DEPTH`], [`MAX_PRINCIPALS`]). Its errors carry a byte
//! offset and render with a caret, because policy text is usually one line buried in a config file
//! and "syntax error" alone sends people hunting.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Longest policy text accepted. Real policies are a few hundred bytes; the limit only stops
/// a hostile or broken config from making the parser, the error (which holds the text) and every
/// later evaluation arbitrarily expensive.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

/// Deepest gate nesting accepted. Parsing, evaluation and display recurse once per level, so this
/// keeps the stack bounded no matter what the text says.
pub const MAX_DEPTH: usize = 32;

/// Most principals one policy may name. Evaluation costs (principals × signers), so this bounds
/// the work a validator does per transaction.
pub const MAX_PRINCIPALS: usize = 1024;

/// An MSP role, as Fabric's `MSPRole` (with NodeOUs: client, peer, admin, orderer; `member` is any
/// identity of the org).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Member,
    Peer,
    Client,
    Admin,
    Orderer,
}

impl Role {
    /// Every role, in the order error messages list them.
    pub const ALL: [Role; 5] = [Role::Member, Role::Peer, Role::Client, Role::Admin, Role::Orderer];

    /// The spelling used in policy text and config.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Peer => "peer",
            Role::Client => "client",
            Role::Admin => "admin",
            Role::Orderer => "orderer",
        }
    }

    /// Whether an identity holding `self` satisfies a principal asking for `principal_role`.
    /// `member` asks only for membership of the org, so any role satisfies it; any other role must
    /// be held exactly (Fabric does not treat an admin as a peer, nor a peer as a client).
    pub fn satisfies(self, principal_role: Role) -> bool {
        principal_role == Role::Member || self == principal_role
    }

    fn lookup(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Text quoted in a message, with control characters escaped so a message stays one line and
/// safe for a terminal, and nothing else escaped (quotes are what users typed, and should show).
fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The message for an unknown role, listing the valid ones so the fix is in the error itself.
fn unknown_role_message(name: &str) -> String {
    let valid: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
    format!("unknown role `{}`: expected one of {}", printable(name), valid.join(", "))
}

impl FromStr for Role {
    /// A [`PolicyError`], so that callers holding one error type for policy text need no second.
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::lookup(s).ok_or_else(|| PolicyError::new(s, 0, unknown_role_message(s)))
    }
}

/// Who must sign: a role within an org (Fabric's MSP id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    pub org: String,
    pub role: Role,
}

/// Written `ORG.ROLE`, the form policy text quotes.
impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.org, self.role)
    }
}

/// Accepts the unquoted `ORG.ROLE` form, for config that lists principals outside a policy.
impl FromStr for Principal {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::too_long(s));
        }
        parse_principal_body(s, 0, 0).map_err(|(position, message)| PolicyError::new(s, position, message))
    }
}

/// An endorsement policy. `AND(a, b, ..)` is `OutOf(len, ..)` and `OR(..)` is `OutOf(1, ..)`, as
/// in Fabric's `SignaturePolicy`, so there is one evaluation rule instead of three.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    SignedBy(Principal),
    OutOf(usize, Vec<Policy>),
}

/// One endorser offered to [`Policy::evaluate`]. Borrowed, because a validator builds these for
/// every transaction of every block and the data already lives in the endorsement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignerRef<'a> {
    pub org: &'a str,
    pub role: Role,
    /// The signer's public key: two signers with the same key are one identity, however many
    /// endorsements carry it.
    pub id: &'a [u8],
}

impl Policy {
    /// Parses Fabric policy text such as `AND('Org1.peer', OutOf(2, 'Org2.member', 'Org3.member'))`.
    ///
    /// Function names are case-insensitive and whitespace may surround any token, as in Fabric.
    /// The org is everything before the principal's last dot, so MSP ids such as
    /// `org1.example.com` work; it may hold only ASCII letters, digits, `.`, `-` and `_` (Fabric
    /// allows the first four), which keeps every parsed policy printable back to the same text.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        if text.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::too_long(text));
        }
        let mut parser = Parser { text, bytes: text.as_bytes(), pos: 0, principals: 0 };
        let policy = parser.policy(0)?;
        parser.skip_ws();
        if parser.pos < text.len() {
            return Err(parser
                .error(parser.pos, format!("unexpected {} after the end of the policy", parser.found(parser.pos))));
        }
        Ok(policy)
    }

    /// Whether `signers` satisfy the policy, with Fabric's `cauthdsl` semantics.
    ///
    /// Pass only signers whose signatures verified, in endorsement order: Fabric drops invalid
    /// signatures before it de-duplicates, and the order decides which signer a principal takes.
    ///
    /// Signers are first de-duplicated by `id`, keeping the first occurrence (Fabric's
    /// `SignatureSetToValidIdentities`), so one key listed twice counts once. Then each principal
    /// takes the first unused signer that satisfies it and marks it used; a gate tries each child
    /// in order on a copy of the used flags, keeps the copy when the child holds, and holds when at
    /// least `n` children held. Hence `AND('Org1.member', 'Org1.member')` needs two distinct Org1
    /// keys.
    ///
    /// Fabric's greedy choice has consequences this keeps on purpose, for parity:
    /// - it can miss a valid assignment: `AND('Org1.member', 'Org1.peer')` fails for
    ///   `[Org1 peer, Org1 client]` (the `member` principal takes the peer), yet holds for the
    ///   same two signers in the other order;
    /// - a gate keeps the signers of *every* child that held, not just the first `n`, so
    ///   `AND(OR('Org1.member', 'Org2.member'), 'Org2.member')` fails for one Org1 and one Org2
    ///   signer;
    /// - it is not monotone: one more signer can make a child that failed hold, and the signers it
    ///   then takes can starve a later sibling, turning true into false.
    pub fn evaluate(&self, signers: &[SignerRef<'_>]) -> bool {
        // BTreeSet rather than HashSet: the core draws no randomness, not even hash seeds.
        let mut seen: BTreeSet<&[u8]> = BTreeSet::new();
        let unique: Vec<&SignerRef<'_>> = signers.iter().filter(|s| seen.insert(s.id)).collect();
        let mut used = vec![false; unique.len()];
        satisfied(self, &unique, &mut used)
    }

    /// Every org the policy names, so config can be checked for orgs that do not exist and the
    /// gateway knows whose endorsers to ask.
    pub fn orgs(&self) -> BTreeSet<&str> {
        let mut orgs = BTreeSet::new();
        let mut stack = vec![self];
        while let Some(policy) = stack.pop() {
            match policy {
                Policy::SignedBy(p) => {
                    orgs.insert(p.org.as_str());
                }
                Policy::OutOf(_, children) => stack.extend(children),
            }
        }
        orgs
    }
}

/// One step of Fabric's `compile`d policy function: `used` marks signers already taken by
/// principals that held earlier in this evaluation.
fn satisfied(policy: &Policy, signers: &[&SignerRef<'_>], used: &mut [bool]) -> bool {
    match policy {
        Policy::SignedBy(principal) => {
            let pick = signers
                .iter()
                .zip(used.iter())
                .position(|(s, &taken)| !taken && s.org == principal.org && s.role.satisfies(principal.role));
            match pick.and_then(|i| used.get_mut(i)) {
                Some(flag) => {
                    *flag = true;
                    true
                }
                None => false,
            }
        }
        Policy::OutOf(n, children) => {
            let mut trial = vec![false; used.len()];
            let mut held = 0usize;
            for child in children {
                trial.copy_from_slice(used);
                if satisfied(child, signers, &mut trial) {
                    held += 1;
                    used.copy_from_slice(&trial);
                }
            }
            held >= *n
        }
    }
}

impl FromStr for Policy {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::parse(s)
    }
}

/// Canonical Fabric text: `AND` when every child is needed, `OR` when one is, `OutOf` otherwise;
/// single quotes; `, ` between arguments. [`Policy::parse`] reads it back to an equal policy, so
/// config can be normalised and policies compared as text.
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::SignedBy(p) => write!(f, "'{p}'"),
            Policy::OutOf(n, children) => {
                let mut first = true;
                if *n == children.len() && !children.is_empty() {
                    f.write_str("AND(")?;
                } else if *n == 1 {
                    f.write_str("OR(")?;
                } else {
                    write!(f, "OutOf({n}")?;
                    first = false;
                }
                for child in children {
                    if !first {
                        f.write_str(", ")?;
                    }
                    first = false;
                    write!(f, "{child}")?;
                }
                f.write_str(")")
            }
        }
    }
}

/// Policy text that could not be parsed: where, why, and the text itself so the error can be
/// shown on its own, far from the config it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at byte {position}{}\n{}", line_and_column(&self.text, self.position), caret_snippet(&self.text, self.position))]
pub struct PolicyError {
    /// Byte offset into `text` of the token at fault (the text's length for "ended too early").
    pub position: usize,
    pub message: String,
    /// The text parsed; for text over [`MAX_POLICY_BYTES`], only its first `MAX_POLICY_BYTES`
    /// bytes, so an error never holds more than the limit.
    pub text: String,
}

impl PolicyError {
    fn new(text: &str, position: usize, message: impl Into<String>) -> Self {
        Self { position, message: message.into(), text: text.to_owned() }
    }

    fn too_long(text: &str) -> Self {
        let mut cut = MAX_POLICY_BYTES.min(text.len());
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        Self::new(
            &text[..cut],
            cut,
            format!("policy text is {} bytes, over the limit of {MAX_POLICY_BYTES} bytes", text.len()),
        )
    }
}

/// The largest char boundary at or before `position`, so rendering never slices inside a char
/// (the fields are public, so a caller may build an error with any position).
fn char_floor(text: &str, position: usize) -> usize {
    let mut pos = position.min(text.len());
    while !text.is_char_boundary(pos) {
        pos -= 1;
    }
    pos
}

/// Line and column, only for multi-line text, where a byte offset alone is hard to find.
fn line_and_column(text: &str, position: usize) -> String {
    if !text.contains('\n') {
        return String::new();
    }
    let pos = char_floor(text, position);
    let before = &text[..pos];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..pos].chars().count() + 1;
    format!(" (line {line}, column {column})")
}

/// The line holding `position`, cut to a window around it, with a caret underneath. Control
/// characters become spaces so the caret stays aligned and nothing odd reaches a terminal.
fn caret_snippet(text: &str, position: usize) -> String {
    const CONTEXT: usize = 40;
    let pos = char_floor(text, position);
    let line_start = text[..pos].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[pos..].find('\n').map_or(text.len(), |i| pos + i);
    let clean = |c: char| if c.is_control() { ' ' } else { c };
    let before: Vec<char> = text[line_start..pos].chars().map(clean).collect();
    let after: Vec<char> = text[pos..line_end].chars().map(clean).collect();

    let mut line = String::new();
    let skip = before.len().saturating_sub(CONTEXT);
    if skip > 0 {
        line.push_str("...");
    }
    line.extend(&before[skip..]);
    let column = line.chars().count();
    line.extend(after.iter().take(CONTEXT));
    if after.len() > CONTEXT {
        line.push_str("...");
    }
    format!("{line}\n{}^", " ".repeat(column))
}

/// Checks the inside of a principal, `ORG.ROLE`. `offset` is where `body` starts in the whole
/// text and `whole` where to point when the principal as a whole is at fault.
fn parse_principal_body(body: &str, offset: usize, whole: usize) -> Result<Principal, (usize, String)> {
    let Some(dot) = body.rfind('.') else {
        return Err((
            whole,
            format!("principal `{}` has no dot: expected 'ORG.ROLE', e.g. 'Org1.member'", printable(body)),
        ));
    };
    let (org, role) = (&body[..dot], &body[dot + 1..]);
    if org.is_empty() {
        return Err((offset, format!("principal `{}` has an empty org", printable(body))));
    }
    if let Some((i, c)) =
        org.char_indices().find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err((
            offset + i,
            format!(
                "org `{}` contains `{}`: an org (MSP id) may hold only ASCII letters, digits, `.`, `-` and `_`",
                printable(org),
                printable(c.encode_utf8(&mut [0; 4]))
            ),
        ));
    }
    match Role::lookup(role) {
        Some(role) => Ok(Principal { org: org.to_owned(), role }),
        None => Err((offset + dot + 1, unknown_role_message(role))),
    }
}

#[derive(Clone, Copy)]
enum Gate {
    And,
    Or,
    OutOf,
}

/// A recursive-descent parser over bytes: every token is ASCII, and quoted text is scanned for an
/// ASCII quote, so positions always fall on char boundaries.
struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    principals: usize,
}

impl Parser<'_> {
    fn error(&self, position: usize, message: impl Into<String>) -> PolicyError {
        PolicyError::new(self.text, position, message)
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    /// What stands at `at`, for "expected X, found Y" messages.
    fn found(&self, at: usize) -> String {
        match self.text.get(at..).and_then(|rest| rest.chars().next()) {
            None => "end of text".to_owned(),
            Some(c) => format!("`{}`", printable(c.encode_utf8(&mut [0; 4]))),
        }
    }

    /// `depth` counts the gates around this policy.
    fn policy(&mut self, depth: usize) -> Result<Policy, PolicyError> {
        self.skip_ws();
        match self.peek() {
            Some(b'\'' | b'"') => self.principal().map(Policy::SignedBy),
            Some(b) if b.is_ascii_alphabetic() => self.gate(depth),
            _ => Err(self.error(
                self.pos,
                format!(
                    "expected a policy (AND(...), OR(...), OutOf(n, ...) or a quoted principal such as 'Org1.member'), found {}",
                    self.found(self.pos)
                ),
            )),
        }
    }

    fn gate(&mut self, depth: usize) -> Result<Policy, PolicyError> {
        let name_start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_') {
            self.pos += 1;
        }
        let name = &self.text[name_start..self.pos];
        let gate = if name.eq_ignore_ascii_case("and") {
            Gate::And
        } else if name.eq_ignore_ascii_case("or") {
            Gate::Or
        } else if name.eq_ignore_ascii_case("outof") {
            Gate::OutOf
        } else {
            return Err(self.error(name_start, format!("unknown function `{name}`: expected AND, OR or OutOf")));
        };
        if depth >= MAX_DEPTH {
            return Err(self.error(name_start, format!("policy nests deeper than {MAX_DEPTH} levels")));
        }

        self.skip_ws();
        if self.peek() != Some(b'(') {
            return Err(self.error(self.pos, format!("expected `(` after `{name}`, found {}", self.found(self.pos))));
        }
        let open = self.pos;
        self.pos += 1;
        self.skip_ws();
        if self.peek() == Some(b')') {
            let what =
                if matches!(gate, Gate::OutOf) { "a number n and at least one policy" } else { "at least one policy" };
            return Err(self.error(self.pos, format!("empty argument list: `{name}` needs {what}")));
        }

        let n = match gate {
            Gate::OutOf => Some(self.count(name)?),
            Gate::And | Gate::Or => None,
        };

        let mut children = Vec::new();
        loop {
            children.push(self.policy(depth + 1)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b')') => {
                    self.pos += 1;
                    break;
                }
                None => {
                    return Err(self.error(self.pos, format!("missing `)` to close the `{name}(` at byte {open}")));
                }
                Some(_) => {
                    return Err(self.error(self.pos, format!("expected `,` or `)`, found {}", self.found(self.pos))));
                }
            }
        }

        let n = match (gate, n) {
            (Gate::OutOf, Some((n, n_start))) => {
                if n > children.len() {
                    return Err(self.error(
                        n_start,
                        format!("n = {n}, but `{name}` lists only {} policies to satisfy", children.len()),
                    ));
                }
                n
            }
            (Gate::Or, _) => 1,
            _ => children.len(),
        };
        Ok(Policy::OutOf(n, children))
    }

    /// `OutOf`'s leading `n,`; returns n and where it starts (for "n too large" once the
    /// children are counted).
    fn count(&mut self, name: &str) -> Result<(usize, usize), PolicyError> {
        let start = self.pos;
        let rest = &self.text[start..];
        let len = rest
            .find(|c: char| c.is_ascii_whitespace() || matches!(c, ',' | '(' | ')' | '\'' | '"'))
            .unwrap_or(rest.len());
        let token = &rest[..len];
        if token.is_empty() {
            return Err(self.error(
                start,
                format!(
                    "`{name}` expects a number n (how many of its policies must hold) first, found {}",
                    self.found(start)
                ),
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.error(start, format!("n must be a whole number, found `{}`", printable(token))));
        }
        let n: usize = token.parse().map_err(|_| self.error(start, format!("n = {token} is too large")))?;
        if n == 0 {
            return Err(self.error(start, "n must be at least 1: a policy needing no signature protects nothing"));
        }
        self.pos = start + len;
        self.skip_ws();
        match self.peek() {
            Some(b',') => {
                self.pos += 1;
                Ok((n, start))
            }
            Some(b')') => Err(self
                .error(self.pos, format!("empty argument list: `{name}({n}, ...)` needs at least one policy after n"))),
            _ => Err(self.error(self.pos, format!("expected `,` after n, found {}", self.found(self.pos)))),
        }
    }

    fn principal(&mut self) -> Result<Principal, PolicyError> {
        let open = self.pos;
        let quote = self.bytes[open];
        let body_start = open + 1;
        let Some(len) = self.bytes[body_start..].iter().position(|&b| b == quote) else {
            return Err(
                self.error(open, format!("unterminated quote: no closing {} for this principal", quote as char))
            );
        };
        if self.principals >= MAX_PRINCIPALS {
            return Err(self.error(open, format!("policy names more than {MAX_PRINCIPALS} principals")));
        }
        self.principals += 1;
        let body_end = body_start + len;
        self.pos = body_end + 1;
        parse_principal_body(&self.text[body_start..body_end], body_start, open)
            .map_err(|(position, message)| self.error(position, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(org: &str, role: Role) -> Policy {
        Policy::SignedBy(Principal { org: org.to_owned(), role })
    }

    fn parse(text: &str) -> Policy {
        match Policy::parse(text) {
            Ok(policy) => policy,
            Err(e) => panic!("{text:?} should parse:\n{e}"),
        }
    }

    fn parse_err(text: &str) -> PolicyError {
        match Policy::parse(text) {
            Ok(policy) => panic!("{text:?} should not parse, got {policy:?}"),
            Err(e) => e,
        }
    }

    /// An owned signer, so tests can build lists freely and borrow [`SignerRef`]s from them.
    #[derive(Debug, Clone)]
    struct S {
        org: String,
        role: Role,
        id: Vec<u8>,
    }

    fn s(org: &str, role: Role, id: u8) -> S {
        S { org: org.to_owned(), role, id: vec![id] }
    }

    fn eval(policy: &Policy, signers: &[S]) -> bool {
        let refs: Vec<SignerRef<'_>> =
            signers.iter().map(|s| SignerRef { org: &s.org, role: s.role, id: &s.id }).collect();
        policy.evaluate(&refs)
    }

    // ---- parsing ----

    #[test]
    fn parses_a_bare_principal() {
        assert_eq!(parse("'Org1.member'"), p("Org1", Role::Member));
        assert_eq!(parse("\"Org1.peer\""), p("Org1", Role::Peer));
    }

    #[test]
    fn parses_each_gate() {
        let a = p("Org1", Role::Peer);
        let b = p("Org2", Role::Client);
        let c = p("Org3", Role::Admin);
        assert_eq!(parse("AND('Org1.peer', 'Org2.client')"), Policy::OutOf(2, vec![a.clone(), b.clone()]));
        assert_eq!(parse("OR('Org1.peer', 'Org2.client')"), Policy::OutOf(1, vec![a.clone(), b.clone()]));
        assert_eq!(
            parse("OutOf(2, 'Org1.peer', 'Org2.client', 'Org3.admin')"),
            Policy::OutOf(2, vec![a.clone(), b.clone(), c.clone()])
        );
        assert_eq!(parse("OutOf(1, 'Org1.peer')"), Policy::OutOf(1, vec![a.clone()]));
        assert_eq!(parse("AND('Org3.admin')"), Policy::OutOf(1, vec![c]));
    }

    #[test]
    fn parses_nesting() {
        let policy = parse("AND('Org1.peer', OR(OutOf(2, 'A.member', 'B.member', 'C.member'), AND('D.orderer')))");
        let expected = Policy::OutOf(
            2,
            vec![
                p("Org1", Role::Peer),
                Policy::OutOf(
                    1,
                    vec![
                        Policy::OutOf(2, vec![p("A", Role::Member), p("B", Role::Member), p("C", Role::Member)]),
                        Policy::OutOf(1, vec![p("D", Role::Orderer)]),
                    ],
                ),
            ],
        );
        assert_eq!(policy, expected);
    }

    #[test]
    fn function_names_are_case_insensitive() {
        let and = Policy::OutOf(2, vec![p("A", Role::Peer), p("B", Role::Peer)]);
        for name in ["AND", "and", "And", "aNd"] {
            assert_eq!(parse(&format!("{name}('A.peer', 'B.peer')")), and, "{name}");
        }
        let or = Policy::OutOf(1, vec![p("A", Role::Peer), p("B", Role::Peer)]);
        for name in ["OR", "or", "Or", "oR"] {
            assert_eq!(parse(&format!("{name}('A.peer', 'B.peer')")), or, "{name}");
        }
        for name in ["OutOf", "outof", "OUTOF", "oUtoF"] {
            assert_eq!(parse(&format!("{name}(1, 'A.peer', 'B.peer')")), or, "{name}");
        }
    }

    #[test]
    fn roles_are_case_insensitive_in_principals() {
        assert_eq!(parse("'Org1.PEER'"), p("Org1", Role::Peer));
        assert_eq!(parse("'Org1.Admin'"), p("Org1", Role::Admin));
    }

    #[test]
    fn both_quote_styles_and_mixed() {
        let expected = Policy::OutOf(2, vec![p("A", Role::Member), p("B", Role::Peer)]);
        assert_eq!(parse("AND('A.member', 'B.peer')"), expected);
        assert_eq!(parse("AND(\"A.member\", \"B.peer\")"), expected);
        assert_eq!(parse("AND(\"A.member\", 'B.peer')"), expected);
    }

    #[test]
    fn whitespace_between_any_tokens() {
        let text = " \t AND \n ( \r\n 'A.member' , OutOf ( 1 ,\"B.peer\" ) \t) \n";
        assert_eq!(
            parse(text),
            Policy::OutOf(2, vec![p("A", Role::Member), Policy::OutOf(1, vec![p("B", Role::Peer)])])
        );
        assert_eq!(parse("AND('A.member','B.peer')"), parse("AND( 'A.member' , 'B.peer' )"));
    }

    #[test]
    fn org_is_everything_before_the_last_dot() {
        assert_eq!(parse("'org1.example.com.peer'"), p("org1.example.com", Role::Peer));
        assert_eq!(parse("'Org-1_x.member'"), p("Org-1_x", Role::Member));
    }

    #[test]
    fn leading_zeros_in_n_are_accepted() {
        assert_eq!(
            parse("OutOf(02, 'A.peer', 'B.peer')"),
            Policy::OutOf(2, vec![p("A", Role::Peer), p("B", Role::Peer)])
        );
    }

    // ---- errors ----

    #[test]
    fn each_error_points_at_the_problem() {
        let cases: &[(&str, usize, &str)] = &[
            // unknown function
            ("FOO('A.member')", 0, "unknown function `FOO`"),
            ("AND('A.member', NOT('B.member'))", 16, "unknown function `NOT`"),
            ("ANDOR('A.member')", 0, "unknown function"),
            // missing parentheses
            ("AND 'A.member'", 4, "expected `(` after `AND`"),
            ("AND", 3, "expected `(`"),
            ("AND('A.member'", 14, "missing `)` to close the `AND(` at byte 3"),
            ("OR('A.member', AND('B.peer')", 28, "missing `)` to close the `OR(` at byte 2"),
            ("AND('A.member' 'B.member')", 15, "expected `,` or `)`"),
            // unterminated quote
            ("AND('A.member)", 4, "unterminated quote"),
            ("AND('A.member', \"B.peer')", 16, "unterminated quote"),
            // bad role
            ("AND('A.boss')", 7, "unknown role `boss`: expected one of member, peer, client, admin, orderer"),
            ("'Org1.'", 6, "unknown role ``"),
            // principal without a dot, or with a bad org
            ("AND('Amember')", 4, "has no dot"),
            ("''", 0, "has no dot"),
            ("'.member'", 1, "empty org"),
            ("'Org 1.member'", 4, "contains ` `"),
            ("'Örg.member'", 1, "contains `Ö`"),
            ("AND('A.peer', 'xÖ.peer')", 16, "contains `Ö`"),
            ("'Org\u{7}.peer'", 4, "contains `\\u{7}`"),
            ("'Org\n1.peer'", 4, "org `Org\\n1` contains `\\n`"),
            // empty argument lists
            ("AND()", 4, "empty argument list"),
            ("OR( )", 4, "empty argument list"),
            ("OutOf()", 6, "empty argument list"),
            ("OutOf(1)", 7, "empty argument list"),
            ("OutOf(1 , )", 10, "expected a policy"),
            // n
            ("OutOf(x, 'A.member')", 6, "whole number, found `x`"),
            ("OutOf(-1, 'A.member')", 6, "whole number"),
            ("OutOf(1.5, 'A.member')", 6, "whole number"),
            ("OutOf(+1, 'A.member')", 6, "whole number"),
            ("OutOf('A.member')", 6, "expects a number n"),
            ("OutOf(0, 'A.member')", 6, "at least 1"),
            ("OutOf(3, 'A.member', 'B.member')", 6, "n = 3, but `OutOf` lists only 2"),
            ("OutOf(99999999999999999999999999, 'A.member')", 6, "too large"),
            ("OutOf(1 'A.member')", 8, "expected `,` after n"),
            // misplaced tokens
            ("AND('A.member',)", 15, "expected a policy"),
            ("AND('A.member', 42)", 16, "expected a policy"),
            ("AND(, 'A.member')", 4, "expected a policy"),
            ("", 0, "found end of text"),
            ("   ", 3, "found end of text"),
            // trailing input
            ("AND('A.member') x", 16, "unexpected `x` after the end of the policy"),
            ("'A.member''B.member'", 10, "unexpected `'`"),
            ("AND('A.member'))", 15, "unexpected `)`"),
        ];
        for &(text, position, fragment) in cases {
            let e = parse_err(text);
            assert_eq!(e.position, position, "{text:?}: {e}");
            assert!(e.message.contains(fragment), "{text:?}: {:?} lacks {fragment:?}", e.message);
            assert_eq!(e.text, text);
        }
    }

    #[test]
    fn error_display_puts_a_caret_under_the_position() {
        let e = parse_err("AND('A.member', 'B.boss')");
        assert_eq!(
            e.to_string(),
            "unknown role `boss`: expected one of member, peer, client, admin, orderer at byte 19\n\
             AND('A.member', 'B.boss')\n                   ^"
        );
        let e = parse_err("AND('A.member'");
        assert!(e.to_string().ends_with("AND('A.member'\n              ^"), "{e}");
    }

    #[test]
    fn error_display_shows_the_offending_line_of_multi_line_text() {
        let e = parse_err("AND(\n  'A.member',\n  'B.nope'\n)");
        assert_eq!(e.position, 24);
        assert_eq!(
            e.to_string(),
            "unknown role `nope`: expected one of member, peer, client, admin, orderer at byte 24 (line 3, column 6)\n  'B.nope'\n     ^"
        );
    }

    #[test]
    fn error_display_windows_long_lines_and_survives_bad_positions() {
        let text = format!("OR({}'A.nope'{})", "'A.peer', ".repeat(20), ", 'B.peer'".repeat(20));
        let e = parse_err(&text);
        let shown = e.to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 3, "{shown}");
        assert!(lines[1].starts_with("...") && lines[1].ends_with("..."), "{shown}");
        assert!(lines[1].chars().count() < 100, "{shown}");
        let caret = lines[2].len() - 1;
        assert_eq!(&lines[1][caret..caret + 4], "nope", "{shown}");

        // Public fields: a hand-made error with a position inside a char, or past the end, must
        // still render.
        let odd = PolicyError { position: 3, message: "m".into(), text: "Ö€x".into() };
        assert!(odd.to_string().ends_with("Ö€x\n ^"), "{odd}");
        let past = PolicyError { position: 99, message: "m".into(), text: "ab".into() };
        assert!(past.to_string().ends_with("ab\n  ^"), "{past}");
    }

    // ---- limits ----

    #[test]
    fn text_size_limit() {
        let policy = "AND('Org1.peer')";
        let at_limit = format!("{policy}{}", " ".repeat(MAX_POLICY_BYTES - policy.len()));
        assert_eq!(at_limit.len(), MAX_POLICY_BYTES);
        assert_eq!(parse(&at_limit), Policy::OutOf(1, vec![p("Org1", Role::Peer)]));

        let over = format!("{at_limit} ");
        let e = parse_err(&over);
        assert_eq!(e.position, MAX_POLICY_BYTES);
        assert!(e.message.contains("65537 bytes, over the limit of 65536"), "{}", e.message);
        assert_eq!(e.text.len(), MAX_POLICY_BYTES, "the error keeps at most the limit");

        // A cut that would fall inside a char backs off to the char's start.
        let multibyte = format!("{}€€", " ".repeat(MAX_POLICY_BYTES - 4));
        let e = parse_err(&multibyte);
        assert_eq!(e.position, MAX_POLICY_BYTES - 1);
        assert!(e.text.ends_with('€'));
        assert!(e.to_string().contains("^"));
    }

    #[test]
    fn depth_limit() {
        let nested = |levels: usize| format!("{}'A.peer'{}", "AND(".repeat(levels), ")".repeat(levels));
        let mut expected = p("A", Role::Peer);
        for _ in 0..MAX_DEPTH {
            expected = Policy::OutOf(1, vec![expected]);
        }
        assert_eq!(parse(&nested(MAX_DEPTH)), expected);

        let e = parse_err(&nested(MAX_DEPTH + 1));
        assert_eq!(e.position, 4 * MAX_DEPTH, "points at the function that goes one level too deep");
        assert!(e.message.contains("deeper than 32 levels"), "{}", e.message);

        // Far beyond the limit: refused the same way, no stack overflow.
        let e = parse_err(&nested(MAX_POLICY_BYTES / 12));
        assert_eq!(e.position, 4 * MAX_DEPTH);
    }

    #[test]
    fn principal_limit() {
        let list = |count: usize| {
            let items: Vec<String> = (0..count).map(|i| format!("'O{i}.member'")).collect();
            format!("OR({})", items.join(","))
        };
        match parse(&list(MAX_PRINCIPALS)) {
            Policy::OutOf(1, children) => assert_eq!(children.len(), MAX_PRINCIPALS),
            other => panic!("unexpected {other:?}"),
        }
        let text = list(MAX_PRINCIPALS + 1);
        let e = parse_err(&text);
        let last = text.rfind(&format!("'O{MAX_PRINCIPALS}.member'")).unwrap_or(usize::MAX);
        assert_eq!(e.position, last, "points at the first principal over the limit");
        assert!(e.message.contains("more than 1024 principals"), "{}", e.message);

        // Spread over nested gates, the count is still the whole policy's.
        let half: Vec<String> = (0..MAX_PRINCIPALS / 2 + 1).map(|i| format!("'O{i}.peer'")).collect();
        let half = half.join(",");
        let e = parse_err(&format!("AND(OR({half}), OR({half}))"));
        assert!(e.message.contains("principals"), "{}", e.message);
    }

    // ---- roles and principals ----

    #[test]
    fn role_from_str() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
            assert_eq!(role.as_str().to_uppercase().parse::<Role>(), Ok(role));
            assert_eq!(role.to_string(), role.as_str());
        }
        let e = match "boss".parse::<Role>() {
            Ok(role) => panic!("parsed {role:?}"),
            Err(e) => e,
        };
        assert_eq!(e.message, "unknown role `boss`: expected one of member, peer, client, admin, orderer");
        assert!(" peer".parse::<Role>().is_err());
        assert!("".parse::<Role>().is_err());
    }

    #[test]
    fn role_serde_is_lowercase() {
        assert_eq!(serde_json::to_string(&Role::Orderer).ok().as_deref(), Some("\"orderer\""));
        assert_eq!(serde_json::from_str::<Role>("\"client\"").ok(), Some(Role::Client));
        assert!(serde_json::from_str::<Role>("\"Client\"").is_err());
    }

    #[test]
    fn role_satisfies() {
        for role in Role::ALL {
            assert!(role.satisfies(Role::Member), "{role} is a member");
            assert!(role.satisfies(role));
        }
        assert!(!Role::Client.satisfies(Role::Peer));
        assert!(!Role::Peer.satisfies(Role::Client));
        assert!(!Role::Admin.satisfies(Role::Peer));
        assert!(!Role::Member.satisfies(Role::Peer), "plain membership is not the peer role");
        assert!(!Role::Peer.satisfies(Role::Orderer));
    }

    #[test]
    fn principal_from_str_and_display() {
        let principal: Result<Principal, _> = "org1.example.com.admin".parse();
        assert_eq!(principal, Ok(Principal { org: "org1.example.com".into(), role: Role::Admin }));
        assert_eq!(principal.map(|p| p.to_string()).ok().as_deref(), Some("org1.example.com.admin"));
        assert_eq!("Org1".parse::<Principal>().map_err(|e| e.position), Err(0));
        assert_eq!("Org1.boss".parse::<Principal>().map_err(|e| e.position), Err(5));
    }

    // ---- display and orgs ----

    #[test]
    fn display_is_canonical_fabric_text() {
        let policy = parse("and( \"Org1.PEER\" , outof(2,'Org2.member','Org3.member', 'Org4.member'), or('Org5.client'), OR('A.admin','B.orderer'))");
        let text = policy.to_string();
        assert_eq!(
            text,
            "AND('Org1.peer', OutOf(2, 'Org2.member', 'Org3.member', 'Org4.member'), AND('Org5.client'), OR('A.admin', 'B.orderer'))"
        );
        assert_eq!(parse(&text), policy);
        assert_eq!(p("Org1", Role::Member).to_string(), "'Org1.member'");
        assert_eq!(
            Policy::OutOf(2, vec![p("A", Role::Peer), p("B", Role::Peer)]).to_string(),
            "AND('A.peer', 'B.peer')"
        );
        assert_eq!(
            Policy::OutOf(2, vec![p("A", Role::Peer), p("B", Role::Peer), p("C", Role::Peer)]).to_string(),
            "OutOf(2, 'A.peer', 'B.peer', 'C.peer')"
        );
    }

    #[test]
    fn orgs_lists_every_org_once() {
        let policy = parse("AND('Org2.peer', OR('Org1.member', OutOf(1, 'Org3.admin', 'Org2.client')), 'a.b.c.peer')");
        let orgs: Vec<&str> = policy.orgs().into_iter().collect();
        assert_eq!(orgs, ["Org1", "Org2", "Org3", "a.b.c"]);
        assert_eq!(p("X", Role::Peer).orgs().into_iter().collect::<Vec<_>>(), ["X"]);
    }

    // ---- evaluation ----

    #[test]
    fn signed_by_matches_org_and_role() {
        let peer = parse("'Org1.peer'");
        assert!(eval(&peer, &[s("Org1", Role::Peer, 1)]));
        assert!(!eval(&peer, &[s("Org1", Role::Client, 1)]), "a client is not a peer");
        assert!(!eval(&peer, &[s("Org1", Role::Admin, 1)]), "an admin is not a peer");
        assert!(!eval(&peer, &[s("Org2", Role::Peer, 1)]), "wrong org");
        assert!(!eval(&peer, &[s("org1", Role::Peer, 1)]), "org names are case-sensitive, as MSP ids");
        assert!(!eval(&peer, &[]));
        assert!(eval(&peer, &[s("Org2", Role::Peer, 1), s("Org1", Role::Client, 2), s("Org1", Role::Peer, 3)]));

        let member = parse("'Org1.member'");
        for role in Role::ALL {
            assert!(eval(&member, &[s("Org1", role, 1)]), "{role} satisfies member");
        }
        assert!(!eval(&member, &[s("Org2", Role::Peer, 1)]));

        let client = parse("'Org1.client'");
        assert!(eval(&client, &[s("Org1", Role::Client, 1)]));
        assert!(!eval(&client, &[s("Org1", Role::Peer, 1)]));
    }

    #[test]
    fn and_needs_distinct_identities() {
        let policy = parse("AND('Org1.member', 'Org1.member')");
        assert!(!eval(&policy, &[s("Org1", Role::Peer, 1)]));
        assert!(
            !eval(&policy, &[s("Org1", Role::Peer, 1), s("Org1", Role::Peer, 1)]),
            "the same key twice counts once"
        );
        assert!(eval(&policy, &[s("Org1", Role::Peer, 1), s("Org1", Role::Peer, 2)]));
    }

    #[test]
    fn dedupe_by_id_keeps_the_first_occurrence() {
        let two_of = parse("OutOf(2, 'Org1.member', 'Org2.member')");
        // One key claimed under two orgs is one identity: the first claim stands.
        assert!(!eval(&two_of, &[s("Org1", Role::Peer, 7), s("Org2", Role::Peer, 7)]));
        assert!(eval(&two_of, &[s("Org1", Role::Peer, 7), s("Org2", Role::Peer, 8)]));

        let peer = parse("'Org1.peer'");
        assert!(!eval(&peer, &[s("Org1", Role::Client, 7), s("Org1", Role::Peer, 7)]), "first occurrence is a client");
        assert!(eval(&peer, &[s("Org1", Role::Peer, 7), s("Org1", Role::Client, 7)]));

        // Multi-byte ids compare whole: a shared prefix is not the same identity.
        let a = S { org: "Org1".into(), role: Role::Peer, id: vec![1, 2] };
        let b = S { org: "Org1".into(), role: Role::Peer, id: vec![1] };
        assert!(eval(&parse("AND('Org1.peer', 'Org1.peer')"), &[a, b]));
    }

    #[test]
    fn out_of_counts_children_that_hold() {
        let policy = parse("OutOf(2, 'A.peer', 'B.peer', 'C.peer')");
        assert!(!eval(&policy, &[s("A", Role::Peer, 1)]));
        assert!(eval(&policy, &[s("A", Role::Peer, 1), s("C", Role::Peer, 2)]));
        assert!(eval(&policy, &[s("C", Role::Peer, 1), s("B", Role::Peer, 2)]));
        assert!(eval(&policy, &[s("A", Role::Peer, 1), s("B", Role::Peer, 2), s("C", Role::Peer, 3)]));
        assert!(!eval(&policy, &[s("A", Role::Peer, 1), s("A", Role::Peer, 2)]));

        let or = parse("OR('A.peer', 'B.peer')");
        assert!(eval(&or, &[s("B", Role::Peer, 1)]));
        assert!(!eval(&or, &[s("C", Role::Peer, 1)]));
    }

    #[test]
    fn greedy_principal_takes_the_first_fitting_signer() {
        // Fabric's greedy choice: `member` takes the first Org1 signer, even when that signer is
        // the only peer. Order decides, as in Fabric.
        let policy = parse("AND('Org1.member', 'Org1.peer')");
        assert!(!eval(&policy, &[s("Org1", Role::Peer, 1), s("Org1", Role::Client, 2)]));
        assert!(eval(&policy, &[s("Org1", Role::Client, 2), s("Org1", Role::Peer, 1)]));
        // Written the other way round, the policy holds for both orders.
        let policy = parse("AND('Org1.peer', 'Org1.member')");
        assert!(eval(&policy, &[s("Org1", Role::Peer, 1), s("Org1", Role::Client, 2)]));
        assert!(eval(&policy, &[s("Org1", Role::Client, 2), s("Org1", Role::Peer, 1)]));
    }

    #[test]
    fn a_gate_keeps_the_signers_of_every_child_that_held() {
        // OR evaluates both children and keeps both signers, starving the second principal.
        let policy = parse("AND(OR('Org1.member', 'Org2.member'), 'Org2.member')");
        assert!(!eval(&policy, &[s("Org1", Role::Peer, 1), s("Org2", Role::Peer, 2)]));
        assert!(eval(&policy, &[s("Org1", Role::Peer, 1), s("Org2", Role::Peer, 2), s("Org2", Role::Peer, 3)]));
    }

    #[test]
    fn a_child_that_fails_keeps_no_signers() {
        // The inner AND takes the Org1 signer, then fails for want of Org2: that take is undone,
        // so the outer Org1 principal still finds it.
        let policy = parse("AND(OR(AND('Org1.member', 'Org2.member'), 'Org3.member'), 'Org1.member')");
        assert!(eval(&policy, &[s("Org1", Role::Peer, 1), s("Org3", Role::Peer, 3)]));
        // The failing gate at the top level is false even though some of its children held.
        let policy = parse("AND('Org1.member', 'Org2.member')");
        assert!(!eval(&policy, &[s("Org1", Role::Peer, 1)]));
    }

    #[test]
    fn more_signers_can_turn_true_into_false_as_in_fabric() {
        // Fabric's cauthdsl is not monotone; this pins the behaviour so that nobody "fixes" it
        // into a verdict other peers running Fabric's rules would not reach.
        let policy = parse("OutOf(2, AND('O1.member', 'O3.member', 'O2.member'), 'O1.member', 'O3.member')");
        let mut signers = vec![s("O1", Role::Peer, 1), s("O3", Role::Peer, 3)];
        assert!(eval(&policy, &signers));
        signers.push(s("O2", Role::Peer, 2));
        assert!(!eval(&policy, &signers));
    }

    #[test]
    fn programmatic_edge_cases_do_not_panic() {
        // Only the parser enforces n in 1..=len; evaluation and display take whatever they get.
        assert!(Policy::OutOf(0, vec![]).evaluate(&[]), "Fabric: 0 of nothing holds");
        assert!(!Policy::OutOf(3, vec![p("A", Role::Peer)]).evaluate(&[SignerRef {
            org: "A",
            role: Role::Peer,
            id: b"k"
        }]));
        assert_eq!(Policy::OutOf(0, vec![]).to_string(), "OutOf(0)");
    }

    // ---- properties ----

    fn org_strategy() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["Org1", "Org2", "Org3", "org4.example.com"]).prop_map(String::from)
    }

    fn role_strategy() -> impl Strategy<Value = Role> {
        prop::sample::select(Role::ALL.to_vec())
    }

    fn leaf_strategy() -> impl Strategy<Value = Policy> {
        (org_strategy(), role_strategy()).prop_map(|(org, role)| Policy::SignedBy(Principal { org, role }))
    }

    /// Any valid policy: gates with 1..=4 children and n in 1..=len.
    fn policy_strategy() -> impl Strategy<Value = Policy> {
        leaf_strategy().prop_recursive(4, 32, 4, |inner| {
            prop::collection::vec(inner, 1..=4)
                .prop_flat_map(|children| (1..=children.len(), Just(children)))
                .prop_map(|(n, children)| Policy::OutOf(n, children))
        })
    }

    /// Policies whose gates all need every child.
    fn and_only_strategy() -> impl Strategy<Value = Policy> {
        leaf_strategy().prop_recursive(4, 32, 4, |inner| {
            prop::collection::vec(inner, 1..=4).prop_map(|children| Policy::OutOf(children.len(), children))
        })
    }

    /// Renames every principal's org to a fresh `D0`, `D1`, ... so that no two principals can
    /// compete for a signer.
    fn with_distinct_orgs(policy: &Policy, next: &mut usize) -> Policy {
        match policy {
            Policy::SignedBy(principal) => {
                let org = format!("D{next}");
                *next += 1;
                Policy::SignedBy(Principal { org, role: principal.role })
            }
            Policy::OutOf(n, children) => {
                Policy::OutOf(*n, children.iter().map(|c| with_distinct_orgs(c, next)).collect())
            }
        }
    }

    /// Up to 7 signers over ids 0..6, so at most 6 distinct identities after de-duplication.
    fn signers_strategy(orgs: Vec<&'static str>) -> impl Strategy<Value = Vec<S>> {
        prop::collection::vec(
            (prop::sample::select(orgs), role_strategy(), 0u8..6).prop_map(|(org, role, id)| S {
                org: org.to_owned(),
                role,
                id: vec![id],
            }),
            0..=7,
        )
    }

    fn common_signers() -> impl Strategy<Value = Vec<S>> {
        signers_strategy(vec!["Org1", "Org2", "Org3", "org4.example.com"])
    }

    fn distinct_org_signers() -> impl Strategy<Value = Vec<S>> {
        signers_strategy(vec!["D0", "D1", "D2", "D3", "D4", "D5", "D6", "D7"])
    }

    /// Brute force over every assignment: does some set of pairwise-distinct signers satisfy the
    /// policy? Signer subsets are bitmasks over at most 6 signers, and a set of subsets is a u64
    /// with bit `mask` set.
    fn exact(policy: &Policy, signers: &[S]) -> bool {
        fn dedupe(signers: &[S]) -> Vec<&S> {
            let mut seen = BTreeSet::new();
            signers.iter().filter(|s| seen.insert(s.id.clone())).collect()
        }
        fn disjoint_unions(a: u64, b: u64) -> u64 {
            let mut out = 0u64;
            for x in (0..64).filter(|x| a >> x & 1 == 1) {
                for y in (0..64).filter(|y| b >> y & 1 == 1 && x & y == 0) {
                    out |= 1u64 << (x | y);
                }
            }
            out
        }
        fn sets(policy: &Policy, signers: &[&S]) -> u64 {
            match policy {
                Policy::SignedBy(p) => signers
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.org == p.org && s.role.satisfies(p.role))
                    .fold(0u64, |acc, (i, _)| acc | 1u64 << (1u64 << i)),
                Policy::OutOf(n, children) => {
                    // reach[k]: subsets with which k children (capped at n) hold on disjoint signers.
                    let mut reach = vec![0u64; n + 1];
                    reach[0] = 1;
                    for child in children {
                        let child = sets(child, signers);
                        let mut next = reach.clone();
                        for k in 0..=*n {
                            next[(k + 1).min(*n)] |= disjoint_unions(reach[k], child);
                        }
                        reach = next;
                    }
                    reach[*n]
                }
            }
        }
        let unique = dedupe(signers);
        assert!(unique.len() <= 6);
        sets(policy, &unique) != 0
    }

    /// Renders `policy` with random function-name case, quote style, role case and whitespace,
    /// drawing choices from `noise`.
    fn render_noisy(policy: &Policy, noise: &mut impl Iterator<Item = u8>, out: &mut String) {
        let mut pick = |k: u8| noise.next().unwrap_or(0) % k;
        let ws = |choice: u8| ["", " ", "\n\t ", "  "][usize::from(choice)];
        match policy {
            Policy::SignedBy(principal) => {
                let quote = if pick(2) == 0 { '\'' } else { '"' };
                let role =
                    if pick(2) == 0 { principal.role.as_str().to_uppercase() } else { principal.role.to_string() };
                let (a, b) = (pick(4), pick(4));
                out.push_str(&format!("{}{quote}{}.{role}{quote}{}", ws(a), principal.org, ws(b)));
            }
            Policy::OutOf(n, children) => {
                let spell = |options: [&'static str; 3], choice: u8| options[usize::from(choice)];
                let style = pick(3);
                let case = pick(3);
                let (a, b) = (pick(4), pick(4));
                out.push_str(ws(a));
                if *n == children.len() && style == 0 {
                    out.push_str(spell(["AND", "and", "And"], case));
                    out.push_str(ws(b));
                    out.push('(');
                } else if *n == 1 && style == 1 {
                    out.push_str(spell(["OR", "or", "Or"], case));
                    out.push_str(ws(b));
                    out.push('(');
                } else {
                    out.push_str(spell(["OutOf", "outof", "OUTOF"], case));
                    out.push_str(ws(b));
                    let (c, d) = (pick(4), pick(4));
                    out.push_str(&format!("({}{n}{},", ws(c), ws(d)));
                }
                for (i, child) in children.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    render_noisy(child, noise, out);
                }
                out.push(')');
                let c = noise.next().unwrap_or(0) % 4;
                out.push_str(ws(c));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn display_then_parse_is_identity(policy in policy_strategy()) {
            let text = policy.to_string();
            prop_assert_eq!(Policy::parse(&text), Ok(policy.clone()));
            // And display is a fixed point: canonical text stays canonical.
            prop_assert_eq!(Policy::parse(&text).map(|p| p.to_string()), Ok(text));
        }

        #[test]
        fn any_spelling_parses_to_the_same_policy(policy in policy_strategy(), noise in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut text = String::new();
            render_noisy(&policy, &mut noise.into_iter().cycle(), &mut text);
            prop_assert_eq!(Policy::parse(&text), Ok(policy), "{}", text);
        }

        #[test]
        fn parse_never_panics_and_errors_point_inside_the_text(text in "[ANDORutfx() ,'\".a-z0-9\n\u{e9}-]{0,48}") {
            match Policy::parse(&text) {
                Ok(policy) => prop_assert_eq!(Policy::parse(&policy.to_string()), Ok(policy)),
                Err(e) => {
                    prop_assert!(e.position <= text.len());
                    prop_assert!(text.is_char_boundary(e.position));
                    prop_assert_eq!(&e.text, &text);
                    let shown = e.to_string();
                    prop_assert!(shown.ends_with('^'), "{}", shown);
                }
            }
        }

        #[test]
        fn greedy_never_accepts_what_no_assignment_satisfies(policy in policy_strategy(), signers in common_signers()) {
            if eval(&policy, &signers) {
                prop_assert!(exact(&policy, &signers));
            }
        }

        #[test]
        fn with_distinct_orgs_greedy_is_exact_and_monotone(
            policy in policy_strategy(),
            signers in distinct_org_signers(),
            extra in distinct_org_signers(),
            at in any::<prop::sample::Index>(),
        ) {
            let policy = with_distinct_orgs(&policy, &mut 0);
            let before = eval(&policy, &signers);
            prop_assert_eq!(before, exact(&policy, &signers));
            if let Some(new) = extra.first() {
                // A new identity: a known key inserted earlier would replace the first occurrence.
                let new = S { id: vec![0xff], ..new.clone() };
                let mut more = signers.clone();
                more.insert(at.index(signers.len() + 1), new.clone());
                prop_assert!(!before || eval(&policy, &more), "adding {:?} turned true into false", new);
            }
        }

        #[test]
        fn and_only_policies_are_monotone(
            policy in and_only_strategy(),
            signers in common_signers(),
            extra in common_signers(),
            at in any::<prop::sample::Index>(),
        ) {
            if let Some(new) = extra.first() {
                // A new identity: a known key inserted earlier would replace the first occurrence.
                let new = S { id: vec![0xff], ..new.clone() };
                let mut more = signers.clone();
                more.insert(at.index(signers.len() + 1), new.clone());
                prop_assert!(!eval(&policy, &signers) || eval(&policy, &more), "adding {:?} turned true into false", new);
            }
        }

        #[test]
        fn a_repeated_key_changes_nothing(policy in policy_strategy(), signers in common_signers(), pick in any::<prop::sample::Index>(), role in role_strategy()) {
            if !signers.is_empty() {
                let mut repeated = signers.clone();
                let mut copy = signers[pick.index(signers.len())].clone();
                copy.role = role;
                copy.org = "Org1".into();
                repeated.push(copy);
                prop_assert_eq!(eval(&policy, &signers), eval(&policy, &repeated));
            }
        }
    }
}
