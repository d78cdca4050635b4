#!/usr/bin/env bash
# What watchers and admin scanners cost a bench, on a fresh local 3-replica cluster of release
# binaries (TLS and fsync on, as `cluster init` writes them): loads DOCS documents, then runs
# `tally bench` alone, beside WATCHERS_LEADER watchers catching up from height 0 on the leader,
# beside WATCHERS_FOLLOWER on a follower, beside SCANNERS admin scanners (`AuditPage` in a loop),
# each load between two benches alone. Prints each load's throughput as a share of the mean of the
# benches alone either side, and writes OUT/watch-load.json and OUT/watch-load.png.
#
#   scripts/watch-load.sh [OUT]                       # defaults: 95000 docs, 20 s benches
#   DOCS=20000 DURATION=8 scripts/watch-load.sh target/watch-load
#
# Bounded in time (7 benches plus loading, under a timeout); kills every process it started (by
# PID) and removes its cluster directory.
set -euo pipefail
out=${1:-target/watch-load}
. "$(dirname "$0")/lib.sh"
docs=${DOCS:-95000}
duration=${DURATION:-20}
base=${BASE_PORT:-7700}
out=$(bench_out "$out")
work=$(mktemp -d /tmp/tally-watch-load.XXXXXX)
trap kill_started EXIT
(cd "$root" && cargo build --release -q -p tallyd -p tally-cli --bins --example watch_load)
"$bin/tally" cluster init --nodes 3 --dir "$work" --accounts 16 --base-port "$base" >/dev/null
for i in 1 2 3; do
  "$bin/tallyd" --config "$work/node-$i.toml" 2>"$work/node-$i.log" &
  pids+=($!)
done
for _ in $(seq 1 50); do
  "$bin/tally" --cluster-dir "$work" status >/dev/null 2>&1 && break
  sleep 0.2
done
timeout --kill-after=10 $((duration * 7 + 600)) "$bin/examples/watch_load" --cluster-dir "$work" \
  --docs "$docs" --duration "$duration" --json "$out/watch-load.json" \
  --watchers-leader "${WATCHERS_LEADER:-200}" --watchers-follower "${WATCHERS_FOLLOWER:-50}" \
  --scanners "${SCANNERS:-4}"
for i in 1 2 3; do
  awk -v n="$i" '/^VmHWM/{printf "node %d peak RSS %d MiB\n", n, $2/1024}' "/proc/${pids[$((i - 1))]}/status" 2>/dev/null || true
done
