#!/usr/bin/env bash
# The fast tier: every unit and in-process test of every crate, the core's integration tests and
# the simulator's CI runs (a few hundred seeds, every planted bug caught), without the
# multi-process cluster tests in tallyd/tests/ (real tallyd processes, kill -9, Docker). 372
# tests in about 41–50 s warm on the 2-core machine (about 3 minutes when the test binaries are rebuilt).
# `cargo test --workspace` (the README's command, what .ci/run runs) is the full suite. Extra
# arguments go to every `cargo test`.
#
#   scripts/test-fast.sh
#   scripts/test-fast.sh -- --nocapture
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
cargo test --workspace --exclude tallyd "$@"
cargo test -p tallyd --bins "$@"
echo "fast tier: $(($(date +%s) - started)) s"
