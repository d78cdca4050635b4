#!/usr/bin/env bash
# Builds `tallyd` and `tally` of a past release from its git tag, once, and prints the directory
# holding them (target/releases/TAG/bin). The source is checked out in a worktree under
# target/releases/TAG/src and built with the release profile into target/releases/TAG/target.
# The upgrade tests and scripts/make-release-fixtures.sh use it.
#
#   scripts/release-binaries.sh v0.3.0
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:?usage: release-binaries.sh TAG}
root=$PWD/target/releases/$tag
bin=$root/bin
if [[ -x $bin/tallyd && -x $bin/tally ]]; then
    echo "$bin"
    exit 0
fi
git rev-parse -q --verify "$tag^{commit}" >/dev/null || {
    echo "release-binaries.sh: no tag $tag in this repository (git fetch --tags?)" >&2
    exit 1
}
mkdir -p "$root"
if [[ ! -d $root/src ]]; then
    git worktree add --detach -f "$root/src" "$tag" >&2
fi
# Release 0.3 named the package holding `tally` tally-client; later ones tally-cli.
packages=(-p tallyd)
if grep -q '"cli"' "$root/src/Cargo.toml"; then packages+=(-p tally-cli); else packages+=(-p tally-client); fi
(cd "$root/src" && CARGO_TARGET_DIR=$root/target cargo build --release --locked "${packages[@]}" >&2)
mkdir -p "$bin"
cp "$root/target/release/tallyd" "$root/target/release/tally" "$bin/"
echo "$bin"
