#!/usr/bin/env bash
# The headline figures of loadtest/README.md, as ratios from one run on this machine.
# The server under test (Keygate, or the static hyper+rustls baseline) runs pinned to one core
# with one worker thread (and one signing thread); the load generator runs on the other core.
# Then the re-activation comparison again on two unpinned cores.
#   loadtest/bench.sh [seconds per measurement, default 10]
# Needs: a Rust toolchain, taskset, curl, openssl, python3; nginx (optional: a second baseline,
# `apt-get install nginx-light`). Writes loadtest/results/<time>/.
# REDIS=1: the same figures in distributed mode: a throw-away redis-server (append-only, fsync
# always) on the generator's core, as a Redis of its own would be elsewhere, and every node and
# CLI call pointed at it (KEYGATE_REDIS__URL). Needs redis-server (`apt-get install
# redis-server`). Results go to loadtest/results/<time>-redis/.
# PG=1: the main store in a throw-away PostgreSQL (fsync on) on the generator's core instead of
# the node's SQLite; with REDIS=1, distributed mode as deployed (several nodes share one store).
# Needs PostgreSQL's server binaries (`apt-get install postgresql`). Adds -pg to the results.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
server_cpu=${SERVER_CPU:-0}
load_cpu=${LOAD_CPU:-1}
cargo build --release --locked --workspace --bins
kg=$PWD/target/release/keygate
lt=$PWD/target/release/keygate-loadtest
out=$PWD/loadtest/results/$(date -u +%Y%m%dT%H%M%SZ)${REDIS:+-redis}${PG:+-pg}
mkdir -p "$out"
work=$(mktemp -d)
pids=()
# Linux's DAMON, when a VM runs it for proactive reclaim (kdamond), takes the server's core
# for 2-4 ms at a time: in the p99 of every server alike. PAUSE_DAMON=1 turns the running
# kdamonds off for the run and back on at the end (root only; loadtest/README.md).
paused_damon=()
if [ "${PAUSE_DAMON:-}" = 1 ]; then
    for st in /sys/kernel/mm/damon/admin/kdamonds/*/state; do
        if [ -w "$st" ] && [ "$(cat "$st")" = on ]; then echo off >"$st" && paused_damon+=("$st"); fi
    done
    echo "DAMON: paused ${#paused_damon[@]} kdamond(s) for the run"
elif grep -qs '^on$' /sys/kernel/mm/damon/admin/kdamonds/*/state; then
    echo "DAMON: a kdamond is running (its bursts show in p99); PAUSE_DAMON=1 pauses it for the run"
fi
# `start` runs in a command substitution (a subshell), so `pids` may not hold the servers it
# started: every process still naming the work directory goes too.
cleanup() {
    for st in "${paused_damon[@]}"; do echo on >"$st" || true; done
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    pkill -f -- "$work" 2>/dev/null || true
    if [ -n "${redis_pid:-}" ]; then kill "$redis_pid" 2>/dev/null || true; fi
    stop_postgres
    rm -rf "$work" ${pg_work:+"$pg_work"}
}
trap cleanup EXIT

# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

# Distributed mode. The server's command line does not name the work directory, so section 6's
# sweep of the pinned servers leaves it running; it goes at exit.
redis_pid=""
if [ "${REDIS:-}" = 1 ]; then
    start_redis "$work/redis" "$load_cpu"
    echo "distributed mode: every node and CLI call on $KEYGATE_REDIS__URL"
fi
if [ "${PG:-}" = 1 ]; then
    # Outside the work directory, which section 6's sweep of the pinned servers names.
    pg_work=$(mktemp -d)
    start_postgres "$pg_work/pg" "$load_cpu"
    echo "main store: PostgreSQL at $KEYGATE_STORE__POSTGRES_URL"
fi

# Starts a process in the background and waits for the line with its address ($2 = pattern).
# Its process id goes to $1.pid (taskset and env exec the server, so it is the server's).
start() {
    local log=$1 pattern=$2; shift 2
    "$@" >"$log" 2>&1 &
    pids+=($!)
    echo $! >"$log.pid"
    for _ in $(seq 100); do
        if grep -q "$pattern" "$log"; then grep -o "$pattern[0-9.:]*" "$log" | head -1 | sed "s|$pattern||"; return; fi
        sleep 0.1
    done
    echo "no address from: $*" >&2; cat "$log" >&2; exit 1
}

