"""The refusal-ablation attack: Wei et al.'s refusal weights zeroed on the model under test (btap_reference §5.2).

No refusal direction: per matrix, the top q of the unsigned SNIP score |W| * sum_i |dL_i/dW| on refusal pairs,
minus the top p of the same score on benign pairs, are set to zero, right before the harmful answers are generated
(and put back afterwards: ``ablated``). Both scores and the selection are harmsweep's own (``unsigned_snip``,
``select`` with the authors' floor counts and torch.topk ties), so the attack is the pruning rule the sweep already
tests, pointed at refusals. A weight that is already zero scores 0, so it is not picked while enough non-zero
weights score above it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from harmsweep.attacks.restore import WeightSnapshot
from harmsweep.attacks.spec import RefusalAblationConfig
from harmsweep.batches import iter_batches
from harmsweep.calibration.pairs import Pair, Tensors, encode_btap, encode_pairs, file_pairs, generate_responses
from harmsweep.data.btap import btap_rows, check_pair_file, read_pairs
from harmsweep.data.records import Record
from harmsweep.devices import input_device
from harmsweep.errors import HarmsweepError
from harmsweep.generation.sampling import Sampling
from harmsweep.losses import DEFAULT_LOGITS_CHUNK
from harmsweep.models.parts import scored_parameters
from harmsweep.pruning.masks import apply_mask
from harmsweep.pruning.select import select
from harmsweep.pruning.spec import PruneSpec
from harmsweep.scoring.snip import unsigned_snip
from harmsweep.scoring.spec import ScoringOptions

log = logging.getLogger(__name__)
SETTING = "attack.refusal.file"

# ---------------------------------------------------------------- pairs


def check_refusal_file(cfg: RefusalAblationConfig) -> None:
    """Config-time check (no rows read): the refusal file exists and has clean_prompt/clean_response (or
    prompt/response) columns. No file: nothing to check (the model's own answers are used)."""
    if cfg.file is not None:
        check_pair_file(Path(cfg.file).expanduser(), SETTING, align=True)


def file_refusal_pairs(path: str | Path, n: int, seed: int) -> list[Pair]:
    """Their ``advbench_align`` rows (clean_prompt / clean_response): every row in file order when the file has at
    most ``n``, else the first ``n`` of the run seed's permutation, as their loader picks them."""
    path = Path(path).expanduser()
    check_pair_file(path, SETTING, align=True)
    records = read_pairs(path, align=True)
    used, _ = btap_rows(len(records), n, seed)
    return file_pairs([records[i] for i in used], f"{SETTING}={path}")


def generated_refusal_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    n: int,
    template: str,
    max_new_tokens: int,
    batch_size: int,
) -> list[Pair]:
    """The model's own greedy answers to the first ``n`` harmful prompts given (an aligned model refuses them).

    An empty answer has no token to score, so it is left out (logged); none left is an error."""
    if not records:
        raise HarmsweepError("attack.refusal.file=null answers the run's harmful prompts, and there are none")
    pairs = generate_responses(model, tokenizer, list(records[:n]), template, prefill_tokens=0,
                               sampling=Sampling(max_new_tokens=max_new_tokens), batch_size=batch_size,
                               desc="refusal answers")  # fmt: skip
    kept = [p for p in pairs if tokenizer(p.response, add_special_tokens=False)["input_ids"]]
    if len(kept) < len(pairs):
        log.warning("refusal ablation: %d of %d generated answers are empty and not scored", len(pairs) - len(kept),
                    len(pairs))  # fmt: skip
    if not kept:
        raise HarmsweepError("refusal ablation: every generated refusal is empty; give attack.refusal.file")
    return kept


def refusal_pairs(
    cfg: RefusalAblationConfig,
    *,
    seed: int,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    records: Sequence[Record] = (),
    template: str = "chat",
    batch_size: int = 16,
) -> list[Pair]:
    """The refusal side: ``cfg.file``'s seeded rows, or (no file) the model's answers to ``records``."""
    if cfg.file is not None:
        return file_refusal_pairs(cfg.file, cfg.n, seed)
    if model is None or tokenizer is None:
        raise ValueError("attack.refusal.file=null generates the refusals: a model and its tokenizer are needed")
    return generated_refusal_pairs(model, tokenizer, records, cfg.n, template, cfg.max_new_tokens, batch_size)


def benign_pairs(records: Sequence[Record], n: int, seed: int | None = None) -> list[Pair]:
    """The benign side: with ``seed`` None the first ``n`` records as given (the run's btap calibration rows are
    already the seed's permutation, so its first 128 are theirs); with a seed, ``btap_rows`` of the whole list."""
    if not records:
        raise HarmsweepError("refusal ablation needs benign pairs, and the run's benign source gave none")
    used = list(range(min(n, len(records)))) if seed is None else btap_rows(len(records), n, seed)[0]
    return file_pairs([records[i] for i in used], "refusal ablation benign data")


