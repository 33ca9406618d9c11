//! Fuzzes the request decoder: any path, query and body bytes must produce a `Request` or a
//! decode error, never a panic. The input is split on the first two 0xFF bytes into
//! path, query and body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0xFF);
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let query = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    let _ = keygate::request::decode(&path, query, body);
});
