#!/usr/bin/env bash
# Where the 4 KiB hit's tail latency goes: the proxy and nginx (the shared
# harness's nginx-cache.conf) alternate serving the same cached 4 KiB blob
# to `wrk -t2 -c64 -d4s --latency`, as the harness drives it, and each run
# prints p50, p99 and what the server's threads did meanwhile from
# /proc/PID/task/*/schedstat: time run, time waited runnable on the run
# queue, and the wait per slice. On two cores shared with wrk's two
# threads, a request's latency is mostly its server thread waiting for a
# core, and the p99 follows the wait per slice, whichever server it is.
#   benchmarks/hit_4k_sched.sh [BINARY]     ROUNDS=4
# Needs docker-registry, nginx, wrk, curl (root for nginx's user).
set -euo pipefail
binary=${1:-.build/release/cache-proxy}
here=$(cd "$(dirname "$0")" && pwd)
for tool in docker-registry nginx wrk curl pgrep; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is missing (apt-get install docker-registry nginx wrk curl procps)" >&2; exit 2; }
done
work=$(mktemp -d)
registry_pid= pid= nginx_pid=
trap '[[ -n $pid ]] && kill $pid 2>/dev/null; [[ -n $nginx_pid ]] && kill $nginx_pid 2>/dev/null; [[ -n $registry_pid ]] && kill $registry_pid 2>/dev/null; rm -rf "$work"' EXIT
origin=5391 proxy=5392 nginx_port=5393
source "$here/origin.sh"
head -c 4096 /dev/urandom > "$work/blob"; blob=$(push "$work/blob")
cat > "$work/proxy.yml" <<EOT
api: {hostname: "127.0.0.1", port: $proxy}
upstreams: [{host: "127.0.0.1", registry: "127.0.0.1", port: $origin, schema: "http"}]
storage: {folder: "$work/cache", fsync: false}
EOT
"$binary" --config "$work/proxy.yml" > "$work/proxy.log" 2>&1 & pid=$!
mkdir -p "$work/nginx/cache"
sed -e "s|@@DIR@@|$work/nginx|g" -e "s|@@CACHE@@|$work/nginx/cache|g" -e "s|@@PORT@@|$nginx_port|g" \
  -e "s|@@ORIGIN_PORT@@|$origin|g" "$here/../../shared/bench/conf/nginx-cache.conf" > "$work/nginx/nginx.conf"
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" > "$work/nginx.log" 2>&1 & nginx_pid=$!
for port in $proxy $nginx_port; do
  for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/v2/ab/blobs/$blob" && break; sleep 0.1; done
  curl -s -o /dev/null "http://127.0.0.1:$port/v2/ab/blobs/$blob"   # a hit from now on
done
# Summed over every thread of the given processes: ns run, ns waited, slices.
sched() {
  local run=0 wait=0 slices=0 task a b c
  for p in "$@"; do
    for task in /proc/"$p"/task/*; do
      read -r a b c < "$task/schedstat" || continue
      run=$((run + a)) wait=$((wait + b)) slices=$((slices + c))
    done
  done
  echo "$run $wait $slices"
}
measure() { # name url pids...
  local name=$1 url=$2 out r0 w0 s0 r1 w1 s1; shift 2
  read -r r0 w0 s0 < <(sched "$@")
  out=$(wrk -t2 -c64 -d4s --latency "$url")
  read -r r1 w1 s1 < <(sched "$@")
  awk -v n="$name" -v r=$((r1 - r0)) -v w=$((w1 - w0)) -v s=$((s1 - s0)) \
    '/ 50%/{m=$2} / 99%/{p=$2} /Requests\/sec/{q=$2}
     END{printf "%-6s req/s %6.0f  p50 %-9s p99 %-8s  threads ran %.2f s, waited runnable %.2f s, %d slices, %.0f µs wait per slice\n", n, q, m, p, r/1e9, w/1e9, s, w/s/1000}' <<<"$out"
}
for _ in $(seq "${ROUNDS:-4}"); do
  measure nginx "http://127.0.0.1:$nginx_port/v2/ab/blobs/$blob" $nginx_pid $(pgrep -P $nginx_pid)
  measure proxy "http://127.0.0.1:$proxy/v2/ab/blobs/$blob" $pid
done
