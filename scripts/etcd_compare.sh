#!/usr/bin/env bash
# tally against etcd on the same machine, in the same run: a 3-member etcd (Debian's etcd-server
# 3.4, installed by apt if missing; fsync on, as shipped) loaded by `etcdctl check perf --load=xl`
# (1,000 clients offering up to its limit of unsigned 256-byte puts), then a 3-replica tally
# cluster loaded by `tally bench` (signed transfers, TLS, fsync). Prints both and the ratio and
# writes OUT/compare.json. Loopback only; every process it starts is killed by PID on exit.
#   scripts/etcd_compare.sh [OUT] [bench args...]      (default OUT target/compare)
set -euo pipefail
out=${1:-target/compare}
shift || true
[ $# -eq 0 ] && set -- --duration 20 --clients 4 --inflight 4
. "$(dirname "$0")/lib.sh"
out=$(bench_out "$out")
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server etcd-client >/dev/null
fi
work=$(mktemp -d /tmp/tally-etcd.XXXXXX)
trap kill_started EXIT
base=${ETCD_BASE_PORT:-23790}
cluster=""
for i in 1 2 3; do cluster+="e$i=http://127.0.0.1:$((base + 10 * i + 1)),"; done
cluster=${cluster%,}
endpoints=""
for i in 1 2 3; do
  c=$((base + 10 * i)); p=$((c + 1))
  etcd --name "e$i" --data-dir "$work/e$i" \
    --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token tally-compare \
    --quota-backend-bytes 8589934592 >"$work/e$i.log" 2>&1 &
  pids+=($!)
  endpoints+="127.0.0.1:$c,"
done
endpoints=${endpoints%,}
for _ in $(seq 1 50); do etcdctl --endpoints "$endpoints" endpoint health >/dev/null 2>&1 && break; sleep 0.2; done
echo "etcd: etcdctl check perf --load=xl (60 s)"
etcdctl --endpoints "$endpoints" check perf --load=xl 2>&1 | tr '\r' '\n' | grep -vE '^ *[0-9]+ / 60' | tee "$out/etcd.txt" || true
etcd_rate=$(grep -oE '[0-9]+ writes/s' "$out/etcd.txt" | grep -oE '^[0-9]+' | head -1 || true)
for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
pids=()
echo "tally: 3 replicas"
"$root/scripts/bench_cluster.sh" 3 "$out/tally" "$@" | tail -8
python3 - "$out" "${etcd_rate:-0}" <<'PY'
import json, sys
out, etcd = sys.argv[1], float(sys.argv[2])
t = json.load(open(f"{out}/tally/bench.json"))
r = {"etcd_puts_per_s": etcd, "tally_signed_requests_per_s": t["throughput_per_s"],
     "tally_latency_ms_p99": t["latency_ms_p99"], "ratio": t["throughput_per_s"] / etcd if etcd else None,
     "etcd_load": "etcdctl check perf --load=xl (unsigned 256-byte puts)",
     "tally_load": "tally bench, signed transfers, TLS, fsync"}
json.dump(r, open(f"{out}/compare.json", "w"), indent=2)
ratio = f"{r['ratio']:.1f}x" if r["ratio"] else "n/a"
print(f"etcd {etcd:.0f} puts/s; tally {t['throughput_per_s']:.0f} signed requests/s (p99 {t['latency_ms_p99']:.0f} ms): {ratio}")
PY
