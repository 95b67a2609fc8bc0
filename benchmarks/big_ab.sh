#!/usr/bin/env bash
# A large cached blob, the proxy against nginx sending THE SAME FILE: the
# proxy's cache file is hard-linked into an nginx `sendfile` root
# (../shared/bench/conf/nginx-static.conf), so both serve the same page-cache
# pages to the same wrk, turn about. Prints, per run, MB/s, the server's CPU
# seconds per GB, wrk's, and their sum, plus the bytes the proxy read on the
# thread pool (a region not in the page cache). On loopback the kernel's
# receive work lands on whichever side runs when a packet arrives, so the
# server's figure alone does not rank two servers; the sum does.
# Needs docker-registry, nginx, wrk, curl, python3 (root for nginx's user).
# FLOOR=1 also runs benchmarks/fill-floor (built here) with FLOOR_SERVE on
# the same file: the least a SwiftNIO server does for it (4 MiB regions
# queued at once, two event loops). THREADS sets wrk's threads (default 1;
# the shared harness runs its eight connections with 2).
#   benchmarks/big_ab.sh [BINARY]     CONNS=1 RUNS=3 SECONDS_PER_RUN=4 MIB=512 FLOOR= THREADS=1
set -euo pipefail
binary=${1:-.build/release/cache-proxy}
conns=${CONNS:-1} runs=${RUNS:-3} seconds=${SECONDS_PER_RUN:-4} mib=${MIB:-512}
here=$(cd "$(dirname "$0")" && pwd)
for tool in docker-registry nginx wrk curl sha256sum python3; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is missing" >&2; exit 2; }
done
work=$(mktemp -d)
registry_pid= pid= nginx_pid= floor_pid=
trap '[[ -n $pid ]] && kill $pid 2>/dev/null; [[ -n $nginx_pid ]] && kill $nginx_pid 2>/dev/null; [[ -n $floor_pid ]] && kill $floor_pid 2>/dev/null; [[ -n $registry_pid ]] && kill $registry_pid 2>/dev/null; rm -rf "$work"' EXIT
if [[ -n ${FLOOR:-} ]]; then
  (cd "$here/fill-floor" && swift build -c release > /dev/null) || { echo "$0: fill-floor does not build" >&2; exit 2; }
fi
origin=5341 proxy=5342 nginx_port=5343
source "$here/origin.sh"
head -c $((mib << 20)) /dev/urandom > "$work/big"; big=$(push "$work/big"); rm -f "$work/big"
cat > "$work/proxy.yml" <<EOT
api: {hostname: "127.0.0.1", port: $proxy}
upstreams: [{host: "127.0.0.1:$proxy", registry: "127.0.0.1", port: $origin, schema: "http"}]
storage: {folder: "$work/cache"}
EOT
"$binary" --config "$work/proxy.yml" > "$work/proxy.log" 2>&1 & pid=$!
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$proxy/healthz" && break; sleep 0.1; done
proxy_url="http://127.0.0.1:$proxy/v2/ab/blobs/$big"
curl -s -o /dev/null "$proxy_url"; sync
# The client can have its last byte before the fill renames the file into
# place: wait for it (at most 5 s).
file=
for _ in $(seq 50); do
  file=$(find "$work/cache/blobs" -type f -size +$((mib - 1))M 2>/dev/null | head -1)
  [[ -n $file ]] && break
  sleep 0.1
done
[[ -n $file ]] || { echo "$0: the proxy did not publish the blob (log: $work/proxy.log)" >&2; cat "$work/proxy.log" >&2; exit 1; }
mkdir -p "$work/root/v2/ab/blobs" "$work/nginx"; ln "$file" "$work/root/v2/ab/blobs/$big"
sed -e "s|@@DIR@@|$work/nginx|g" -e "s|@@PORT@@|$nginx_port|g" -e "s|@@DATA@@|$work/root|g" \
  "$here/../../shared/bench/conf/nginx-static.conf" > "$work/nginx.conf"
nginx -c "$work/nginx.conf" -p "$work/nginx" > /dev/null 2>&1 & nginx_pid=$!
nginx_url="http://127.0.0.1:$nginx_port/v2/ab/blobs/$big"
for _ in $(seq 50); do curl -s -o /dev/null "$nginx_url" && break; sleep 0.1; done
if [[ -n ${FLOOR:-} ]]; then
  FLOOR_SERVE=$file "$here/fill-floor/.build/release/fill-floor" 5344 0 "$work" > "$work/floor.log" 2>&1 & floor_pid=$!
  floor_url="http://127.0.0.1:5344/v2/ab/blobs/$big"
  for _ in $(seq 50); do curl -s -o /dev/null "$floor_url" && break; sleep 0.1; done
fi

ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo "$t"; }
# User-space ticks alone: the server's own code, which loopback's receive
# work (kernel time, landing on whoever runs) does not blur.
uticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14}' "/proc/$p/stat"))); done; echo "$t"; }
cold() { curl -s "http://127.0.0.1:$proxy/metrics" | awk '/^cacheproxy_cold_read_bytes_total/{print $2}'; }
# wrk's own CPU from its rusage; prints "bytes/s client-cpu-seconds".
drive() {
  python3 - "$1" <<'EOT'
import resource, re, subprocess, sys, os
out = subprocess.run(["wrk", "-t" + os.environ.get("THREADS", "1"), "-c" + os.environ["CONNS_"], "-d" + os.environ["SECS_"] + "s", sys.argv[1]],
                     capture_output=True, text=True).stdout
m = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]B)", out)
rate = float(m.group(1)) * {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[m.group(2)]
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(rate, r.ru_utime + r.ru_stime)
EOT
}
export CONNS_=$conns SECS_=$seconds
measure() { # name url pids...
  local name=$1 url=$2; shift 2
  local t0 t1 u0 u1 rate client cold0
  cold0=$(cold); t0=$(ticks "$@"); u0=$(uticks "$@"); read -r rate client < <(drive "$url"); t1=$(ticks "$@"); u1=$(uticks "$@")
  awk -v n="$name" -v r="$rate" -v s="$seconds" -v d=$((t1 - t0)) -v u=$((u1 - u0)) -v c="$client" -v cb=$(( $(cold) - cold0 )) -v k="$conns" \
    'BEGIN { gb = r * s / 1e9; printf "%-6s c%s %6.0f MB/s  server %.3f (user %.4f)  wrk %.3f  sum %.3f CPU s/GB  (pool reads %d MiB)\n", n, k, r / 1e6, d / 100 / gb, u / 100 / gb, c / gb, (d / 100 + c) / gb, cb / 1048576 }'
}
for _ in $(seq "$runs"); do
  measure nginx "$nginx_url" $nginx_pid $(pgrep -P $nginx_pid)
  measure proxy "$proxy_url" $pid
  if [[ -n ${FLOOR:-} ]]; then measure floor "$floor_url" $floor_pid; fi
done
