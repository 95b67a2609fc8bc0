#!/usr/bin/env python3
"""How the proxy's costs grow: with connections, blob size, cache entries
and fills in flight. The figures of docs/performance.md.

    make release
    benchmarks/scaling.py [--binary .build/release/cache-proxy] [--no-2g] [--json out.json]

A local distribution registry is the origin (blobs written straight into
its storage, as in miss.py). The proxy runs as users run it: request logs
at info (to a file), access checks and manifest revalidation on. Each
section starts a fresh proxy process:

  connections  one cached 4 KiB blob, `wrk -t2 -cN -d4s` for N = 1..1024:
               req/s, p99, the proxy's CPU µs per request, RSS
  sizes        one cached blob of 4 KiB..2 GiB, `wrk -t2 -c8 -d4s`:
               MB/s, CPU s per GB served, RSS
  entries      a cache folder of N synthetic blobs (1k..1M) plus the 4 KiB
               one: start-up time (the folder scan), RSS after it, and the
               4 KiB hit's CPU µs per request
  fills        N different uncached 8 MiB blobs fetched at once (N = 1..64):
               wall, CPU s per GB filled, peak RSS

CPU is user+system of the proxy process from /proc (wrk shares the 2
cores, so req/s and MB/s move with it; CPU per request and per GB are the
steady figures).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from miss import REPO, Process, fetch_all, free_port, seed, wait_port  # noqa: E402


def rss_mb(pid, field="VmRSS:"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


def wrk(port, digest, connections, seconds):
    out = subprocess.run(["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency",
                          f"http://127.0.0.1:{port}/v2/{REPO}/blobs/{digest}"],
                         capture_output=True, text=True, check=True).stdout
    requests = transferred = 0
    p99 = "-"
    for line in out.splitlines():
        words = line.split()
        if "requests in" in line:
            requests = int(words[0])
        elif line.strip().startswith("99%"):
            p99 = words[1]
        elif line.startswith("Transfer/sec"):
            value = words[1]
            scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}
            for unit in ("GB", "MB", "KB", "B"):
                if value.endswith(unit):
                    transferred = float(value[:-len(unit)]) * scale[unit] * seconds
                    break
    return requests, p99, transferred


class Proxy:
    def __init__(self, binary, work, name, origin_port, folder=None):
        self.folder = folder or os.path.join(work, f"cache-{name}")
        self.port = free_port()
        config = os.path.join(work, f"{name}.yaml")
        with open(config, "w") as f:
            f.write(f'api: {{hostname: "127.0.0.1", port: {self.port}}}\n'
                    f'upstreams: [{{host: "127.0.0.1:{self.port}", registry: "127.0.0.1", '
                    f'port: {origin_port}, schema: "http"}}]\n'
                    f'storage: {{folder: "{self.folder}"}}\n')
        started = time.monotonic()
        self.process = Process([binary, "--config", config], os.path.join(work, f"{name}.log"))
        wait_port(self.port, timeout=600)
        self.startup_s = time.monotonic() - started
        self.pid = self.process.proc.pid

    def cpu(self):
        return self.process.cpu_seconds()

    def stop(self):
        self.process.stop()


def measure_hits(proxy, blob, connections, seconds=4):
    fetch_all(proxy.port, [blob])
    fetch_all(proxy.port, [blob])  # the second read puts a small blob in memory
    cpu0 = proxy.cpu()
    requests, p99, transferred = wrk(proxy.port, blob["digest"], connections, seconds)
    cpu = proxy.cpu() - cpu0
    return {"requests": requests, "req_s": requests / seconds, "p99": p99,
            "cpu_us_per_req": cpu * 1e6 / max(1, requests),
            "mb_s": transferred / seconds / 1e6, "cpu_s_per_gb": cpu / max(1e-9, transferred / 1e9),
            "rss_mb": rss_mb(proxy.pid), "peak_rss_mb": rss_mb(proxy.pid, "VmHWM:")}


def synthetic_folder(folder, entries):
    """`entries` files named like cached blobs (1 byte each: the scan reads
    names and sizes, never contents)."""
    base = os.path.join(folder, "blobs", "sha256")
    for prefix in range(256):
        os.makedirs(os.path.join(base, f"{prefix:02x}"), exist_ok=True)
    for index in range(entries):
        hexd = f"{index:064x}"[::-1]  # spread over the 256 prefixes
        fd = os.open(os.path.join(base, hexd[:2], hexd), os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"x")
        os.close(fd)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default=os.path.join(HERE, "..", ".build", "release", "cache-proxy"))
    parser.add_argument("--no-2g", action="store_true", help="leave out the 2 GiB blob")
    parser.add_argument("--sections", default="connections,sizes,entries,fills")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    binary = os.path.abspath(args.binary)
    sections = args.sections.split(",")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    work = tempfile.mkdtemp(prefix="cache-proxy-scaling-")
    origin_root = os.path.join(work, "origin")
    os.makedirs(origin_root)
    sizes = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20] + ([] if args.no_2g else [2 << 30])
    print("seeding the origin ...", file=sys.stderr)
    small = seed(origin_root, "small", 4 << 10)
    by_size = {size: seed(origin_root, f"size{size}", size) for size in sizes} if "sizes" in sections else {}
    fill_counts = [1, 4, 16, 64]
    fill_sets = {n: [seed(origin_root, f"fill{n}-{i}", 8 << 20) for i in range(n)]
                 for n in fill_counts} if "fills" in sections else {}
    origin_port = free_port()
    config = os.path.join(work, "registry.yml")
    with open(config, "w") as f:
        f.write(f"version: 0.1\nlog: {{level: error, accesslog: {{disabled: true}}}}\n"
                f"storage: {{filesystem: {{rootdirectory: {origin_root}}}}}\n"
                f"http: {{addr: 127.0.0.1:{origin_port}, secret: scaling}}\n")
    registry = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    origin = Process([registry, "serve", config], os.path.join(work, "origin.log"))
    results = {}
    try:
        wait_port(origin_port)
        if "connections" in sections:
            proxy = Proxy(binary, work, "connections", origin_port)
            results["connections"] = {c: measure_hits(proxy, small, c) for c in [1, 16, 64, 256, 1024]}
            proxy.stop()
        if "sizes" in sections:
            results["sizes"] = {}
            for size, blob in by_size.items():
                proxy = Proxy(binary, work, f"size{size}", origin_port)
                results["sizes"][size] = measure_hits(proxy, blob, 8)
                proxy.stop()
                shutil.rmtree(proxy.folder, ignore_errors=True)
        if "entries" in sections:
            results["entries"] = {}
            for entries in [1_000, 10_000, 100_000, 1_000_000]:
                folder = os.path.join(work, f"entries{entries}")
                synthetic_folder(folder, entries)
                subprocess.run(["sync"], check=True)
                proxy = Proxy(binary, work, f"entries{entries}", origin_port, folder=folder)
                after_start = rss_mb(proxy.pid)
                figures = measure_hits(proxy, small, 64)
                figures.update(startup_s=proxy.startup_s, rss_after_start_mb=after_start)
                results["entries"][entries] = figures
                proxy.stop()
                shutil.rmtree(folder, ignore_errors=True)
        if "fills" in sections:
            results["fills"] = {}
            for n, blobs in fill_sets.items():
                fetch_all(origin_port, blobs)  # the origin's page cache
                proxy = Proxy(binary, work, f"fills{n}", origin_port)
                cpu0 = proxy.cpu()
                wall = fetch_all(proxy.port, blobs)
                cpu = proxy.cpu() - cpu0
                results["fills"][n] = {"wall_s": wall, "cpu_s_per_gb": cpu / (n * (8 << 20) / 1e9),
                                       "peak_rss_mb": rss_mb(proxy.pid, "VmHWM:")}
                proxy.stop()
                shutil.rmtree(proxy.folder, ignore_errors=True)
    finally:
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)

    if "connections" in results:
        print("\n4 KiB hit by connections (wrk -t2 -cN -d4s)")
        print(f"{'conns':>6} {'req/s':>8} {'p99':>9} {'CPU µs/req':>11} {'RSS MB':>7}")
        for c, r in results["connections"].items():
            print(f"{c:>6} {r['req_s']:>8.0f} {r['p99']:>9} {r['cpu_us_per_req']:>11.1f} {r['peak_rss_mb']:>7.1f}")
    if "sizes" in results:
        print("\nhit by blob size (wrk -t2 -c8 -d4s)")
        print(f"{'size':>10} {'req/s':>8} {'MB/s':>8} {'CPU s/GB':>9} {'CPU µs/req':>11} {'RSS MB':>7}")
        for size, r in results["sizes"].items():
            print(f"{size:>10} {r['req_s']:>8.1f} {r['mb_s']:>8.0f} {r['cpu_s_per_gb']:>9.3f} "
                  f"{r['cpu_us_per_req']:>11.1f} {r['peak_rss_mb']:>7.1f}")
    if "entries" in results:
        print("\ncache entries (a synthetic folder; 4 KiB hit, wrk -t2 -c64 -d4s)")
        print(f"{'entries':>9} {'start s':>8} {'RSS after start MB':>19} {'CPU µs/req':>11} {'req/s':>8} {'peak RSS MB':>12}")
        for n, r in results["entries"].items():
            print(f"{n:>9} {r['startup_s']:>8.2f} {r['rss_after_start_mb']:>19.1f} {r['cpu_us_per_req']:>11.1f} "
                  f"{r['req_s']:>8.0f} {r['peak_rss_mb']:>12.1f}")
    if "fills" in results:
        print("\nfills in flight (N different uncached 8 MiB blobs at once)")
        print(f"{'fills':>6} {'wall s':>7} {'CPU s/GB':>9} {'peak RSS MB':>12}")
        for n, r in results["fills"].items():
            print(f"{n:>6} {r['wall_s']:>7.2f} {r['cpu_s_per_gb']:>9.2f} {r['peak_rss_mb']:>12.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
