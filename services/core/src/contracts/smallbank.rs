//! `smallbank`: Hyperledger Caliper's SmallBank workload, so that Caliper benchmarks run here as
//! they run on Fabric.
//!
//! Matched source: `hyperledger/caliper-benchmarks`, `src/fabric/scenario/smallbank/go/smallbank.go`
//! (driven by `benchmarks/scenario/smallbank/smallbankOperations.js`). Same function names,
//! argument order, key derivation and JSON value (byte for byte), and the same reads and writes in
//! the same order, hence the same read-write sets:
//!
//! | function           | arguments                                                              |
//! |--------------------|------------------------------------------------------------------------|
//! | `create_account`   | customer_id, customer_name, initial_checking_balance, initial_savings_balance |
//! | `transact_savings` | amount, customer_id (savings += amount)                                |
//! | `deposit_checking` | amount, customer_id (checking += amount)                               |
//! | `send_payment`     | amount, dest_customer_id, source_customer_id                           |
//! | `write_check`      | amount, customer_id (checking -= amount)                               |
//! | `amalgamate`       | dest_customer_id, source_customer_id (dest checking += source savings, source savings = 0) |
//! | `query`            | customer_id: the account JSON, empty if there is none                 |
//!
//! As in Caliper, there is no funds check (balances may go negative: "the contract is only used for
//! performance testing"), amounts may be negative, and `send_payment`/`amalgamate` between an
//! account and itself succeed with the destination's write winning (Fabric keeps the last write
//! and reads do not see own writes), so money appears. Caliper's workload does pick the same
//! account twice now and then; refusing those would change benchmark results.
//!
//! Deliberate differences, where Caliper's chaincode is sloppy and matching it would hurt:
//! - a non-integer amount fails the call; Caliper ignores the parse error and uses 0;
//! - an overflowing balance fails the call; Go's `int` would wrap;
//! - `query` requires exactly one argument; Caliper indexes `args[0]` unchecked;
//! - messages are plain text naming the function, argument or account, not Caliper's
//!   `{"error":...}`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};

use crate::contract::{expect_args, get_json, parse_i64, put_json, respond, unknown_function, Context, Contract};
use crate::model::Response;

pub const NAME: &str = "smallbank";
const FUNCTIONS: &[&str] =
    &["create_account", "transact_savings", "deposit_checking", "send_payment", "write_check", "amalgamate", "query"];

#[derive(Debug, Default, Clone, Copy)]
pub struct SmallBank;

/// The stored account. Field names and order are those Go's `encoding/json` gives Caliper's
/// `Account` struct, so the bytes are the same. (Go would also escape `<`, `>` and `&` in names;
/// Caliper's generated names never contain them.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    #[serde(rename = "CustomId")]
    pub custom_id: String,
    #[serde(rename = "CustomName")]
    pub custom_name: String,
    #[serde(rename = "SavingsBalance")]
    pub savings_balance: i64,
    #[serde(rename = "CheckingBalance")]
    pub checking_balance: i64,
}

fn hexdigest(s: &str) -> String {
    hex::encode(Sha512::digest(s.as_bytes()))
}

/// Caliper's `accountKey`: the first 6 hex digits of SHA-512("smallbank") followed by the first
/// 64 of SHA-512(customer id).
pub fn account_key(customer_id: &str) -> String {
    let mut key = hexdigest(NAME);
    key.truncate(6);
    key.push_str(&hexdigest(customer_id)[..64]);
    key
}

impl Contract for SmallBank {
    fn name(&self) -> &'static str {
        NAME
    }

    fn invoke(&self, ctx: &mut dyn Context, function: &str, args: &[String]) -> Response {
        respond(match function {
            "create_account" => create_account(ctx, args),
            "transact_savings" => change_balance(ctx, "transact_savings", args, |a, amount| add(&mut a.savings_balance, amount)),
            "deposit_checking" => change_balance(ctx, "deposit_checking", args, |a, amount| add(&mut a.checking_balance, amount)),
            "write_check" => change_balance(ctx, "write_check", args, |a, amount| add(&mut a.checking_balance, amount.checked_neg())),
            "send_payment" => send_payment(ctx, args),
            "amalgamate" => amalgamate(ctx, args),
            "query" => query(ctx, args),
            _ => Err(unknown_function(NAME, function, FUNCTIONS)),
        })
    }
}

