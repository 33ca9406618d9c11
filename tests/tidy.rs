//! Architecture invariants from ARCHITECTURE.md, checked mechanically over `src/`.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Source text without comment lines, so docs may name what the code must not use.
fn code(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn sources() -> Vec<(String, String)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            (rel, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

#[test]
fn every_source_file_starts_with_a_module_doc() {
    for (path, text) in sources() {
        assert!(
            text.starts_with("//!"),
            "src/{path} has no leading //! module doc"
        );
    }
}

#[test]
fn the_domain_is_pure() {
    let banned = [
        "tokio",
        "hyper",
        "rusqlite",
        "serde_json",
        "SystemTime",
        "Instant::now",
        "std::fs",
        "std::net",
        "metrics::",
    ];
    for (path, text) in sources() {
        if !path.starts_with("domain") {
            continue;
        }
        let text = code(&text);
        for b in banned {
            assert!(
                !text.contains(b),
                "src/{path} mentions {b}: the domain does no I/O and reads no clock"
            );
        }
    }
}

#[test]
fn metric_names_live_in_metrics_rs() {
    for (path, text) in sources() {
        if path == "metrics.rs" {
            continue;
        }
        assert!(
            !text.contains("\"keygate_"),
            "src/{path} spells a metric name; use src/metrics.rs"
        );
        assert!(
            !text.contains("metrics::counter!")
                && !text.contains("metrics::histogram!")
                && !text.contains("metrics::gauge!"),
            "src/{path} emits a metric directly; add a function to src/metrics.rs"
        );
    }
}

#[test]
fn serde_derives_only_in_config() {
    for (path, text) in sources() {
        // The configuration, and the local file formats of the spool and the activation log
        // (never sent to a client).
        if matches!(
            path.as_str(),
            "config.rs" | "store/journal.rs" | "store/wal.rs"
        ) {
            continue;
        }
        assert!(
            !text.contains("derive(Serialize") && !text.contains("Serialize, Deserialize"),
            "src/{path} derives Serialize: response bytes are written by src/wire.rs only"
        );
    }
}

#[test]
fn error_messages_are_mapped_in_one_place() {
    for (path, text) in sources() {
        if path == "http/error.rs" || path.ends_with("tests.rs") {
            continue;
        }
        for msg in [
            "Unable to authenticate.",
            "Access denied.",
            "Could not find the key.",
            "The key is blocked",
        ] {
            assert!(
                !text.contains(msg),
                "src/{path} spells the client message {msg:?}; map it in src/http/error.rs"
            );
        }
    }
}

#[test]
fn no_should_panic_or_ignored_tests() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("tests"), &mut files);
    for p in files {
        if p.ends_with("tidy.rs") {
            continue;
        }
        let t = std::fs::read_to_string(&p).unwrap();
        assert!(
            !t.contains("#[should_panic]") && !t.contains("#[ignore]"),
            "{}: tests must assert, not be skipped",
            p.display()
        );
    }
}

/// The dashboard and the alert rules may only use metrics Keygate emits: every `keygate_*`
/// name in them (histogram suffixes stripped) is a constant in `src/metrics.rs`.
#[test]
fn deploy_files_use_only_metrics_that_exist() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let metrics = std::fs::read_to_string(root.join("src/metrics.rs")).unwrap();
    let known: Vec<&str> = metrics
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const ")?.split('"').nth(1))
        .collect();
    assert!(known.len() > 10, "{known:?}");
    let mut used = 0;
    for file in [
        "deploy/grafana/dashboards/keygate.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for (i, _) in text.match_indices("keygate_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(known.contains(&base), "{file} uses unknown metric {name}");
            used += 1;
        }
    }
    assert!(used > 10, "only {used} metric references found");
}
