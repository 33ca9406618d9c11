//! The load engine: workers over keep-alive (or per-request) TLS connections, closed loop
//! (as fast as answers come) or open loop (a fixed schedule; latency is measured from when a
//! request was due, so a stalled server cannot hide its queue: no coordinated omission).

use crate::scenario::{render, Scenario, Vars};
use crate::{Connection, Protocol};
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Closed loop: each worker sends its next request when the last is answered.
    Max,
    /// Open loop: this many requests per second in total, on a fixed schedule.
    Rate(f64),
}

#[derive(Clone, Debug)]
pub struct Options {
    pub addr: SocketAddr,
    /// Client TLS settings (built once, so new connections can resume sessions); `None` for
    /// plain HTTP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub protocol: Protocol,
    pub connections: usize,
    /// Concurrent streams per HTTP/2 connection (1 for HTTP/1.1).
    pub streams: usize,
    pub mode: Mode,
    pub warmup: Duration,
    pub duration: Duration,
    /// A new connection (TLS handshake, with session resumption) for every request.
    pub new_connection: bool,
    /// The target's process on this machine, if known: its CPU over the measured window is
    /// reported as CPU per request, a steadier measure than throughput when the generator
    /// is what limits a run.
    pub server_pid: Option<u32>,
}

/// What one run measured (after warm-up).
#[derive(Clone, Debug)]
pub struct Outcome {
    pub requests: u64,
    pub by_status: BTreeMap<u16, u64>,
    pub transport_errors: u64,
    pub elapsed: Duration,
    /// Latency in microseconds.
    pub latency: Histogram<u64>,
    /// CPU seconds this process (the generator) used during the measured time. Near
    /// `elapsed` on one core in a closed-loop run, the generator, not the target, set the
    /// pace. (Open loop: the pacer spins between releases, so it is always near.)
    pub generator_cpu: Duration,
    /// CPU time the target's process (`Options::server_pid`) used during the measured time.
    pub server_cpu: Option<Duration>,
    /// The same by thread name (threads of one name added up; one that ended during the
    /// window is left out): where the target's CPU went.
    pub server_threads_cpu: Option<BTreeMap<String, Duration>>,
}

impl Outcome {
    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// The generator's CPU use as a share of one core (1.0: a core fully busy).
    pub fn generator_load(&self) -> f64 {
        self.generator_cpu.as_secs_f64() / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// The target's CPU time per answered request, in microseconds.
    pub fn server_cpu_per_request_us(&self) -> Option<f64> {
        let cpu = self.server_cpu?;
        (self.requests > 0).then(|| cpu.as_secs_f64() * 1e6 / self.requests as f64)
    }

    /// Each named thread's CPU time per answered request, in microseconds.
    pub fn server_threads_cpu_per_request_us(&self) -> Option<BTreeMap<String, f64>> {
        let threads = self.server_threads_cpu.as_ref()?;
        (self.requests > 0).then(|| {
            threads
                .iter()
                .map(|(name, cpu)| (name.clone(), cpu.as_secs_f64() * 1e6 / self.requests as f64))
                .collect()
        })
    }

    /// The target's CPU use as a share of one core.
    pub fn server_load(&self) -> Option<f64> {
        let cpu = self.server_cpu?;
        Some(cpu.as_secs_f64() / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE))
    }

    pub fn percentile_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    fn merge(&mut self, o: &Outcome) {
        self.requests += o.requests;
        self.transport_errors += o.transport_errors;
        for (s, n) in &o.by_status {
            *self.by_status.entry(*s).or_default() += n;
        }
        self.latency.add(&o.latency).expect("same histogram bounds");
    }

    fn empty() -> Outcome {
        Outcome {
            requests: 0,
            by_status: BTreeMap::new(),
            transport_errors: 0,
            elapsed: Duration::ZERO,
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            generator_cpu: Duration::ZERO,
            server_cpu: None,
            server_threads_cpu: None,
        }
    }

