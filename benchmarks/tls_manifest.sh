#!/usr/bin/env bash
# Manifest by tag through the proxy from a registry serving TLS (a CA and a
# certificate made on the spot with openssl, the proxy trusting it by
# `ca_file`): the proxy's CPU µs per request under `wrk -t2 -c16 -d5s`, two
# runs per binary, each on a fresh cache. The shared harness's origin is
# plaintext; Docker Hub, Quay and most private registries are not.
# Needs docker-registry, openssl, wrk, curl.
#   benchmarks/tls_manifest.sh BINARY [BINARY ...]     (absolute paths)
set -euo pipefail
(($# >= 1)) || set -- "$(pwd)/.build/release/cache-proxy"
work=$(mktemp -d); registry_pid= pid=
trap '[[ -n $pid ]] && kill $pid 2>/dev/null; [[ -n $registry_pid ]] && kill $registry_pid 2>/dev/null; rm -rf "$work"' EXIT
cd "$work"
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=testca 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj /CN=127.0.0.1 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > ext
openssl x509 -req -in srv.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out srv.crt -days 2 -extfile ext 2>/dev/null
origin=5351 proxy=5352
cat > registry.yml <<EOT
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/data}}
http: {addr: "127.0.0.1:$origin", secret: ab, tls: {certificate: $work/srv.crt, key: $work/srv.key}}
EOT
docker-registry serve registry.yml > registry.log 2>&1 & registry_pid=$!
for _ in $(seq 50); do curl -s --cacert ca.crt -o /dev/null "https://127.0.0.1:$origin/v2/" && break; sleep 0.1; done
push() {
  local d loc
  d=sha256:$(sha256sum "$1" | cut -d' ' -f1)
  loc=$(curl -si --cacert ca.crt -X POST "https://127.0.0.1:$origin/v2/ab/blobs/uploads/" | tr -d '\r' | awk 'tolower($1)=="location:"{print $2}')
  curl -s --cacert ca.crt -o /dev/null -X PUT -H "Content-Type: application/octet-stream" -T "$1" "$loc&digest=$d"
  echo "$d"
}
head -c 4096 /dev/urandom > blob; blob=$(push blob)
echo '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' > config; config=$(push config)
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"%s","size":4096}]}' "$config" "$(stat -c %s config)" "$blob" > manifest
mtype=application/vnd.oci.image.manifest.v1+json
curl -s --cacert ca.crt -o /dev/null -X PUT -H "Content-Type: $mtype" --data-binary @manifest "https://127.0.0.1:$origin/v2/ab/manifests/latest"
cat > proxy.yml <<EOT
api: {hostname: "127.0.0.1", port: $proxy}
upstreams: [{host: "127.0.0.1:$proxy", registry: "127.0.0.1", port: $origin, schema: "https", ca_file: "$work/ca.crt"}]
storage: {folder: "$work/cache"}
EOT
url="http://127.0.0.1:$proxy/v2/ab/manifests/latest"
for binary in "$@"; do
  for run in 1 2; do
    rm -rf cache; "$binary" --config proxy.yml > proxy.log 2>&1 & pid=$!
    for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$proxy/healthz" && break; sleep 0.1; done
    for _ in 1 2; do curl -s -o /dev/null -H "Accept: $mtype" "$url"; done
    t0=$(awk '{print $14+$15}' /proc/$pid/stat)
    out=$(wrk -t2 -c16 -d5s -H "Accept: $mtype" "$url")
    t1=$(awk '{print $14+$15}' /proc/$pid/stat)
    requests=$(awk '/requests in/{print $1}' <<<"$out"); non2xx=$(awk '/Non-2xx/{print $NF}' <<<"$out")
    echo "$binary: $requests requests ${non2xx:+($non2xx non-2xx) }$(awk -v t=$((t1 - t0)) -v r="$requests" 'BEGIN{printf "%.1f", t*10000/r}') µs CPU per request"
    kill $pid; wait $pid 2>/dev/null || true; pid=
  done
done
