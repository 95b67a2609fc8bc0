#!/usr/bin/env python3
"""The miss path, per storage backend, against the origin straight.

    make release
    benchmarks/miss.py [--binary .build/release/cache-proxy] [--quick]

One local distribution registry (Debian's docker-registry) is the origin;
its blobs are written straight into its storage layout, so seeding costs no
upload. Each scenario runs against the origin directly and then through a
fresh cache-proxy (empty cache folder, new process) for each backend:

  cold_64m     one client, one uncached 64 MiB blob
  cold_512m    one client, one uncached 512 MiB blob
  fills_32x8m  32 clients, 32 different uncached 8 MiB blobs at once
  herd_512m    16 clients, one uncached 512 MiB blob

Clients are curl processes writing to /dev/null (so the client's own cost is
small and the same for every target). For the proxy it reports wall time,
CPU seconds per GB filled (user+system of the proxy process, from
/proc/PID/stat, per byte fetched from the origin), peak RSS (VmHWM: each
scenario gets its own process) and the ratio of wall time to the origin's
for the same scenario. The origin's page cache is warmed first, so its disk
is not what is timed.
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = "bench/miss"
HERE = os.path.dirname(os.path.abspath(__file__))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def seed(root, name, size):
    """A random blob written into distribution's storage layout."""
    rng = random.Random(f"miss/{name}")
    digest = hashlib.sha256()
    tmp = os.path.join(root, f".{name}")
    with open(tmp, "wb") as f:
        left = size
        while left:
            chunk = rng.randbytes(min(1 << 22, left))
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    hexd = digest.hexdigest()
    v2 = os.path.join(root, "docker", "registry", "v2")
    data = os.path.join(v2, "blobs", "sha256", hexd[:2], hexd)
    os.makedirs(data, exist_ok=True)
    os.replace(tmp, os.path.join(data, "data"))
    link = os.path.join(v2, "repositories", REPO, "_layers", "sha256", hexd)
    os.makedirs(link, exist_ok=True)
    with open(os.path.join(link, "link"), "w") as f:
        f.write("sha256:" + hexd)
    return {"name": name, "size": size, "digest": "sha256:" + hexd}


class Process:
    def __init__(self, argv, log):
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)

    def cpu_seconds(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def peak_rss_mb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def fetch_all(port, blobs):
    """One curl per blob, all at once; returns the wall time. Every answer
    must be 200 with the blob's size."""
    started = time.monotonic()
    procs = [subprocess.Popen(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
         f"http://127.0.0.1:{port}/v2/{REPO}/blobs/{b['digest']}"],
        stdout=subprocess.PIPE) for b in blobs]
    outputs = [p.communicate()[0].decode() for p in procs]
    wall = time.monotonic() - started
    for blob, out in zip(blobs, outputs):
        if out != f"200 {blob['size']}":
            raise RuntimeError(f"{blob['name']}: got {out!r}")
    return wall


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default=os.path.join(HERE, "..", ".build", "release", "cache-proxy"))
    parser.add_argument("--quick", action="store_true", help="smaller blobs (8/64 MiB), for a smoke run")
    parser.add_argument("--backends", default="io_uring,threadpool")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    binary = os.path.abspath(args.binary)
    big, cold, small = ((64 << 20), (8 << 20), (1 << 20)) if args.quick else ((512 << 20), (64 << 20), (8 << 20))
    work = tempfile.mkdtemp(prefix="cache-proxy-miss-")
    registry = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    origin_root = os.path.join(work, "origin")
    os.makedirs(origin_root)
    backends = args.backends.split(",")
    print(f"seeding blobs in {origin_root} ...", file=sys.stderr)
    # Each backend gets blobs of its own, so no run warms another's cache;
    # the origin serves them all from its page cache.
    sets = {}
    for target in ["origin"] + backends:
        sets[target] = {
            "cold_64m": [seed(origin_root, f"{target}-cold", cold)],
            "cold_512m": [seed(origin_root, f"{target}-big", big)],
            "fills_32x8m": [seed(origin_root, f"{target}-f{i}", small) for i in range(32)],
        }
        herd = seed(origin_root, f"{target}-herd", big)
        sets[target]["herd_512m"] = [herd] * 16

    origin_port = free_port()
    config = os.path.join(work, "registry.yml")
    with open(config, "w") as f:
        f.write(f"version: 0.1\nlog: {{level: error, accesslog: {{disabled: true}}}}\n"
                f"storage: {{filesystem: {{rootdirectory: {origin_root}}}}}\n"
                f"http: {{addr: 127.0.0.1:{origin_port}, secret: miss-bench}}\n")
    origin = Process([registry, "serve", config], os.path.join(work, "origin.log"))
    results = {}
    try:
        wait_port(origin_port)
        # Warm the origin's page cache (and its blob descriptor cache).
        for target in sets:
            for blobs in sets[target].values():
                fetch_all(origin_port, blobs[:1] if len(set(b["digest"] for b in blobs)) == 1 else blobs)
        results["origin"] = {name: {"wall_s": fetch_all(origin_port, blobs)} for name, blobs in sets["origin"].items()}
        for backend in backends:
            results[backend] = {}
            for name, blobs in sets[backend].items():
                folder = os.path.join(work, f"cache-{backend}-{name}")
                port = free_port()
                with open(folder + ".yaml", "w") as f:
                    f.write(f'api: {{hostname: "127.0.0.1", port: {port}}}\n'
                            f'upstreams: [{{host: "127.0.0.1:{port}", registry: "127.0.0.1", '
                            f'port: {origin_port}, schema: "http"}}]\n'
                            f'storage: {{folder: "{folder}", io_backend: {backend}}}\n'
                            f'log_level: warning\n')
                proxy = Process([binary, "--config", folder + ".yaml"], folder + ".log")
                wait_port(port)
                cpu0 = proxy.cpu_seconds()
                wall = fetch_all(port, blobs)
                cpu = proxy.cpu_seconds() - cpu0
                filled = sum(b["size"] for b in {b["digest"]: b for b in blobs}.values())
                results[backend][name] = {
                    "wall_s": wall,
                    "ratio_to_origin": wall / results["origin"][name]["wall_s"],
                    "cpu_s_per_gb": cpu / (filled / 1e9),
                    "peak_rss_mb": proxy.peak_rss_mb(),
                }
                proxy.stop()
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'scenario':<13} {'origin s':>9}", end="")
    for backend in backends:
        print(f" | {backend + ' s':>12} {'ratio':>6} {'CPU s/GB':>9} {'RSS MB':>7}", end="")
    print()
    for name in results["origin"]:
        print(f"{name:<13} {results['origin'][name]['wall_s']:>9.3f}", end="")
        for backend in backends:
            r = results[backend][name]
            print(f" | {r['wall_s']:>12.3f} {r['ratio_to_origin']:>6.2f} {r['cpu_s_per_gb']:>9.2f} {r['peak_rss_mb']:>7.1f}",
                  end="")
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
