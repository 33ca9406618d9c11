//! The pure core: license data, access-token scopes and the activation decisions.
//!
//! Nothing in here does I/O, reads the clock or touches tokio, hyper, SQLite or serde_json
//! (`tests/tidy.rs` enforces it). Every decision is a function of plain data and `now`, so the
//! tables in `domain/tests.rs` pin the Cryptolens semantics without a server.

pub mod codes;
pub mod decide;
pub mod model;
pub mod scope;

#[cfg(test)]
mod tests;

pub use codes::StateCode;
pub use decide::{activate, deactivate, ActivateInput, ActivateOutcome, DeactivateOutcome, Reject};
pub use model::{
    Customer, DataObject, Features, License, LogFilter, Machine, MachineKind, Mask, UnixTime,
    DAY_SECONDS,
};
pub use scope::{Method, Scope, ScopeError};
