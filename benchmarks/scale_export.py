"""Measure one export command at scale: wall time, peak RSS, peak and final disk (not CI).

    python benchmarks/scale_export.py --out /big/7b-int4 -- \\
        molmo-export --model /big/molmo-7b-d-random --target ort-int4 --out /big/7b-int4

Runs the command once, samples the RSS of its whole process tree and the size of --out (which
holds the staging folder while the export runs: the temporary disk) every 0.5 s, and prints one
JSON line with the machine, its load and the figures. Peak RSS is also the kernel's own
high-water mark of the biggest process (ru_maxrss of the children), which sampling can miss.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def folder_bytes(path: Path) -> int:
    """Disk blocks under `path`, each file once (a hard link to a file already counted, such as
    the decoder-parts scratch link to the decoder's data file, takes no more disk)."""
    total, seen = 0, set()
    for root, _, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the folder the command writes (disk figures)")
    p.add_argument("--label", default="")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    out = Path(args.out)
    start = time.monotonic()
    load_before = os.getloadavg()
    proc = psutil.Popen(command)
    peak_rss = peak_disk = 0
    while proc.poll() is None:
        peak_rss = max(peak_rss, tree_rss(proc))
        peak_disk = max(peak_disk, folder_bytes(out))
        time.sleep(0.5)
    wall = time.monotonic() - start
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({
        "label": args.label, "command": " ".join(command), "returncode": proc.returncode,
        "wall_s": round(wall, 1), "peak_rss_gb_sampled": round(peak_rss / 1e9, 2),
        "peak_rss_gb_maxrss": round(maxrss / 1e9, 2),
        "peak_disk_gb": round(peak_disk / 1e9, 2), "final_disk_gb": round(folder_bytes(out) / 1e9, 2),
        "machine": {"cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
                    "platform": platform.platform(terse=True)},
        "load_avg_1m": {"before": round(load_before[0], 1), "after": round(os.getloadavg()[0], 1)},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