    /// Adds up several runs of the same kind (compare mode's rounds).
    pub fn sum(runs: &[Outcome]) -> Outcome {
        let mut total = Outcome::empty();
        // The target's CPU only if every run measured it.
        total.server_cpu = runs.iter().map(|r| r.server_cpu).sum();
        total.server_threads_cpu = runs.iter().try_fold(BTreeMap::new(), |mut all, r| {
            for (name, cpu) in r.server_threads_cpu.as_ref()? {
                *all.entry(name.clone()).or_default() += *cpu;
            }
            Some(all)
        });
        for r in runs {
            total.merge(r);
            total.elapsed += r.elapsed;
            total.generator_cpu += r.generator_cpu;
        }
        total
    }
}

async fn connect(o: &Options) -> anyhow::Result<Connection> {
    match &o.tls {
        Some(tls) => Connection::connect(o.addr, tls.clone(), o.protocol).await,
        None => Connection::connect_plain(o.addr, o.protocol).await,
    }
}

struct Worker {
    id: u64,
    workers: u64,
    conn: Option<Connection>,
    /// Open loop: when each of this worker's requests is due, from the pacer thread.
    schedule: Option<tokio::sync::mpsc::UnboundedReceiver<Instant>>,
}

/// The open-loop clock: a task that releases request `k` to worker `k % workers` at
/// `start + k / rate`. Latency counts from that due time, so the clock's own lateness would
/// count as server latency: it sleeps on tokio's (millisecond) timer only until a millisecond
/// before the next release and yields in a loop for the rest, so releases are late by about
/// one pass over the ready connections. It runs beside the connections on the generator's
/// runtime (an OS thread sleeping per request cost two context switches per request, and
/// made the generator, not the server, the limit of open-loop runs on one core).
async fn pacer(
    start: Instant,
    end: Instant,
    rate: f64,
    workers: Vec<tokio::sync::mpsc::UnboundedSender<Instant>>,
) {
    let step = Duration::from_secs_f64(1.0 / rate);
    let coarse = Duration::from_millis(1);
    let mut k = 0u64;
    loop {
        let now = Instant::now();
        let mut due = start + step.mul_f64(k as f64);
        while due <= now {
            if due >= end {
                return;
            }
            let w = &workers[(k % workers.len() as u64) as usize];
            if w.send(due).is_err() {
                return;
            }
            k += 1;
            due = start + step.mul_f64(k as f64);
        }
        if due >= end {
            return;
        }
        if due - now > coarse + coarse / 2 {
            tokio::time::sleep_until(due - coarse).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
}

/// Runs `scenario` against `o.addr` and returns what was measured after the warm-up.
pub async fn run(o: &Options, scenario: &Scenario, vars: &Vars) -> anyhow::Result<Outcome> {
    let streams = if o.protocol == Protocol::Http2 {
        o.streams.max(1)
    } else {
        1
    };
    let mut workers = Vec::new();
    let total = (o.connections * streams) as u64;
    for c in 0..o.connections {
        let conn = if o.new_connection {
            None
        } else {
            Some(connect(o).await?)
        };
        for s in 0..streams {
            let conn = match (&conn, s) {
                (None, _) => None,
                (Some(_), 0) => None, // filled below so the first stream owns the original
                (Some(c), _) => c.clone_h2(),
            };
            workers.push(Worker {
                id: (c * streams + s) as u64,
                workers: total,
                conn,
                schedule: None,
            });
        }
        if let (Some(c), Some(w)) = (conn, workers.get_mut(c * streams)) {
            w.conn = Some(c);
        }
    }
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + o.warmup;
    let end = measure_from + o.duration;
    if let Mode::Rate(rate) = o.mode {
        let senders = workers
            .iter_mut()
            .map(|w| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                w.schedule = Some(rx);
                tx
            })
            .collect();
        tokio::spawn(pacer(start, end, rate, senders));
    }
    // The generator's own CPU over the measured window, to tell its limit from the target's,
    // and the target's when it runs here.
    let pid = o.server_pid;
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from).await;
        let (before, server_before) = (process_cpu(), pid.and_then(pid_cpu));
        let threads_before = pid.and_then(threads_cpu);
        tokio::time::sleep_until(end).await;
        let server = server_before
            .zip(pid.and_then(pid_cpu))
            .map(|(b, a)| a.saturating_sub(b));
        let threads = threads_before
            .zip(pid.and_then(threads_cpu))
            .map(|(b, a)| threads_delta(&b, &a));
        (process_cpu().saturating_sub(before), server, threads)
    });
    let scenario = Arc::new(scenario.clone());
    let vars = Arc::new(vars.clone());
    let opts = Arc::new(o.clone());
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|w| {
            let (scenario, vars, opts) = (scenario.clone(), vars.clone(), opts.clone());
            tokio::spawn(
                async move { work(w, &opts, &scenario, &vars, start, measure_from, end).await },
            )
        })
        .collect();
    let mut total_outcome = Outcome::empty();
    for t in tasks {
        total_outcome.merge(&t.await??);
    }
    total_outcome.elapsed = o.duration;
    (
        total_outcome.generator_cpu,
        total_outcome.server_cpu,
        total_outcome.server_threads_cpu,
    ) = cpu.await?;
    if pid.is_some() && total_outcome.server_cpu.is_none() {
        anyhow::bail!("cannot read the CPU time of process {pid:?} from /proc");
    }
    Ok(total_outcome)
}

