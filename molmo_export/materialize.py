"""Full-size random-weight checkpoints in the hub's layout, for testing scale without a download.

    python -m molmo_export.materialize molmo-7b-d-0924 /big/molmo-7b-d-random
        config.json (+ full_config.json), preprocessor_config.json, tokenizer files,
        model-0000N-of-0000M.safetensors (bf16, official names) + model.safetensors.index.json

Any preset (molmo-7b-d-0924, molmo-7b-o-0924, molmoe-1b-0924, molmo-72b-0924, demo, bench-0.5b)
is written with the same deterministic init as the built-in presets (molmo_export.demo), but in
the hub's dtype (bf16 by default) and layout, in shards of 2 GB by default. Shards are written
one at a time: peak memory is one shard plus one float32 tensor (the largest is the 7B/72B LM
head: 2.2 / 5.0 GB); 7B-D measured 3.5 GB peak RSS (docs/scale.md). The folder is built beside its final place and
renamed into it, so it is either complete or absent. The weights are random: generation is
degenerate; the point is size (export, quantization, memory, speed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from molmo_export.config import PRESETS, get_preset
from molmo_runtime.errors import InputError, MolmoError

DTYPES = ("bf16", "fp16", "fp32")
DEFAULT_SHARD_GB = 2.0


def materialize(preset: str, directory: str | os.PathLike[str], dtype: str = "bf16",
                shard_gb: float = DEFAULT_SHARD_GB) -> Path:
    """Write preset `preset` as a random-weight checkpoint folder `directory` (new or empty)."""
    import torch

    from molmo_export.demo import _make_readable, write_checkpoint

    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if not shard_gb > 0:
        raise InputError(f"--shard-gb must be positive, got {shard_gb}")
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(f"{target} exists and is not an empty folder; choose a new one "
                         "(nothing was changed)")
    target.parent.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        write_checkpoint(get_preset(preset), tmp, dtype=torch_dtype,
                         shard_bytes=int(shard_gb * 1e9))
        _make_readable(tmp)
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m molmo_export.materialize",
                                description=__doc__.split("\n")[0])
    p.add_argument("preset", choices=list(PRESETS))
    p.add_argument("out", help="new or empty folder to write the checkpoint into")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--shard-gb", type=float, default=DEFAULT_SHARD_GB)
    args = p.parse_args(argv)
    try:
        path = materialize(args.preset, args.out, args.dtype, args.shard_gb)
    except MolmoError as e:
        print(f"materialize: error: {e}", file=sys.stderr)
        return 2
    print(f"checkpoint written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
