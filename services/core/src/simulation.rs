//! Endorsement-time simulation: run a contract function against committed state and record its
//! read-write set exactly as Fabric's transaction simulator does
//! (`core/ledger/kvledger/txmgmt/txmgr/{query_executor,tx_simulator}.go` and
//! `rwsetutil/rwset_builder.go`), so that the validator's MVCC and phantom checks, and Fabric users'
//! intuitions about them, carry over unchanged.
//!
//! The rules, some of which surprise people who expect a database transaction:
//!
//! - **No read-your-writes.** `get_state` returns the *committed* value even after this
//!   transaction wrote or deleted the key, and records the committed version. Fabric does the same
//!   (its docs: "Read-your-writes semantics are not supported"): the read set must describe the
//!   state the transaction depends on, which is the committed state, and validation compares
//!   exactly that. A contract that needs its own write must keep it in a local variable.
//! - **One read entry per key.** Reading a key twice records it once (Fabric's `readMap`). We also
//!   return the first read's value again instead of asking the store twice: Fabric holds a read
//!   lock on state for the whole simulation so both reads agree; our stores are not locked, and
//!   this keeps the response consistent with the version recorded.
//! - **A missing key is read with version `None`**, which validation treats as "must still be
//!   missing".
//! - **Last write wins.** Writing a key twice records only the last value; a delete is a write with
//!   value `None`, also when the key did not exist.
//! - **Sorted.** Reads and writes are sorted by (namespace, key), as the builder's
//!   `GetValuesBySortedKeys` sorts them (byte order, as Go compares strings). Range reads keep the
//!   order the contract performed them in, as Fabric's builder does (`rangeQueriesKeys` is a
//!   slice), and an identical range read is recorded once.
//! - **Range reads** see committed state only, do not enter the point-read set, and record each key
//!   returned with its committed version. `exhausted` is false when the limit (or the
//!   [`TOTAL_QUERY_LIMIT`]) stopped the read before the end of the range; we fetch one entry more
//!   than the limit to know. The extra entry is not recorded (the contract never saw it).
//!   Differences from Fabric, both forced by `model::RangeRead`: Fabric rewrites `EndKey` to the
//!   last key returned when the iterator was not exhausted, we keep the requested end and the
//!   validator checks up to the last key read; and Fabric summarises more than 50 results as a
//!   Merkle tree of hashes, we always keep the raw reads.
//! - **Empty keys are refused** (Fabric's shim refuses them) with a `ContractError`, which a
//!   contract normally turns into a failing response.
//!
//! Errors: a contract failure of any kind (unknown contract or function, wrong arguments, business
//! rule, even a panic) is a failing `Response` with status 500. `Err` means only that the state
//! store failed during the simulation: that is infrastructure, to retry, never a verdict on the
//! proposal. The simulator remembers a store failure, so a contract that swallows it cannot turn
//! it into a response, and refuses every later call.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::contract::{Context, ContractError, Registry};
use crate::model::{Identity, KvRead, KvWrite, Proposal, RangeRead, Response, RwSet};
use crate::state::{CommittedState, StateError, VersionedValue};

/// The most entries one range read returns, whatever limit the contract asks for: Fabric's
/// `ledger.state.totalQueryLimit` default. A read cut by it is recorded as not exhausted.
pub const TOTAL_QUERY_LIMIT: usize = 100_000;

/// Runs `proposal` on `state` and returns the contract's response with the read-write set.
///
/// The response may be a failure (status other than 200); its read-write set is then whatever the
/// contract recorded before failing, useful for debugging but never to be endorsed.
pub fn simulate(registry: &Registry, state: &dyn CommittedState, proposal: &Proposal) -> Result<(Response, RwSet), StateError> {
    let Some(contract) = registry.get(&proposal.contract) else {
        let message = format!("unknown contract {:?} (installed: {})", proposal.contract, registry.names().join(", "));
        return Ok((Response::error(message), RwSet::default()));
    };
    let mut sim = Simulator::new(state, contract.name(), &proposal.tx_id, &proposal.creator);
    // A panicking contract is a bug in that contract, not a reason to stop the endorser: it fails
    // this proposal like any other contract error.
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        if proposal.function == "init" {
            contract.init(&mut sim, &proposal.args)
        } else {
            contract.invoke(&mut sim, &proposal.function, &proposal.args)
        }
    }));
    let response = outcome.unwrap_or_else(|panic| {
        let detail = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Response::error(format!("contract {} panicked in function {:?}: {detail}", contract.name(), proposal.function))
    });
    sim.finish(response)
}

