//! The contract API, shaped after Fabric's chaincode shim.
//!
//! A [`Contract`] sees the ledger only through a [`Context`] (Fabric's `ChaincodeStubInterface`):
//! point reads, writes, deletes and range reads in its own namespace, plus the transaction id and
//! the creator. What the context records is the read-write set; see `simulation` for the exact
//! (Fabric) semantics, in particular that reads never see the transaction's own writes.
//!
//! A contract answers with a [`Response`]: status 200 is success, anything else a failure
//! (`Response::error` gives 500, Fabric's `shim.Error`). The helpers below keep contracts short:
//! write each function as `fn(ctx, args) -> Result<Vec<u8>, Response>` where the `Err` is the
//! failing response, use `?` on the helpers and on `Context` calls, and turn the result into a
//! response with [`respond`].
//!
//! Contracts must be deterministic: every endorser runs them and their outputs must be
//! byte-identical. No clock, no randomness, no iteration over hash maps, and JSON only from structs
//! (whose field order is fixed).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::{Identity, Response};
use crate::state::StateError;

/// What a contract can do with the ledger during one simulation.
pub trait Context {
    fn tx_id(&self) -> &str;
    /// Who signed the proposal.
    fn creator(&self) -> &Identity;
    /// The committed value of `key` (never this transaction's own writes: Fabric semantics).
    fn get_state(&mut self, key: &str) -> Result<Option<Vec<u8>>, ContractError>;
    fn put_state(&mut self, key: &str, value: Vec<u8>) -> Result<(), ContractError>;
    fn delete_state(&mut self, key: &str) -> Result<(), ContractError>;
    /// Committed entries with keys in `[start, end)` in key order; an empty `end` is unbounded; at
    /// most `limit` entries.
    fn get_state_by_range(&mut self, start: &str, end: &str, limit: Option<usize>) -> Result<Vec<(String, Vec<u8>)>, ContractError>;
}

/// A smart contract (Fabric: chaincode). Its name is also the namespace of its state.
pub trait Contract: Send + Sync {
    fn name(&self) -> &'static str;

    /// Called for the function name `init`. Most contracts have nothing to set up.
    fn init(&self, ctx: &mut dyn Context, args: &[String]) -> Response {
        let _ = (ctx, args);
        Response::ok(vec![])
    }

    fn invoke(&self, ctx: &mut dyn Context, function: &str, args: &[String]) -> Response;
}

/// Why a `Context` call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    /// The state store failed: infrastructure, not the contract's fault. The simulation turns this
    /// into an `Err` whatever response the contract then gives.
    #[error(transparent)]
    State(#[from] StateError),
    /// A key the ledger refuses (Fabric refuses empty keys).
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
}

/// A `Context` failure becomes a failing response, so contracts can use `?` on `Context` calls.
/// (A store failure still makes the whole simulation an `Err`: the simulator remembers it.)
impl From<ContractError> for Response {
    fn from(e: ContractError) -> Self {
        Response::error(e.to_string())
    }
}

/// Turns a contract function's result into its response: `Ok(payload)` is 200 with that payload.
pub fn respond(result: Result<Vec<u8>, Response>) -> Response {
    result.map_or_else(|failure| failure, Response::ok)
}

/// Exactly `N` arguments, named for the error message:
/// "function transfer expects 3 arguments (from, to, amount), got 2".
pub fn expect_args<'a, const N: usize>(function: &str, args: &'a [String], names: [&str; N]) -> Result<[&'a str; N], Response> {
    if args.len() != N {
        return Err(Response::error(format!(
            "function {function} expects {N} argument{} ({}), got {}",
            if N == 1 { "" } else { "s" },
            names.join(", "),
            args.len()
        )));
    }
    Ok(std::array::from_fn(|i| args[i].as_str()))
}

/// `N` required arguments followed by up to `M` optional ones:
/// "function range expects 2 to 3 arguments (start, end[, limit]), got 1".
#[allow(clippy::type_complexity)]
pub fn expect_args_optional<'a, const N: usize, const M: usize>(
    function: &str,
    args: &'a [String],
    required: [&str; N],
    optional: [&str; M],
) -> Result<([&'a str; N], [Option<&'a str>; M]), Response> {
    if args.len() < N || args.len() > N + M {
        let optional: String = optional.iter().map(|name| format!("[, {name}]")).collect();
        return Err(Response::error(format!(
            "function {function} expects {N} to {} arguments ({}{optional}), got {}",
            N + M,
            required.join(", "),
            args.len()
        )));
    }
    Ok((std::array::from_fn(|i| args[i].as_str()), std::array::from_fn(|i| args.get(N + i).map(String::as_str))))
}

/// The response for a function the contract does not have.
pub fn unknown_function(contract: &str, function: &str, functions: &[&str]) -> Response {
    Response::error(format!("contract {contract} has no function {function:?} (it has: {})", functions.join(", ")))
}

fn parse_number<T: FromStr>(name: &str, value: &str, what: &str) -> Result<T, Response> {
    value.parse().map_err(|_| Response::error(format!("argument {name} must be {what}, got {value:?}")))
}

/// A signed 64-bit integer argument, named in the error message.
pub fn parse_i64(name: &str, value: &str) -> Result<i64, Response> {
    parse_number(name, value, "an integer")
}

/// A non-negative integer argument, named in the error message.
pub fn parse_u64(name: &str, value: &str) -> Result<u64, Response> {
    parse_number(name, value, "a non-negative integer")
}

