//! `kv`: a plain key-value contract, mostly for tests. Values are stored as the UTF-8 bytes of
//! the argument, unchanged.
//!
//! - `get(key)`: the committed value; a missing key is a success with an empty payload (like
//!   Fabric's `GetState` returning nil), so a test can record a read of a missing key.
//! - `put(key, value)`, `delete(key)`: blind writes.
//! - `range(start, end[, limit])`: a JSON array of `{"key", "value"}` for `[start, end)`, empty
//!   `end` unbounded.

use serde::Serialize;

use crate::contract::{expect_args, expect_args_optional, parse_usize, respond, to_json, unknown_function, Context, Contract};
use crate::model::Response;

pub const NAME: &str = "kv";
const FUNCTIONS: &[&str] = &["get", "put", "delete", "range"];

#[derive(Debug, Default, Clone, Copy)]
pub struct Kv;

impl Contract for Kv {
    fn name(&self) -> &'static str {
        NAME
    }

    fn invoke(&self, ctx: &mut dyn Context, function: &str, args: &[String]) -> Response {
        respond(match function {
            "get" => get(ctx, args),
            "put" => put(ctx, args),
            "delete" => delete(ctx, args),
            "range" => range(ctx, args),
            _ => Err(unknown_function(NAME, function, FUNCTIONS)),
        })
    }
}

fn get(ctx: &mut dyn Context, args: &[String]) -> Result<Vec<u8>, Response> {
    let [key] = expect_args("get", args, ["key"])?;
    Ok(ctx.get_state(key)?.unwrap_or_default())
}

fn put(ctx: &mut dyn Context, args: &[String]) -> Result<Vec<u8>, Response> {
    let [key, value] = expect_args("put", args, ["key", "value"])?;
    ctx.put_state(key, value.as_bytes().to_vec())?;
    Ok(Vec::new())
}

fn delete(ctx: &mut dyn Context, args: &[String]) -> Result<Vec<u8>, Response> {
    let [key] = expect_args("delete", args, ["key"])?;
    ctx.delete_state(key)?;
    Ok(Vec::new())
}

#[derive(Serialize)]
struct Entry {
    key: String,
    value: String,
}

fn range(ctx: &mut dyn Context, args: &[String]) -> Result<Vec<u8>, Response> {
    let ([start, end], [limit]) = expect_args_optional("range", args, ["start", "end"], ["limit"])?;
    let limit = limit.map(|l| parse_usize("limit", l)).transpose()?;
    let entries: Vec<Entry> = ctx
        .get_state_by_range(start, end, limit)?
        .into_iter()
        .map(|(key, value)| Entry { key, value: String::from_utf8_lossy(&value).into_owned() })
        .collect();
    to_json(&entries)
}

#[cfg(test)]
mod tests {
    use crate::model::{Response, Version};
    use crate::simulation::testing::{identity, proposal, run};
    use crate::state::{CommittedState, MemState};

    fn call(state: &mut MemState, block: i64, function: &str, args: &[&str]) -> Response {
        run(state, block, &proposal("kv", function, args, &identity("Org1MSP", 1))).0
    }

    #[test]
    fn put_get_delete_round_trip() {
        let mut s = MemState::new();
        assert!(call(&mut s, 1, "put", &["k", "hello"]).is_ok());
        assert_eq!(s.get("kv", "k").unwrap().unwrap().version, Version::new(1, 0), "namespace is the contract name");
        assert_eq!(call(&mut s, 2, "get", &["k"]).payload, b"hello");
        assert!(call(&mut s, 3, "delete", &["k"]).is_ok());
        let missing = call(&mut s, 4, "get", &["k"]);
        assert!(missing.is_ok());
        assert!(missing.payload.is_empty());
    }

    #[test]
    fn range_returns_json_entries_and_honours_limit() {
        let mut s = MemState::new();
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            call(&mut s, i as i64 + 1, "put", &[k, &format!("v{k}")]);
        }
        let all = call(&mut s, 9, "range", &["a", ""]);
        assert_eq!(String::from_utf8_lossy(&all.payload), r#"[{"key":"a","value":"va"},{"key":"b","value":"vb"},{"key":"c","value":"vc"}]"#);
        let two = call(&mut s, 9, "range", &["a", "c", "5"]);
        assert_eq!(String::from_utf8_lossy(&two.payload), r#"[{"key":"a","value":"va"},{"key":"b","value":"vb"}]"#);
        let one = call(&mut s, 9, "range", &["", "", "1"]);
        assert_eq!(String::from_utf8_lossy(&one.payload), r#"[{"key":"a","value":"va"}]"#);
    }

    #[test]
    fn bad_calls_fail_with_a_message_naming_the_problem() {
        let mut s = MemState::new();
        let cases: [(&str, &[&str], &str); 5] = [
            ("get", &[], "function get expects 1 argument (key), got 0"),
            ("put", &["k"], "function put expects 2 arguments (key, value), got 1"),
            ("range", &["a", "b", "x"], "argument limit must be a non-negative integer, got \"x\""),
            ("range", &["a"], "function range expects 2 to 3 arguments (start, end[, limit]), got 1"),
            ("nope", &[], "contract kv has no function \"nope\" (it has: get, put, delete, range)"),
        ];
        for (function, args, message) in cases {
            let r = call(&mut s, 1, function, args);
            assert_eq!((r.status, r.message.as_str()), (Response::ERROR, message));
        }
        assert_eq!(s.last_block(), None, "nothing was committed");
    }
}
