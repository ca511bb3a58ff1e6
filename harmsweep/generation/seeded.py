"""Per-prompt seeded sampling: each prompt's answer depends on (run seed, its key) only, not on its batch.

``torch.manual_seed`` once per call ties a prompt's answer to what else is in the batch and to the batch order.
Here every row owns a CPU ``torch.Generator`` seeded by ``key_seed(seed, key)`` and advanced once per step, and
the token is drawn by the Gumbel-max trick: argmax(warped logits + Gumbel noise) is a sample from
softmax(warped logits). The processor returns the noisy scores and generation runs greedy, so HF's argmax picks
the sample. Warping follows HF's sampling order: repetition penalty (prompt and generated tokens, left padding
ignored), then temperature, top-k, top-p. The noise comes from the CPU so a key gives the same draws on any device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessor

from harmsweep.errors import HarmsweepError

if TYPE_CHECKING:
    from harmsweep.generation.sampling import Sampling

FILTERED = float("-inf")


def key_seed(seed: int, key: str) -> int:
    """A 63-bit seed of (run seed, prompt key): stable across processes and Python versions (no ``hash()``)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def unique_keys(keys: Sequence[str]) -> list[str]:
    """Keys made distinct: the n-th repeat (n >= 1) of a key becomes ``key#n``, so a prompt asked several times
    gets several samples while its first occurrence keeps the key it has alone."""
    seen: dict[str, int] = {}
    out = []
    for key in keys:
        n = seen.get(key, 0)
        seen[key] = n + 1
        out.append(key if n == 0 else f"{key}#{n}")
    return out


def content_key(ids: Sequence[int]) -> str:
    """The key of a prompt without one: its token ids."""
    return "ids:" + hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:32]


def prompt_seeds(prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[int]:
    """Each prompt's sampling seed: (run seed, its key), keys from ``sampling.keys`` or the prompt's ids; a repeated
    key gets its occurrence appended (a prompt asked k times gets k samples)."""
    keys = list(sampling.keys) if sampling.keys is not None else [content_key(p) for p in prompts]
    if len(keys) != len(prompts):
        raise HarmsweepError(f"sampling has {len(keys)} prompt keys for {len(prompts)} prompts")
    return [key_seed(sampling.seed, k) for k in unique_keys(keys)]


def repetition_penalty(
    scores: torch.Tensor, input_ids: torch.Tensor, starts: Sequence[int], penalty: float
) -> torch.Tensor:
    """HF's repetition penalty (negative scores times ``penalty``, positive ones divided) on every token present in
    row r's ``input_ids[r, starts[r]:]``: the prompt and what was generated, never the left padding."""
    out = scores.clone()
    for row, start in enumerate(starts):
        seen = torch.unique(input_ids[row, start:])
        seen = seen[seen < scores.size(-1)]
        picked = out[row, seen]
        out[row, seen] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return out


def warp(scores: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p, as HF's warpers do (ties at the k-th score are kept; top-p keeps the
    smallest set of most likely tokens whose mass exceeds top_p, at least one)."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.size(-1))).values[..., -1:]
        scores = scores.masked_fill(scores < kth, FILTERED)
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), FILTERED)
    return scores


def gumbel(generators: Sequence[torch.Generator], vocab: int) -> torch.Tensor:
    """One row of standard Gumbel noise per generator (float64 uniforms, CPU), each generator advanced once."""
    uniform = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in generators])
    return -torch.log(-torch.log(uniform))


def gumbel_sample(scores: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Scores whose argmax is a draw from softmax(scores), row r's draw from ``generators[r]``."""
    noise = gumbel(generators, scores.size(-1))
    return (scores.double() + noise.to(scores.device)).float()


class SeededSampler(LogitsProcessor):
    """Sampling as a logits processor for greedy ``generate``: row r is keyed by ``seeds[r]`` and its prompt starts
    at column ``starts[r]`` of the left-padded input (the padding the repetition penalty skips)."""

    def __init__(self, seeds: Sequence[int], starts: Sequence[int], temperature: float = 1.0,
                 top_k: int | None = None, top_p: float = 1.0, penalty: float | None = None) -> None:  # fmt: skip
        if len(seeds) != len(starts):
            raise ValueError(f"{len(seeds)} seeds for {len(starts)} rows")
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.starts, self.temperature, self.top_k, self.top_p, self.penalty = (
            list(starts), temperature, top_k, top_p, penalty)  # fmt: skip

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.size(0) != len(self.generators):
            raise ValueError(f"the sampler was built for {len(self.generators)} rows, got {scores.size(0)}")
        if self.penalty is not None and self.penalty != 1.0:
            scores = repetition_penalty(scores, input_ids, self.starts, self.penalty)
        scores = warp(scores, self.temperature, self.top_k, self.top_p)
        return gumbel_sample(scores, self.generators)
