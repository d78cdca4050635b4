#!/usr/bin/env bash
# Measures what TLS costs: the same 3-replica bench on a cluster from `cluster init` (TLS on
# both ports) and on one whose configs opt into plaintext. Release binaries; prints both JSON
# summaries. Usage: scripts/tls_cost.sh [SECONDS] (default 20). Cleans up its processes.
set -euo pipefail
secs=${1:-20}
bin=$(cd "$(dirname "$0")/.." && pwd)/target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
run() { # $1 = name, $2 = base port, $3 = plaintext (0/1)
  local dir="$work/$1"
  "$bin/tally" cluster init --nodes 3 --dir "$dir" --accounts 8 --base-port "$2" >/dev/null
  if [ "$3" = 1 ]; then
    for f in "$dir"/node-*.toml; do
      sed -i '/^tls_/d; s/^insecure_plaintext = false/insecure_plaintext = true/' "$f"
    done
  fi
  local started=()
  for i in 1 2 3; do "$bin/tallyd" --config "$dir/node-$i.toml" 2>"$dir/n$i.log" & started+=($!); done
  pids+=("${started[@]}")
  sleep 3
  local access=(--cluster-dir "$dir")
  [ "$3" = 1 ] && access=(--addr "127.0.0.1:$(($2+1))")
  "$bin/tally" "${access[@]}" bench --duration "$secs" --clients 4 --inflight 2 --rate-max 80000 \
    --accounts-dir "$dir" --json "$work/$1.json" >/dev/null 2>&1
  for p in "${started[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  echo "$1: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%.0f/s p50 %.0f ms p99 %.0f ms" % (d["throughput_per_s"], d["latency_ms_p50"], d["latency_ms_p99"]))' "$work/$1.json")"
}
run tls 26000 0
run plaintext 26300 1
