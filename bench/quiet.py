"""Wait until the machine is quiet before a timed run, and say how busy it was.

Samples /proc/stat over a short window (load averages lag by minutes): prints the busy fraction of all
CPUs and the load averages, and returns once the busy fraction stays under --max-busy, or after
--max-wait seconds (then it says so: the figures that follow were measured on a busy machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def busy_fraction(window: float) -> float:
    def read() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as fh:
            parts = [int(v) for v in fh.readline().split()[1:]]
        idle = parts[3] + (parts[4] if len(parts) > 4 else 0)  # idle + iowait
        return sum(parts), idle

    total0, idle0 = read()
    time.sleep(window)
    total1, idle1 = read()
    dt = max(1, total1 - total0)
    return 1.0 - (idle1 - idle0) / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-busy", type=float, default=0.15, help="busy fraction of all CPUs counted as quiet")
    ap.add_argument("--window", type=float, default=3.0, help="seconds per sample")
    ap.add_argument("--max-wait", type=float, default=600.0, help="give up waiting after this many seconds")
    args = ap.parse_args()
    if not os.path.exists("/proc/stat"):
        print("quiet: no /proc/stat here; not checking", file=sys.stderr)
        return 0
    end = time.monotonic() + args.max_wait
    while True:
        busy = busy_fraction(args.window)
        load = "/".join(f"{v:.2f}" for v in os.getloadavg())
        if busy <= args.max_busy:
            print(f"quiet: CPUs {busy:.0%} busy over {args.window:g} s; load average {load}", file=sys.stderr)
            return 0
        if time.monotonic() > end:
            print(f"quiet: still {busy:.0%} busy after {args.max_wait:g} s (load {load}); measuring anyway",
                  file=sys.stderr)
            return 0
        time.sleep(5)


if __name__ == "__main__":
    sys.exit(main())
