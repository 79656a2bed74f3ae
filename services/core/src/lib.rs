//! The pure core of streamledger: the data model and its Avro codec, identities and signatures,
//! endorsement policies, the block cutter, the validator and the contracts.
//!
//! Nothing here does I/O, reads a clock or draws randomness: time and keys are passed in, so every
//! function is deterministic and can be unit- and property-tested. The stages (endorser, gateway,
//! orderer, validator) wrap these functions with the log and state ports.

mod batch_verify;
pub mod codec;
pub mod schema_history;
pub mod contract;
pub mod contracts;
pub mod crypto;
pub mod cutter;
pub mod endorsement;
pub mod fixtures;
pub mod model;
pub mod network;
pub mod policy;
pub mod publish;
pub mod recent;
pub mod simulation;
pub mod state;
pub mod validation;
pub mod write_rules;
