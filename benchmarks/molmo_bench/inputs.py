"""What the benchmark feeds the model: synthetic arrays, or a real image through the processor.

Synthetic inputs have the processor's layout without its cost: `crops` crops of random pixels
([crops, 576, 588] f32), image masks of ones, and a token sequence of
  BOS, per crop: <im_start> 12 x (12 <im_patch> + <im_col>) <im_end>, then `prompt_tokens` ids
with image_input_idx pointing at the <im_patch> positions, so prefill sees as many positions as a
real image of that many crops (the real processor lays the high-res crops out as one big grid;
the token count per crop is the same up to a few column tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from molmo_runtime.errors import InputError
from molmo_runtime.manifest import Manifest


@dataclass(frozen=True)
class BenchInputs:
    """Either fixed arrays (synthetic) or an image + prompt the processor turns into arrays."""

    kind: str  # "synthetic" or "image"
    arrays: dict[str, np.ndarray] | None = None  # processor-style arrays, no batch axis
    image: str | None = None
    prompt: str | None = None

    def describe(self) -> dict[str, Any]:
        if self.arrays is not None:
            crops = self.arrays["images"].shape[0]
            return {"kind": self.kind, "crops": crops,
                    "sequence_tokens": int(self.arrays["input_ids"].shape[0])}
        return {"kind": self.kind, "image": self.image, "prompt": self.prompt}

    def batch(self, processor: Any) -> dict[str, np.ndarray]:
        """Arrays with a batch axis of 1; for an image this runs the processor (preprocess)."""
        if self.arrays is not None:
            return {k: v[None] for k, v in self.arrays.items()}
        if processor is None:
            raise InputError("this artifact has no tokenizer, so --image cannot build a prompt; "
                             "use --synthetic")
        from molmo_runtime.image_io import load_image

        assert self.image is not None
        pixels = load_image(self.image)  # [H, W, 3] uint8, as MolmoPipeline.stream loads it
        inputs = processor(images=pixels, text=self.prompt)
        return {k: v[None] for k, v in inputs.items()}


def text_id_bound(special_tokens: dict[str, int]) -> int:
    """Ids below this are ordinary text tokens in every preset (the specials sit above them;
    the pad id of some vocabularies is low and is not special for the model)."""
    return max(1, min(v for k, v in special_tokens.items() if k != "pad"))


def synthetic_inputs(manifest: Manifest, crops: int, prompt_tokens: int,
                     seed: int = 0) -> BenchInputs:
    dims, tokens = manifest.dims, manifest.special_tokens
    if not 1 <= crops <= dims.max_crops + 1:
        raise InputError(f"--crops {crops}: this artifact takes 1..{dims.max_crops + 1} crops "
                         f"(max_crops {dims.max_crops} + the low-resolution overview)")
    if prompt_tokens < 1:
        raise InputError(f"--prompt-tokens {prompt_tokens}: need at least one prompt token")
    rng = np.random.default_rng(seed)
    side = math.isqrt(dims.tokens_per_crop)  # 12 rows of 12 pooled tokens
    ids: list[int] = [tokens["bos"]]
    idx: list[int] = []
    for _ in range(crops):
        ids.append(tokens["im_start"])
        for _ in range(side):
            for _ in range(side):
                idx.append(len(ids))
                ids.append(tokens["im_patch"])
            ids.append(tokens["im_col"])
        ids.append(tokens["im_end"])
    ids += rng.integers(0, text_id_bound(tokens), prompt_tokens).tolist()
    images = rng.standard_normal((crops, dims.patches_per_crop, dims.patch_dim), np.float32)
    arrays: dict[str, np.ndarray] = {
        "input_ids": np.asarray(ids, np.int64),  # [L]
        "images": images,  # [crops, 576, 588]
        "image_input_idx": np.asarray(idx, np.int32).reshape(crops, -1),  # [crops, 144]
        "image_masks": np.ones((crops, dims.patches_per_crop), np.float32),  # [crops, 576]
    }
    return BenchInputs("synthetic", arrays=arrays)


def image_inputs(image: str, prompt: str) -> BenchInputs:
    if not Path(image).is_file():
        raise InputError(f"--image {image}: no such file; pass an image file or use --synthetic")
    return BenchInputs("image", image=str(image), prompt=prompt)
