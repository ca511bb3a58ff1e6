"""What every generation backend shares: decoding settings (the ``eval.generation`` block), stop tokens.

No torch here (types only): the command line reads the generation block without loading a backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harmsweep.errors import HarmsweepError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BACKENDS = ("hf", "vllm", "auto")  # auto: vLLM where it is installed and a GPU is visible, else hf (orgad2026_em only)


def resolve_backend(backend: str) -> str:
    """``auto`` made concrete on the machine the job runs on; hf and vllm stay as they are."""
    if backend != "auto":
        return backend
    import importlib.util

    import torch

    return "vllm" if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available() else "hf"


# eval.generation.attack values: which answers are generated, from which model
ATTACKS = (
    "none", "prefill", "refusal_ablation", "refusal_ablation_prefill", "finetune", "finetune_prefill",
)  # fmt: skip
WEIGHT_ATTACKS = {"refusal_ablation": "refusal", "refusal_ablation_prefill": "refusal",
                  "finetune": "finetune", "finetune_prefill": "finetune"}  # fmt: skip


def prefills(attack: str) -> bool:
    """Whether the attack forces a prefix into the answer."""
    return attack == "prefill" or attack.endswith("_prefill")


def weight_attack(attack: str) -> str | None:
    """refusal | finetune: the attack changes weights before generating; None: it does not."""
    return WEIGHT_ATTACKS.get(attack)


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


# What HF uses for a setting a model's generation config leaves unset (GenerationConfig's global defaults)
HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; do_sample=False is greedy and ignores the rest.

    Sampling is per prompt: prompt i draws from its own generator seeded by (``seed``, ``keys[i]``) (harmsweep/
    generation/seeded.py), so a prompt's answer is the same alone, in any batch and on a rerun. ``keys=None``: each
    prompt is keyed by its token ids (a repeated prompt by its ids and its occurrence). top_k / repetition_penalty
    None: not applied.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int | None = None
    repetition_penalty: float | None = None
    keys: tuple[str, ...] | None = None  # one per prompt, in the prompts' order (generate_responses: source ids)


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


def sampling_from_model(model: PreTrainedModel, max_new_tokens: int, seed: int) -> Sampling:
    """eval.generation.sampling=model: the model's own generation config as HF's generate would apply it (the
    authors' pipeline uses ``model.generation_config`` as is): a setting it leaves unset takes HF's global default
    (top_k 50 included); do_sample false there is greedy. Sampling stays per-prompt seeded (``Sampling``)."""
    config = model.generation_config

    def value(name: str) -> Any:
        found = getattr(config, name, None)
        return HF_DEFAULTS[name] if found is None else found

    if not value("do_sample"):
        return Sampling(max_new_tokens=max_new_tokens, seed=seed)
    top_k, penalty = int(value("top_k")), float(value("repetition_penalty"))
    return Sampling(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=float(value("temperature")),
        top_p=float(value("top_p")),
        seed=seed,
        top_k=top_k if top_k > 0 else None,
        repetition_penalty=penalty if penalty != 1.0 else None,
    )


def decoding_for(gen: GenerationConfig, model: PreTrainedModel, seed: int) -> Sampling:
    """The answers' decoding under ``eval.generation.sampling``: ``fixed`` is this block's settings (do_sample /
    temperature / top_p; no top-k, no repetition penalty), ``model`` the model's generation config. Either way a
    sampled answer is per-prompt seeded."""
    if gen.sampling == "fixed":
        return gen.decoding(seed)
    if gen.sampling == "model":
        return sampling_from_model(model, gen.max_new_tokens, seed)
    raise HarmsweepError(f"eval.generation.sampling={gen.sampling} is not one of {', '.join(SAMPLINGS)}")


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    stop = model.generation_config.eos_token_id
    return {t for t in (stop if isinstance(stop, list) else [stop]) if t is not None} | {tokenizer.eos_token_id}


def _cut(continuation: list[int], stops: set[int]) -> list[int]:
    return continuation[: next((j for j, t in enumerate(continuation) if t in stops), len(continuation))]
