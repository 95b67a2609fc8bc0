#!/usr/bin/env bash
# A/B of the cold fill: each binary in turn fetches FILLS uncached 64 MiB
# blobs one after another (fetch, verify, store, serve to one curl), ROUNDS
# rounds alternating the binaries, against a local distribution registry as
# origin. Prints the proxy's CPU seconds per GB filled (/proc ticks) and the
# peak RSS of each round. Steadier than the harness's cold row, which is one
# fill of a few clock ticks; compare binaries within one run only.
# The word `nginx` in place of a binary runs nginx with the shared
# harness's nginx-cache configuration (../shared/bench/conf), its master
# and workers counted together, so the two systems alternate in one run.
#   FILLS=4 ROUNDS=3 benchmarks/cold_ab.sh .build/release/cache-proxy /path/to/other/cache-proxy
#   FILLS=4 ROUNDS=3 benchmarks/cold_ab.sh .build/release/cache-proxy nginx
# The word `floor` runs benchmarks/fill-floor (built here): the least a
# SwiftNIO server does for the same fill, on one event loop, reads of up to
# 1 MiB, SHA-256 and 1 MiB writes on the loop, `sendfile` to the client;
# FLOOR_HASH=0, FLOOR_READ_KIB, FLOOR_LOWAT_KIB vary it (see its main.swift).
# HASH=1: the client pipes each body through sha256sum and checks it (a
# client that hashes what it reads, as containerd and the harness do).
# FSYNC=false: the proxy does not fsync its files (`storage.fsync`), as
# nginx never does; by default it does, and its CPU includes the fsync's
# write-back, which nginx's leaves to the kernel's flusher.
# nginx's VmHWM is summed over its processes, shared pages counted in each.
# `busy` is the whole machine's CPU over the fills (every process: the
# origin, curl and sha256sum too), in cores: near the core count, the fill
# is bound by CPU, and its wall time moves with the sum of everyone's CPU.
set -euo pipefail
(($# >= 1)) || { echo "usage: $0 BINARY [BINARY...]" >&2; exit 2; }
tools=(docker-registry curl sha256sum)
here=$(cd "$(dirname "$0")" && pwd)
for binary in "$@"; do
  [[ $binary == nginx ]] && tools+=(nginx pgrep)
  if [[ $binary == floor ]]; then
    (cd "$here/fill-floor" && swift build -c release > /dev/null) || { echo "$0: fill-floor does not build" >&2; exit 2; }
  fi
done
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is missing (apt-get install docker-registry curl nginx procps)" >&2; exit 2; }
done
fills=${FILLS:-4} rounds=${ROUNDS:-3}
work=$(mktemp -d)
registry_pid= pid=
trap '[[ -n $pid ]] && kill $pid 2>/dev/null; [[ -n $registry_pid ]] && kill $registry_pid 2>/dev/null; rm -rf "$work"' EXIT
origin=5341 proxy=5342
source "$here/origin.sh"
# The same blobs for every binary: each starts on an empty cache folder.
blobs=()
for _ in $(seq "$fills"); do head -c $((64 << 20)) /dev/urandom > "$work/m"; blobs+=("$(push "$work/m")"); done
rm -f "$work/m"
for d in "${blobs[@]}"; do curl -s -o /dev/null "http://127.0.0.1:$origin/v2/ab/blobs/$d"; done  # the origin's page cache
cat > "$work/proxy.yml" <<EOT
api: {hostname: "127.0.0.1", port: $proxy}
upstreams: [{host: "127.0.0.1:$proxy", registry: "127.0.0.1", port: $origin, schema: "http"}]
storage: {folder: "$work/cache", fsync: ${FSYNC:-true}, io_backend: ${BACKEND:-auto}}
EOT
nginx_conf=$here/../../shared/bench/conf/nginx-cache.conf
# The sum of what AWK prints from /proc/PID/FILE over a process and its
# children (nginx's workers). A child gone between the listing and the read
# counts 0 (its ticks went to the master's cutime, which is not read).
tree_sum() {
  local total=0 p
  for p in $1 $(pgrep -P "$1" || true); do total=$((total + $(awk "$3" /proc/$p/$2 2>/dev/null || echo 0))); done
  echo $total
}
ticks() { tree_sum "$1" stat '{print $14+$15}'; }
user_ticks() { tree_sum "$1" stat '{print $14}'; }
faults() { tree_sum "$1" stat '{print $10}'; }
# Context switches over every thread of a process and its children.
switches() {
  local total=0 p
  for p in $1 $(pgrep -P "$1" || true); do
    total=$((total + $(cat /proc/$p/task/*/status 2>/dev/null | awk '/ctxt_switches/{n += $2} END{print n + 0}')))
  done
  echo $total
}
# Busy ticks of the whole machine (user, nice, system, irq, softirq, steal).
machine_busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }
for round in $(seq "$rounds"); do
  for binary in "$@"; do
    rm -rf "$work/cache" "$work/nginx"
    if [[ $binary == nginx ]]; then
      [[ -r $nginx_conf ]] || { echo "$0: $nginx_conf is missing" >&2; exit 2; }
      mkdir -p "$work/nginx/cache"
      sed -e "s|@@DIR@@|$work/nginx|g" -e "s|@@CACHE@@|$work/nginx/cache|g" \
          -e "s|@@PORT@@|$proxy|g" -e "s|@@ORIGIN_PORT@@|$origin|g" "$nginx_conf" > "$work/nginx/nginx.conf"
      nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" > "$work/proxy.log" 2>&1 & pid=$!
    elif [[ $binary == floor ]]; then
      mkdir -p "$work/cache"
      "$here/fill-floor/.build/release/fill-floor" $proxy $origin "$work/cache" > "$work/proxy.log" 2>&1 & pid=$!
    else
      "$binary" --config "$work/proxy.yml" > "$work/proxy.log" 2>&1 & pid=$!
    fi
    up=
    # Up: the process started here is alive and the port answers (a
    # leftover server on the port would answer too, hence both).
    for _ in $(seq 50); do
      kill -0 $pid 2>/dev/null || break
      curl -s -o /dev/null "http://127.0.0.1:$proxy/v2/" && up=1 && break
      sleep 0.1
    done
    [[ -n $up ]] || { echo "$binary: did not start (log: $work/proxy.log)" >&2; cat "$work/proxy.log" >&2; exit 1; }
    t0=$(ticks $pid) u0=$(user_ticks $pid) c0=$(switches $pid) f0=$(faults $pid) o0=$(ticks $registry_pid) m0=$(machine_busy) s0=$(date +%s.%N)
    for d in "${blobs[@]}"; do
      if [[ -n ${HASH:-} ]]; then
        # A client that hashes what it reads (as containerd and the
        # harness do), slower than one writing to /dev/null.
        got=$( (curl -sf --max-time 60 "http://127.0.0.1:$proxy/v2/ab/blobs/$d" || echo "curl failed: $?" >&2) | sha256sum | cut -d' ' -f1)
        [[ sha256:$got == "$d" ]] || { echo "$binary: $d came as sha256:$got" >&2; exit 1; }
      else
        code=$(curl -s --max-time 60 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$proxy/v2/ab/blobs/$d") || code=000
        [[ $code == 200 ]] || { echo "$binary: $d answered $code" >&2; exit 1; }
      fi
    done
    s1=$(date +%s.%N) m1=$(machine_busy)
    sleep 1  # a fill may still be syncing and publishing (idle costs nothing)
    t1=$(ticks $pid) u1=$(user_ticks $pid) c1=$(switches $pid) f1=$(faults $pid) o1=$(ticks $registry_pid)
    hwm=$(tree_sum $pid status '/VmHWM/{print $2}')
    kill $pid; wait $pid 2>/dev/null || true; pid=
    awk -v r="$round" -v b="$binary" -v t=$((t1 - t0)) -v u=$((u1 - u0)) -v c=$((c1 - c0)) -v f=$((f1 - f0)) -v o=$((o1 - o0)) -v hz="$(getconf CLK_TCK)" -v n="$fills" -v s0="$s0" -v s1="$s1" -v h="$hwm" -v m=$((m1 - m0)) \
      'BEGIN{gb = n*67.108864e-3; printf "round %d  %-28s CPU %.2f s/GB (user %.2f)  switches %5d  faults %6d /fill  origin %.2f  wall %.3f s/fill  busy %.2f cores  VmHWM %.1f MB\n", r, b, t/hz/gb, u/hz/gb, c/n, f/n, o/hz/gb, (s1-s0)/n, m/hz/(s1-s0), h/1024}'
  done
done
