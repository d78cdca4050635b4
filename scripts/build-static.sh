#!/usr/bin/env bash
# Builds tallyd and tally as static executables (glibc, +crt-static: no musl target needed) and
# stages them with the Dockerfile in a small build context; with --image TAG it also builds the
# FROM-scratch image.
#
#   scripts/build-static.sh                     # -> $CARGO_TARGET_DIR/docker-context/{tallyd,tally,Dockerfile}
#   scripts/build-static.sh --image tally:latest
#   PROFILE=dev scripts/build-static.sh         # unoptimised workspace crates, quicker to build
#
# The explicit --target keeps RUSTFLAGS away from build scripts and proc macros (which must stay
# dynamic); the binaries land in $CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/<profile>/.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-gnu
profile=${PROFILE:-release}
target_dir=${CARGO_TARGET_DIR:-target}
image=""
while [ $# -gt 0 ]; do
  case "$1" in
    --image) image=$2; shift 2 ;;
    *) echo "usage: $0 [--image TAG]" >&2; exit 2 ;;
  esac
done

start=$(date +%s)
RUSTFLAGS='-C target-feature=+crt-static' cargo build --profile "$profile" --target "$target" \
  -p tallyd -p tally-cli --bin tallyd --bin tally
out_profile=$profile
[ "$profile" = dev ] && out_profile=debug
bin_dir=$target_dir/$target/$out_profile
echo "static build: $(( $(date +%s) - start )) s"

for b in tallyd tally; do
  # A static executable has no interpreter and no needed libraries.
  if file "$bin_dir/$b" | grep -q 'dynamically linked'; then
    echo "$bin_dir/$b is dynamically linked" >&2; exit 1
  fi
done

ctx=$target_dir/docker-context
rm -rf "$ctx" && mkdir -p "$ctx"
# Debug info off (the symbols stay, for backtraces): ~4x smaller.
for b in tallyd tally; do
  strip --strip-debug -o "$ctx/$b" "$bin_dir/$b" 2>/dev/null || cp "$bin_dir/$b" "$ctx/$b"
done
cp deploy/Dockerfile "$ctx/"
ls -l "$ctx"
if [ -n "$image" ]; then
  docker build -t "$image" "$ctx"
  docker image ls "$image"
fi
