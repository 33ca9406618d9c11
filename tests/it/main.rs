//! System tests: a real `keygate serve` process over real TLS sockets, driven by our HTTPS
//! client and by the real Cryptolens SDKs. One binary: `cargo test --test it`.

mod activation;
mod distributed;
mod encryption;
mod helpers;
mod hostile;
mod loadgen;
mod ops;
mod pg_store;
mod sdk;
mod weblog;
