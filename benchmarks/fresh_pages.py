#!/usr/bin/env python3
"""What a write into the page cache costs on this machine, by how long ago
the memory it lands in was freed.

256 MiB are written in 1 MiB writes into a new file, which is then
deleted; the next file is written after DELAY seconds. On the dev VM (free
page reporting: `page_reporting.page_reporting_order=11` on the kernel
command line) memory that has been free for more than ~1.5 s has gone back
to the host, and the first write into it costs several times as much.
That is the cold fill's "slow mode" in `cold_ab.sh`, and why a fill after
an idle spell (the shared harness's cold row) costs any cache, nginx
included, far more than back-to-back fills do.

    benchmarks/fresh_pages.py [FOLDER]      (default: the current folder)

Prints CPU seconds (user + system, this process) per GB written.
"""
import os
import sys
import tempfile
import time

SIZE = 256 << 20
CHUNK = b"\x02" * (1 << 20)


def write(folder):
    fd, path = tempfile.mkstemp(dir=folder, prefix="fresh.")
    try:
        before = os.times()
        for _ in range(SIZE // len(CHUNK)):
            os.write(fd, CHUNK)
        after = os.times()
    finally:
        os.close(fd)
        os.unlink(path)  # its pages are free from now on
    return (after.user + after.system - before.user - before.system) / (SIZE / 1e9)


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "."
    write(folder)
    for delay in (0, 0.5, 1, 1.5, 2, 3, 4, 0):
        time.sleep(delay)
        print(f"after {delay:3.1f} s idle: {write(folder):.2f} CPU s/GB", flush=True)


if __name__ == "__main__":
    main()
