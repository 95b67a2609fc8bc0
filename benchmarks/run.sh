#!/usr/bin/env bash
# Runs the shared peer benchmark (nginx proxy_cache, distribution in proxy
# mode, nginx serving files) with this project's release build beside them, in
# one run, and keeps the JSON under benchmarks/results/.
#   benchmarks/run.sh            full run (~3 minutes)
#   benchmarks/run.sh --quick    smoke run (< 90 s)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
harness=${BENCH_HARNESS:-$root/../shared/bench/run.sh}
[[ -x $harness ]] || { echo "benchmarks/run.sh: no harness at $harness (set BENCH_HARNESS)" >&2; exit 2; }
[[ -x $root/.build/release/cache-proxy ]] || (cd "$root" && make release)
mkdir -p "$here/results"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
mode=full
for arg in "$@"; do [[ $arg == --quick ]] && mode=quick; done
exec "$harness" --project "$root/.build/release/cache-proxy" --json "$here/results/$stamp-$mode.json" "$@"
