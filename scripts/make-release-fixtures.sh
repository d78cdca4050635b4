#!/usr/bin/env bash
# Writes the fixture cluster of a past release: a 3-replica cluster created and run by that
# release's own binaries, a little of every kind of request, each with its receipt file, then
# stopped cleanly. tallyd/tests/upgrade.rs opens it with this release and checks that every old
# receipt is served with the same bytes.
#
#   scripts/make-release-fixtures.sh v0.3.0       # writes tallyd/tests/fixtures/v0.3.0/
#
# The release is built from its tag by scripts/release-binaries.sh (cached under
# target/releases/TAG). Ports 15001-15003 (clients), 15101-15103 (peers), 15201-15203 (metrics):
# the fixture's configs and logs name them, and the test runs the cluster on them again.
# Absolute paths in the configs are written as @DIR@.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:?usage: make-release-fixtures.sh TAG}
bin=$(scripts/release-binaries.sh "$tag")
out=tallyd/tests/fixtures/$tag
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

dir=$work/cluster
"$bin/tally" cluster init --nodes 3 --dir "$dir" --accounts 4 --base-port 15000 >/dev/null
for i in 1 2 3; do
    "$bin/tallyd" --config "$dir/node-$i.toml" >"$work/node-$i.log" 2>&1 &
    pids+=($!)
done
tally() { "$bin/tally" --cluster-dir "$dir" "$@"; }
for _ in $(seq 1 100); do
    tally status >/dev/null 2>&1 && break
    sleep 0.2
done

mkdir -p "$work/receipts"
pub() { python3 -c "import json;print(json.load(open('$dir/accounts/$1.key'))['public'],end='')"; }
doc=6f1e0c7a-3b7d-4c1e-9a55-2f1f8d3c4b10
for n in 1 2 3; do
    tally --key "$dir/accounts/0.key" transfer --to "$(pub 1)" --amount "$n" --receipt "$work/receipts/transfer-$n.json" >/dev/null
done
tally --key "$dir/accounts/1.key" set "$doc" '{"owner":"fixture","n":1}' --receipt "$work/receipts/set.json" >/dev/null
tally --key "$dir/accounts/1.key" set "$doc" '{"owner":"fixture","n":2}' --if-revision 1 --receipt "$work/receipts/set-if.json" >/dev/null
tally --key "$dir/accounts/2.key" claim --domain validators --slot 7 --receipt "$work/receipts/claim.json" >/dev/null
tally --key "$dir/accounts/2.key" lease grant --ttl-ms 600000 >"$work/lease.txt"
cat >"$work/txn.json" <<EOF
{"compares": [], "then": [{"transfer": {"to": "$(pub 3)", "amount": 11}}], "else": []}
EOF
tally --key "$dir/accounts/2.key" txn --file "$work/txn.json" --receipt "$work/receipts/txn.json" >/dev/null
tally status >"$work/status.txt"

for p in "${pids[@]}"; do kill -TERM "$p"; done
for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
pids=()

rm -rf "$out"
mkdir -p "$out"
cp -r "$dir" "$out/cluster"
cp -r "$work/receipts" "$out/receipts"
cp "$work/status.txt" "$work/lease.txt" "$out/"
rm -f "$out"/cluster/node-*.log
grep -rl "$dir" "$out/cluster" | while read -r f; do sed -i "s|$dir|@DIR@|g" "$f"; done
{
    echo "Written by $tag ($(git rev-parse "$tag^{commit}")) with scripts/make-release-fixtures.sh on $(date -u +%F)."
    echo "Receipts: $(ls "$out/receipts" | tr '\n' ' ')"
    echo "Size: $(du -sh "$out" | cut -f1)"
} >"$out/README"
cat "$out/README"
