"""What every generation backend shares: decoding settings (the ``eval.generation`` block), stop tokens.

No torch here (types only): the command line reads the generation block without loading a backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BACKENDS = ("hf", "vllm")
PREFIXES = ("target", "file")  # eval.generation.prefix: the dataset's affirmative target, or a real answer from a file
SAMPLINGS = ("fixed", "model")  # eval.generation.sampling: this block's settings, or the model's generation config
PROMPT_FORMATS = ("harmsweep", "btap")  # eval.generation.prompt_format: plain-template prompts (base models)
# eval.generation settings added after runs were made: at these values they key no run id or cached evaluation
GENERATION_LATER_DEFAULTS = {"prefix": "target", "prefix_file": None, "sampling": "fixed", "prompt_format": "harmsweep"}


@dataclass(frozen=True)
class EngineInputs:
    """What the vLLM backend needs beyond the in-memory model: where its weights are, and the mask."""

    source: str = ""  # LoadedModel.source: "dir:/path" or "hub:id" are loaded as they are
    fingerprint: str = ""  # names the one scratch copy of a model without a checkpoint
    mask: Mapping[str, torch.Tensor] | None = None  # applied inside the engine (None: unpruned)


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; do_sample=False is greedy and ignores the rest."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class GenerationConfig:
    """The ``eval.generation`` block: how held-out answers are generated (and attacked)."""

    attack: str = "none"  # none | prefill | refusal_ablation(_prefill) | finetune(_prefill) (attacks/spec.py)
    prefill_tokens: int = 8
    prefix: str = "target"  # target: the dataset's "Sure, here is" | file: a real harmful answer from prefix_file
    prefix_file: str | None = None  # CSV (clean_prompt/clean_response or prompt/response, matched by prompt) or
    # JSONL of [user, assistant] pairs (Harmful-HEx-PHI: line i answers line i of data.harmful's HEx-PHI.jsonl)
    sampling: str = "fixed"  # fixed: do_sample/temperature/top_p here | model: the model's generation config
    prompt_format: str = "harmsweep"  # plain template (base models): harmsweep "User: ..\nAssistant:\n" |
    # btap: "Q: {prompt}\nA:" and, prefilled, "{prompt}\n{prefix}" (the authors')
    max_new_tokens: int = 64
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    backend: str = "hf"

    def decoding(self, seed: int) -> Sampling:
        """The decoding settings of this block, seeded by the run."""
        return Sampling(self.max_new_tokens, self.do_sample, self.temperature, self.top_p, seed)


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    stop = model.generation_config.eos_token_id
    return {t for t in (stop if isinstance(stop, list) else [stop]) if t is not None} | {tokenizer.eos_token_id}


def _cut(continuation: list[int], stops: set[int]) -> list[int]:
    return continuation[: next((j for j, t in enumerate(continuation) if t in stops), len(continuation))]