/// The `Context` a contract runs in, recording the read-write set. One contract, one namespace:
/// there are no contract-to-contract calls, so sorting by key is sorting by (namespace, key).
struct Simulator<'a> {
    state: &'a dyn CommittedState,
    namespace: &'a str,
    tx_id: &'a str,
    creator: &'a Identity,
    /// Point reads: the committed value as first read (`None`: missing). Both the read set and a
    /// cache that makes later reads of the key agree with the version recorded.
    reads: BTreeMap<String, Option<VersionedValue>>,
    /// Final value per key; `None` deletes.
    writes: BTreeMap<String, Option<Vec<u8>>>,
    range_reads: Vec<RangeRead>,
    /// The first store failure; once set, the simulation is an `Err` whatever the contract does.
    failure: Option<StateError>,
}

impl<'a> Simulator<'a> {
    fn new(state: &'a dyn CommittedState, namespace: &'a str, tx_id: &'a str, creator: &'a Identity) -> Self {
        Self {
            state,
            namespace,
            tx_id,
            creator,
            reads: BTreeMap::new(),
            writes: BTreeMap::new(),
            range_reads: Vec::new(),
            failure: None,
        }
    }

    fn check_healthy(&self) -> Result<(), ContractError> {
        match &self.failure {
            Some(e) => Err(ContractError::State(e.clone())),
            None => Ok(()),
        }
    }

    /// Remembers a store failure before handing it to the contract.
    fn store<T>(&mut self, result: Result<T, StateError>) -> Result<T, ContractError> {
        result.map_err(|e| {
            self.failure.get_or_insert_with(|| e.clone());
            ContractError::State(e)
        })
    }

    fn finish(self, response: Response) -> Result<(Response, RwSet), StateError> {
        if let Some(e) = self.failure {
            return Err(e);
        }
        let ns = self.namespace;
        let reads = self
            .reads
            .into_iter()
            .map(|(key, v)| KvRead { namespace: ns.to_string(), key, version: v.map(|v| v.version) })
            .collect();
        let writes = self.writes.into_iter().map(|(key, value)| KvWrite { namespace: ns.to_string(), key, value }).collect();
        Ok((response, RwSet { reads, range_reads: self.range_reads, writes }))
    }
}

fn check_key(key: &str) -> Result<(), ContractError> {
    if key.is_empty() {
        return Err(ContractError::InvalidKey { key: String::new(), reason: "must not be empty" });
    }
    Ok(())
}

impl Context for Simulator<'_> {
    fn tx_id(&self) -> &str {
        self.tx_id
    }

    fn creator(&self) -> &Identity {
        self.creator
    }

    fn get_state(&mut self, key: &str) -> Result<Option<Vec<u8>>, ContractError> {
        self.check_healthy()?;
        check_key(key)?;
        // Deliberately not looking at `self.writes`: no read-your-writes (see the module docs).
        if let Some(seen) = self.reads.get(key) {
            return Ok(seen.as_ref().map(|v| v.value.clone()));
        }
        let committed = self.store(self.state.get(self.namespace, key))?;
        let value = committed.as_ref().map(|v| v.value.clone());
        self.reads.insert(key.to_string(), committed);
        Ok(value)
    }

    fn put_state(&mut self, key: &str, value: Vec<u8>) -> Result<(), ContractError> {
        self.check_healthy()?;
        check_key(key)?;
        self.writes.insert(key.to_string(), Some(value));
        Ok(())
    }

    fn delete_state(&mut self, key: &str) -> Result<(), ContractError> {
        self.check_healthy()?;
        check_key(key)?;
        self.writes.insert(key.to_string(), None);
        Ok(())
    }

    fn get_state_by_range(&mut self, start: &str, end: &str, limit: Option<usize>) -> Result<Vec<(String, Vec<u8>)>, ContractError> {
        self.check_healthy()?;
        let limit = limit.unwrap_or(TOTAL_QUERY_LIMIT).min(TOTAL_QUERY_LIMIT);
        // One more than asked for tells whether the range goes on past what the contract sees.
        let mut entries = self.store(self.state.range(self.namespace, start, end, Some(limit + 1)))?;
        let exhausted = entries.len() <= limit;
        entries.truncate(limit);
        let range_read = RangeRead {
            namespace: self.namespace.to_string(),
            start_key: start.to_string(),
            end_key: end.to_string(),
            exhausted,
            reads: entries
                .iter()
                .map(|(key, v)| KvRead { namespace: self.namespace.to_string(), key: key.clone(), version: Some(v.version) })
                .collect(),
        };
        if !self.range_reads.contains(&range_read) {
            self.range_reads.push(range_read);
        }
        Ok(entries.into_iter().map(|(key, v)| (key, v.value)).collect())
    }
}

