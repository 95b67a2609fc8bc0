#!/usr/bin/env python3
"""Cache-hit throughput by blob size: cache-proxy against nginx serving the
same files with sendfile and open_file_cache (the shared harness's
nginx-static configuration), in one run, on 127.0.0.1.

Why: the proxy sends blobs up to 64 KiB from memory (one writev with the
head) and larger ones with sendfile. This shows where that line pays and
what either path costs next to nginx, for the sizes registries really serve
(configs are ~1-10 KiB, layers 10 KiB to hundreds of MiB).

    benchmarks/hit_sizes.py [--seconds 4] [--connections 64]

Needs: the release build (.build/release/cache-proxy), nginx, wrk (Debian
nginx-light, wrk). Prints a Markdown table; exits non-zero if a server
answered anything but 200.
"""
import argparse, hashlib, os, re, shutil, signal, socket, subprocess, sys, tempfile, time

SIZES = [1024, 4096, 16 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024, 8 * 1024 * 1024]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NGINX_CONF = os.path.join(ROOT, "..", "shared", "bench", "conf", "nginx-static.conf")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def wrk(port, path, seconds, connections):
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s",
                          f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise SystemExit(f"non-2xx answers on {port}{path}:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [int(p) for p in out]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args()
    binary = os.path.join(ROOT, ".build", "release", "cache-proxy")
    if not os.access(binary, os.X_OK):
        raise SystemExit("build first: make release")

    work = tempfile.mkdtemp(prefix="hit-sizes-")
    procs = []
    try:
        cache, static = os.path.join(work, "cache"), os.path.join(work, "static")
        digests = {}
        for size in SIZES:
            data = os.urandom(size)
            hexd = hashlib.sha256(data).hexdigest()
            digests[size] = hexd
            os.makedirs(f"{cache}/blobs/sha256/{hexd[:2]}", exist_ok=True)
            open(f"{cache}/blobs/sha256/{hexd[:2]}/{hexd}", "wb").write(data)
            os.makedirs(f"{static}/v2/bench/blobs", exist_ok=True)
            open(f"{static}/v2/bench/blobs/sha256:{hexd}", "wb").write(data)

        pport, nport = free_port(), free_port()
        with open(f"{work}/proxy.yaml", "w") as f:
            f.write(f'api: {{hostname: "127.0.0.1", port: {pport}}}\n'
                    f'upstreams: [{{host: "127.0.0.1", registry: "127.0.0.1", port: 9, schema: "http"}}]\n'
                    f'storage: {{folder: "{cache}"}}\nlog_level: error\n')
        conf = open(NGINX_CONF).read().replace("@@DIR@@", work).replace("@@PORT@@", str(nport)).replace("@@DATA@@", static)
        open(f"{work}/nginx.conf", "w").write(conf)
        for sub in ["client_body", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp"]:
            os.makedirs(f"{work}/{sub}", exist_ok=True)
        proxy = subprocess.Popen([binary, "--config", f"{work}/proxy.yaml"], start_new_session=True)
        nginx = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-c", f"{work}/nginx.conf"],
                                 start_new_session=True, stderr=subprocess.DEVNULL)
        procs = [proxy, nginx]
        wait_port(pport)
        wait_port(nport)
        time.sleep(0.3)

        print(f"| blob size | cache-proxy req/s | nginx-static req/s | ratio | cache-proxy CPU ms/1k req | nginx CPU ms/1k req |")
        print("|---|---|---|---|---|---|")
        for size in SIZES:
            path = f"/v2/bench/blobs/sha256:{digests[size]}"
            row = []
            for port, proc in [(pport, proxy), (nport, nginx)]:
                wrk(port, path, 1, args.connections)  # warm: page cache, open-file caches
                pids = children(proc.pid)
                before = cpu_seconds(pids)
                rps = wrk(port, path, args.seconds, args.connections)
                cpu = cpu_seconds(pids) - before
                row.append((rps, 1000 * cpu / max(1, rps * args.seconds) * 1000))
            (prps, pcpu), (nrps, ncpu) = row
            label = f"{size // 1024} KiB" if size < 1 << 20 else f"{size >> 20} MiB"
            print(f"| {label} | {prps:.0f} | {nrps:.0f} | {prps / nrps:.2f} | {pcpu:.1f} | {ncpu:.1f} |", flush=True)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(10)
            except Exception:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
