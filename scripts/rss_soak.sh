#!/usr/bin/env bash
# Memory stays bounded as the state grows: one tallyd (release), its RSS when empty, after
# DOCS documents, and after REQUESTS requests in all. Bench rounds run back to back; the node's
# Audit query counts documents. Usage: scripts/rss_soak.sh [DOCS] [REQUESTS]   (defaults 1M, 10M)
set -euo pipefail
cd "$(dirname "$0")/.."
DOCS=${1:-1000000}
REQUESTS=${2:-10000000}
DIR=$(mktemp -d /tmp/tally-rss.XXXXXX)
BASE=${BASE_PORT:-7900}
cargo build --release -q -p tallyd -p tally-cli
T=./target/release/tally
$T cluster init --nodes 1 --dir "$DIR" --accounts 64 --base-port "$BASE" >/dev/null
./target/release/tallyd --config "$DIR/node-1.toml" >"$DIR/node.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null || true' EXIT
ADDR=127.0.0.1:$((BASE + 1))
sleep 1
rss() { awk '/^VmRSS/{r=$2} /^VmHWM/{h=$2} END{printf "rss_kib=%d peak_kib=%d", r, h}' /proc/$PID/status; }
committed=0
echo "empty: $(rss)" | tee "$DIR/rss.txt"
round() { # mix duration
  $T --addr "$ADDR" bench --mix "$1" --duration "$2" --clients 4 --rate-max 40000 --accounts-dir "$DIR" --json "$DIR/round.json" >/dev/null 2>&1 || true
  python3 -c "import json;print(json.load(open('$DIR/round.json'))['committed'])"
}
while :; do
  # Every doc request SETs a fresh random UUID4: committed doc requests = documents.
  n=$(round doc 20); committed=$((committed + n))
  echo "after $committed documents: $(rss)" | tee -a "$DIR/rss.txt"
  [ "$committed" -ge "$DOCS" ] && break
done
echo "with >= $DOCS documents: $(rss)" | tee -a "$DIR/rss.txt"
while [ "$committed" -lt "$REQUESTS" ]; do
  n=$(round transfer 30); committed=$((committed + n))
  echo "after $committed requests: $(rss)" | tee -a "$DIR/rss.txt"
done
echo "done: $committed requests; $(rss); log in $DIR" | tee -a "$DIR/rss.txt"
