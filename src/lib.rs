//! Keygate: a license-activation edge server that speaks the Cryptolens Web API v3.
//!
//! Module map (see ARCHITECTURE.md for the invariants):
//! - `domain`: pure activation logic and data (no I/O).
//! - `request`: path routing and tolerant parameter decoding.
//! - `wire`: the byte-exact Cryptolens JSON and the public-key XML.
//! - `signing`: RSA-2048 PKCS#1 v1.5 over aws-lc-rs.
//! - `state`: the node's in-memory licenses, tokens and signers; change-feed sync.
//! - `dist`: distributed mode: license activations shared by edge nodes through Redis.
//! - `store`: the main store (SQLite or PostgreSQL), its batched writer and local spool.
//! - `http`: the HTTPS edge, handlers and the one error mapping.
//! - `privacy`: pure privacy rules (IP anonymisation of the request log).
//! - `tls`, `config`, `control` (CLI operations), `metrics`, `app` (wiring for `serve`).
//! - `testkit`: throw-away PostgreSQL clusters for tests and benchmarks.

pub mod app;
pub mod config;
pub mod control;
pub mod dist;
pub mod domain;
pub mod http;
pub mod metrics;
pub mod privacy;
pub mod request;
pub mod sched;
pub mod signing;
pub mod state;
pub mod store;
mod swar;
#[doc(hidden)]
pub mod testkit;
pub mod tls;
pub mod wire;
