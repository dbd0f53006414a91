#!/usr/bin/env bash
# Instructions per heartbeat on the hot path, counted by valgrind's callgrind (repeatable whatever else the machine
# does, unlike CPU seconds on a VM). bench/bench_hotpath.py runs 2 passes over N terminals twice: once only
# generating the heartbeats, once also handling them; the difference divided by 2 N is the handling alone.
# Usage: bench/callgrind_hotpath.sh [N (10000)] [process|decode|naive]   (about 2 minutes for 10,000)
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")/.."
n=${1:-10000}
what=${2:-process}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
count() {
  valgrind --tool=callgrind --callgrind-out-file="$out/cg.$1" .venv/bin/python bench/bench_hotpath.py \
    --terminals "$n" --sites $((n / 50 > 0 ? n / 50 : 1)) --repeat 2 --only "$1" >/dev/null 2>"$out/log.$1"
  grep -E "^totals:" "$out/cg.$1" | awk '{print $2}'
}
generate=$(count none)
handled=$(count "$what")
echo "$what: $(( (handled - generate) / (2 * n) )) instructions per heartbeat ($n terminals, 2 passes, callgrind)"
