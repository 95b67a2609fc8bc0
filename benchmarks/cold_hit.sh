#!/usr/bin/env bash
# No disk waits on an event loop: the 4 KiB hits' latency on a proxy with ONE
# event loop (NIO_SINGLETON_GROUP_LOOP_COUNT=1), alone, beside large hits served warm
# from the page cache, and beside large hits whose pages were just dropped
# (`echo 3 > /proc/sys/vm/drop_caches` before each). A sendfile of a cold
# file on the event loop stalls every connection of the loop for the disk;
# reading cold regions on the thread pool keeps the small hits' p99 near
# the warm figure. Needs root (drop_caches) and docker-registry, wrk, curl.
#   benchmarks/cold_hit.sh [BINARY ...]      (default .build/release/cache-proxy)
set -euo pipefail
(($# >= 1)) || set -- .build/release/cache-proxy
big_mib=${BIG_MIB:-256} seconds=${SECONDS_PER_RUN:-6}
for tool in docker-registry wrk curl sha256sum; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is missing" >&2; exit 2; }
done
work=$(mktemp -d)
registry_pid= pid= loop_pid=
trap '[[ -n $loop_pid ]] && kill $loop_pid 2>/dev/null; [[ -n $pid ]] && kill $pid 2>/dev/null; [[ -n $registry_pid ]] && kill $registry_pid 2>/dev/null; rm -rf "$work"' EXIT
origin=5331 proxy=5332
source "$(dirname "$0")/origin.sh"
head -c 4096 /dev/urandom > "$work/small"; small=$(push "$work/small")
head -c $((big_mib << 20)) /dev/urandom > "$work/big"; big=$(push "$work/big"); rm -f "$work/big"
cat > "$work/proxy.yml" <<EOT
api: {hostname: "127.0.0.1", port: $proxy}
upstreams: [{host: "127.0.0.1:$proxy", registry: "127.0.0.1", port: $origin, schema: "http"}]
storage: {folder: "$work/cache"}
EOT
small_url="http://127.0.0.1:$proxy/v2/ab/blobs/$small" big_url="http://127.0.0.1:$proxy/v2/ab/blobs/$big"
p99() { wrk -t1 -c8 -d${seconds}s --latency "$small_url" | awk '/ 99%/{print $2} /Requests\/sec/{rps=$2} END{print rps}' | paste -sd' '; }
big_loop() { # $1: cold|warm|control (cold, read by cat, not through the proxy)
  local file=$work/cache/blobs/sha256/${big:7:2}/${big:7}
  while :; do
    [[ $1 != warm ]] && { sync; echo 3 > /proc/sys/vm/drop_caches; }
    if [[ $1 == control ]]; then cat "$file" > /dev/null; else curl -s -o /dev/null "$big_url"; fi
  done
}
for binary in "$@"; do
  rm -rf "$work/cache"
  NIO_SINGLETON_GROUP_LOOP_COUNT=1 "$binary" --config "$work/proxy.yml" > "$work/proxy.log" 2>&1 & pid=$!
  for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$proxy/healthz" && break; sleep 0.1; done
  curl -s -o /dev/null "$small_url"; curl -s -o /dev/null "$big_url"; curl -s -o /dev/null "$small_url"; sync
  echo "$binary (event loops: $(ls /proc/$pid/task | xargs -I{} cat /proc/$pid/task/{}/comm | grep -c NIO-SGLTN))"
  echo "  4 KiB alone:               p99 / req/s  $(p99)"
  big_loop warm & loop_pid=$!
  echo "  beside warm ${big_mib} MiB hits:  p99 / req/s  $(p99)"
  kill $loop_pid; wait $loop_pid 2>/dev/null || true
  big_loop control & loop_pid=$!
  echo "  beside drop_caches + cat of the ${big_mib} MiB file (no proxy: the floor):  p99 / req/s  $(p99)"
  kill $loop_pid; wait $loop_pid 2>/dev/null || true
  # Cold hits alone, one after another: the proxy's CPU per GB of them.
  t0=$(awk '{print $14+$15}' /proc/$pid/stat)
  for _ in 1 2 3 4; do sync; echo 3 > /proc/sys/vm/drop_caches; curl -s -o /dev/null "$big_url"; done
  t1=$(awk '{print $14+$15}' /proc/$pid/stat)
  echo "  cold ${big_mib} MiB hits alone (4): proxy CPU $(awk -v t=$((t1 - t0)) -v m=$big_mib 'BEGIN{printf "%.3f", t/100/(4*m*1048576/1e9)}') s per GB"
  big_loop cold & loop_pid=$!
  echo "  beside cold ${big_mib} MiB hits:  p99 / req/s  $(p99)"
  kill $loop_pid; wait $loop_pid 2>/dev/null || true; loop_pid=
  echo "  proxy major page faults (its own code and data read back from disk): $(awk '{print $12}' /proc/$pid/stat)"
  echo "  cold bytes read on the pool: $(curl -s "http://127.0.0.1:$proxy/metrics" | awk '/^cacheproxy_cold_read_bytes_total/{print $2}')"
  kill $pid; wait $pid 2>/dev/null || true; pid=
done