/// `balance += amount`, failing on overflow (`amount` is `None` when negating it overflowed).
fn add(balance: &mut i64, amount: impl Into<Option<i64>>) -> Result<(), Response> {
    match amount.into().and_then(|a| balance.checked_add(a)) {
        Some(sum) => {
            *balance = sum;
            Ok(())
        }
        None => Err(Response::error("balance would overflow")),
    }
}

fn load(ctx: &mut dyn Context, customer_id: &str) -> Result<Option<Account>, Response> {
    get_json(ctx, &account_key(customer_id))
}

fn not_found(customer_id: &str) -> Response {
    Response::error(format!("could not find specified account {customer_id:?}"))
}

fn save(ctx: &mut dyn Context, account: &Account) -> Result<(), Response> {
    put_json(ctx, &account_key(&account.custom_id), account)
}

fn create_account(ctx: &mut dyn Context, args: &[String]) -> Result<Vec<u8>, Response> {
    let [id, name, checking, savings] = expect_args(
        "create_account",
        args,
        ["customer_id", "customer_name", "initial_checking_balance", "initial_savings_balance"],
    )?;
    if ctx.get_state(&account_key(id))?.is_some() {
        return Err(Response::error(format!("can not create duplicated account {id:?}")));
    }
    let checking_balance = parse_i64("initial_checking_balance", checking)?;
    let savings_balance = parse_i64("initial_savings_balance", savings)?;
    save(ctx, &Account { custom_id: id.to_string(), custom_name: name.to_string(), savings_balance, checking_balance })?;
    Ok(Vec::new())
}

/// `transact_savings`, `deposit_checking`, `write_check`: (amount, customer_id), one account.
fn change_balance(
    ctx: &mut dyn Context,
    function: &str,
    args: &[String],
    change: impl Fn(&mut Account, i64) -> Result<(), Response>,
) -> Result<Vec<u8>, Response> {
    let [amount, id] = expect_args(function, args, ["amount", "customer_id"])?;
    let mut account = load(ctx, id)?.ok_or_else(|| not_found(id))?;
    let amount = parse_i64("amount", amount)?;
    change(&mut account, amount)?;
    save(ctx, &account)?;
    Ok(Vec::new())
}

fn send_payment(ctx: &mut dyn Context, args: &[String]) -> Result<Vec<u8>, Response> {
    let [amount, dest_id, source_id] = expect_args("send_payment", args, ["amount", "dest_customer_id", "source_customer_id"])?;
    // Both are read before either is checked, as in Caliper.
    let dest = load(ctx, dest_id)?;
    let source = load(ctx, source_id)?;
    let mut dest = dest.ok_or_else(|| not_found(dest_id))?;
    let mut source = source.ok_or_else(|| not_found(source_id))?;
    let amount = parse_i64("amount", amount)?;
    add(&mut source.checking_balance, amount.checked_neg())?;
    add(&mut dest.checking_balance, amount)?;
    // Source first, destination last: for dest == source the destination's write wins, as in Caliper.
    save(ctx, &source)?;
    save(ctx, &dest)?;
    Ok(Vec::new())
}

fn amalgamate(ctx: &mut dyn Context, args: &[String]) -> Result<Vec<u8>, Response> {
    let [dest_id, source_id] = expect_args("amalgamate", args, ["dest_customer_id", "source_customer_id"])?;
    let dest = load(ctx, dest_id)?;
    let source = load(ctx, source_id)?;
    let mut dest = dest.ok_or_else(|| not_found(dest_id))?;
    let mut source = source.ok_or_else(|| not_found(source_id))?;
    add(&mut dest.checking_balance, source.savings_balance)?;
    source.savings_balance = 0;
    save(ctx, &source)?;
    save(ctx, &dest)?;
    Ok(Vec::new())
}

