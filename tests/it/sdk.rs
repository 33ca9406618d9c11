//! The real Cryptolens SDKs (PyPI `licensing` 0.54, npm `cryptolens` 1.0.11) against a running
//! server: activation, limits, deactivation, GetKey, blocking, floating, metadata, trials,
//! errors and signature checks. `./scripts/test` installs both; a missing one fails the test.

use super::helpers::{Server, TempDir, BIN};
use std::path::PathBuf;
use std::process::Command;

fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk")
}

/// The Python with `licensing` 0.54: `KEYGATE_PYTHON` (set by `./scripts/test` to its venv), else
/// `python3` from `PATH`.
fn python() -> String {
    std::env::var("KEYGATE_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn run_script(server: &Server, program: &str, script: &str, tag: &str) {
    let mut cmd = Command::new(program);
    // The scripts' own `keygate` calls use the same store as the server.
    let config = server.data_dir.join("keygate.toml");
    if config.exists() {
        cmd.env("KEYGATE_CONFIG", config);
    }
    let out = cmd
        .arg(sdk_dir().join(script))
        .current_dir(sdk_dir())
        .env("KEYGATE_BIN", BIN)
        .env("KEYGATE_DATA_DIR", &server.data_dir)
        .env("KEYGATE_URL", server.url())
        .env("SSL_CERT_FILE", &server.cert)
        .env("NODE_EXTRA_CA_CERTS", &server.cert)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with(tag))
        .unwrap_or_else(|| panic!("{script} printed no summary line"));
    assert!(out.status.success(), "{script} failed: {summary}");
    assert!(summary.ends_with(" 0 failed"), "{summary}");
    let passed: u32 = summary
        .trim_start_matches(tag)
        .trim_start_matches(':')
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(passed >= 40, "{script}: only {passed} checks ran");
}

#[test]
fn python_licensing_sdk_end_to_end() {
    let python = python();
    let probe = Command::new(&python)
        .args([
            "-c",
            "import licensing, importlib.metadata as m; assert m.version('licensing') == '0.54'",
        ])
        .status()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        probe.success(),
        "the Python SDK is missing from {python}: `./scripts/test` installs it (licensing==0.54 in target/sdk-venv)"
    );
    let dir = TempDir::new("py");
    let mut server = Server::start(&dir.0, &[]);
    run_script(&server, &python, "python_e2e.py", "sdk-python");
    server.stop();
}

#[test]
fn node_cryptolens_sdk_end_to_end() {
    assert!(
        sdk_dir()
            .join("node_modules/cryptolens/package.json")
            .exists(),
        "the npm SDK is missing: `./scripts/test` installs it (npm ci in tests/sdk)"
    );
    let dir = TempDir::new("node");
    let mut server = Server::start(&dir.0, &[]);
    run_script(&server, "node", "node_e2e.js", "sdk-node");
    server.stop();
}