/// An integer argument that must be greater than zero, named in the error message.
pub fn parse_positive_u64(name: &str, value: &str) -> Result<u64, Response> {
    match parse_number(name, value, "a positive integer")? {
        0 => Err(Response::error(format!("argument {name} must be a positive integer, got {value:?}"))),
        n => Ok(n),
    }
}

/// A count or size argument, named in the error message.
pub fn parse_usize(name: &str, value: &str) -> Result<usize, Response> {
    parse_number(name, value, "a non-negative integer")
}

/// Reads `key` and decodes its JSON value.
pub fn get_json<T: DeserializeOwned>(ctx: &mut dyn Context, key: &str) -> Result<Option<T>, Response> {
    match ctx.get_state(key)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Response::error(format!("value of key {key:?} is not what this contract stores: {e}"))),
    }
}

/// Encodes `value` as JSON (so that CouchDB can index and query it) and writes it to `key`.
pub fn put_json<T: Serialize>(ctx: &mut dyn Context, key: &str, value: &T) -> Result<(), Response> {
    let bytes = to_json(value)?;
    ctx.put_state(key, bytes)?;
    Ok(())
}

/// JSON bytes of a value; a failure (which plain structs cannot produce) is a failing response.
pub fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, Response> {
    serde_json::to_vec(value).map_err(|e| Response::error(format!("cannot encode JSON: {e}")))
}

/// Installed contracts, by name.
#[derive(Clone, Default)]
pub struct Registry {
    contracts: BTreeMap<&'static str, Arc<dyn Contract>>,
}

impl Registry {
    /// No contracts.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The contracts shipped with streamledger (the list in `contracts/mod.rs`).
    pub fn builtin() -> Self {
        let mut registry = Self::empty();
        for contract in crate::contracts::builtin() {
            registry.register(contract);
        }
        registry
    }

    /// Installs `contract` under its name; returns the contract it replaces, if any.
    pub fn register(&mut self, contract: Arc<dyn Contract>) -> Option<Arc<dyn Contract>> {
        self.contracts.insert(contract.name(), contract)
    }

    pub fn get(&self, name: &str) -> Option<&dyn Contract> {
        self.contracts.get(name).map(|c| c.as_ref())
    }

    /// Names of the installed contracts, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.contracts.keys().copied().collect()
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").field("contracts", &self.names()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn expect_args_names_function_arguments_and_count() {
        let args = strings(&["a", "b"]);
        assert_eq!(expect_args("transfer", &args, ["from", "to"]).unwrap(), ["a", "b"]);
        let err = expect_args("transfer", &args, ["from", "to", "amount"]).unwrap_err();
        assert_eq!(err.status, Response::ERROR);
        assert_eq!(err.message, "function transfer expects 3 arguments (from, to, amount), got 2");
        let err = expect_args("balance", &args, ["account"]).unwrap_err();
        assert_eq!(err.message, "function balance expects 1 argument (account), got 2");
    }

    #[test]
    fn optional_arguments_are_none_when_absent() {
        let two = strings(&["a", "b"]);
        let three = strings(&["a", "b", "5"]);
        assert_eq!(expect_args_optional("range", &two, ["start", "end"], ["limit"]).unwrap(), (["a", "b"], [None]));
        assert_eq!(expect_args_optional("range", &three, ["start", "end"], ["limit"]).unwrap(), (["a", "b"], [Some("5")]));
        let err = expect_args_optional("range", &two[..1], ["start", "end"], ["limit"]).unwrap_err();
        assert_eq!(err.message, "function range expects 2 to 3 arguments (start, end[, limit]), got 1");
    }

    #[test]
    fn number_parsing_names_the_argument() {
        assert_eq!(parse_i64("amount", "-7").unwrap(), -7);
        assert_eq!(parse_u64("amount", "7").unwrap(), 7);
        assert_eq!(parse_u64("amount", "-7").unwrap_err().message, "argument amount must be a non-negative integer, got \"-7\"");
        assert_eq!(parse_i64("amount", "x").unwrap_err().message, "argument amount must be an integer, got \"x\"");
        assert_eq!(parse_positive_u64("amount", "0").unwrap_err().message, "argument amount must be a positive integer, got \"0\"");
        assert_eq!(parse_positive_u64("amount", "1.5").unwrap_err().message, "argument amount must be a positive integer, got \"1.5\"");
        assert_eq!(parse_usize("limit", "").unwrap_err().message, "argument limit must be a non-negative integer, got \"\"");
    }

    #[test]
    fn registry_lists_builtin_contracts_and_registers_by_name() {
        let registry = Registry::builtin();
        assert_eq!(registry.names(), ["kv", "smallbank", "transfer"]);
        assert_eq!(registry.get("transfer").map(|c| c.name()), Some("transfer"));
        assert!(registry.get("nope").is_none());
        let mut empty = Registry::empty();
        assert!(empty.names().is_empty());
        assert!(empty.register(Arc::new(crate::contracts::kv::Kv)).is_none());
        assert!(empty.register(Arc::new(crate::contracts::kv::Kv)).is_some(), "same name replaces");
        assert_eq!(empty.names(), ["kv"]);
    }

    #[test]
    fn context_errors_become_failing_responses() {
        let r: Response = ContractError::InvalidKey { key: String::new(), reason: "must not be empty" }.into();
        assert_eq!(r.status, Response::ERROR);
        assert_eq!(r.message, "invalid key \"\": must not be empty");
    }
}
