#!/usr/bin/env bash
# How long request-log rows wait when the store writer is starved and no request follows:
# a node (the store writer under SCHED_IDLE, its default), four busy loops at the normal
# policy on the machine's cores, eight activations, then nothing but polls of /metrics until
# `keygate_log_rows_written_total` reaches eight. Prints the wait after the last answer and
# how often the writer was raised. Run it several times per build: the hogs' share varies.
#   loadtest/starved-writer.sh BIN
# shellcheck source=loadtest/lib.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source loadtest/lib.sh
bin=$1
lt=target/release/keygate-loadtest
[ -x "$lt" ] || cargo build --release --locked -p keygate-loadtest >/dev/null
work=$(mktemp -d)
hogs=()
cleanup() {
    for p in "${hogs[@]}" ${pid:-}; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
KEYGATE_LOG=warn KEYGATE_SERVER__LISTEN=127.0.0.1:0 KEYGATE_ADMIN__LISTEN=127.0.0.1:0 \
    KEYGATE_RATE_LIMITS__PER_CLIENT_IP_PER_SECOND=0 "$bin" --data-dir "$work/data" serve >"$work/node.log" 2>&1 &
pid=$!
addr=$(address "$work/node.log")
admin=$(address "$work/node.log" "keygate admin on http://")
"$lt" seed --keygate "$bin" --data-dir "$work/data" --keys 1 >"$work/seed.json"
read -r token product key < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["token"], d["product"], d["keys"][0])' "$work/seed.json")
sleep 1
for _ in 1 2 3 4; do
    (while :; do :; done) &
    hogs+=($!)
done
sleep 0.5
for i in $(seq 1 8); do
    curl -sk -o /dev/null "https://$addr/api/key/Activate" \
        --data "token=$token&ProductId=$product&Key=$key&MachineCode=starved-$i&Sign=true&v=1"
done
metric() { curl -s "http://$admin/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
start=$(date +%s%N)
written=0
while [ $(($(date +%s%N) - start)) -lt 20000000000 ]; do
    written=$(metric keygate_log_rows_written_total)
    [ "${written:-0}" -ge 8 ] && break
    sleep 0.02
done
waited=$((($(date +%s%N) - start) / 1000000))
echo "$(basename "$bin"): ${written:-0} of 8 rows written ${waited} ms after the last answer; writer raised $(metric keygate_store_writer_raised_total) times"
