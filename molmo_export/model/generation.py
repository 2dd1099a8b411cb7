"""Generation with a KV cache, as the official generate_from_batch (spec §8.1).

Prefill computes the logits of each row's last valid position only. Padded batches (-1
padding, right-padded as the official code expects, or left-padded) work: the new token of every
row goes at the end of the (padded) sequence, its position is the row's previous position + 1,
and the mask grows by one valid column per step.
Sampling is a set of small pure functions (greedy, temperature, top-k, top-p).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from molmo_runtime.errors import InputError

if TYPE_CHECKING:
    from molmo_export.model.molmo import MolmoForConditionalGeneration


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens before it already reach p; the top token is always kept.
    drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def select_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next ids [B]: argmax by default, else a sample after the filters."""
    if not do_sample:
        return greedy(logits)
    logits = apply_temperature(logits.float(), temperature)
    if top_k is not None:
        logits = apply_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = apply_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_args(max_new_tokens: int, do_sample: bool, temperature: float, top_k: int | None,
                top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise InputError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def decode_steps(model: MolmoForConditionalGeneration, input_ids: torch.Tensor,
                 images: torch.Tensor | None = None, image_masks: torch.Tensor | None = None,
                 image_input_idx: torch.Tensor | None = None, *,
                 choose: Callable[[torch.Tensor], torch.Tensor] = greedy
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (logits [B, V], chosen ids [B]) per step, without end: the caller stops.

    Step 0 is the prefill (logits of each row's last valid position); every later step feeds
    the previous ids through the decoder with the KV cache.
    """
    from molmo_export.model.molmo import default_mask_and_positions

    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}; "
                         "add the batch axis (ids[None])")
    lm = model.language_model
    mask, positions = default_mask_and_positions(input_ids)
    if bool((mask.sum(dim=-1) == 0).any()):
        raise InputError("a row of input_ids is all padding (-1); every row needs a prompt")
    embeds = model.embed_inputs(input_ids, images, image_masks, image_input_idx)
    hidden, cache = lm.model(embeds, positions, mask)
    # Last valid column of each row: count - 1 for right padding (the official rule), T - 1 for
    # left padding (which the official rule gets wrong).
    last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(dim=-1)  # [B]
    logits = lm.logits_at(hidden, last)  # [B, V]
    position = positions[:, -1:]  # [B, 1]: clamp(cumsum - 1) ends at each row's last position
    while True:
        next_ids = choose(logits)  # [B]
        yield logits, next_ids
        position = position + 1
        mask = torch.cat((mask, mask.new_ones(mask.shape[0], 1)), dim=1)  # [B, T + step]
        hidden, new_kv = lm.model(lm.model.embed(next_ids[:, None]), position, mask, cache)
        cache = [(torch.cat((k, nk), dim=2), torch.cat((v, nv), dim=2))
                 for (k, v), (nk, nv) in zip(cache, new_kv)]
        logits = lm.lm_head(hidden[:, -1])


@torch.no_grad()
def generate(model: MolmoForConditionalGeneration, input_ids: torch.Tensor,
             images: torch.Tensor | None = None, image_masks: torch.Tensor | None = None,
             image_input_idx: torch.Tensor | None = None, *, max_new_tokens: int = 20,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | None = None,
             seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """input_ids [B, T] (right-padded with -1) -> [B, T + N], N <= max_new_tokens: the prompt
    and the new ids, as Hugging Face's generate. (The runtime's MolmoPipeline.generate_from_inputs
    returns the new ids [B, N] only; docs/runtime.md puts the two side by side.)

    Greedy unless do_sample. Stops early once every row has produced eos_token_id; rows that
    finished earlier are filled with eos_token_id. Sampling draws from `generator`, or from a new
    one seeded with `seed` (random when neither is given).
    """
    _check_args(max_new_tokens, do_sample, temperature, top_k, top_p)
    if do_sample and generator is None:
        generator = torch.Generator(device=input_ids.device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()

    def choose(logits: torch.Tensor) -> torch.Tensor:
        return select_next(logits, do_sample, temperature, top_k, top_p, generator)

    out = [input_ids]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    if max_new_tokens == 0:
        return input_ids
    for step, (_, next_ids) in enumerate(decode_steps(model, input_ids, images, image_masks,
                                                      image_input_idx, choose=choose)):
        if eos_token_id is not None:
            next_ids = torch.where(done, torch.full_like(next_ids, eos_token_id), next_ids)
            done = done | (next_ids == eos_token_id)
        out.append(next_ids[:, None])
        if step == max_new_tokens - 1 or bool(done.all()):
            break
    return torch.cat(out, dim=1)
