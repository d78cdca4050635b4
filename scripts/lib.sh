# Shared by the benchmark scripts (sourced): the repository root and release binaries, an output
# directory made absolute, a scratch directory, and the processes to kill on exit.
#   out=$(bench_out DIR); work=$(bench_work NAME); pids+=($!); trap kill_started EXIT
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=$root/target/release
pids=()
work=""

# Creates DIR and prints its absolute path.
bench_out() {
  mkdir -p "$1"
  (cd "$1" && pwd)
}

# Kills every PID in `pids` (kill -9, then reaps them) and removes `work`.
kill_started() {
  for p in "${pids[@]:-}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${pids[@]:-}"; do wait "$p" 2>/dev/null || true; done
  [ -n "$work" ] && rm -rf "$work"
  return 0
}
