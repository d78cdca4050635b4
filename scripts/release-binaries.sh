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
# Each release's commit, for a checkout that lacks the tags (a clone without --tags).
declare -A commits=([v0.3.0]=0c153676c077df1414f3e910bce468a05bdb32d7)
rev=$tag
if ! git rev-parse -q --verify "$tag^{commit}" >/dev/null; then
    rev=${commits[$tag]:-}
    if [[ -z $rev ]] || ! git rev-parse -q --verify "$rev^{commit}" >/dev/null; then
        echo "release-binaries.sh: no tag $tag and no known commit for it in this repository" >&2
        exit 1
    fi
fi
mkdir -p "$root"
if [[ ! -d $root/src ]]; then
    git worktree add --detach -f "$root/src" "$rev" >&2
fi
# Release 0.3 named the package holding `tally` tally-client; later ones tally-cli.
packages=(-p tallyd)
if grep -q '"cli"' "$root/src/Cargo.toml"; then packages+=(-p tally-cli); else packages+=(-p tally-client); fi
(cd "$root/src" && CARGO_TARGET_DIR=$root/target cargo build --release --locked "${packages[@]}" >&2)
mkdir -p "$bin"
cp "$root/target/release/tallyd" "$root/target/release/tally" "$bin/"
echo "$bin"
