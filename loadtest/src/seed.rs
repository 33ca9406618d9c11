//! Seeding through the `keygate` CLI, so a run brings its own licenses.

use crate::scenario::Vars;
use std::path::Path;
use std::process::Command;

fn cli_json(keygate: &Path, data_dir: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut cmd = Command::new(keygate);
    cmd.arg("--json").arg("--data-dir").arg(data_dir);
    // A data directory may carry its configuration (the system tests' PostgreSQL runs).
    let config = data_dir.join("keygate.toml");
    if config.exists() {
        cmd.arg("--config").arg(config);
    }
    let out = cmd.args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "keygate {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Creates a tenant, product, token and `keys` keys (room for 100 million machines each)
/// through the `keygate` CLI on `data_dir`.
pub fn seed(kg: &Path, dir: &Path, keys: usize) -> anyhow::Result<Vars> {
    let t = cli_json(kg, dir, &["tenant", "create", "--name", "loadtest"])?;
    let tenant = t["tenant_id"].as_i64().unwrap_or_default().to_string();
    let p = cli_json(
        kg,
        dir,
        &[
            "product", "create", "--tenant", &tenant, "--name", "loadtest",
        ],
    )?;
    let product = p["product_id"].as_i64().unwrap_or_default();
    let tok = cli_json(kg, dir, &["token", "create", "--tenant", &tenant])?;
    let pid = product.to_string();
    let count = keys.max(1).to_string();
    let created = cli_json(
        kg,
        dir,
        &[
            "key",
            "create",
            "--product",
            &pid,
            "--max-machines",
            "100000000",
            "--period",
            "365",
            "--count",
            &count,
        ],
    )?;
    // One key prints the key itself; several print {"count", "keys": [...]}.
    let keys = match created["keys"].as_array() {
        Some(list) => list
            .iter()
            .map(|k| k["key"].as_str().unwrap_or_default().to_owned())
            .collect(),
        None => vec![created["key"].as_str().unwrap_or_default().to_owned()],
    };
    Ok(Vars {
        token: tok["token"].as_str().unwrap_or_default().to_owned(),
        product,
        keys,
        run: run_id(),
    })
}

/// A tag that makes `{run}` templates unique per run.
pub fn run_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{:x}", t.as_millis())
}
