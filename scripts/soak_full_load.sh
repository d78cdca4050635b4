#!/usr/bin/env bash
# Full load on a local 3-replica cluster (release, TLS, fsync) for SECONDS (default 600): no
# replica may mistake a slow scheduler for a dead leader. Two lanes of ROUND_S-second bench
# rounds (default 30) run half a round apart, so while one lane sets up its next round (status,
# filling its signing queues) the other loads the cluster, and the machine stays busy.
# Prints the leader changes and campaigns each replica counted (its /metrics), the terms before
# and after, each replica's RSS at the end and the requests committed (RSS after N requests).
#   scripts/soak_full_load.sh [SECONDS] [OUT]
set -euo pipefail
secs=${1:-600}
out=${2:-target/soak}
round_s=${ROUND_S:-30}
. "$(dirname "$0")/lib.sh"
base=${BASE_PORT:-7700}
out=$(bench_out "$out")
work=$(mktemp -d /tmp/tally-soak.XXXXXX)
lanes=()
cleanup() {
  # What the replicas said about elections and links, kept for diagnosis.
  grep -h -i -E "elect|campaign|became|leader|peer down|link|store|snapshot|exported" "$work"/node-*.log 2>/dev/null | tail -200 >"$out/elections.log" || true
  for p in "${lanes[@]:-}"; do kill -9 "$p" 2>/dev/null || true; done
  pkill -9 -f "tally --cluster-dir $work" 2>/dev/null || true
  kill_started
}
trap cleanup EXIT
(cd "$root" && cargo build --release -q -p tallyd -p tally-cli)
"$bin/tally" cluster init --nodes 3 --dir "$work" --accounts 16 --base-port "$base" >/dev/null
for i in 1 2 3; do
  "$bin/tallyd" --config "$work/node-$i.toml" 2>"$work/node-$i.log" &
  pids+=($!)
done
sleep 3
metric() { # node name -> sum of the metric's samples
  curl -s "http://127.0.0.1:$((base + 200 + $1))/metrics" | awk -v m="$2" '$1 ~ "^"m {s += $2} END {print s + 0}'
}
report() {
  for i in 1 2 3; do
    echo "$1 node $i: leader_changes=$(metric "$i" tally_leader_changes_total) campaigns=$(metric "$i" tally_elections_total) leader_down_campaigns=$(metric "$i" 'tally_elections_total\\{kind="leader_down"') term=$(metric "$i" tally_term)"
  done
}
report before | tee "$out/soak.txt"
end=$(( $(date +%s) + secs ))
lane() { # lane number
  local n=0
  while [ "$(date +%s)" -lt "$end" ]; do
    n=$((n + 1))
    "$bin/tally" --cluster-dir "$work" bench --duration "$round_s" --clients 2 --inflight 2 --rate-max 40000 \
      --accounts-dir "$work" --json "$out/lane-$1-round-$n.json" >/dev/null 2>&1 || true
  done
}
rm -f "$out"/lane-*.json
lane 1 & lanes+=($!)
sleep $((round_s / 2))
lane 2 & lanes+=($!)
wait "${lanes[@]}"
report after | tee -a "$out/soak.txt"
python3 - "$out" <<'PY' | tee -a "$out/soak.txt"
import glob, json, sys
runs = [json.load(open(f)) for f in sorted(glob.glob(sys.argv[1] + "/lane-*.json"))]
c = sum(r["committed"] for r in runs)
e = sum(r["errors"] for r in runs)
p99 = max((r["latency_ms_p99"] for r in runs), default=0)
print(f"{len(runs)} rounds: {c} requests committed, {e} errors, worst round p99 {p99:.0f} ms")
PY
for i in 1 2 3; do
  awk -v n="$i" '/^VmRSS/{r=$2} /^VmHWM/{h=$2} END{printf "node %d RSS %d MiB (peak %d MiB)\n", n, r/1024, h/1024}' \
    "/proc/${pids[$((i - 1))]}/status" | tee -a "$out/soak.txt"
done
