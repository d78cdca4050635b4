#!/usr/bin/env bash
# One benchmark run on a fresh local cluster of release binaries (TLS and fsync on, as `cluster
# init` writes them): starts NODES tallyd, runs `tally bench` with the given arguments, prints
# its summary and leaves the JSON and PNG in OUT. With PERF=1 it also records a CPU profile of
# every tallyd (`perf record -g`) and prints the top symbols per process, grouped by stage.
#
#   scripts/bench_cluster.sh NODES OUT [bench args...]
#   scripts/bench_cluster.sh 3 target/bench/3r --duration 20 --clients 4 --inflight 2
#   scripts/bench_cluster.sh 3 target/bench/sweep --sweep --clients 4 --inflight 4
#
# Cleans up every process it started (by PID) and its cluster directory.
set -euo pipefail
nodes=${1:?usage: $0 NODES OUT [bench args...]}
out=${2:?usage: $0 NODES OUT [bench args...]}
shift 2
. "$(dirname "$0")/lib.sh"
base=${BASE_PORT:-7600}
out=$(bench_out "$out")
work=$(mktemp -d /tmp/tally-bench.XXXXXX)
trap kill_started EXIT
(cd "$root" && cargo build --release -q -p tallyd -p tally-cli)
"$bin/tally" cluster init --nodes "$nodes" --dir "$work" --accounts 16 --base-port "$base" >/dev/null
for i in $(seq 1 "$nodes"); do
  "$bin/tallyd" --config "$work/node-$i.toml" 2>"$work/node-$i.log" &
  pids+=($!)
done
"$bin/tally" --cluster-dir "$work" status >/dev/null 2>&1 || sleep 3
perf_pids=()
if [ "${PERF:-0}" = 1 ]; then
  for i in $(seq 1 "$nodes"); do
    perf record -g -F 499 -o "$out/perf-node-$i.data" -p "${pids[$((i - 1))]}" >/dev/null 2>&1 &
    perf_pids+=($!)
  done
fi
"$bin/tally" --cluster-dir "$work" bench --accounts-dir "$work" --json "$out/bench.json" --plot "$out/bench.png" "$@"
for p in "${perf_pids[@]:-}"; do kill -INT "$p" 2>/dev/null || true; done
for p in "${perf_pids[@]:-}"; do wait "$p" 2>/dev/null || true; done
for i in $(seq 1 "$nodes"); do
  awk -v n="$i" '/^VmHWM/{printf "node %d peak RSS %d MiB\n", n, $2/1024}' "/proc/${pids[$((i - 1))]}/status" 2>/dev/null || true
done
if [ "${PERF:-0}" = 1 ]; then
  for i in $(seq 1 "$nodes"); do
    echo "== node $i: top symbols (self time)"
    perf report -i "$out/perf-node-$i.data" --no-children --sort dso,symbol --stdio 2>/dev/null \
      | grep -E '^ +[0-9]' | head -25
  done
fi
echo "wrote $out/bench.json and $out/bench.png"
