"""How long opening an artifact's manifest takes, first time and again (the hash cache).

    python benchmarks/artifact_open_time.py ARTIFACT [--rounds 3]

Each round, interleaved, times load_manifest(ARTIFACT, verify=...) for:
  cached-first   verify="cached" with an empty hash cache (a fresh temporary cache folder)
  cached-second  verify="cached" again with that folder: sizes checked, nothing re-hashed
  full           verify="full": every file hashed (molmo-verify, verify="full")
  size           verify="size": sizes only
Files are read through the page cache: the first "cached-first" of a cold machine also pays the
disk. Prints every round and the median, with the artifact's size, the machine's load average
and the date. Torch-free.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    from molmo_runtime import hash_cache
    from molmo_runtime.manifest import load_manifest

    art = Path(args.artifact)
    m = load_manifest(art, verify="none")
    total = sum(int(r["bytes"]) for r in m.files.values())
    print(f"artifact {art}: {len(m.files)} files, {total / 1e6:,.1f} MB; "
          f"load {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    times: dict[str, list[float]] = {k: [] for k in ("cached-first", "cached-second", "full",
                                                     "size")}
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as cache:
            os.environ[hash_cache.CACHE_ENV] = cache
            for mode, verify in (("cached-first", "cached"), ("cached-second", "cached"),
                                 ("full", "full"), ("size", "size")):
                t0 = time.perf_counter()
                load_manifest(art, verify=verify)  # type: ignore[arg-type]
                times[mode].append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()))
    print("median:  " + "  ".join(f"{k} {statistics.median(v):.3f} s" for k, v in times.items()))
    first, second = statistics.median(times["cached-first"]), statistics.median(
        times["cached-second"])
    print(f"second open / first open: {second / first:.4f} ({first / second:.0f}x faster)")


if __name__ == "__main__":
    main()
