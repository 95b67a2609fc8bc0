#!/usr/bin/env bash
# Instructions per request, counted by callgrind: a figure this shared VM's
# noise does not move (it has no hardware counters for `perf stat`). The
# release binary runs under valgrind (a copy without its DWARF, which
# valgrind 3.19 cannot read; the symbols stay), request logs at info,
# access checks on, against a local distribution registry as origin. Per
# path, after a warm-up, the counters are zeroed, REQUESTS requests go one
# after another on one kept-alive connection, and the dump's total is
# divided by them: every thread of the process is counted, the event loops'
# waits and the kernel's work are not (callgrind counts user space only).
#   benchmarks/callgrind.sh [BINARY...]       (REQUESTS=2000)
# KEEP=FOLDER keeps each dump there (FOLDER/N.PATH.out, N the binary's
# place) for `callgrind_annotate --inclusive=yes FILE`.
# Paths: hit4k (a cached 4 KiB blob, from memory), digest (a cached
# manifest by digest), manifest (a pull by tag: the upstream HEAD, the
# body from memory); PATHS="big" (or "hit4k big", ...) also counts a cached
# 64 MiB blob sent with `sendfile` (16 requests; the figure is per MiB: the
# per-region work of a large hit, where /proc's ticks are too coarse).
set -euo pipefail
binaries=("$@"); ((${#binaries[@]})) || binaries=(.build/release/cache-proxy)
for tool in docker-registry valgrind callgrind_control curl python3 objcopy sha256sum; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is missing (apt-get install docker-registry valgrind curl python3 binutils)" >&2; exit 2; }
done
requests=${REQUESTS:-2000}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
registry_pid= pid=
trap '[[ -n $pid ]] && kill $pid 2>/dev/null; [[ -n $registry_pid ]] && kill $registry_pid 2>/dev/null; rm -rf "$work"' EXIT
origin=5381 proxy=5382
source "$here/origin.sh"
head -c 4096 /dev/urandom > "$work/blob"; blob=$(push "$work/blob")
push_image "$blob"
paths=${PATHS:-hit4k digest manifest}
if [[ " $paths " == *" big "* ]]; then head -c $((64 << 20)) /dev/urandom > "$work/big"; big=$(push "$work/big"); rm -f "$work/big"; fi
cat > "$work/proxy.yml" <<EOT
api: {hostname: "127.0.0.1", port: $proxy}
upstreams: [{host: "127.0.0.1:$proxy", registry: "127.0.0.1", port: $origin, schema: "http"}]
storage: {folder: "$work/cache", io_backend: threadpool}
EOT
# N GETs of PATH on one kept-alive connection; fails on any answer but 200.
cat > "$work/client.py" <<'EOT'
import http.client, sys
port, path, count, accept = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for _ in range(count):
    connection.request("GET", path, headers={"Accept": accept})
    answer = connection.getresponse()
    answer.read()
    if answer.status != 200:
        sys.exit(f"GET {path}: {answer.status}")
EOT
index=0
for binary in "${binaries[@]}"; do
  index=$((index + 1))
  rm -rf "$work/cache"
  # valgrind 3.19 cannot read the DWARF 5 of a Swift 6 build; the symbol
  # table is enough for counting.
  objcopy --strip-debug "$binary" "$work/proxy-bin"
  valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p" "$work/proxy-bin" --config "$work/proxy.yml" \
    > "$work/proxy.log" 2>&1 & pid=$!
  for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$proxy/healthz" && break; sleep 0.2; done
  for path in $paths; do
    count=$requests unit=request per=1
    case $path in
      hit4k) target=/v2/ab/blobs/$blob ;;
      digest) target=/v2/ab/manifests/$mdigest ;;
      manifest) target=/v2/ab/manifests/latest ;;
      big) target=/v2/ab/blobs/$big count=16 unit=MiB per=64 ;;
      *) echo "$0: unknown path $path" >&2; exit 2 ;;
    esac
    # warm: filled, in memory, access known
    python3 "$work/client.py" $proxy "$target" $(( count < 50 ? 2 : 50 )) "$mtype"
    callgrind_control -z $pid > /dev/null 2>&1
    python3 "$work/client.py" $proxy "$target" "$count" "$mtype"
    rm -f "$work"/cg.$pid.*
    callgrind_control -d $pid > /dev/null 2>&1
    sleep 1
    dump=$(ls -t "$work"/cg.$pid.* | head -1)
    [[ -n ${KEEP:-} ]] && mkdir -p "$KEEP" && cp "$dump" "$KEEP/$index.$path.out"
    total=$(awk '/^(summary|totals):/{print $2; exit}' "$dump")
    printf '%-40s %-9s %8.0f instructions per %s\n' "$binary" "$path" "$(awk -v t="$total" -v n=$((count * per)) 'BEGIN{print t/n}')" "$unit"
  done
  kill $pid; wait $pid 2>/dev/null || true; pid=
done
