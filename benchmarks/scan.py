#!/usr/bin/env python3
"""How long the start-up scan of the cache folder takes.

    make release
    benchmarks/scan.py [--entries 100000] [--binary .build/release/cache-proxy]

Writes `--entries` blobs (1 KiB each, each with the size attribute a publish
records) under a fresh cache folder, drops the kernel's dentry and inode
caches when allowed (root) so the first start reads the disk, then starts
cache-proxy on it three times and reports the scan time it logs ("cache
indexed ... seconds") and the time until its port accepts connections.
The first start is cold (after the cache drop), the others warm.
"""
import argparse
import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def populate(folder, entries):
    blobs = os.path.join(folder, "blobs", "sha256")
    for i in range(entries):
        body = i.to_bytes(8, "little") * 128
        hexd = hashlib.sha256(body).hexdigest()
        sub = os.path.join(blobs, hexd[:2])
        os.makedirs(sub, exist_ok=True)
        path = os.path.join(sub, hexd)
        with open(path, "wb") as f:
            f.write(body)
            os.setxattr(f.fileno(), "user.cacheproxy.size", str(len(body)).encode())


def start_once(binary, folder):
    port = free_port()
    config = folder + ".yaml"
    with open(config, "w") as f:
        f.write(f'api: {{hostname: "127.0.0.1", port: {port}}}\n'
                f'upstreams: [{{host: "h", registry: "127.0.0.1", port: 1, schema: "http"}}]\n'
                f'storage: {{folder: "{folder}"}}\n')
    started = time.monotonic()
    proc = subprocess.Popen([binary, "--config", config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read().decode())
            time.sleep(0.01)
    ready = time.monotonic() - started
    proc.terminate()
    log = proc.communicate(timeout=30)[0].decode()
    line = next((l for l in log.splitlines() if "cache indexed" in l), None)
    blobs = re.search(r"blobs=(\d+)", line or "")
    seconds = re.search(r"seconds=([0-9.e-]+)", line or "")
    if not (blobs and seconds):
        raise RuntimeError("no 'cache indexed' line in:\n" + log)
    return int(blobs.group(1)), float(seconds.group(1)), ready


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--binary", default=os.path.join(HERE, "..", ".build", "release", "cache-proxy"))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="cache-proxy-scan-")
    folder = os.path.join(work, "cache")
    try:
        t0 = time.monotonic()
        populate(folder, args.entries)
        print(f"wrote {args.entries} blobs in {time.monotonic() - t0:.1f} s")
        os.sync()
        cold = False
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")
            cold = True
        except OSError:
            pass
        for run in range(3):
            blobs, scan, ready = start_once(os.path.abspath(args.binary), folder)
            label = "cold" if run == 0 and cold else "warm"
            print(f"start {run + 1} ({label}): {blobs} blobs indexed, scan {scan:.3f} s, port open after {ready:.3f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
