# Sourced by the benchmark scripts: a local distribution registry as the
# origin, in "$work" on port "$origin" (both set by the caller), and `push
# FILE`, which uploads FILE as a blob of repository ab and prints its digest
# (and `push_image`, below: an image whose layer is such a blob).
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

# `push_image BLOB_DIGEST`: a config and an OCI image manifest whose one
# layer is BLOB_DIGEST (4 KiB), pushed as ab:latest. Sets `mtype` (the
# manifest's media type) and `mdigest` (its digest); leaves the manifest in
# "$work/manifest".
push_image() {
  local config
  echo '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' > "$work/config"
  config=$(push "$work/config")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"%s","size":4096}]}' \
    "$config" "$(stat -c %s "$work/config")" "$1" > "$work/manifest"
  mtype=application/vnd.oci.image.manifest.v1+json
  curl -s -o /dev/null -X PUT -H "Content-Type: $mtype" --data-binary @"$work/manifest" "http://127.0.0.1:$origin/v2/ab/manifests/latest"
  mdigest=sha256:$(sha256sum "$work/manifest" | cut -d' ' -f1)
}
