#!/usr/bin/env python3
"""What the security work costs, on this machine, in one run:

    make release
    benchmarks/security.py [--binary .build/release/cache-proxy] [--quick]

1. access_check: the 4 KiB hit path with `access_check: always` (every
   request carries an `Authorization` header, so the keyed hash runs on
   real input; the upstream's yes is remembered after the first request)
   against `access_check: never`, `wrk -t2 -c64 -d4s`, alternated three
   times each, same binary, same blob.
2. TLS: one cached 256 MiB blob downloaded 8 times in a row (2 GiB) over the
   plaintext listener (sendfile) and over the TLS listener (read in 512 KiB
   chunks, encrypted), one process listening on both; CPU seconds of the
   proxy per GB served (user+system, /proc/PID/stat) and throughput.

The origin is Debian's docker-registry with the blobs written straight into
its storage layout (miss.py's `seed`). Certificates are made with openssl.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from miss import REPO, Process, free_port, seed, wait_port  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def wrk(url, seconds, header):
    out = subprocess.run(["wrk", "-t2", "-c64", f"-d{seconds}s", "-H", header, url],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError(out)


def certificates(folder):
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{folder}/ca.key", "-out", f"{folder}/ca.pem", "-days", "2", "-subj", "/CN=bench CA")
    with open(f"{folder}/ext", "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{folder}/server.key", "-out", f"{folder}/server.csr", "-subj", "/CN=localhost")
    run("x509", "-req", "-in", f"{folder}/server.csr", "-CA", f"{folder}/ca.pem", "-CAkey", f"{folder}/ca.key",
        "-CAcreateserial", "-out", f"{folder}/server.pem", "-days", "2", "-extfile", f"{folder}/ext")


def start_proxy(binary, work, name, origin_port, api_extra="", upstream_extra=""):
    port = free_port()
    folder = os.path.join(work, name)
    with open(folder + ".yaml", "w") as f:
        f.write(f'api: {{hostname: "127.0.0.1", port: {port}{api_extra}}}\n'
                f'upstreams: [{{host: "127.0.0.1", registry: "127.0.0.1", port: {origin_port}, '
                f'schema: "http"{upstream_extra}}}]\n'
                f'storage: {{folder: "{folder}", fsync: false}}\nlog_level: error\n')
    proxy = Process([binary, "--config", folder + ".yaml"], folder + ".log")
    wait_port(port)
    return proxy, port


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default=os.path.join(HERE, "..", ".build", "release", "cache-proxy"))
    parser.add_argument("--quick", action="store_true", help="2 s wrk runs, a 64 MiB blob")
    args = parser.parse_args()
    binary = os.path.abspath(args.binary)
    seconds, big = (2, 64 << 20) if args.quick else (4, 256 << 20)
    work = tempfile.mkdtemp(prefix="cache-proxy-security-")
    origin_root = os.path.join(work, "origin")
    os.makedirs(origin_root)
    small_blob = seed(origin_root, "hit-4k", 4096)
    big_blob = seed(origin_root, "tls-big", big)
    certificates(work)
    origin_port = free_port()
    with open(os.path.join(work, "registry.yml"), "w") as f:
        f.write(f"version: 0.1\nlog: {{level: error, accesslog: {{disabled: true}}}}\n"
                f"storage: {{filesystem: {{rootdirectory: {origin_root}}}}}\n"
                f"http: {{addr: 127.0.0.1:{origin_port}, secret: security-bench}}\n")
    origin = Process([shutil.which("docker-registry") or "/usr/bin/docker-registry", "serve",
                      os.path.join(work, "registry.yml")], os.path.join(work, "origin.log"))
    header = "Authorization: Bearer " + "x" * 900  # the size of a real registry JWT
    try:
        wait_port(origin_port)
        # 1. The access check on the 4 KiB hit path.
        rates = {"always": [], "never": []}
        for _ in range(3):
            for mode in ("always", "never"):
                proxy, port = start_proxy(binary, work, f"hit-{mode}", origin_port,
                                          upstream_extra=f", access_check: {mode}")
                url = f"http://127.0.0.1:{port}/v2/{REPO}/blobs/{small_blob['digest']}"
                subprocess.run(["curl", "-sf", "-o", "/dev/null", "-H", header, url], check=True)
                rates[mode].append(wrk(url, seconds, header))
                proxy.stop()
                shutil.rmtree(os.path.join(work, f"hit-{mode}"), ignore_errors=True)
        print("4 KiB hits, req/s (3 runs each, alternated):")
        for mode, values in rates.items():
            print(f"  access_check: {mode:<6} " + "  ".join(f"{v:>9.0f}" for v in values)
                  + f"   median {sorted(values)[1]:>9.0f}")
        print(f"  always / never: {sorted(rates['always'])[1] / sorted(rates['never'])[1]:.3f}")

        # 2. TLS against plaintext, one process with both listeners.
        tls_port = free_port()
        proxy, port = start_proxy(binary, work, "tls", origin_port,
                                  api_extra=f', tls_port: {tls_port}, tls_cert: "{work}/server.pem", '
                                            f'tls_key: "{work}/server.key"')
        path = f"/v2/{REPO}/blobs/{big_blob['digest']}"
        subprocess.run(["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{port}{path}"], check=True)  # fill
        rounds = 8
        print(f"\n{big >> 20} MiB cached blob x {rounds} downloads, one curl at a time:")
        for name, url, extra in (("plaintext", f"http://127.0.0.1:{port}{path}", []),
                                 ("TLS", f"https://127.0.0.1:{tls_port}{path}", ["--cacert", f"{work}/ca.pem"])):
            cpu0, started = proxy.cpu_seconds(), time.monotonic()
            for _ in range(rounds):
                out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", *extra,
                                      url], capture_output=True, text=True).stdout
                if out != f"200 {big}":
                    raise RuntimeError(f"{name}: {out}")
            wall, cpu = time.monotonic() - started, proxy.cpu_seconds() - cpu0
            gb = rounds * big / 1e9
            print(f"  {name:<10} CPU {cpu / gb:6.3f} s/GB   {gb / wall:6.2f} GB/s   (wall {wall:.1f} s)")
        proxy.stop()
    finally:
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