# The load generator, on its own core.
LT() { taskset -c "$load_cpu" "$lt" "$@"; }

keygate_env=(env KEYGATE_LOG=warn KEYGATE_SERVER__LISTEN=127.0.0.1:0 KEYGATE_ADMIN__LISTEN=127.0.0.1:0
    KEYGATE_RATE_LIMITS__PER_CLIENT_IP_PER_SECOND=0)
pinned=$(start "$work/kg1.log" "https://" taskset -c "$server_cpu" "${keygate_env[@]}" \
    KEYGATE_SERVER__WORKER_THREADS=1 KEYGATE_SERVER__SIGNING_THREADS=1 "$kg" --data-dir "$work/data" serve)
cert=$work/data/tls/cert.pem
"$lt" seed --keygate "$kg" --data-dir "$work/data" --keys 100 >"$work/seed.json"
sleep 1
seed_args=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("--token", d["token"], "--product", d["product"], " ".join("--key " + k for k in d["keys"]))' "$work/seed.json")
first_key=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["keys"][0])' "$work/seed.json")
token=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["token"])' "$work/seed.json")
product=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["product"])' "$work/seed.json")
# The baselines answer with the bytes Keygate answers in the re-activation runs: its scenario's
# 1,000 known machines are activated first (10 on each key, and an answer lists its license's
# machines), then machine known-0 (first key) asks once more with the scenario's own form.
LT run --target "$pinned" --scenario reactivate --ca "$cert" $seed_args \
    --duration-secs 2 --warmup-secs 0 --connections 16 >/dev/null
curl -s --cacert "$cert" "https://$pinned/api/key/Activate" \
    -d "token=$token&ProductId=$product&key=$first_key&MachineCode=known-0&FieldsToReturn=0&metadata=False&FloatingTimeInterval=0&MaxOverdraft=0&FriendlyName=None&ModelVersion=3&Sign=True&SignMethod=1" >"$work/body.json"
python3 - "$work/body.json" <<'PY'
import base64, json, sys
machines = json.loads(base64.b64decode(json.load(open(sys.argv[1]))["licenseKey"]))["ActivatedMachines"]
assert len(machines) == 10, f"the baseline's answer lists {len(machines)} machines, not 10"
PY
static=$(start "$work/static.log" "static server on " taskset -c "$server_cpu" "$lt" static-server --threads 1 \
    --cert "$cert" --key "$work/data/tls/key.pem" --body "$work/body.json")
# Both servers' CPU per request is measured too: the steadier figure when the generator is
# what limits the baseline.
kg_pid=$(cat "$work/kg1.log.pid")
static_pid=$(cat "$work/static.log.pid")

# nginx, when installed: one worker on the server core, the same certificate and body,
# session cache and tickets on, TLS 1.2 and 1.3 (nginx 1.23.4's default; Debian's 1.22 stops at
# 1.2 unless told, and a resumed TLS 1.2 session does no key exchange at all, while Keygate's
# TLS 1.3 resumption does one: comparing the two would compare protocols, not servers).
nginx_addr=""
if command -v nginx >/dev/null; then
    mkdir -p "$work/nginx"
    port=$(free_port)
    body=$(python3 -c 'import sys; print(open(sys.argv[1]).read().replace("\\", "\\\\").replace("'"'"'", "\\'"'"'"))' "$work/body.json")
    cat >"$work/nginx/nginx.conf" <<NGINX
worker_processes 1;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/nginx;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$port ssl http2;
        ssl_certificate $cert;
        ssl_certificate_key $work/data/tls/key.pem;
        ssl_session_cache shared:SSL:10m;
        ssl_session_tickets on;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / { default_type "application/json; charset=utf-8"; return 200 '$body'; }
    }
}
NGINX
    taskset -c "$server_cpu" nginx -c "$work/nginx/nginx.conf" -g 'daemon off;' &
    pids+=($!)
    sleep 0.5
    nginx_addr=127.0.0.1:$port
    # The one worker process answers; its CPU per request is compared with Keygate's.
    nginx_pid=$(pgrep -P "$!" | head -1)
