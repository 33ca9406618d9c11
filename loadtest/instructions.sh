#!/usr/bin/env bash
# User-space instructions per re-activation, counted by valgrind's callgrind: Keygate's async
# worker and its store writer, and the static baseline's worker, under the same load. Unlike
# time, these counts repeat to within about 1 % whatever else the VM is doing, so they judge
# changes too small for `ab.sh` (its rounds move by a few per cent). Kernel work (TCP, TLS
# record writes, syscalls) is not counted, nor are SIMD widths: a cut that trades a byte loop
# for vector code shows in criterion, not here.
#   loadtest/instructions.sh [BIN, default target/release/keygate] [seconds, default 30]
# With KEEP_DUMPS=DIR the callgrind dumps are copied there (kg.cg, st.cg), for
# `callgrind_annotate` to say where the instructions went.
# Needs valgrind, python3, curl. Signed answers are cached for an hour here, and the counting
# starts once the cache holds every answer, so that no signature is made while counting.
set -euo pipefail
cd "$(dirname "$0")/.."
kg=$(realpath "${1:-target/release/keygate}")
secs=${2:-30}
command -v valgrind >/dev/null || { echo "error: valgrind not found (apt-get install valgrind)" >&2; exit 1; }
cargo build --release --locked -p keygate-loadtest
lt=$PWD/target/release/keygate-loadtest
work=$(mktemp -d)
cleanup() {
    pkill -f -- "$work" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
cp "$kg" "$work/keygate"
env_kg=(env KEYGATE_LOG=warn KEYGATE_SERVER__LISTEN=127.0.0.1:0 KEYGATE_ADMIN__LISTEN=127.0.0.1:0
    KEYGATE_RATE_LIMITS__PER_CLIENT_IP_PER_SECOND=0 KEYGATE_SERVER__WORKER_THREADS=1
    KEYGATE_SERVER__SIGNING_THREADS=1 KEYGATE_CACHE__RESPONSE_TTL_MS=3600000)

# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

# Seeds 100 keys and their 1,000 known machines through a node run natively.
"${env_kg[@]}" "$work/keygate" --data-dir "$work/data" serve >"$work/seed.log" 2>&1 &
seed_pid=$!
addr=$(address "$work/seed.log" "https://")
"$lt" seed --keygate "$work/keygate" --data-dir "$work/data" --keys 100 >"$work/seed.json"
args=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("--token", d["token"], "--product", d["product"], " ".join("--key " + k for k in d["keys"]))' "$work/seed.json")
read -r token product key < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["token"], d["product"], d["keys"][0])' "$work/seed.json")
cert=$work/data/tls/cert.pem
# shellcheck disable=SC2086 # $args is a list of options
"$lt" run --target "$addr" --scenario reactivate --ca "$cert" $args --duration-secs 2 \
    --warmup-secs 0 --connections 16 >/dev/null
curl -s --cacert "$cert" "https://$addr/api/key/Activate" \
    -d "token=$token&ProductId=$product&key=$key&MachineCode=known-0&FieldsToReturn=0&metadata=False&FloatingTimeInterval=0&MaxOverdraft=0&FriendlyName=None&ModelVersion=3&Sign=True&SignMethod=1" >"$work/body.json"
kill "$seed_pid"
wait "$seed_pid" || true

# Runs the scenario against $1 for $2 seconds.
load() {
    # shellcheck disable=SC2086
    "$lt" run --target "$1" --scenario reactivate --ca "$cert" $args --duration-secs "$2" \
        --warmup-secs 0 --connections 16 >/dev/null
}

# The response cache's misses so far, from the admin listener $1.
misses() {
    curl -s "http://$1/metrics" | awk '/^keygate_response_cache_total\{result="miss"\}/ {print $2}'
}

# Runs the load against $2 (pid $1): warm-up runs until one adds no response-cache miss (admin
# listener $4; none for the static server), so that nothing is encoded or signed while
# counting (under valgrind a signature takes tens of milliseconds), then the counted run
# between zeroing the counters and dumping them. Prints the requests served.
count() {
    local pid=$1 target=$2 out=$3 admin=${4:-}
    load "$target" 4
    if [ -n "$admin" ]; then
        local before after
        for _ in $(seq 40); do
            before=$(misses "$admin")
            load "$target" 4
            after=$(misses "$admin")
            [ "$before" = "$after" ] && break
        done
        [ "$before" = "$after" ] || echo "warning: the response cache still misses" >&2
    fi
    callgrind_control -z "$pid" >/dev/null 2>&1
    # shellcheck disable=SC2086
    "$lt" run --target "$target" --scenario reactivate --ca "$cert" $args --duration-secs "$secs" \
        --warmup-secs 0 --connections 16 >"$out.run"
    callgrind_control -d "$pid" >/dev/null 2>&1
    sleep 1
    awk '$1 == "keygate" {print $3}' "$out.run"
}

# The inclusive instruction count of the first function matching $2 in callgrind dump $1.
inclusive() {
    callgrind_annotate --inclusive=yes --threshold=100 "$1" >"$1.txt" 2>/dev/null
    grep -m1 -- "$2" "$1.txt" | awk '{gsub(",", "", $1); print $1}'
}

"${env_kg[@]}" valgrind --tool=callgrind --callgrind-out-file="$work/kg.cg" "$work/keygate" \
    --data-dir "$work/data" serve >"$work/kg.log" 2>&1 &
kg_pid=$!
kg_addr=$(address "$work/kg.log" "https://")
kg_req=$(count "$kg_pid" "$kg_addr" "$work/kg" "$(address "$work/kg.log" "keygate admin on http://")")
kg_dump=$(ls -S "$work"/kg.cg.* | head -1)
kg_worker=$(inclusive "$kg_dump" "multi_thread::worker::run ")
kg_store=$(inclusive "$kg_dump" "store/writer.rs:std::sys::backtrace::__rust_begin_short_backtrace")
kill "$kg_pid"
wait "$kg_pid" || true

valgrind --tool=callgrind --callgrind-out-file="$work/st.cg" "$lt" static-server --threads 1 \
    --cert "$cert" --key "$work/data/tls/key.pem" --body "$work/body.json" >"$work/st.log" 2>&1 &
st_pid=$!
st_req=$(count "$st_pid" "$(address "$work/st.log" "static server on ")" "$work/st")
st_dump=$(ls -S "$work"/st.cg.* | head -1)
st_worker=$(inclusive "$st_dump" "multi_thread::worker::run ")
if [ -n "${KEEP_DUMPS:-}" ]; then
    mkdir -p "$KEEP_DUMPS"
    cp "$kg_dump" "$KEEP_DUMPS/kg.cg"
    cp "$st_dump" "$KEEP_DUMPS/st.cg"
fi

python3 - "$kg_req" "$kg_worker" "$kg_store" "$st_req" "$st_worker" <<'PY'
import sys
kg_req, kg_worker, kg_store, st_req, st_worker = map(int, sys.argv[1:])
w, s, b = kg_worker / kg_req, kg_store / kg_req, st_worker / st_req
print(f"Keygate: {kg_req} re-activations counted; per request: async worker {w:,.0f}, "
      f"store writer {s:,.0f}, both {w + s:,.0f} instructions")
print(f"static baseline: {st_req} requests counted; per request: worker {b:,.0f} instructions")
print(f"Keygate / static, user-space instructions per request: {(w + s) / b:.3f}")
PY
