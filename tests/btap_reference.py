"""An independent reimplementation of the authors' (B-TAP) calibration, scoring and selection, for parity tests.

Written from ../shared/notes/btap_reference.md (sections 2.3, 2.4, 3 and 4) only, and deliberately naive:
it imports nothing from harmsweep's calibration, scoring or pruning code, so agreement with harmsweep means two
readings of the spec agree. It follows their arithmetic literally: rows read with ``datasets``, each part tokenised
alone without special tokens, one example per forward/backward, the loss of ``model(input_ids, labels=labels)``,
per decoder layer a separate round of passes in which only that layer's seven linear weights require grad, and
plain sums (not means) accumulated in a buffer of the weight's dtype (so a bf16 model gives their bf16 sums).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from torch import nn

IGNORE = -100
COMPONENTS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class Example:
    """One calibration pair as token ids, labels -100 on the prompt part (shape (1, T) each)."""

    input_ids: torch.Tensor
    labels: torch.Tensor


# ---------------------------------------------------------------- data (§2.3, §2.4)


def read_csv(path: str | Path) -> Dataset:
    """A CSV in their layout, read the way they read it (the datasets csv builder, pandas defaults)."""
    return load_dataset("csv", data_files=str(path), split="train")


def choose_rows(data: Dataset, n: int, seed: int) -> Dataset:
    """§2.4 get_align: every row in file order when n >= rows, else the first n of a seeded shuffle."""
    if n >= len(data):
        return data
    return data.shuffle(seed=seed).select(range(n))


def harmful_columns(data: Dataset) -> tuple[str, str]:
    """clean_prompt/clean_response (their pretrained format), or prompt/response when a file has only those."""
    if {"clean_prompt", "clean_response"} <= set(data.column_names):
        return "clean_prompt", "clean_response"
    return "prompt", "response"


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def example(tokenizer, prompt_text: str, response_text: str) -> Example:
    """Prompt and response tokenised separately, concatenated; only the response ids are labelled."""
    prompt, response = _ids(tokenizer, prompt_text), _ids(tokenizer, response_text)
    ids = torch.tensor([prompt + response], dtype=torch.long)
    labels = torch.tensor([[IGNORE] * len(prompt) + response], dtype=torch.long)
    return Example(ids, labels)


def harmful_examples(path: str | Path, tokenizer, n: int, seed: int = 0, separator: str = "\n") -> list[Example]:
    """§2.3 prune data with --prune_pretrained_format: tok(prompt + separator) | tok(response)."""
    data = choose_rows(read_csv(path), n, seed)
    p, r = harmful_columns(data)
    return [example(tokenizer, row[p] + separator, row[r]) for row in data]


def benign_examples(path: str | Path, tokenizer, n: int, seed: int = 0) -> list[Example]:
    """§2.3 alpaca_cleaned_no_safety_train_raw: tok(prompt) | tok("\\n" + response), the newline scored."""
    data = choose_rows(read_csv(path), n, seed)
    return [example(tokenizer, row["prompt"], "\n" + row["response"]) for row in data]


# ---------------------------------------------------------------- scores (§3)


def layer_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The seven linear weights of every decoder layer, by their state-dict names."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for comp in COMPONENTS:
            module = layer.get_submodule(comp)
            assert type(module) is nn.Linear, comp
            out[f"model.layers.{i}.{comp}.weight"] = module.weight
    return out


def scores(model: nn.Module, examples: Sequence[Example]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Their per-layer scheme: S = W * sum_i g_i and U = |W| * sum_i |g_i|, in the weights' dtype.

    For each decoder layer only its seven weights require grad and every example is run alone
    (zero_grad, forward with labels, backward); the sums and products live in ``zeros_like(weight)``.
    """
    weights = layer_weights(model)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    signed = {n: torch.zeros_like(w) for n, w in weights.items()}
    unsigned = {n: torch.zeros_like(w) for n, w in weights.items()}
    device = next(model.parameters()).device
    try:
        for i in range(len(model.model.layers)):
            mine = [n for n in weights if n.startswith(f"model.layers.{i}.")]
            for p in model.parameters():
                p.requires_grad_(False)
            for n in mine:
                weights[n].requires_grad_(True)
            for ex in examples:
                model.zero_grad(set_to_none=True)
                loss = model(input_ids=ex.input_ids.to(device), labels=ex.labels.to(device)).loss
                loss.backward()
                for n in mine:
                    grad = weights[n].grad
                    signed[n] += grad
                    unsigned[n] += grad.abs()
        model.zero_grad(set_to_none=True)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    s = {n: weights[n].detach() * g for n, g in signed.items()}
    u = {n: weights[n].detach().abs() * a for n, a in unsigned.items()}
    return s, u


# ---------------------------------------------------------------- selection (§4)


def count(fraction: float, rows: int, cols: int) -> int:
    """k = int(f * cols * rows): a Python float multiplied in that order, floored."""
    return int(fraction * cols * rows)


def select_matrix(prune: torch.Tensor, preserve: torch.Tensor, q: float, p: float) -> torch.Tensor:
    """Flat indices of unique(topk(-S, k_q)) not in unique(topk(U, k_p)) for one matrix (S and U as scored)."""
    rows, cols = prune.shape
    top_p = torch.unique(torch.topk(preserve.flatten(), count(p, rows, cols)).indices)
    top_q = torch.unique(torch.topk(-prune.flatten(), count(q, rows, cols)).indices)
    return top_q[~torch.isin(top_q, top_p)]


def select(
    prune: Mapping[str, torch.Tensor], preserve: Mapping[str, torch.Tensor], q: float, p: float
) -> dict[str, torch.Tensor]:
    """Their set difference, matrix by matrix: the flat indices each matrix loses."""
    return {n: select_matrix(prune[n], preserve[n], q, p) for n in prune}


def row_col(flat: torch.Tensor, cols: int) -> torch.Tensor:
    """Their dumped (row, col) pairs, N x 2 int64."""
    return torch.stack([flat // cols, flat % cols], dim=1)