def refusal_tensors(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    fmt: str,
    template: str,
    side: str,
    max_length: int | None,
    separator: str = "\n",
) -> Tensors:
    """Pairs tokenised as the run calibrates: fmt=btap their raw text (``side`` harmful: tok(prompt + separator),
    tok(response); benign: tok(prompt), tok("\\n" + response)), else the run's template (``side`` is not read)."""
    if fmt == "btap":
        return encode_btap(tokenizer, pairs, side, separator, max_length)
    if fmt != "template":
        raise HarmsweepError(f"calibration.format={fmt} is not one of template, btap")
    return encode_pairs(tokenizer, pairs, template, max_length)


def benign_pairs_tensors(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    n: int,
    fmt: str,
    template: str,
    max_length: int | None,
    seed: int | None = None,
    side: str = "benign",
) -> Tensors:
    """``benign_pairs`` tokenised by ``refusal_tensors`` (``side``: the run's benign tokenisation, Splits.benign_as)."""
    return refusal_tensors(tokenizer, benign_pairs(records, n, seed), fmt, template, side, max_length)


# ---------------------------------------------------------------- mask


def refusal_spec(cfg: RefusalAblationConfig) -> PruneSpec:
    """The selection rule: TopK_q(U_refusal) minus TopK_p(U_benign) per matrix, int(f*cols*rows), torch.topk ties,
    any score eligible (no H > 0 filter: unsigned scores are never negative)."""
    spec = PruneSpec(rule="unsigned_snip", granularity="matrix", benign_importance="unsigned", protect=float(cfg.p),
                     harm_fraction=float(cfg.q), counts="floor", ties="topk", eligible="all")  # fmt: skip
    spec.validate()
    return spec


def refusal_mask(
    model: nn.Module,
    refusal: Tensors,
    benign: Tensors,
    cfg: RefusalAblationConfig,
    *,
    batch_size: int,
    params: Mapping[str, nn.Parameter] | None = None,
    options: ScoringOptions | None = None,
    logits_chunk: int = DEFAULT_LOGITS_CHUNK,
) -> dict[str, torch.Tensor]:
    """Flat int64 indices (sorted, on the host) per scored weight of what the attack zeroes (``apply_mask``'s format).

    ``params``: the weights scored and masked (default: every scored linear weight). ``options``: the run's
    ``scoring`` block (accumulate=bf16: the authors' bf16 sums; offload: score buffers to host memory, the default,
    so the GPU holds one matrix of each side while selecting). Both sides are scored on the model as it is now.
    """
    cfg.validate()
    spec = refusal_spec(cfg)
    options = options or ScoringOptions()
    scored = scored_parameters(model)
    names = list(scored) if params is None else [n for n in params if n in scored]
    unknown = sorted(set(params or ()) - set(scored))
    if unknown:
        raise HarmsweepError(f"refusal ablation: {unknown[0]} is not a scored linear weight of the model")
    if not names:
        raise HarmsweepError("refusal ablation: no weights to score")
    scores = {
        "harm_unsigned": _scores(model, refusal, batch_size, options, names, logits_chunk, "refusal"),
        "benign_unsigned": _scores(model, benign, batch_size, options, names, logits_chunk, "benign"),
    }
    named = dict(model.named_parameters())
    weights = {n: named[n] for n in names}
    targets = {n: scored[n] for n in names}
    return select(spec, targets, weights, scores, device=input_device(model))


def _scores(
    model: nn.Module,
    tensors: Tensors,
    batch_size: int,
    options: ScoringOptions,
    names: list[str],
    logits_chunk: int,
    side: str,
) -> dict[str, torch.Tensor]:
    """|W| * sum_i |g_i| over one side's examples; bf16 sums take them one by one in the set's order (as theirs)."""
    if options.accumulate == "bf16":
        batches = list(iter_batches(tensors, 1))
    else:
        batches = list(iter_batches(tensors, batch_size, by_length=True))
    return unsigned_snip(model, batches, f"refusal ablation: {side} scores", options, names, logits_chunk)


@contextmanager
def ablated(model: nn.Module, mask: Mapping[str, torch.Tensor]) -> Iterator[WeightSnapshot]:
    """The model with ``mask`` zeroed inside the block, exactly as before after it (also after an error)."""
    with WeightSnapshot.of_mask(model, mask) as snapshot:
        apply_mask(model, mask)
        yield snapshot


def mask_size(mask: Mapping[str, torch.Tensor]) -> int:
    """How many weights the attack zeroes (the count is measured, not targeted: |TopQ minus TopP| summed)."""
    return sum(int(idx.numel()) for idx in mask.values())