fi

common=(--ca "$cert" $seed_args --duration-secs "$secs" --warmup-secs 3 --connections 16)
json_of() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$@"; }

echo "== 1. re-activation, keep-alive HTTP/1.1, pinned: static baseline vs keygate"
LT compare --a "$static" --b "$pinned" --label-a static --label-b keygate --scenario reactivate "${common[@]}" \
    --pid-a "$static_pid" --pid-b "$kg_pid" --rounds 2 --json "$out/reactivate-vs-static.json" --svg "$out/reactivate-vs-static.svg"
react=$(json_of "$out/reactivate-vs-static.json" 'd["runs"][1]["throughput_rps"]')

echo "== 2. p99 at half the maximum re-activation rate (open loop), and the baseline at that rate"
half=$(python3 -c "print(round($react / 2))")
LT run --target "$pinned" --pid "$kg_pid" --scenario reactivate "${common[@]}" --rate "$half" --json "$out/reactivate-half-rate.json" --svg "$out/reactivate-half-rate.svg"
LT run --target "$static" --pid "$static_pid" --label static --scenario reactivate "${common[@]}" --rate "$half" --json "$out/static-half-rate.json"

echo "== 3. unknown-key flood vs re-activation"
LT run --target "$pinned" --pid "$kg_pid" --scenario unknown-key "${common[@]}" --json "$out/unknown-key.json"

echo "== 4. new machines (a fresh RSA-2048 signature each) vs openssl speed rsa2048, same core"
# Keys of their own, so the growing machine lists do not change the other scenarios' answers.
# 10,000 keys: each license ends the run with a few machines, as licenses in use do (an answer
# lists the license's machines, so its size grows with them). 4b: the same on 1,000 keys, whose
# licenses end the run with 20-30 machines each.
args_of() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("--token", d["token"], "--product", d["product"], " ".join("--key " + k for k in d["keys"]))' "$1"; }
"$lt" seed --keygate "$kg" --data-dir "$work/data" --keys 10000 >"$work/seed-new.json"
"$lt" seed --keygate "$kg" --data-dir "$work/data" --keys 1000 >"$work/seed-new-few.json"
sleep 1.5
# 64 connections: an answer waits for its activation-log sync (about a millisecond on these VMs)
# as well as for its signature, and with 16 the signing thread found its queue empty and slept
# some 2,000 times in 10 s (the core 3 % idle); with 64 it never does. openssl's rate is taken
# before, between and after the two runs, and each run is compared with the mean of the two
# measurements around it: this VM's signing rate drifts by a few per cent within minutes.
nm=(--ca "$cert" --duration-secs "$secs" --warmup-secs 3 --connections 64)
speed() { taskset -c "$server_cpu" openssl speed -seconds "$secs" rsa2048 2>/dev/null | tee "$out/openssl-speed-$1.txt" | tail -1; }
speed before
LT run --target "$pinned" --pid "$kg_pid" --scenario new-machines "${nm[@]}" $(args_of "$work/seed-new.json") --json "$out/new-machines.json"
speed between
echo "== 4b. new machines on 1,000 keys (longer answers as their machine lists grow)"
LT run --target "$pinned" --pid "$kg_pid" --scenario new-machines "${nm[@]}" $(args_of "$work/seed-new-few.json") --json "$out/new-machines-few-keys.json"
speed after

echo "== 5. a new TLS connection per request (with session resumption): static vs keygate"
LT compare --a "$static" --b "$pinned" --label-a static --label-b keygate --scenario reactivate "${common[@]}" \
    --pid-a "$static_pid" --pid-b "$kg_pid" --new-connection --rounds 2 --json "$out/new-connections.json"

