#!/usr/bin/env bash
# A/B of two Keygate builds on one pinned core: both run at once on core 0 (one worker and one
# signing thread each), each on its own copy of one freshly seeded data directory, and
# `keygate-loadtest compare` drives them in interleaved rounds from core 1, with both
# processes' CPU per request. Run it twice with the builds swapped: only a ratio that holds in
# both orders is a result on a noisy machine.
#   loadtest/ab.sh BIN_A BIN_B [rounds, default 6] [seconds per round, default 4]
# Environment: SCENARIO (default reactivate), KEYS (default 100; the new-machine figures use
# 10000), ENV_A / ENV_B (extra KEY=value settings for one side, e.g.
# ENV_B=KEYGATE_STORE__ACTIVATION_LOG=false), CONNECTIONS (default 16), RATE (open loop at this
# many requests per second, for latency at a fixed rate; default closed loop).
# Needs taskset and python3; the binaries are copied, so a rebuild during the run is harmless.
set -euo pipefail
cd "$(dirname "$0")/.."
a_bin=$(realpath "$1")
b_bin=$(realpath "$2")
rounds=${3:-6}
secs=${4:-4}
scenario=${SCENARIO:-reactivate}
keys=${KEYS:-100}
cargo build --release --locked -p keygate-loadtest
lt=$PWD/target/release/keygate-loadtest
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
cp "$a_bin" "$work/keygate-a"
cp "$b_bin" "$work/keygate-b"
base=(env KEYGATE_LOG=warn KEYGATE_SERVER__LISTEN=127.0.0.1:0 KEYGATE_ADMIN__LISTEN=127.0.0.1:0
    KEYGATE_RATE_LIMITS__PER_CLIENT_IP_PER_SECOND=0 KEYGATE_SERVER__WORKER_THREADS=1
    KEYGATE_SERVER__SIGNING_THREADS=1)

# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

# One data directory with `keys` licenses, seeded through a running node, then stopped.
"${base[@]}" "$work/keygate-a" --data-dir "$work/seed" serve >"$work/seed.log" 2>&1 &
seed_pid=$!
address "$work/seed.log" >/dev/null
"$lt" seed --keygate "$work/keygate-a" --data-dir "$work/seed" --keys "$keys" >"$work/seed.json"
sleep 1
kill "$seed_pid"
wait "$seed_pid" || true
cp -a "$work/seed" "$work/a"
cp -a "$work/seed" "$work/b"

# shellcheck disable=SC2086 # ENV_A / ENV_B are lists of settings
taskset -c 0 "${base[@]}" ${ENV_A:-} "$work/keygate-a" --data-dir "$work/a" serve >"$work/a.log" 2>&1 &
pids+=($!)
pid_a=$!
# shellcheck disable=SC2086
taskset -c 0 "${base[@]}" ${ENV_B:-} "$work/keygate-b" --data-dir "$work/b" serve >"$work/b.log" 2>&1 &
pids+=($!)
pid_b=$!
addr_a=$(address "$work/a.log")
addr_b=$(address "$work/b.log")
seed_args=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("--token", d["token"], "--product", d["product"], " ".join("--key " + k for k in d["keys"]))' "$work/seed.json")
sleep 1
# shellcheck disable=SC2086
taskset -c 1 "$lt" compare --a "$addr_a" --b "$addr_b" --label-a A --label-b B --scenario "$scenario" \
    --ca "$work/seed/tls/cert.pem" $seed_args --duration-secs "$secs" --warmup-secs 2 \
    --connections "${CONNECTIONS:-16}" --rounds "$rounds" --pid-a "$pid_a" --pid-b "$pid_b" ${RATE:+--rate "$RATE"}

# How often each node's store writer left SCHED_IDLE (store.writer_idle_priority), because
# rows piled up or a handler found it late: a count that grows with every round means it could
# not keep up under SCHED_IDLE at this load.
for side in a b; do
    admin=$(address "$work/$side.log" "keygate admin on http://")
    raised=$(curl -s "http://$admin/metrics" | awk '/^keygate_store_writer_raised_total/ {print $2}')
    echo "$(echo "$side" | tr ab AB): store writer raised ${raised:-?} times"
done
