//! `transfer`: accounts with an owner and a balance, the project's original example.
//!
//! - `create(account, balance)`: a new account owned by the caller (the proposal's creator),
//!   with a non-negative integer balance. Fails if the account exists.
//! - `transfer(from, to, amount)`: moves `amount` (> 0) from `from`, which the caller must own,
//!   to `to`. Both must exist and differ, and `from` must hold at least `amount`.
//! - `balance(account)`: the account's JSON, e.g.
//!   `{"balance":100,"owner":{"org":"Org1MSP","public_key":"ab12…"}}`.
//!
//! The key of an account is its name; the value is JSON so that CouchDB can index and query it.

use serde::{Deserialize, Serialize};

use crate::contract::{expect_args, get_json, parse_positive_u64, parse_u64, put_json, respond, unknown_function, Context, Contract};
use crate::model::{Identity, Response};

pub const NAME: &str = "transfer";
const FUNCTIONS: &[&str] = &["create", "transfer", "balance"];

#[derive(Debug, Default, Clone, Copy)]
pub struct Transfer;

/// The stored value of an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub balance: u64,
    pub owner: Owner,
}

/// An identity as stored: the org and the hex public key (JSON has no bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub org: String,
    pub public_key: String,
}

impl Owner {
    pub fn of(identity: &Identity) -> Self {
        Self { org: identity.org.clone(), public_key: hex::encode(&identity.public_key) }
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} key {}", self.org, self.public_key)
    }
}

impl Contract for Transfer {
    fn name(&self) -> &'static str {
        NAME
    }

    fn invoke(&self, ctx: &mut dyn Context, function: &str, args: &[String]) -> Response {
        respond(match function {
            "create" => create(ctx, args),
            "transfer" => transfer(ctx, args),
            "balance" => balance(ctx, args),
            _ => Err(unknown_function(NAME, function, FUNCTIONS)),
        })
    }
}

fn load(ctx: &mut dyn Context, account: &str) -> Result<Account, Response> {
    get_json(ctx, account)?.ok_or_else(|| Response::error(format!("unknown account {account:?}")))
}

fn create(ctx: &mut dyn Context, args: &[String]) -> Result<Vec<u8>, Response> {
    let [account, balance] = expect_args("create", args, ["account", "balance"])?;
    let balance = parse_u64("balance", balance)?;
    // The read (version None when missing) also makes two creates of one account in the same
    // block conflict at validation: the second fails MVCC.
    if ctx.get_state(account)?.is_some() {
        return Err(Response::error(format!("account {account:?} already exists")));
    }
    let owner = Owner::of(ctx.creator());
    put_json(ctx, account, &Account { balance, owner })?;
    Ok(Vec::new())
}

fn transfer(ctx: &mut dyn Context, args: &[String]) -> Result<Vec<u8>, Response> {
    let [from, to, amount] = expect_args("transfer", args, ["from", "to", "amount"])?;
    let amount = parse_positive_u64("amount", amount)?;
    // Without this check the credit would overwrite the debit (last write wins, and reads do not
    // see own writes), creating money.
    if from == to {
        return Err(Response::error(format!("cannot transfer from account {from:?} to itself")));
    }
    let mut source = load(ctx, from)?;
    let mut target = load(ctx, to)?;
    let caller = Owner::of(ctx.creator());
    if source.owner != caller {
        return Err(Response::error(format!("account {from:?} is owned by {}, not by the caller ({caller})", source.owner)));
    }
    if source.balance < amount {
        return Err(Response::error(format!("insufficient funds: account {from:?} has {}, the transfer needs {amount}", source.balance)));
    }
    source.balance -= amount;
    target.balance = target
        .balance
        .checked_add(amount)
        .ok_or_else(|| Response::error(format!("the balance of account {to:?} would overflow")))?;
    put_json(ctx, from, &source)?;
    put_json(ctx, to, &target)?;
    Ok(Vec::new())
}

