#!/usr/bin/env bash
# A/B of the 4 KiB hit path: the same cached blob served by each binary in
# turn, `wrk -t2 -c64 -d4s` three times each, against a local distribution
# registry as origin. Steadier than the full harness for small hit-path
# changes; compare binaries within one run only. Request logs at info (as
# users run it) unless LOG_LEVEL says otherwise.
#   benchmarks/hit_4k_ab.sh .build/release/cache-proxy /path/to/other/cache-proxy
set -euo pipefail
(($# >= 1)) || { echo "usage: $0 BINARY [BINARY...]" >&2; exit 2; }
for tool in docker-registry wrk curl sha256sum; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is missing (apt-get install docker-registry wrk curl)" >&2; exit 2; }
done
work=$(mktemp -d)
registry_pid=
trap '[[ -n $registry_pid ]] && kill $registry_pid 2>/dev/null; rm -rf "$work"' EXIT
origin=5311 proxy=5312
source "$(dirname "$0")/origin.sh"
head -c 4096 /dev/urandom > "$work/blob"
digest=$(push "$work/blob")
cat > "$work/proxy.yml" <<EOT
api: {hostname: "127.0.0.1", port: $proxy}
upstreams: [{host: "127.0.0.1", registry: "127.0.0.1", port: $origin, schema: "http"}]
storage: {folder: "$work/cache", fsync: false}
log_level: ${LOG_LEVEL:-info}
EOT
url="http://127.0.0.1:$proxy/v2/ab/blobs/$digest"
for binary in "$@"; do
  rm -rf "$work/cache"
  "$binary" --config "$work/proxy.yml" 2> "$work/proxy.log" & pid=$!
  for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$proxy/healthz" && break; sleep 0.1; done
  code=$(curl -s -o /dev/null -w '%{http_code}' "$url")
  [[ $code == 200 ]] || { echo "$binary: first fetch answered $code" >&2; kill $pid; exit 1; }
  echo "$binary"
  for _ in 1 2 3; do
    t0=$(awk '{print $14+$15}' /proc/$pid/stat)
    out=$(wrk -t2 -c64 -d4s --latency "$url")
    t1=$(awk '{print $14+$15}' /proc/$pid/stat)
    awk -v t=$((t1 - t0)) '/requests in/{r=$1} / 99%/{p=$2} /Requests\/sec/{q=$2} END{printf "  req/s %s  p99 %s  CPU µs/req %.1f\n", q, p, t*10000/r}' <<<"$out"
  done
  kill $pid; wait $pid 2>/dev/null || true
done
