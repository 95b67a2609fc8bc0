#!/usr/bin/env bash
# Where the CPU goes, per path: perf samples (cpu-clock, call graphs) of the
# release binary while wrk drives one scenario, against a local distribution
# registry as origin. Log level is the default (info), access checks and
# manifest revalidation on: the configuration users run.
#   benchmarks/profile.sh hit4k|manifest|digest|big|miss [BINARY]     (root: perf needs it here)
# big: a cached 512 MiB blob to one connection (wrk -c1), CPU per GB.
# miss: eight uncached 64 MiB blobs fetched one after another (fill, verify,
# store, serve), CPU per GB.
# Prints the top symbols by self time and the CPU per request from /proc.
# EVENT and FREQ set perf's event and rate (cpu-clock at 2000 Hz):
# EVENT=cpu-clock:u FREQ=20000 samples the proxy's user space alone.
# ALLOCS=1: instead of sampling, counts glibc malloc calls through a uprobe
# (perf probe, set up here) and prints allocations per request: a figure
# this shared VM's noise does not move (the machine has no hardware
# counters, and callgrind dies on the Swift runtime). ALLOCS=1 KEEP=FILE:
# records each allocation's call graph into FILE instead.
set -euo pipefail
scenario=${1:?usage: $0 hit4k|manifest|digest|big|miss [BINARY]}
binary=${2:-.build/release/cache-proxy}
seconds=${SECONDS_PER_RUN:-6}
for tool in docker-registry wrk curl sha256sum perf; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is missing (apt-get install docker-registry wrk curl linux-perf)" >&2; exit 2; }
done
work=$(mktemp -d)
registry_pid= pid=
trap '[[ -n $pid ]] && kill $pid 2>/dev/null; [[ -n $registry_pid ]] && kill $registry_pid 2>/dev/null; rm -rf "$work"' EXIT
origin=5321 proxy=5322
source "$(dirname "$0")/origin.sh"
head -c 4096 /dev/urandom > "$work/blob"; blob=$(push "$work/blob")
if [[ $scenario == big ]]; then head -c $((512 << 20)) /dev/urandom > "$work/big"; big=$(push "$work/big"); rm -f "$work/big"; fi
misses=()
if [[ $scenario == miss ]]; then
  for i in 1 2 3 4 5 6 7 8; do head -c $((64 << 20)) /dev/urandom > "$work/m"; misses+=("$(push "$work/m")"); done
  rm -f "$work/m"
fi
push_image "$blob"
cat > "$work/proxy.yml" <<EOT
api: {hostname: "127.0.0.1", port: $proxy}
upstreams: [{host: "127.0.0.1:$proxy", registry: "127.0.0.1", port: $origin, schema: "http"}]
storage: {folder: "$work/cache"}
EOT
case $scenario in
  hit4k) url="http://127.0.0.1:$proxy/v2/ab/blobs/$blob"; conns=64 ;;
  manifest) url="http://127.0.0.1:$proxy/v2/ab/manifests/latest"; conns=16 ;;
  digest) url="http://127.0.0.1:$proxy/v2/ab/manifests/$mdigest"; conns=64 ;;
  big) url="http://127.0.0.1:$proxy/v2/ab/blobs/$big"; conns=${CONNS:-1} ;;
  miss) url="http://127.0.0.1:$proxy/v2/ab/blobs/$blob"; conns=1 ;;
  *) echo "$0: unknown scenario $scenario" >&2; exit 2 ;;
esac
"$binary" --config "$work/proxy.yml" > "$work/proxy.log" 2>&1 & pid=$!
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$proxy/healthz" && break; sleep 0.1; done
for _ in 1 2; do curl -s -o /dev/null -H "Accept: $mtype" "$url"; done
ticks() { awk '{print $14+$15}' /proc/$pid/stat; }
t0=$(ticks)
if [[ -n ${ALLOCS:-} ]]; then
  libc=$(ldd "$binary" | awk '/libc\.so/{print $3}')
  perf probe -l 2>/dev/null | grep -c 'probe_libc:malloc' > /dev/null || perf probe -q -x "$libc" malloc
  if [[ -n ${KEEP:-} ]]; then
    # With KEEP: where each allocation comes from (call graphs of the probe).
    perf record -q -e probe_libc:malloc -g -p "$pid" -o "$KEEP" -- sleep "$seconds" > /dev/null 2>&1 &
  else
    perf stat -e probe_libc:malloc -x, -o "$work/stat.txt" -p "$pid" -- sleep "$seconds" &
  fi
else
  perf record -q -e ${EVENT:-cpu-clock} -F ${FREQ:-2000} -g -p "$pid" -o "$work/perf.data" -- sleep "$seconds" > /dev/null 2>&1 &
fi
perf_pid=$!
if [[ $scenario == miss ]]; then
  for d in "${misses[@]}"; do curl -s -o /dev/null "http://127.0.0.1:$proxy/v2/ab/blobs/$d"; done
  out="${#misses[@]} requests in 0s, $(( ${#misses[@]} * 64 ))MB read"
  kill -INT $perf_pid 2>/dev/null || true
else
  out=$(wrk -t$(( conns < 2 ? 1 : 2 )) -c$conns -d${seconds}s -H "Accept: $mtype" "$url")
fi
wait $perf_pid || true
t1=$(ticks)
requests=$(awk '/requests in/{print $1}' <<<"$out")
bytes=$(awk '/requests in/{v=$5; sub(/,$/,"",v); m=1; if (v ~ /GB$/) m=1e9; else if (v ~ /MB$/) m=1e6; else if (v ~ /KB$/) m=1e3; sub(/[A-Z]+$/,"",v); print v*m}' <<<"$out")
echo "$scenario: $(awk -v t=$((t1 - t0)) -v b="$bytes" 'BEGIN{printf "%.3f", t/100/(b/1e9)}') CPU s per GB served"
echo "$scenario: $requests requests, $(awk -v t=$((t1 - t0)) -v r="$requests" 'BEGIN{printf "%.1f", t*10000/r}') µs CPU per request (proxy, /proc ticks, perf attached)"
if [[ -n ${ALLOCS:-} ]]; then
  if [[ -n ${KEEP:-} ]]; then
    echo "allocations (malloc) per request: $(perf report -i "$KEEP" --stdio 2>/dev/null | awk -v r="$requests" '/^# Event count/{printf "%.1f", $5/r}') (call graphs in $KEEP)"
  else
    awk -F, -v r="$requests" '/malloc/{printf "allocations (malloc) per request: %.1f\n", $1/r}' "$work/stat.txt"
  fi
  exit 0
fi
# Kept before the reports: a `head` that closes a pipe early ends the script (pipefail).
if [[ -n ${KEEP:-} ]]; then cp "$work/perf.data" "$KEEP"; fi
perf report -i "$work/perf.data" --no-children --sort comm,dso -g none --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -12
perf report -i "$work/perf.data" --no-children --sort symbol --percent-limit 0.7 --stdio 2>/dev/null \
  | grep -E '^ +[0-9]' | head -${TOP:-45}
if [[ -n ${CALLERS:-} ]]; then
  perf report -i "$work/perf.data" --children --sort symbol --percent-limit 2 --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' | head -60
fi
