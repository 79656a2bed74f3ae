//! The contracts shipped with streamledger.
//!
//! # Adding a contract
//!
//! 1. Write `contracts/<module>.rs` with a `#[derive(Default)]` type that implements
//!    [`Contract`](crate::contract::Contract). Its `name()` is also its state namespace and the
//!    name proposals call it by. Copy `kv.rs` for a start: dispatch on the function name, one
//!    `fn(ctx, args) -> Result<Vec<u8>, Response>` per function, the helpers of `contract` for
//!    arguments and JSON, [`respond`](crate::contract::respond) at the end. Tests go in the same
//!    file and run through `simulation::simulate`.
//! 2. Add one line `<module>::<Type>,` to the list below. The macro declares the module and puts
//!    the contract in [`builtin`], hence in `Registry::builtin()`.
//!
//! Contracts must be deterministic (every endorser must produce the same bytes): no clock, no
//! randomness, no hash-map iteration, JSON from structs only.

use std::sync::Arc;

use crate::contract::Contract;

macro_rules! builtin_contracts {
    ($($module:ident :: $contract:ident),* $(,)?) => {
        $(pub mod $module;)*

        /// One instance of every shipped contract.
        pub fn builtin() -> Vec<Arc<dyn Contract>> {
            vec![$(Arc::new($module::$contract::default()) as Arc<dyn Contract>),*]
        }
    };
}

builtin_contracts! {
    kv::Kv,
    smallbank::SmallBank,
    transfer::Transfer,
}
