//! The load generator against a real node: every shipped scenario runs, gets the answers it
//! should (no transport errors, only the statuses the scenario implies), and the reports are
//! well formed, and the node's CPU is read when its process id is given. A functional check
//! of the tool; the figures are for loadtest/README.md.

use super::helpers::{Server, TempDir, BIN};
use keygate_loadtest::run::{self, Mode, Options};
use keygate_loadtest::{report, scenario, seed, tls_config, Protocol};
use std::path::Path;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_against_a_real_node() {
    let dir = TempDir::new("loadgen");
    let mut server = Server::start(&dir.0, &[]);
    let vars = seed::seed(Path::new(BIN), &dir.0, 3).unwrap();
    assert_eq!(vars.keys.len(), 3);
    // The node takes the seeded keys from its change-feed poll: wait until it serves each.
    let mut conn = server.connect(Protocol::Http1).await;
    for key in &vars.keys {
        let form = format!(
            "token={}&ProductId={}&Key={key}&Sign=false",
            vars.token, vars.product
        );
        let mut served = false;
        for _ in 0..400 {
            served = conn.post("/api/key/GetKey", &form).await.unwrap().status == 200;
            if served {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(served, "seeded key {key} not served within 10 s");
    }
    let file = scenario::load(include_str!("../../loadtest/scenarios.toml")).unwrap();
    let mut rows = Vec::new();
    for (name, s) in &file.scenario {
        for (protocol, mode) in [
            (Protocol::Http1, Mode::Max),
            (Protocol::Http2, Mode::Rate(200.0)),
        ] {
            // The node's CPU per request, in one closed-loop run.
            let watch_cpu = name == "reactivate" && mode == Mode::Max;
            let o = Options {
                addr: server.addr,
                tls: Some(tls_config(&server.cert, protocol).unwrap()),
                protocol,
                connections: 2,
                streams: 4,
                mode,
                warmup: Duration::from_millis(100),
                duration: Duration::from_millis(400),
                new_connection: name == "unknown-key" && protocol == Protocol::Http1,
                server_pid: watch_cpu.then(|| server.pid()),
            };
            let out = run::run(&o, s, &vars).await.unwrap();
            let label = format!("{name} {protocol:?} {mode:?}");
            match out.server_cpu_per_request_us() {
                // (/proc counts in 10 ms ticks: a short run on a busy machine may show none.)
                Some(us) => assert!(watch_cpu && (0.0..1e6).contains(&us), "{label}: {us} µs"),
                None => assert!(!watch_cpu && out.server_cpu.is_none(), "{label}"),
            }
            assert!(out.requests > 10, "{label}: only {} requests", out.requests);
            assert_eq!(out.transport_errors, 0, "{label}");
            let ok = out.by_status.get(&200).copied().unwrap_or(0);
            let bad = out.by_status.get(&400).copied().unwrap_or(0);
            assert_eq!(ok + bad, out.requests, "{label}: {:?}", out.by_status);
            match name.as_str() {
                "unknown-key" => assert_eq!(bad, out.requests, "{label}"),
                // A fixed-rate run always sends the same iterations, some of them unknown
                // keys (3 % of the mix); a closed-loop one as many as the machine manages,
                // which on a slow one may hold none.
                "mix" => assert!(
                    ok > 0 && (bad > 0 || matches!(mode, Mode::Max)),
                    "{label}: {:?}",
                    out.by_status
                ),
                _ => assert_eq!(ok, out.requests, "{label}: {:?}", out.by_status),
            }
            if let Mode::Rate(r) = mode {
                let achieved = out.throughput();
                assert!(
                    achieved > r * 0.5 && achieved < r * 1.5,
                    "{label}: {achieved} req/s"
                );
            }
            rows.push((label, out));
        }
    }
    let refs: Vec<(String, &run::Outcome)> = rows.iter().map(|(l, o)| (l.clone(), o)).collect();
    let table = report::table(&refs);
    // A header, a line per run, and two for the run that measured the node's CPU (in all,
    // and by thread).
    assert_eq!(table.lines().count(), refs.len() + 3, "{table}");
    assert_eq!(table.matches("server CPU").count(), 1, "{table}");
    assert_eq!(table.matches("by thread").count(), 1, "{table}");
    let (label, watched) = refs
        .iter()
        .find(|(_, o)| o.server_cpu.is_some())
        .expect("the run that measured the node's CPU");
    let threads = &report::to_json(label, watched)["server_threads_cpu_us_per_request"];
    assert!(threads["tokio-rt-worker"].is_number(), "{threads}");
    let json = report::to_json(&refs[0].0, refs[0].1);
    assert!(json["throughput_rps"].as_f64().unwrap() > 0.0);
    assert!(
        json["latency"]["p99_ms"].as_f64().unwrap() >= json["latency"]["p50_ms"].as_f64().unwrap()
    );
    let svg = report::svg("smoke", &refs);
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(
        svg.matches("<rect x=").count(),
        refs.len() * 5 + 5,
        "a bar per percentile per run, plus the legend"
    );
    server.stop();
}
