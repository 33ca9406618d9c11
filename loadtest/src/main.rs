//! `keygate-loadtest`: drives a Keygate node (or a baseline) with a scenario from
//! `scenarios.toml` and reports throughput and latency percentiles; `compare` interleaves two
//! targets in one run and prints their ratios; `static-server` is the stack-ceiling baseline.

use clap::{Args, Parser, Subcommand, ValueEnum};
use keygate_loadtest::run::{self, Mode, Options, Outcome};
use keygate_loadtest::scenario::{self, Scenario, Vars};
use keygate_loadtest::{report, seed, static_server, tls_config, tls_config_versions, Protocol};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs one scenario against one target.
    Run {
        #[command(flatten)]
        load: Load,
        /// Target address, e.g. 127.0.0.1:8443.
        #[arg(long)]
        target: SocketAddr,
        /// Label in the report.
        #[arg(long, default_value = "keygate")]
        label: String,
        /// The target's process id, when it runs on this machine: its CPU per request is
        /// reported too.
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Runs the same load against two targets, alternating A B B A ... in short rounds, and
    /// prints B's throughput and latency as ratios of A's.
    Compare {
        #[command(flatten)]
        load: Load,
        #[arg(long)]
        a: SocketAddr,
        #[arg(long)]
        b: SocketAddr,
        #[arg(long, default_value = "a")]
        label_a: String,
        #[arg(long, default_value = "b")]
        label_b: String,
        /// Rounds per target.
        #[arg(long, default_value_t = 4)]
        rounds: u32,
        /// The targets' process ids, when they run on this machine: their CPU per request,
        /// and its ratio, are reported too (steadier than throughput when the generator is
        /// the limit).
        #[arg(long, requires = "pid_b")]
        pid_a: Option<u32>,
        #[arg(long, requires = "pid_a")]
        pid_b: Option<u32>,
    },
    /// Creates a tenant, product, token and key with the `keygate` CLI; prints them as JSON.
    Seed {
        #[command(flatten)]
        seed: SeedArgs,
    },
    /// The baseline server: fixed bytes for every request, on the same hyper + rustls stack.
    StaticServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// PEM certificate and key; without them, plain HTTP.
        #[arg(long)]
        cert: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
        /// The response body (e.g. a recorded Activate answer).
        #[arg(long)]
        body: PathBuf,
        /// Tokio worker threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    H1,
    H2,
}

#[derive(Args, Clone)]
struct SeedArgs {
    /// The `keygate` binary and the node's data directory (to seed through the CLI).
    #[arg(long)]
    keygate: PathBuf,
    #[arg(long)]
    data_dir: PathBuf,
    /// How many license keys to create (each with room for 100 million machines).
    #[arg(long, default_value_t = 200)]
    keys: usize,
}

fn seed(s: &SeedArgs) -> anyhow::Result<Vars> {
    seed::seed(&s.keygate, &s.data_dir, s.keys)
}

#[derive(Args, Clone)]
struct Load {
    /// Scenario name from the scenarios file.
    #[arg(long, default_value = "reactivate")]
    scenario: String,
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios.toml"))]
    scenarios: PathBuf,
    /// CA certificate (PEM) to trust; without it, plain HTTP.
    #[arg(long)]
    ca: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "h1")]
    protocol: Proto,
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Concurrent streams per HTTP/2 connection.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Open loop at this many requests per second in total; without it, closed loop (max).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value_t = 3.0)]
    warmup_secs: f64,
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// A new TLS connection per request.
    #[arg(long)]
    new_connection: bool,
    /// Offer only TLS 1.2 (default: TLS 1.3 and 1.2, and servers that speak 1.3 choose it).
    #[arg(long)]
    tls12: bool,
    /// Seed through the CLI (`--keygate`, `--data-dir`) ...
    #[arg(long, requires = "data_dir")]
    keygate: Option<PathBuf>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 200)]
    keys: usize,
    /// ... or use existing values (`--key` repeated for several keys).
    #[arg(long, conflicts_with = "keygate")]
    token: Option<String>,
    #[arg(long, default_value_t = 1)]
    product: i64,
    #[arg(long)]
    key: Vec<String>,
    /// Write the results as JSON / as an SVG chart.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    svg: Option<PathBuf>,
}