/// Helpers for tests of simulation and of contracts.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::Version;
    use crate::state::{MemState, WriteBatch};

    pub fn identity(org: &str, key_byte: u8) -> Identity {
        Identity { org: org.to_string(), public_key: vec![key_byte; 32] }
    }

    pub fn proposal(contract: &str, function: &str, args: &[&str], creator: &Identity) -> Proposal {
        Proposal {
            tx_id: format!("tx-{contract}-{function}-{}", args.join("-")),
            channel: "ch".into(),
            contract: contract.into(),
            function: function.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            creator: creator.clone(),
            nonce: vec![0; 24],
            timestamp_ms: 0,
            signature: vec![],
        }
    }

    /// The writes of one transaction as the batch of block `block` (the transaction at position
    /// 0), as the validator would commit them if the transaction is valid.
    pub fn write_batch(rwset: &RwSet, block: i64) -> WriteBatch {
        let writes: BTreeMap<_, _> = rwset
            .writes
            .iter()
            .map(|w| ((w.namespace.clone(), w.key.clone()), (w.value.clone(), Version::new(block, 0))))
            .collect();
        WriteBatch { block, writes, tx_index: Vec::new() }
    }

    /// Simulates and, when the response is a success, commits the writes as block `block`.
    pub fn run(state: &mut MemState, block: i64, p: &Proposal) -> (Response, RwSet) {
        let (response, rwset) = simulate(&Registry::builtin(), state, p).expect("MemState never fails");
        if response.is_ok() {
            state.apply(&write_batch(&rwset, block));
        }
        (response, rwset)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::testing::*;
    use super::*;
    use crate::contract::{respond, Contract};
    use crate::model::Version;
    use crate::state::{MemState, StateResult, TxLocation};

    /// A contract that runs a little script, one step per argument, and answers with what it read
    /// (one line per read), so each test can say exactly which calls a contract makes:
    /// `get:k`, `put:k=v`, `del:k`, `range:start:end[:limit]`.
    #[derive(Default)]
    struct Script;

    impl Contract for Script {
        fn name(&self) -> &'static str {
            "script"
        }

        fn invoke(&self, ctx: &mut dyn Context, _function: &str, args: &[String]) -> Response {
            respond((|| {
                let mut out = Vec::new();
                for step in args {
                    let (op, rest) = step.split_once(':').unwrap_or((step, ""));
                    match op {
                        "get" => {
                            let v = ctx.get_state(rest)?;
                            out.push(v.map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_else(|| "<none>".into()));
                        }
                        "put" => {
                            let (k, v) = rest.split_once('=').unwrap_or((rest, ""));
                            ctx.put_state(k, v.as_bytes().to_vec())?;
                        }
                        "del" => ctx.delete_state(rest)?,
                        "range" => {
                            let parts: Vec<&str> = rest.split(':').collect();
                            let limit = parts.get(2).and_then(|l| l.parse().ok());
                            let rows = ctx.get_state_by_range(parts[0], parts.get(1).copied().unwrap_or(""), limit)?;
                            out.push(rows.into_iter().map(|(k, _)| k).collect::<Vec<_>>().join(","));
                        }
                        // Keeps going after a store failure, as a careless contract might.
                        "swallow" => {
                            let _ = ctx.get_state(rest);
                            out.push("swallowed".into());
                        }
                        "panic" => panic!("boom"),
                        other => return Err(Response::error(format!("bad step {other}"))),
                    }
                }
                Ok(out.join("\n").into_bytes())
            })())
        }
    }

    fn registry() -> Registry {
        let mut r = Registry::builtin();
        r.register(Arc::new(Script));
        r
    }

    fn run_script(state: &dyn CommittedState, steps: &[&str]) -> (Response, RwSet) {
        let p = proposal("script", "run", steps, &identity("Org1MSP", 1));
        simulate(&registry(), state, &p).expect("no store failure")
    }

    fn committed(entries: &[(&str, &str, i64)]) -> MemState {
        let mut s = MemState::new();
        for (k, v, block) in entries {
            s.put("script", k, v.as_bytes(), Version::new(*block, 0));
        }
        s
    }

    fn read(key: &str, version: Option<Version>) -> KvRead {
        KvRead { namespace: "script".into(), key: key.into(), version }
    }

    fn write(key: &str, value: Option<&str>) -> KvWrite {
        KvWrite { namespace: "script".into(), key: key.into(), value: value.map(|v| v.as_bytes().to_vec()) }
    }

    #[test]
    fn read_after_own_write_returns_committed_value_and_version() {
        let state = committed(&[("a", "old", 3)]);
        let (response, rwset) = run_script(&state, &["put:a=new", "get:a", "del:b", "get:b"]);
        assert!(response.is_ok(), "{}", response.message);
        assert_eq!(String::from_utf8_lossy(&response.payload), "old\n<none>");
        assert_eq!(rwset.reads, [read("a", Some(Version::new(3, 0))), read("b", None)]);
        assert_eq!(rwset.writes, [write("a", Some("new")), write("b", None)]);
    }

    #[test]
    fn a_key_read_twice_is_recorded_once() {
        let state = committed(&[("a", "1", 1)]);
        let (_, rwset) = run_script(&state, &["get:a", "get:a", "get:a"]);
        assert_eq!(rwset.reads, [read("a", Some(Version::new(1, 0)))]);
    }

    #[test]
    fn missing_key_read_has_version_none() {
        let (response, rwset) = run_script(&MemState::new(), &["get:nope"]);
        assert_eq!(String::from_utf8_lossy(&response.payload), "<none>");
        assert_eq!(rwset.reads, [read("nope", None)]);
    }

    #[test]
    fn reads_and_writes_are_sorted_by_key_in_byte_order() {
        let state = committed(&[("b", "1", 1), ("B", "1", 2), ("a", "1", 3)]);
        let (_, rwset) = run_script(&state, &["get:b", "get:a", "get:B", "put:z=1", "put:Z=1", "put:m=1"]);
        let read_keys: Vec<&str> = rwset.reads.iter().map(|r| r.key.as_str()).collect();
        let write_keys: Vec<&str> = rwset.writes.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(read_keys, ["B", "a", "b"]);
        assert_eq!(write_keys, ["Z", "m", "z"]);
    }

    #[test]
    fn last_write_wins_and_delete_is_a_write_of_none() {
        let state = committed(&[("a", "old", 1)]);
        let (_, rwset) = run_script(&state, &["put:a=1", "put:a=2", "del:c", "put:c=3", "put:d=4", "del:d"]);
        assert_eq!(rwset.writes, [write("a", Some("2")), write("c", Some("3")), write("d", None)]);
        assert!(rwset.reads.is_empty(), "blind writes read nothing");
    }

    #[test]
    fn range_read_records_committed_keys_and_whether_it_was_exhausted() {
        let state = committed(&[("k1", "v", 1), ("k2", "v", 2), ("k3", "v", 3), ("z", "v", 4)]);
        let (response, rwset) = run_script(&state, &["put:k0=new", "range:k:l:2", "range:k:l", "range:k:l:3"]);
        // Own write k0 is invisible; the limit 2 stops before k3; without a limit, and with a limit
        // the range just fits, the read reaches the end.
        assert_eq!(String::from_utf8_lossy(&response.payload), "k1,k2\nk1,k2,k3\nk1,k2,k3");
        let v = |b| Some(Version::new(b, 0));
        let range = |exhausted, reads| RangeRead { namespace: "script".into(), start_key: "k".into(), end_key: "l".into(), exhausted, reads };
        assert_eq!(
            rwset.range_reads,
            // Recorded in the order performed; the third read equals the second and is kept once.
            [range(false, vec![read("k1", v(1)), read("k2", v(2))]), range(true, vec![read("k1", v(1)), read("k2", v(2)), read("k3", v(3))])]
        );
        assert!(rwset.reads.is_empty(), "range reads do not enter the point-read set");
    }

    #[test]
    fn range_read_with_empty_end_is_unbounded_and_empty_range_is_exhausted() {
        let state = committed(&[("a", "v", 1), ("b", "v", 1)]);
        let (response, rwset) = run_script(&state, &["range:b:", "range:x:y:0"]);
        assert_eq!(String::from_utf8_lossy(&response.payload), "b\n");
        assert!(rwset.range_reads[0].exhausted);
        assert_eq!(rwset.range_reads[0].end_key, "");
        assert!(rwset.range_reads[1].exhausted, "nothing past the end of an empty range");
    }

    #[test]
    fn empty_keys_are_refused_with_a_failing_response() {
        for step in ["get:", "put:=v", "del:"] {
            let (response, rwset) = run_script(&MemState::new(), &[step]);
            assert_eq!(response.status, Response::ERROR, "{step}");
            assert_eq!(response.message, "invalid key \"\": must not be empty");
            assert_eq!(rwset, RwSet::default());
        }
    }

    #[test]
    fn unknown_contract_and_panics_are_failing_responses() {
        let p = proposal("nope", "run", &[], &identity("Org1MSP", 1));
        let (response, rwset) = simulate(&registry(), &MemState::new(), &p).unwrap();
        assert_eq!(response.status, Response::ERROR);
        assert_eq!(response.message, "unknown contract \"nope\" (installed: kv, script, smallbank, transfer)");
        assert_eq!(rwset, RwSet::default());

        let (response, _) = run_script(&MemState::new(), &["panic"]);
        assert_eq!(response.status, Response::ERROR);
        assert_eq!(response.message, "contract script panicked in function \"run\": boom");
    }

    #[test]
    fn init_calls_contract_init() {
        // The default init succeeds without touching state; "init" must not reach invoke, where the
        // script would fail on the unknown step.
        let p = proposal("script", "init", &["bogus"], &identity("Org1MSP", 1));
        let (response, rwset) = simulate(&registry(), &MemState::new(), &p).unwrap();
        assert!(response.is_ok(), "{}", response.message);
        assert_eq!(rwset, RwSet::default());
    }

    /// A store that is down.
    struct Down;

    impl CommittedState for Down {
        fn get(&self, _: &str, _: &str) -> StateResult<Option<VersionedValue>> {
            Err(StateError { message: "connection refused".into(), retryable: true })
        }
        fn range(&self, _: &str, _: &str, _: &str, _: Option<usize>) -> StateResult<Vec<(String, VersionedValue)>> {
            Err(StateError { message: "connection refused".into(), retryable: true })
        }
        fn tx_location(&self, _: &str) -> StateResult<Option<TxLocation>> {
            Ok(None)
        }
    }

    #[test]
    fn a_store_failure_is_an_err_even_if_the_contract_swallows_it() {
        let p = proposal("script", "run", &["get:a"], &identity("Org1MSP", 1));
        let err = simulate(&registry(), &Down, &p).unwrap_err();
        assert_eq!(err.message, "connection refused");
        assert!(err.retryable);

        let p = proposal("script", "run", &["swallow:a", "put:b=1"], &identity("Org1MSP", 1));
        assert!(simulate(&registry(), &Down, &p).is_err());

        let p = proposal("script", "run", &["range:a:b"], &identity("Org1MSP", 1));
        assert!(simulate(&registry(), &Down, &p).is_err());

        // The builtin contracts propagate it too, instead of answering "unknown account".
        let p = proposal("transfer", "balance", &["alice"], &identity("Org1MSP", 1));
        assert!(simulate(&registry(), &Down, &p).is_err());
    }

    #[test]
    fn equal_simulations_give_equal_rwsets() {
        // Endorsers compare results byte for byte: the rwset must not depend on call order.
        let state = committed(&[("a", "1", 1), ("b", "1", 2)]);
        let (_, one) = run_script(&state, &["get:a", "get:b", "put:x=1", "put:y=2"]);
        let (_, two) = run_script(&state, &["get:b", "get:a", "put:y=2", "put:x=1"]);
        assert_eq!(one, two);
    }
}
