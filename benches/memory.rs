//! Resident memory of a node's in-memory state at scale: N licenses with M activated machines
//! each, as `State::load` would hold them (the same `put_key` path), measured as the growth of
//! the process's resident set. Run: `cargo bench --bench memory -- [licenses] [machines each]`
//! (default 1,000,000 and 2). Results: benches/README.md.

use keygate::domain::{Features, License, Machine, MachineKind};
use keygate::state::State;
use keygate::store::KeyRow;
use std::time::Instant;

/// The allocator the `keygate` binary uses, so the figure is the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A 64-character hex machine code, as the SDKs' `GetMachineCode` produces (SHA-256).
fn machine_code(n: u64) -> String {
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut s = String::with_capacity(64);
    for _ in 0..4 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("{x:016x}"));
    }
    s
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let licenses = args.first().copied().unwrap_or(1_000_000);
    let per = args.get(1).copied().unwrap_or(2);
    let state = State::default();
    // One shared copy of the node address, as `Store::keys` interns it.
    let node: std::sync::Arc<str> = "10.0.0.1".into();
    let before = rss_bytes();
    let started = Instant::now();
    for i in 0..licenses {
        let machines = (0..per)
            .map(|m| Machine {
                machine_code: machine_code(i * per + m),
                kind: MachineKind::NodeLocked,
                ip: format!("203.0.{}.{}", (i >> 8) & 255, i & 255),
                proxy_ip: node.clone(),
                time: 1_800_000_000 + i as i64,
                friendly_name: String::new(),
                floating_expires: 0,
            })
            .collect();
        let license = License {
            product_id: 1 + (i % 10) as i64,
            id: i as i64 + 1,
            global_id: i as i64 + 1,
            key: format!("{:05}-BCDEF-GHIJK-{:05}", i % 100_000, i / 100_000),
            created: 1_800_000_000,
            expires: 1_830_000_000,
            period: 365,
            features: Features(0b101),
            notes: None,
            block: false,
            customer: None,
            trial_activation: false,
            max_no_of_machines: 5,
            version: 0,
            shared_version: 0,
            allowed_machines: String::new(),
            data_objects: Vec::new(),
            machines,
        };
        state.put_key(
            KeyRow {
                tenant_id: 1,
                trial_machine_code: None,
                license,
            },
            false,
        );
    }
    let grown = rss_bytes().saturating_sub(before);
    let gib = grown as f64 / (1u64 << 30) as f64;
    println!(
        "{licenses} licenses x {per} machines: resident memory +{:.1} MiB ({gib:.3} GiB), {:.0} bytes per license, loaded in {:.1} s",
        grown as f64 / (1u64 << 20) as f64,
        grown as f64 / licenses.max(1) as f64,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(state.license_count(), licenses as usize);
}