fn prepare(load: &Load) -> anyhow::Result<(Scenario, Vars)> {
    let file = scenario::load(&std::fs::read_to_string(&load.scenarios)?)?;
    let scenario = file
        .scenario
        .get(&load.scenario)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no scenario {:?} in {}",
                load.scenario,
                load.scenarios.display()
            )
        })?
        .clone();
    let vars = match (&load.keygate, &load.data_dir, &load.token) {
        (Some(kg), Some(dir), _) => {
            let v = seed(&SeedArgs {
                keygate: kg.clone(),
                data_dir: dir.clone(),
                keys: load.keys,
            })?;
            // Let the node's change-feed poll pick the new key up.
            std::thread::sleep(Duration::from_millis(1500));
            v
        }
        (None, _, Some(token)) => Vars {
            token: token.clone(),
            product: load.product,
            keys: load.key.clone(),
            run: seed::run_id(),
        },
        _ => anyhow::bail!("give --keygate and --data-dir to seed, or --token/--product/--key"),
    };
    Ok((scenario, vars))
}

fn options(load: &Load, addr: SocketAddr, server_pid: Option<u32>) -> anyhow::Result<Options> {
    let protocol = match load.protocol {
        Proto::H1 => Protocol::Http1,
        Proto::H2 => Protocol::Http2,
    };
    Ok(Options {
        addr,
        tls: load
            .ca
            .as_deref()
            .map(|ca| match load.tls12 {
                true => tls_config_versions(ca, protocol, &[&rustls::version::TLS12]),
                false => tls_config(ca, protocol),
            })
            .transpose()?,
        protocol,
        connections: load.connections,
        streams: load.streams,
        mode: load.rate.map_or(Mode::Max, Mode::Rate),
        warmup: Duration::from_secs_f64(load.warmup_secs),
        duration: Duration::from_secs_f64(load.duration_secs),
        new_connection: load.new_connection,
        server_pid,
    })
}

fn write_outputs(
    load: &Load,
    title: &str,
    rows: &[(String, &Outcome)],
    extra: serde_json::Value,
) -> anyhow::Result<()> {
    print!("{}", report::table(rows));
    if let Some(p) = &load.json {
        let runs: Vec<_> = rows.iter().map(|(l, o)| report::to_json(l, o)).collect();
        let doc = serde_json::json!({ "title": title, "runs": runs, "summary": extra });
        std::fs::write(p, serde_json::to_string_pretty(&doc)? + "\n")?;
    }
    if let Some(p) = &load.svg {
        std::fs::write(p, report::svg(title, rows))?;
    }
    Ok(())
}

fn describe(load: &Load, s: &Scenario) -> String {
    let mode = load.rate.map_or("closed loop".to_owned(), |r| {
        format!("open loop {r:.0} req/s")
    });
    let proto = match load.protocol {
        Proto::H1 => "HTTP/1.1".to_owned(),
        Proto::H2 => format!("HTTP/2 x{} streams", load.streams),
    };
    let conn = if load.new_connection {
        "new connection per request"
    } else {
        "keep-alive"
    };
    let conn = if load.tls12 {
        format!("TLS 1.2 only, {conn}")
    } else {
        conn.to_owned()
    };
    format!(
        "{} ({}): {proto}, {} connections, {conn}, {mode}, {}s",
        load.scenario, s.description, load.connections, load.duration_secs
    )
}