fn balance(ctx: &mut dyn Context, args: &[String]) -> Result<Vec<u8>, Response> {
    let [account] = expect_args("balance", args, ["account"])?;
    ctx.get_state(account)?.ok_or_else(|| Response::error(format!("unknown account {account:?}")))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::model::{KvRead, RwSet, Version};
    use crate::simulation::testing::{identity, proposal, run};
    use crate::state::{CommittedState, MemState};

    fn call(state: &mut MemState, block: i64, caller: &Identity, function: &str, args: &[&str]) -> (Response, RwSet) {
        run(state, block, &proposal(NAME, function, args, caller))
    }

    fn stored(state: &MemState, account: &str) -> Account {
        let v = state.get(NAME, account).unwrap().expect("account exists");
        serde_json::from_slice(&v.value).expect("valid account JSON")
    }

    /// alice (Org1, 100) and bob (Org2, 50), created in blocks 1 and 2.
    fn two_accounts() -> (MemState, Identity, Identity) {
        let (alice, bob) = (identity("Org1MSP", 1), identity("Org2MSP", 2));
        let mut s = MemState::new();
        assert!(call(&mut s, 1, &alice, "create", &["alice", "100"]).0.is_ok());
        assert!(call(&mut s, 2, &bob, "create", &["bob", "50"]).0.is_ok());
        (s, alice, bob)
    }

    fn fails(r: &Response, message: &str) {
        assert_eq!((r.status, r.message.as_str()), (Response::ERROR, message));
    }

    #[test]
    fn create_stores_json_owned_by_the_creator() {
        let (s, alice, _) = two_accounts();
        let value = s.get(NAME, "alice").unwrap().unwrap();
        let expected = format!(r#"{{"balance":100,"owner":{{"org":"Org1MSP","public_key":"{}"}}}}"#, "01".repeat(32));
        assert_eq!(String::from_utf8_lossy(&value.value), expected);
        assert_eq!(stored(&s, "alice").owner, Owner::of(&alice));
    }

    #[test]
    fn create_reads_the_missing_key_and_refuses_existing_or_bad_input() {
        let (mut s, alice, _) = two_accounts();
        let (r, rwset) = call(&mut s, 3, &alice, "create", &["carol", "0"]);
        assert!(r.is_ok(), "zero is a valid starting balance");
        assert_eq!(rwset.reads, [KvRead { namespace: NAME.into(), key: "carol".into(), version: None }]);

        fails(&call(&mut s, 4, &alice, "create", &["bob", "1"]).0, "account \"bob\" already exists");
        fails(&call(&mut s, 4, &alice, "create", &["dave", "-1"]).0, "argument balance must be a non-negative integer, got \"-1\"");
        fails(&call(&mut s, 4, &alice, "create", &["dave", "ten"]).0, "argument balance must be a non-negative integer, got \"ten\"");
        fails(&call(&mut s, 4, &alice, "create", &["dave"]).0, "function create expects 2 arguments (account, balance), got 1");
        fails(&call(&mut s, 4, &alice, "create", &["", "1"]).0, "invalid key \"\": must not be empty");
        assert_eq!(stored(&s, "bob").balance, 50, "bob untouched");
    }

    #[test]
    fn transfer_moves_funds_and_records_both_accounts() {
        let (mut s, alice, _) = two_accounts();
        let (r, rwset) = call(&mut s, 3, &alice, "transfer", &["alice", "bob", "30"]);
        assert!(r.is_ok(), "{}", r.message);
        assert_eq!((stored(&s, "alice").balance, stored(&s, "bob").balance), (70, 80));
        let read_keys: Vec<_> = rwset.reads.iter().map(|r| (r.key.as_str(), r.version)).collect();
        assert_eq!(read_keys, [("alice", Some(Version::new(1, 0))), ("bob", Some(Version::new(2, 0)))]);
        let write_keys: Vec<_> = rwset.writes.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(write_keys, ["alice", "bob"]);
        // The whole balance may go.
        assert!(call(&mut s, 4, &alice, "transfer", &["alice", "bob", "70"]).0.is_ok());
        assert_eq!(stored(&s, "alice").balance, 0);
    }

    #[test]
    fn transfer_failures_say_why_and_change_nothing() {
        let (mut s, alice, bob) = two_accounts();
        let bob_key = "02".repeat(32);
        let alice_key = "01".repeat(32);
        let cases: Vec<(&Identity, Vec<&str>, String)> = vec![
            (&alice, vec!["alice", "bob", "101"], "insufficient funds: account \"alice\" has 100, the transfer needs 101".into()),
            (&alice, vec!["alice", "carol", "1"], "unknown account \"carol\"".into()),
            (&alice, vec!["carol", "bob", "1"], "unknown account \"carol\"".into()),
            (&bob, vec!["alice", "bob", "1"], format!("account \"alice\" is owned by Org1MSP key {alice_key}, not by the caller (Org2MSP key {bob_key})")),
            (&alice, vec!["alice", "alice", "1"], "cannot transfer from account \"alice\" to itself".into()),
            (&alice, vec!["alice", "bob", "0"], "argument amount must be a positive integer, got \"0\"".into()),
            (&alice, vec!["alice", "bob", "-5"], "argument amount must be a positive integer, got \"-5\"".into()),
            (&alice, vec!["alice", "bob", "lots"], "argument amount must be a positive integer, got \"lots\"".into()),
            (&alice, vec!["alice", "bob"], "function transfer expects 3 arguments (from, to, amount), got 2".into()),
        ];
        for (caller, args, message) in cases {
            fails(&call(&mut s, 3, caller, "transfer", &args).0, &message);
        }
        // Same org, different key: still not the owner.
        let other_org1 = identity("Org1MSP", 9);
        assert!(call(&mut s, 3, &other_org1, "transfer", &["alice", "bob", "1"]).0.message.contains("not by the caller"));
        assert_eq!((stored(&s, "alice").balance, stored(&s, "bob").balance), (100, 50));
        assert_eq!(s.last_block(), Some(2), "no failing call was committed");
    }

    #[test]
    fn transfer_refuses_to_overflow_the_target() {
        let (alice, bob) = (identity("Org1MSP", 1), identity("Org2MSP", 2));
        let mut s = MemState::new();
        call(&mut s, 1, &alice, "create", &["alice", "10"]);
        call(&mut s, 2, &bob, "create", &["bob", &u64::MAX.to_string()]);
        fails(&call(&mut s, 3, &alice, "transfer", &["alice", "bob", "1"]).0, "the balance of account \"bob\" would overflow");
    }

    #[test]
    fn balance_returns_the_account_json() {
        let (mut s, _, bob) = two_accounts();
        let (r, rwset) = call(&mut s, 3, &bob, "balance", &["alice"]);
        assert!(r.is_ok());
        let account: Account = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(account.balance, 100);
        assert!(rwset.writes.is_empty());
        fails(&call(&mut s, 3, &bob, "balance", &["zed"]).0, "unknown account \"zed\"");
        fails(&call(&mut s, 3, &bob, "balance", &[]).0, "function balance expects 1 argument (account), got 0");
    }

    #[test]
    fn unknown_function_is_named() {
        let (mut s, alice, _) = two_accounts();
        fails(&call(&mut s, 3, &alice, "mint", &["alice", "5"]).0, "contract transfer has no function \"mint\" (it has: create, transfer, balance)");
    }

    const ACCOUNTS: [&str; 4] = ["a0", "a1", "a2", "a3"];

    proptest! {
        /// Random transfers by random callers, each simulated and (if it succeeds) committed as its
        /// own block: the total never changes, no balance goes negative, and each transfer succeeds
        /// exactly when a plain model says it should, moving exactly its amount.
        #[test]
        fn transfers_conserve_the_total(
            initial in prop::collection::vec(0u64..1_000, ACCOUNTS.len()),
            ops in prop::collection::vec((0..ACCOUNTS.len(), 0..ACCOUNTS.len(), 0u64..400, 0..ACCOUNTS.len()), 1..40),
        ) {
            // Account i is owned by identity i.
            let owners: Vec<Identity> = (0..ACCOUNTS.len()).map(|i| identity(&format!("Org{i}MSP"), i as u8)).collect();
            let mut s = MemState::new();
            let mut model: BTreeMap<&str, u64> = BTreeMap::new();
            let mut block = 0;
            for (i, account) in ACCOUNTS.iter().enumerate() {
                block += 1;
                let (r, _) = call(&mut s, block, &owners[i], "create", &[account, &initial[i].to_string()]);
                prop_assert!(r.is_ok(), "{}", r.message);
                model.insert(account, initial[i]);
            }
            let total: u64 = initial.iter().sum();

            for (from, to, amount, caller) in ops {
                block += 1;
                let (f, t) = (ACCOUNTS[from], ACCOUNTS[to]);
                let (r, _) = call(&mut s, block, &owners[caller], "transfer", &[f, t, &amount.to_string()]);
                let allowed = amount > 0 && from != to && caller == from && model[f] >= amount;
                prop_assert_eq!(r.is_ok(), allowed, "{} -> {} of {} by {}: {}", f, t, amount, caller, r.message);
                if allowed {
                    *model.get_mut(f).unwrap() -= amount;
                    *model.get_mut(t).unwrap() += amount;
                }

                let mut sum: u64 = 0;
                for account in ACCOUNTS {
                    // Read as a generic JSON number: a negative or fractional balance would fail here.
                    let v = s.get(NAME, account).unwrap().unwrap();
                    let json: serde_json::Value = serde_json::from_slice(&v.value).unwrap();
                    let balance = json["balance"].as_u64();
                    prop_assert!(balance.is_some(), "{} has balance {}", account, json["balance"]);
                    let balance = balance.unwrap_or_default();
                    prop_assert_eq!(balance, model[account]);
                    sum += balance;
                }
                prop_assert_eq!(sum, total);
            }
        }
    }
}