/// User plus system CPU time of process `pid` so far (all its threads, from /proc).
fn pid_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_cpu(&stat)
}

/// utime + stime from a /proc `stat` line, as a duration.
fn stat_cpu(stat: &str) -> Option<Duration> {
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = stat_cpu_ticks(stat)?;
    (hz > 0).then(|| Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// Each thread of process `pid`: its id, name and CPU time so far (from /proc).
fn threads_cpu(pid: u32) -> Option<BTreeMap<u64, (String, Duration)>> {
    let mut all = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = entry.ok()?.path();
        let Some(tid) = path.file_name().and_then(|t| t.to_str()?.parse().ok()) else {
            continue;
        };
        // A thread may end between listing and reading.
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let Some(cpu) = stat_cpu(&stat) else {
            continue;
        };
        all.insert(tid, (stat[open + 1..close].to_owned(), cpu));
    }
    Some(all)
}

/// CPU time used between two `threads_cpu` readings, added up by thread name. A thread that
/// started in between counts from zero; one that ended is left out.
fn threads_delta(
    before: &BTreeMap<u64, (String, Duration)>,
    after: &BTreeMap<u64, (String, Duration)>,
) -> BTreeMap<String, Duration> {
    let mut by_name = BTreeMap::<String, Duration>::new();
    for (tid, (name, cpu)) in after {
        let earlier = before.get(tid).map_or(Duration::ZERO, |(_, c)| *c);
        *by_name.entry(name.clone()).or_default() += cpu.saturating_sub(earlier);
    }
    by_name
}

/// utime + stime (clock ticks) from a /proc/<pid>/stat line. The command name, in
/// parentheses, may itself hold spaces and parentheses, so fields count from the last `)`.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11); // state is field 3; utime is field 14
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// User plus system CPU time of this process so far.
fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

async fn work(
    mut w: Worker,
    o: &Options,
    scenario: &Scenario,
    vars: &Vars,
    start: Instant,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<Outcome> {
    let mut out = Outcome::empty();
    let mut schedule = w.schedule.take();
    let mut iteration = 0u64;
    tokio::time::sleep_until(start).await;
    loop {
        let seq = iteration * w.workers + w.id;
        iteration += 1;
        let flow = scenario.flow(seq);
        for step in &flow.steps {
            // Open loop: latency counts from when the request was due, not when it went out.
            let sent = match &mut schedule {
                Some(rx) => match rx.recv().await {
                    Some(due) => due,
                    None => return Ok(out),
                },
                None => Instant::now(),
            };
            if sent >= end {
                return Ok(out);
            }
            let body = render(&step.form, vars, seq, scenario.known_machines);
            let reply = send(&mut w, o, &step.path, body).await;
            let done = Instant::now();
            if sent < measure_from {
                continue;
            }
            out.requests += 1;
            match reply {
                Ok(status) => *out.by_status.entry(status).or_default() += 1,
                Err(_) => out.transport_errors += 1,
            }
            let us = (done - sent).as_micros().max(1) as u64;
            out.latency.saturating_record(us);
        }
    }
}

async fn send(w: &mut Worker, o: &Options, path: &str, body: String) -> anyhow::Result<u16> {
    if o.new_connection || w.conn.is_none() {
        w.conn = Some(connect(o).await?);
    }
    let conn = w.conn.as_mut().expect("connected above");
    match conn.post(path, &body).await {
        Ok(r) => {
            if o.new_connection {
                w.conn = None;
            }
            Ok(r.status)
        }
        Err(e) => {
            w.conn = None; // reconnect next time
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_come_from_the_fields_after_the_command_name() {
        // A real line's shape: pid (comm) state ppid ... utime (14) stime (15) ...
        let line = "4242 (tokio (rt) 2) S 1 4242 4242 0 -1 4194560 1225 0 0 0 731 94 0 0 20 0 8 0";
        assert_eq!(stat_cpu_ticks(line), Some(731 + 94));
        assert_eq!(stat_cpu_ticks("4242 (x) S 1 2"), None);
        assert_eq!(stat_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn this_process_cpu_is_readable_and_grows() {
        let pid = std::process::id();
        let before = pid_cpu(pid).expect("own /proc/<pid>/stat");
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(
            pid_cpu(pid).unwrap() > before,
            "60 ms of spinning did not show"
        );
    }

    #[test]
    fn a_sum_has_the_targets_cpu_only_when_every_run_had_it() {
        let run = |cpu: Option<u64>| Outcome {
            requests: 100,
            elapsed: Duration::from_secs(1),
            server_cpu: cpu.map(Duration::from_millis),
            ..Outcome::empty()
        };
        let both = Outcome::sum(&[run(Some(500)), run(Some(300))]);
        assert_eq!(both.server_cpu, Some(Duration::from_millis(800)));
        assert_eq!(both.server_cpu_per_request_us(), Some(4000.0));
        assert_eq!(both.server_load(), Some(0.4));
        assert_eq!(Outcome::sum(&[run(Some(500)), run(None)]).server_cpu, None);
    }

    /// Per-thread CPU: a named thread that spins shows under its name, threads of one name
    /// add up, one started in between counts from zero and one that ended is left out.
    #[test]
    fn thread_cpu_is_read_by_name_and_differenced() {
        let pid = std::process::id();
        let before = threads_cpu(pid).expect("own /proc/<pid>/task");
        let (spun_tx, spun) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let spinner = std::thread::Builder::new()
            .name("lt-spinner".into())
            .spawn(move || {
                // Until /proc shows CPU time for this thread (10 ms ticks, and a loaded machine
                // may give it little), then alive until it has been read.
                let own = || {
                    std::fs::read_to_string("/proc/thread-self/stat")
                        .ok()
                        .and_then(|s| stat_cpu_ticks(&s))
                };
                let (mut x, started) = (0u64, std::time::Instant::now());
                while own().is_none_or(|t| t < 2) && started.elapsed() < Duration::from_secs(10) {
                    for _ in 0..100_000 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    }
                }
                std::hint::black_box(x);
                spun_tx.send(()).unwrap();
                let _ = released.recv();
            })
            .unwrap();
        spun.recv().unwrap();
        let after = threads_cpu(pid).unwrap();
        drop(release);
        spinner.join().unwrap();
        let delta = threads_delta(&before, &after);
        assert!(
            delta.get("lt-spinner").is_some_and(|c| !c.is_zero()),
            "{delta:?}"
        );

        let ms = Duration::from_millis;
        let b = BTreeMap::from([(1, ("w".to_owned(), ms(10))), (2, ("gone".into(), ms(5)))]);
        let a = BTreeMap::from([
            (1, ("w".to_owned(), ms(30))),
            (3, ("w".into(), ms(7))),
            (4, ("new".into(), ms(2))),
        ]);
        let d = threads_delta(&b, &a);
        assert_eq!(
            d,
            BTreeMap::from([("w".into(), ms(27)), ("new".into(), ms(2))])
        );
        let run = |t: Option<BTreeMap<String, Duration>>| Outcome {
            requests: 1000,
            server_threads_cpu: t,
            ..Outcome::empty()
        };
        let sum = Outcome::sum(&[run(Some(d.clone())), run(Some(d.clone()))]);
        assert_eq!(
            sum.server_threads_cpu_per_request_us().unwrap()["w"],
            27.0,
            "54 ms over 2,000 requests"
        );
        assert_eq!(
            Outcome::sum(&[run(Some(d)), run(None)]).server_threads_cpu,
            None
        );
    }
}