async fn main_async(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Seed { seed: s } => {
            let v = seed(&s)?;
            println!(
                "{}",
                serde_json::json!({"token": v.token, "product": v.product, "keys": v.keys})
            );
        }
        Cmd::StaticServer { .. } => unreachable!("handled before the runtime starts"),
        Cmd::Run {
            load,
            target,
            label,
            pid,
        } => {
            let (scenario, vars) = prepare(&load)?;
            let title = describe(&load, &scenario);
            println!("{title}");
            let o = run::run(&options(&load, target, pid)?, &scenario, &vars).await?;
            write_outputs(&load, &title, &[(label, &o)], serde_json::json!({}))?;
        }
        Cmd::Compare {
            load,
            a,
            b,
            label_a,
            label_b,
            rounds,
            pid_a,
            pid_b,
        } => {
            let (scenario, vars) = prepare(&load)?;
            let title = describe(&load, &scenario);
            println!("{title}; {rounds} rounds each, interleaved A B B A");
            let (oa, ob) = (options(&load, a, pid_a)?, options(&load, b, pid_b)?);
            let (mut ra, mut rb) = (Vec::new(), Vec::new());
            for r in 0..rounds {
                let order = if r % 2 == 0 {
                    [true, false]
                } else {
                    [false, true]
                };
                for is_a in order {
                    let o = if is_a { &oa } else { &ob };
                    let round = vars.for_round(r, if is_a { 'a' } else { 'b' });
                    let out = run::run(o, &scenario, &round).await?;
                    eprintln!(
                        "round {r} {}: {:.0} req/s",
                        if is_a { &label_a } else { &label_b },
                        out.throughput()
                    );
                    if is_a {
                        ra.push(out)
                    } else {
                        rb.push(out)
                    }
                }
            }
            let (ta, tb) = (Outcome::sum(&ra), Outcome::sum(&rb));
            let ratio = tb.throughput() / ta.throughput();
            let p99 = tb.percentile_ms(0.99) / ta.percentile_ms(0.99);
            println!(
                "{label_b}/{label_a}: throughput ratio {ratio:.3}, p99 latency ratio {p99:.3}"
            );
            // (An open-loop run's pacer spins between releases: its CPU says nothing there.)
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            let busiest = ta.generator_load().max(tb.generator_load());
            if load.rate.is_none() && busiest > 0.9 * cores {
                println!(
                    "note: the generator used {:.0} % of its {cores} core(s): it may be what limits these figures",
                    busiest / cores * 100.0
                );
            }
            // CPU per request, A's over B's: B's efficiency as a share of A's, comparable
            // with the throughput ratio but not capped by the generator.
            let cpu_ratio = ta
                .server_cpu_per_request_us()
                .zip(tb.server_cpu_per_request_us())
                .map(|(ca, cb)| ca / cb);
            if let Some(r) = cpu_ratio {
                println!("{label_b}/{label_a}: server CPU per request, A's over B's {r:.3}");
            }
            let summary = serde_json::json!({
                "a": label_a, "b": label_b, "throughput_ratio_b_over_a": ratio, "p99_ratio_b_over_a": p99,
                "generator_cpu_cores_a": ta.generator_load(), "generator_cpu_cores_b": tb.generator_load(),
                "server_cpu_per_request_ratio_a_over_b": cpu_ratio,
            });
            write_outputs(
                &load,
                &title,
                &[(label_a.clone(), &ta), (label_b.clone(), &tb)],
                summary,
            )?;
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::StaticServer {
        listen,
        cert,
        key,
        body,
        threads,
    } = &cli.cmd
    {
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        rt.enable_all();
        if *threads > 0 {
            rt.worker_threads(*threads);
        }
        let tls = match (cert, key) {
            (Some(c), Some(k)) => Some(static_server::server_tls(c, k)?),
            (None, None) => None,
            _ => anyhow::bail!("give both --cert and --key, or neither"),
        };
        let body = bytes::Bytes::from(std::fs::read(body)?);
        return rt.build()?.block_on(async move {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            static_server::serve(listener, tls, body).await
        });
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(main_async(cli))
}
