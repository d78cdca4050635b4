#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ (the byte-level ones and the structure-aware
# `structured_*` ones), one after another on one core, each for a number of executions, and
# prints per target the executions done, the crashes found and the time taken. A target stops at
# its first crash (libFuzzer's rule), so its executions are then below the number asked for; the
# crash is in fuzz/artifacts/<target>/ (replay: see fuzz/README.md).
#
#   scripts/fuzz-all.sh                      # 10,000,000 executions of every target
#   scripts/fuzz-all.sh -r 100000            # fewer
#   scripts/fuzz-all.sh -t 60 structured_batch structured_receipt   # a minute each, two targets
#   scripts/fuzz-all.sh -n structured_receipt # without compare tracing: about twice as fast
#
# Options: -r RUNS (default 10000000), -t SECONDS (also stop a target after this long),
# -m MAX_LEN (largest input, default 65536), -n (build without
# `-sanitizer-coverage-trace-compares`: the structured targets spend about half their time in
# it, and their generators reach the comparisons it would help solve by construction). Needs nightly and cargo-fuzz
# (`cargo install cargo-fuzz --locked`). Builds with `-s none` (no sanitizer: the crates forbid
# `unsafe`; fuzz/README.md says how to replay a corpus under AddressSanitizer). Logs go to
# fuzz/logs/<target>.log, corpora to fuzz/corpus/<target>/ (seeds/<target>/ is read too when it
# exists). Exit status 1 when any target crashed or ran nothing (it did not build or start).
set -euo pipefail

runs=10000000
seconds=""
max_len=65536
build=(-s none)
while getopts "r:t:m:nh" opt; do
    case "$opt" in
        r) runs="$OPTARG" ;;
        t) seconds="$OPTARG" ;;
        m) max_len="$OPTARG" ;;
        n) build+=(--no-trace-compares) ;;
        *) sed -n '2,23p' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))

cd "$(dirname "$0")/../fuzz"
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
mkdir -p logs
if ! cargo +nightly fuzz build "${build[@]}" >logs/build.log 2>&1; then
    tail -n 30 logs/build.log
    exit 2
fi

extra=()
[ -n "$seconds" ] && extra+=("-max_total_time=$seconds")
printf '%-26s %14s %8s %9s %5s\n' target executions crashes seconds slow
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    # Only crash-, leak-, timeout- and oom- artifacts are failures. libFuzzer also writes a
    # slow-unit- file for an execution that took over 10 s of wall time, which a fuzzer paused
    # (SIGSTOP) or starved of CPU produces too: counted apart, replay it to judge.
    failures() { find "artifacts/$t" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l; }
    slows() { find "artifacts/$t" -type f -name 'slow-unit-*' | wc -l; }
    before=$(failures)
    slow_before=$(slows)
    dirs=("corpus/$t")
    [ -d "seeds/$t" ] && dirs+=("seeds/$t")
    start=$(date +%s)
    cargo +nightly fuzz run "${build[@]}" "$t" "${dirs[@]}" -- \
        -runs="$runs" -max_len="$max_len" -print_final_stats=1 "${extra[@]}" >"logs/$t.log" 2>&1 || true
    took=$(( $(date +%s) - start ))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | tail -1 | grep -o '[0-9]*$' || true)
    if [ -z "$execs" ]; then
        # libFuzzer prints no final stats when it dies: take its last progress line.
        execs=$(grep -o '^#[0-9]*' "logs/$t.log" | tail -1 | tr -d '#' || true)
    fi
    crashes=$(( $(failures) - before ))
    slow=$(( $(slows) - slow_before ))
    [ "$crashes" -gt 0 ] && failed=1
    printf '%-26s %14s %8s %9s %5s\n' "$t" "${execs:-?}" "$crashes" "$took" "$slow"
    if [ -z "$execs" ]; then
        # No executions counted: the target did not build or did not start. Not a pass.
        echo "  $t ran nothing: see fuzz/logs/$t.log" >&2
        tail -n 5 "logs/$t.log" >&2
        failed=1
    fi
done
exit "$failed"
