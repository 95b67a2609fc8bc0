# Sourced by the benchmark scripts: a local distribution registry as the
# origin, in "$work" on port "$origin" (both set by the caller), and `push
# FILE`, which uploads FILE as a blob of repository ab and prints its digest.
# The caller's EXIT trap kills "$registry_pid".
cat > "$work/registry.yml" <<EOT
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/data}}
http: {addr: "127.0.0.1:$origin", secret: ab}
EOT
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 & registry_pid=$!
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$origin/v2/" && break; sleep 0.1; done

push() {
  local d loc
  d=sha256:$(sha256sum "$1" | cut -d' ' -f1)
  loc=$(curl -si -X POST "http://127.0.0.1:$origin/v2/ab/blobs/uploads/" | tr -d '\r' | awk 'tolower($1)=="location:"{print $2}')
  curl -s -o /dev/null -X PUT -H "Content-Type: application/octet-stream" -T "$1" "$loc&digest=$d"
  echo "$d"
}