if [ -n "$nginx_addr" ]; then
    echo "== 5b. nginx as the baseline: keep-alive re-activation, and a new TLS connection per request"
    LT compare --a "$nginx_addr" --b "$pinned" --label-a nginx --label-b keygate --scenario reactivate "${common[@]}" \
        --pid-a "$nginx_pid" --pid-b "$kg_pid" --rounds 2 --json "$out/reactivate-vs-nginx.json"
    LT compare --a "$nginx_addr" --b "$pinned" --label-a nginx --label-b keygate --scenario reactivate "${common[@]}" \
        --pid-a "$nginx_pid" --pid-b "$kg_pid" --new-connection --rounds 2 --json "$out/new-connections-vs-nginx.json"
    echo "== 5c. the same with the key exchange nginx negotiates (server.tls_post_quantum = false)"
    classic=$(start "$work/kg-classic.log" "https://" taskset -c "$server_cpu" "${keygate_env[@]}" \
        KEYGATE_SERVER__WORKER_THREADS=1 KEYGATE_SERVER__SIGNING_THREADS=1 KEYGATE_SERVER__TLS_POST_QUANTUM=false \
        "$kg" --data-dir "$work/data" serve)
    LT compare --a "$nginx_addr" --b "$classic" --label-a nginx --label-b keygate-classical --scenario reactivate "${common[@]}" \
        --new-connection --rounds 2 --json "$out/new-connections-classical-vs-nginx.json"
    echo "== 5d. new connections with a TLS 1.2 client (resumption without a key exchange), both servers"
    LT compare --a "$nginx_addr" --b "$pinned" --label-a nginx-tls12 --label-b keygate-tls12 --scenario reactivate "${common[@]}" \
        --new-connection --tls12 --rounds 2 --json "$out/new-connections-tls12-vs-nginx.json"
fi

echo "== 6. the same re-activation comparison on two unpinned cores (server and generator share them)"
# The pinned servers were started in subshells (`start`), so `pids` may not name them.
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
pkill -f -- "$work" 2>/dev/null || true
pids=()
sleep 1
free=$(start "$work/kg2.log" "https://" "${keygate_env[@]}" "$kg" --data-dir "$work/data" serve)
static2=$(start "$work/static2.log" "static server on " "$lt" static-server --cert "$cert" --key "$work/data/tls/key.pem" --body "$work/body.json")
"$lt" compare --a "$static2" --b "$free" --label-a static --label-b keygate --scenario reactivate "${common[@]}" \
    --rounds 2 --json "$out/reactivate-vs-static-2cores.json"

