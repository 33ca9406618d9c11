#!/usr/bin/env bash
# One scenario against one freshly seeded node: the node on core 0 (one worker and one signing
# thread), the generator on core 1, and the node's CPU per request by thread. For comparing
# builds where `ab.sh` cannot: in distributed mode (REDIS=1: a throw-away redis-server on core
# 1 for each run), or for scenarios whose cost is in the node's own threads. Run the builds in
# turn, several times each, with `openssl speed rsa2048` around them for new machines.
#   loadtest/one.sh BIN [keys, default 10000] [seconds, default 8]
# Environment: SCENARIO (default new-machines), CONNECTIONS (default 64), REDIS=1, PG=1 (the main
# store in a throw-away PostgreSQL on core 1 instead of SQLite), RATE (requests per second: open
# loop at that rate instead of closed loop), KEEP_WORK=DIR (keep the node's directory and logs).
# Prints one line: throughput, CPU per request (in all and by thread), and the node's counters
# of activation-log syncs, store-writer raises and stream entries stored; with REDIS=1 also the
# Redis commands sent over the whole run, by command. `keygate_redis_stream_entries_stored_total`
# against the `xadd` calls tells whether the main store kept up.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "$1")
keys=${2:-10000}
secs=${3:-8}
cargo build --release --locked -p keygate-loadtest >/dev/null 2>&1
lt=$PWD/target/release/keygate-loadtest
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh
work=$(mktemp -d)
pids=()
redis_pid=""
cleanup() {
    for p in "${pids[@]}" $redis_pid; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    stop_postgres
    [ -n "${KEEP_WORK:-}" ] && cp -r "$work" "$KEEP_WORK"; rm -rf "$work"
}
trap cleanup EXIT
if [ "${REDIS:-}" = 1 ]; then start_redis "$work/redis" 1; fi
if [ "${PG:-}" = 1 ]; then start_postgres "$work/pg" 1; fi
taskset -c 0 env KEYGATE_LOG=warn KEYGATE_SERVER__LISTEN=127.0.0.1:0 KEYGATE_ADMIN__LISTEN=127.0.0.1:0 \
    KEYGATE_RATE_LIMITS__PER_CLIENT_IP_PER_SECOND=0 KEYGATE_SERVER__WORKER_THREADS=1 \
    KEYGATE_SERVER__SIGNING_THREADS=1 "$bin" --data-dir "$work/data" serve >"$work/node.log" 2>&1 &
pid=$!
pids+=("$pid")
addr=$(address "$work/node.log")
admin=$(address "$work/node.log" "keygate admin on http://")
"$lt" seed --keygate "$bin" --data-dir "$work/data" --keys "$keys" >"$work/seed.json"
sleep 1
seed_args=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("--token", d["token"], "--product", d["product"], " ".join("--key " + k for k in d["keys"]))' "$work/seed.json")
# shellcheck disable=SC2086 # seed_args is a list of arguments
taskset -c 1 "$lt" run --target "$addr" --pid "$pid" --scenario "${SCENARIO:-new-machines}" \
    --ca "$work/data/tls/cert.pem" --duration-secs "$secs" --warmup-secs 3 \
    --connections "${CONNECTIONS:-64}" ${RATE:+--rate "$RATE"} $seed_args --json "$work/run.json" >/dev/null
curl -s "http://$admin/metrics" >"$work/metrics.txt"
if [ "${REDIS:-}" = 1 ]; then
    redis-cli -u "$KEYGATE_REDIS__URL" info commandstats >"$work/redis.txt"
else
    : >"$work/redis.txt"
fi
python3 - "$work/run.json" "$work/metrics.txt" "$work/redis.txt" <<'PY'
import json, re, sys
r = json.load(open(sys.argv[1]))["runs"][0]
threads = r.get("server_threads_cpu_us_per_request") or {}
counters = [l for l in open(sys.argv[2]) if l.startswith((
    "keygate_activation_log_syncs_total", "keygate_store_writer_raised_total",
    "keygate_redis_stream_entries_stored_total"))]
lat = r["latency"]
print(f'{r["throughput_rps"]:.0f} req/s (p50 {lat["p50_ms"]} ms, p99 {lat["p99_ms"]} ms, max {lat["max_ms"]} ms), '
      + f'{r["server_cpu_us_per_request"]:.1f} us CPU per request ('
      + ", ".join(f"{k} {v:.1f}" for k, v in sorted(threads.items()) if v >= 0.5) + "); "
      + "; ".join(l.strip() for l in counters))
# Redis commands the node sent over the whole run (seeding and warm-up included).
calls = {m[1]: int(m[2]) for m in re.finditer(r"cmdstat_(\S+?):calls=(\d+)", open(sys.argv[3]).read())}
if calls:
    print("redis calls: " + ", ".join(f"{k} {v}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1])))
PY