fn query(ctx: &mut dyn Context, args: &[String]) -> Result<Vec<u8>, Response> {
    let [id] = expect_args("query", args, ["customer_id"])?;
    Ok(ctx.get_state(&account_key(id))?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Identity, RwSet};
    use crate::simulation::testing::{identity, proposal, run};
    use crate::state::{CommittedState, MemState};

    fn call(state: &mut MemState, block: i64, function: &str, args: &[&str]) -> (Response, RwSet) {
        let caller: Identity = identity("Org1MSP", 1);
        run(state, block, &proposal(NAME, function, args, &caller))
    }

    fn account(state: &MemState, id: &str) -> Account {
        let v = state.get(NAME, &account_key(id)).unwrap().expect("account exists");
        serde_json::from_slice(&v.value).expect("account JSON")
    }

    fn balances(state: &MemState, id: &str) -> (i64, i64) {
        let a = account(state, id);
        (a.checking_balance, a.savings_balance)
    }

    /// Accounts 1 (checking 100, savings 1000) and 2 (checking 200, savings 2000).
    fn bank() -> MemState {
        let mut s = MemState::new();
        assert!(call(&mut s, 1, "create_account", &["1", "Ann", "100", "1000"]).0.is_ok());
        assert!(call(&mut s, 2, "create_account", &["2", "Bo", "200", "2000"]).0.is_ok());
        s
    }

    fn fails(r: &Response, message: &str) {
        assert_eq!((r.status, r.message.as_str()), (Response::ERROR, message));
    }

    #[test]
    fn keys_and_values_match_caliper_byte_for_byte() {
        // Expected values computed independently (Python hashlib.sha512).
        assert_eq!(account_key("1001"), "332514e3d0e2ef3cab0dab2c12f297e3bc618f6b976aced29b3a301828c6f9f1e1aabb");
        let s = bank();
        let value = s.get(NAME, &account_key("1")).unwrap().unwrap().value;
        assert_eq!(String::from_utf8_lossy(&value), r#"{"CustomId":"1","CustomName":"Ann","SavingsBalance":1000,"CheckingBalance":100}"#);
    }

    #[test]
    fn create_account_refuses_duplicates_and_bad_numbers() {
        let mut s = bank();
        fails(&call(&mut s, 3, "create_account", &["1", "X", "1", "1"]).0, "can not create duplicated account \"1\"");
        fails(&call(&mut s, 3, "create_account", &["3", "X", "1.5", "1"]).0, "argument initial_checking_balance must be an integer, got \"1.5\"");
        fails(&call(&mut s, 3, "create_account", &["3", "X", "1", "y"]).0, "argument initial_savings_balance must be an integer, got \"y\"");
        fails(
            &call(&mut s, 3, "create_account", &["3", "X", "1"]).0,
            "function create_account expects 4 arguments (customer_id, customer_name, initial_checking_balance, initial_savings_balance), got 3",
        );
        // Negative starting balances are integers, and Caliper accepts them.
        assert!(call(&mut s, 3, "create_account", &["3", "X", "-5", "0"]).0.is_ok());
    }

    #[test]
    fn single_account_operations() {
        let mut s = bank();
        assert!(call(&mut s, 3, "transact_savings", &["50", "1"]).0.is_ok());
        assert!(call(&mut s, 4, "deposit_checking", &["7", "1"]).0.is_ok());
        assert!(call(&mut s, 5, "write_check", &["500", "1"]).0.is_ok(), "no funds check, as in Caliper");
        assert_eq!(balances(&s, "1"), (100 + 7 - 500, 1050));
        assert_eq!(balances(&s, "2"), (200, 2000));
        for function in ["transact_savings", "deposit_checking", "write_check"] {
            fails(&call(&mut s, 6, function, &["5", "9"]).0, "could not find specified account \"9\"");
            fails(&call(&mut s, 6, function, &["five", "1"]).0, "argument amount must be an integer, got \"five\"");
            fails(&call(&mut s, 6, function, &["5"]).0, &format!("function {function} expects 2 arguments (amount, customer_id), got 1"));
        }
        fails(&call(&mut s, 6, "write_check", &[&i64::MIN.to_string(), "1"]).0, "balance would overflow");
        assert_eq!(balances(&s, "1"), (-393, 1050), "failures changed nothing");
    }

    #[test]
    fn send_payment_moves_checking_from_source_to_dest() {
        let mut s = bank();
        // (amount, dest, source)
        let (r, rwset) = call(&mut s, 3, "send_payment", &["30", "2", "1"]);
        assert!(r.is_ok(), "{}", r.message);
        assert_eq!((balances(&s, "1"), balances(&s, "2")), ((70, 1000), (230, 2000)));
        assert_eq!((rwset.reads.len(), rwset.writes.len()), (2, 2));
        fails(&call(&mut s, 4, "send_payment", &["1", "2", "9"]).0, "could not find specified account \"9\"");
        fails(&call(&mut s, 4, "send_payment", &["1", "9", "1"]).0, "could not find specified account \"9\"");
        fails(&call(&mut s, 4, "send_payment", &["x", "2", "1"]).0, "argument amount must be an integer, got \"x\"");
        fails(
            &call(&mut s, 4, "send_payment", &["1", "2"]).0,
            "function send_payment expects 3 arguments (amount, dest_customer_id, source_customer_id), got 2",
        );
    }

    #[test]
    fn amalgamate_moves_source_savings_into_dest_checking() {
        let mut s = bank();
        // (dest, source)
        assert!(call(&mut s, 3, "amalgamate", &["1", "2"]).0.is_ok());
        assert_eq!((balances(&s, "1"), balances(&s, "2")), ((2100, 1000), (200, 0)));
        fails(&call(&mut s, 4, "amalgamate", &["1", "9"]).0, "could not find specified account \"9\"");
        fails(&call(&mut s, 4, "amalgamate", &["1"]).0, "function amalgamate expects 2 arguments (dest_customer_id, source_customer_id), got 1");
    }

    #[test]
    fn same_account_payments_behave_as_on_fabric() {
        // Caliper's chaincode on Fabric: both loads see the committed account, the destination's
        // write is the last and wins. Checking grows by the amount (send_payment) or by the
        // savings, which stay (amalgamate).
        let mut s = bank();
        assert!(call(&mut s, 3, "send_payment", &["30", "1", "1"]).0.is_ok());
        assert_eq!(balances(&s, "1"), (130, 1000));
        assert!(call(&mut s, 4, "amalgamate", &["1", "1"]).0.is_ok());
        assert_eq!(balances(&s, "1"), (1130, 1000));
    }

    #[test]
    fn query_returns_the_account_or_nothing() {
        let mut s = bank();
        let (r, rwset) = call(&mut s, 3, "query", &["2"]);
        assert!(r.is_ok());
        assert_eq!(serde_json::from_slice::<Account>(&r.payload).unwrap().custom_name, "Bo");
        assert!(rwset.writes.is_empty());
        let (r, _) = call(&mut s, 3, "query", &["9"]);
        assert!(r.is_ok() && r.payload.is_empty(), "Caliper answers success with no payload");
        fails(&call(&mut s, 3, "query", &[]).0, "function query expects 1 argument (customer_id), got 0");
        fails(&call(&mut s, 3, "withdraw", &[]).0, "contract smallbank has no function \"withdraw\" (it has: create_account, transact_savings, deposit_checking, send_payment, write_check, amalgamate, query)");
    }
}