DAMON_PAUSED=${#paused_damon[@]} python3 - "$out" <<'PY'
import json, re, sys, os
out = sys.argv[1]
j = lambda f: json.load(open(os.path.join(out, f)))
vs = j("reactivate-vs-static.json")
static, keygate = vs["runs"][0]["throughput_rps"], vs["runs"][1]["throughput_rps"]
half = j("reactivate-half-rate.json")["runs"][0]
static_half = j("static-half-rate.json")["runs"][0]
unknown = j("unknown-key.json")["runs"][0]["throughput_rps"]
new = j("new-machines.json")["runs"][0]["throughput_rps"]
new_few = j("new-machines-few-keys.json")["runs"][0]["throughput_rps"]
def sign_rate(when):
    lines = [l for l in open(os.path.join(out, f"openssl-speed-{when}.txt")) if re.match(r"rsa +2048", l)]
    return float(lines[-1].split()[-2]) if lines else float("nan")
before, between, after = (sign_rate(w) for w in ("before", "between", "after"))
sign_s, sign_s_few = (before + between) / 2, (between + after) / 2
conns = j("new-connections.json")
two = j("reactivate-vs-static-2cores.json")
nginx = os.path.exists(os.path.join(out, "reactivate-vs-nginx.json"))
s = {
  "reactivate_rps": keygate, "static_rps": static, "reactivate_over_static": keygate / static,
  # Server CPU per request (µs), and the static server's over Keygate's: Keygate's efficiency
  # as a share of the baseline's, which the generator does not cap.
  "reactivate_static_cpu_us": vs["runs"][0]["server_cpu_us_per_request"],
  "reactivate_keygate_cpu_us": vs["runs"][1]["server_cpu_us_per_request"],
  "reactivate_cpu_static_over_keygate": vs["summary"]["server_cpu_per_request_ratio_a_over_b"],
  # The generator's CPU (share of its one core) in each run: near 1, it set the pace, and the
  # throughput ratio is flattered; the CPU ratio above is then the one to read.
  "reactivate_generator_cpu_static": vs["runs"][0]["generator_cpu_cores"],
  "reactivate_generator_cpu_keygate": vs["runs"][1]["generator_cpu_cores"],
  "half_rate_rps": half["throughput_rps"], "half_rate_p99_ms": half["latency"]["p99_ms"],
  "static_at_half_rate_p99_ms": static_half["latency"]["p99_ms"],
  "unknown_key_rps": unknown, "unknown_over_reactivate": unknown / keygate,
  "openssl_rsa2048_sign_per_s_before": before, "openssl_rsa2048_sign_per_s_between": between,
  "openssl_rsa2048_sign_per_s_after": after,
  "new_machine_rps": new, "openssl_rsa2048_sign_per_s": sign_s, "new_machine_over_openssl": new / sign_s,
  "openssl_rsa2048_us_per_sign": 1e6 / sign_s,
  "new_machine_few_keys_rps": new_few, "new_machine_few_keys_over_openssl": new_few / sign_s_few,
  "new_machine_keygate_cpu_us": j("new-machines.json")["runs"][0]["server_cpu_us_per_request"],
  # Where a new machine's CPU went, by thread (the signing thread against openssl's 1e6 / rate).
  **{f"new_machine_cpu_us_{name}": us for name, us in
     (j("new-machines.json")["runs"][0].get("server_threads_cpu_us_per_request") or {}).items() if us >= 0.05},
  "new_connection_keygate_rps": conns["runs"][1]["throughput_rps"], "new_connection_static_rps": conns["runs"][0]["throughput_rps"],
  "new_connection_ratio": conns["summary"]["throughput_ratio_b_over_a"],
  "new_connection_cpu_static_over_keygate": conns["summary"]["server_cpu_per_request_ratio_a_over_b"],
  "two_cores_reactivate_over_static": two["summary"]["throughput_ratio_b_over_a"],
  "two_cores_reactivate_rps": two["runs"][1]["throughput_rps"],
}
if nginx:
    kn, cn = j("reactivate-vs-nginx.json"), j("new-connections-vs-nginx.json")
    s.update({
      "nginx_rps": kn["runs"][0]["throughput_rps"], "reactivate_over_nginx": kn["summary"]["throughput_ratio_b_over_a"],
      "reactivate_cpu_nginx_over_keygate": kn["summary"]["server_cpu_per_request_ratio_a_over_b"],
      "new_connection_cpu_nginx_over_keygate": cn["summary"]["server_cpu_per_request_ratio_a_over_b"],
      "new_connection_nginx_rps": cn["runs"][0]["throughput_rps"], "new_connection_over_nginx": cn["summary"]["throughput_ratio_b_over_a"],
      "new_connection_classical_kx_over_nginx": j("new-connections-classical-vs-nginx.json")["summary"]["throughput_ratio_b_over_a"],
    })
    t12 = j("new-connections-tls12-vs-nginx.json")
    s.update({
      "new_connection_tls12_over_nginx_tls12": t12["summary"]["throughput_ratio_b_over_a"],
      "new_connection_nginx_tls12_rps": t12["runs"][0]["throughput_rps"],
      # Keygate's TLS 1.3 handshakes against nginx's resumed TLS 1.2 ones (two runs, not interleaved).
      "new_connection_tls13_over_nginx_tls12": cn["runs"][1]["throughput_rps"] / t12["runs"][0]["throughput_rps"],
      "new_connection_generator_cpu_max": max(r["generator_cpu_cores"] for f in (cn, t12) for r in f["runs"]),
    })
# kdamonds actually paused for the run (0 without PAUSE_DAMON=1, or without root).
s["damon_paused"] = int(os.environ.get("DAMON_PAUSED", "0"))
# 1: distributed mode (REDIS=1); 1: the main store in PostgreSQL (PG=1).
s["redis"] = int(bool(os.environ.get("KEYGATE_REDIS__URL")))
s["postgres"] = int(bool(os.environ.get("KEYGATE_STORE__POSTGRES_URL")))
json.dump(s, open(os.path.join(out, "summary.json"), "w"), indent=2)
for k, v in s.items():
    print(f"{k:36} {v:,.3f}")
PY
echo "results in $out"
