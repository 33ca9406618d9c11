//! Encryption at rest over the real stack (on SQLite, and on PostgreSQL in the suite's
//! PostgreSQL pass): a dump of the main store holds none of the personal values that the node
//! and the CLI stored, while the API and the CLI still show them; a store written in clear is
//! sealed by `privacy rotate-key`; a new key takes over and the old one can leave the file.

use super::helpers::{cli, license_text, Seed, Server, TempDir};
use keygate_loadtest::{form, Protocol};
use std::path::{Path, PathBuf};

/// Appends TOML to the directory's configuration (which may already name PostgreSQL).
fn add_config(dir: &Path, text: &str) {
    let path = dir.join("keygate.toml");
    let mut s = std::fs::read_to_string(&path).unwrap_or_default();
    s.push_str(text);
    std::fs::write(path, s).unwrap();
}

fn postgres_url(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("keygate.toml")).ok()?;
    let line = text.lines().find(|l| l.starts_with("postgres_url"))?;
    Some(line.split('"').nth(1)?.to_owned())
}

/// Everything an attacker with the database alone gets: the SQLite files, or `pg_dump`.
fn dump(dir: &Path) -> Vec<u8> {
    match postgres_url(dir) {
        Some(url) => {
            let bin: PathBuf = std::fs::read_dir("/usr/lib/postgresql")
                .unwrap()
                .filter_map(|e| Some(e.ok()?.path().join("bin/pg_dump")))
                .find(|p| p.exists())
                .expect("pg_dump from the postgresql package");
            let out = std::process::Command::new(bin)
                .args(["--data-only", "--inserts", "-d", &url])
                .output()
                .expect("running pg_dump");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        }
        None => {
            let mut all = Vec::new();
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                if name.starts_with("keygate.db") {
                    all.extend(std::fs::read(&p).unwrap());
                }
            }
            assert!(!all.is_empty(), "no SQLite files in {}", dir.display());
            all
        }
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

async fn activate(server: &Server, seed: &Seed, key: &str, machine: &str, ip: &str) -> String {
    let mut c = server.connect(Protocol::Http1).await;
    let body = form(&[
        ("token", &seed.token),
        ("ProductId", &seed.product.to_string()),
        ("Key", key),
        ("MachineCode", machine),
        ("FriendlyName", &format!("{machine}-laptop")),
        ("SignMethod", "1"),
    ]);
    let r = c
        .request(
            "POST",
            "/api/key/Activate",
            &[("X-Forwarded-For", ip)],
            body,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    license_text(&r.text())
}

const PROXIES: (&str, &str) = ("KEYGATE_SERVER__TRUSTED_PROXIES", r#"["127.0.0.0/8"]"#);
/// Whole client addresses in the log, so the dump check covers the log's IPs too.
const WHOLE_IPS: (&str, &str) = ("KEYGATE_PRIVACY__LOG_IPV4_PREFIX", "32");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_dump_reveals_no_personal_data_and_every_answer_still_does() {
    let dir = TempDir::new("encryption");
    let d = &dir.0;
    // Written in clear first: a store from before encryption was turned on.
    let seed = Seed::new(d);
    let key = seed.key(
        d,
        &[
            "--max-machines",
            "10",
            "--customer-name",
            "Grace Hopper",
            "--customer-email",
            "grace.hopper@example.com",
            "--customer-company",
            "Navy Labs",
        ],
    );
    let mut server = Server::start(d, &[PROXIES, WHOLE_IPS]);
    activate(&server, &seed, &key, "mc-plain-4e1d", "198.51.100.41").await;
    server.stop();

    // Encryption on: a key file, every process restarted with it.
    let line = cli(d, &["privacy", "new-key", "--id", "k1"])["key_line"]
        .as_str()
        .unwrap()
        .to_owned();
    let keys = d.join("keys");
    std::fs::write(&keys, format!("{line}\n")).unwrap();
    add_config(
        d,
        &format!(
            "\n[privacy]\nencryption_key_file = \"{}\"\n",
            keys.display()
        ),
    );
    let mut server = Server::start(d, &[PROXIES, WHOLE_IPS]);
    let text = activate(&server, &seed, &key, "mc-sealed-7f3a", "198.51.100.77").await;
    // The answers carry the values in clear (from the plaintext rows and the sealed ones).
    for v in [
        "grace.hopper@example.com",
        "Navy Labs",
        "mc-plain-4e1d",
        "mc-sealed-7f3a",
        "198.51.100.77",
    ] {
        assert!(text.contains(v), "{v} missing from {text}");
    }
    let mut c = server.connect(Protocol::Http1).await;
    let trial = c
        .post(
            "/api/key/CreateTrialKey",
            &form(&[
                ("token", &seed.token),
                ("ProductId", &seed.product.to_string()),
                ("MachineCode", "trial-mc-5d1c"),
            ]),
        )
        .await
        .unwrap();
    assert_eq!(trial.status, 200, "{}", trial.text());
    server.stop();

    // `rotate-key` seals what was written in clear; a second run has nothing left to do.
    let n = cli(d, &["privacy", "rotate-key"])["rows_reencrypted"]
        .as_i64()
        .unwrap();
    // Tenant key, customer, activation and log rows were in clear; in distributed mode the
    // node's first sealed snapshot already rewrote the key's activations, sealed.
    let distributed = std::fs::read_to_string(d.join("keygate.toml"))
        .unwrap_or_default()
        .contains("[redis]");
    let in_clear = if distributed { 3 } else { 4 };
    assert!(n >= in_clear, "rows in clear: {n}");
    assert_eq!(cli(d, &["privacy", "rotate-key"])["rows_reencrypted"], 0);

    let secrets = [
        "mc-plain-4e1d",
        "mc-sealed-7f3a",
        "trial-mc-5d1c",
        "198.51.100.41",
        "198.51.100.77",
        "grace.hopper@example.com",
        "Grace Hopper",
        "Navy Labs",
        "mc-sealed-7f3a-laptop",
        &seed.token,
    ];
    let check_dump = |when: &str| {
        let bytes = dump(d);
        assert!(
            contains(&bytes, &key),
            "{when}: the dump is not of this store"
        );
        assert!(
            contains(&bytes, "enc1:"),
            "{when}: no sealed values in the dump"
        );
        for s in secrets {
            assert!(!contains(&bytes, s), "{when}: the dump reveals {s:?}");
        }
    };
    check_dump("after rotate-key");

    // Every CLI answer still shows them, and equality lookups find them.
    let shown = cli(
        d,
        &[
            "key",
            "show",
            "--product",
            &seed.product.to_string(),
            "--key",
            &key,
        ],
    );
    let shown = shown.to_string();
    for v in [
        "mc-plain-4e1d",
        "mc-sealed-7f3a",
        "198.51.100.77",
        "grace.hopper@example.com",
    ] {
        assert!(shown.contains(v), "key show lacks {v}: {shown}");
    }
    let export = cli(
        d,
        &["privacy", "export", "--machine-code", "mc-sealed-7f3a"],
    );
    assert_eq!(
        export["activations"].as_array().unwrap().len(),
        1,
        "{export}"
    );
    assert!(
        !export["request_log"].as_array().unwrap().is_empty(),
        "{export}"
    );
    let trial_export = cli(d, &["privacy", "export", "--machine-code", "trial-mc-5d1c"]);
    assert_eq!(
        trial_export["trial_keys"].as_array().unwrap().len(),
        1,
        "{trial_export}"
    );
    let by_ip = cli(d, &["privacy", "export", "--ip", "198.51.100.41"]);
    assert_eq!(by_ip["activations"].as_array().unwrap().len(), 1, "{by_ip}");

    // Rotation: a new key first, rotate, then the old key leaves the file.
    let line2 = cli(d, &["privacy", "new-key", "--id", "k2"])["key_line"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(&keys, format!("{line2}\n{line}\n")).unwrap();
    let n = cli(d, &["privacy", "rotate-key"])["rows_reencrypted"]
        .as_i64()
        .unwrap();
    assert!(n >= 6, "everything moves to k2: {n}");
    std::fs::write(&keys, format!("{line2}\n")).unwrap();
    check_dump("after rotating to k2");
    assert!(!contains(&dump(d), "enc1:k1:"), "k1 is no longer used");
    let export = cli(d, &["privacy", "export", "--machine-code", "mc-plain-4e1d"]);
    assert_eq!(
        export["activations"].as_array().unwrap().len(),
        1,
        "{export}"
    );
    // A node with only k2 loads everything, signs with the tenant key, and knows the machine.
    let server = Server::start(d, &[PROXIES, WHOLE_IPS]);
    let text = activate(&server, &seed, &key, "mc-sealed-7f3a", "198.51.100.77").await;
    assert!(
        text.contains("mc-plain-4e1d") && text.contains("Navy Labs"),
        "{text}"
    );

    // Without the key file the store cannot be read: a clear error, not garbage.
    let out = super::helpers::keygate(d)
        .args([
            "key",
            "show",
            "--product",
            &seed.product.to_string(),
            "--key",
            &key,
        ])
        .env(
            "KEYGATE_PRIVACY__ENCRYPTION_KEY_FILE",
            d.join("no-such-file"),
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-file"));
}
