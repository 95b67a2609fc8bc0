#!/usr/bin/env bash
# Where the floor of a manifest pull by tag lies on this machine: the CPU per
# request of nginx relaying the GET (the harness's nginx-cache set-up: a
# kept-alive upstream, access log off), of `nio-floor` (the least a SwiftNIO
# server can do for it: one upstream HEAD on a kept-alive connection of the
# same loop, a fixed answer, no parsing; benchmarks/nio-floor), and of the
# proxy, one after another against the same local distribution registry,
# with the harness's load (wrk -t2 -c16, Accept of an OCI manifest).
#   benchmarks/manifest_floor.sh [BINARY] [ROUNDS]
# CPU: the server's processes' utime+stime from /proc over the wrk run (and
# the user part); context switches of all its threads; the origin's CPU per
# request (a `HEAD` may cost the registry more or less than a `GET`).
set -euo pipefail
binary=${1:-.build/release/cache-proxy}
rounds=${2:-3}
seconds=${SECONDS_PER_RUN:-5}
for tool in docker-registry wrk curl sha256sum nginx; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is missing (apt-get install docker-registry wrk curl nginx)" >&2; exit 2; }
done
here=$(cd "$(dirname "$0")" && pwd)
(cd "$here/nio-floor" && swift build -c release > /dev/null) || { echo "$0: nio-floor does not build" >&2; exit 2; }
floor_bin=$here/nio-floor/.build/release/nio-floor
work=$(mktemp -d)
registry_pid= pid=
trap '[[ -n $pid ]] && kill $pid 2>/dev/null; [[ -n $registry_pid ]] && kill $registry_pid 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
origin=5331 port=5332
source "$here/origin.sh"
head -c 4096 /dev/urandom > "$work/blob"; blob=$(push "$work/blob")
push_image "$blob"
mkdir -p "$work/nginx"
cat > "$work/nginx.conf" <<EOT
daemon off; master_process on; worker_processes auto; pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn; user root;
events { worker_connections 8192; multi_accept on; }
http {
  access_log off; client_body_temp_path $work/nginx/cb; proxy_temp_path $work/nginx/pt;
  fastcgi_temp_path $work/nginx/ft; uwsgi_temp_path $work/nginx/ut; scgi_temp_path $work/nginx/st;
  tcp_nodelay on; keepalive_timeout 65s; keepalive_requests 100000;
  upstream origin { server 127.0.0.1:$origin; keepalive 64; keepalive_requests 100000; keepalive_timeout 60s; }
  server {
    listen 127.0.0.1:$port reuseport backlog=4096;
    proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host \$http_host;
    location / { proxy_pass http://origin; }
  }
}
EOT
cat > "$work/proxy.yml" <<EOT
api: {hostname: "127.0.0.1", port: $port}
upstreams: [{host: "127.0.0.1:$port", registry: "127.0.0.1", port: $origin, schema: "http"}]
storage: {folder: "$work/cache"}
EOT
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat 2>/dev/null || echo 0))); done; echo $t; }
user_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14}' /proc/$p/stat 2>/dev/null || echo 0))); done; echo $t; }
# Context switches of every thread (a loop that sleeps in epoll_wait and is
# woken pays one each time): voluntary plus involuntary.
switches() { local p; for p in "$@"; do cat /proc/$p/task/*/status 2>/dev/null; done | awk '/ctxt_switches/{s+=$2} END{print s+0}'; }
run() {  # name command...
  local name=$1; shift
  "$@" > "$work/$name.log" 2>&1 & pid=$!
  for _ in $(seq 50); do curl -s -o /dev/null -H "Accept: $mtype" "http://127.0.0.1:$port/v2/ab/manifests/latest" && break; sleep 0.1; done
  local body; body=$(curl -s -H "Accept: $mtype" "http://127.0.0.1:$port/v2/ab/manifests/latest" | sha256sum | cut -d' ' -f1)
  [[ "sha256:$body" == "$mdigest" ]] || { echo "$name: wrong manifest body" >&2; exit 1; }
  local pids=("$pid" $(pgrep -P "$pid" || true))
  local t0; t0=$(ticks "${pids[@]}"); local c0; c0=$(switches "${pids[@]}"); local u0; u0=$(user_ticks "${pids[@]}"); local o0; o0=$(ticks "$registry_pid")
  local out; out=$(wrk -t2 -c16 -d${seconds}s -H "Accept: $mtype" "http://127.0.0.1:$port/v2/ab/manifests/latest")
  local t1; t1=$(ticks "${pids[@]}"); local c1; c1=$(switches "${pids[@]}"); local u1; u1=$(user_ticks "${pids[@]}"); local o1; o1=$(ticks "$registry_pid")
  local requests; requests=$(awk '/requests in/{print $1}' <<<"$out")
  printf '%-12s %7d requests  %6.1f µs CPU per request (%5.1f user)  %5.2f context switches per request  origin %4.0f µs\n' \
    "$name" "$requests" \
    "$(awk -v t=$((t1 - t0)) -v r="$requests" 'BEGIN{print t*10000/r}')" "$(awk -v t=$((u1 - u0)) -v r="$requests" 'BEGIN{print t*10000/r}')" \
    "$(awk -v c=$((c1 - c0)) -v r="$requests" 'BEGIN{print c/r}')" "$(awk -v t=$((o1 - o0)) -v r="$requests" 'BEGIN{print t*10000/r}')"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  sleep 0.5
}
for _ in $(seq "$rounds"); do
  run nginx nginx -c "$work/nginx.conf"
  run nio-floor "$floor_bin" "$port" "$origin" ab latest "$work/manifest" "$mtype" "$mdigest"
  run cache-proxy "$binary" --config "$work/proxy.yml"
done
