"""Scoring cost: one signed-SNIP pass vs a bare forward+backward loop over the same batches, and
Wanda (scoring=wanda: one forward per batch, hooks on the linear inputs) against signed SNIP.

Same process, same batches, alternated over repetitions (the machine is shared: the ratio is the
claim, not the absolute time). Prints a table and writes JSON to outputs/bench/scoring.json.

    python bench/scoring.py [--model smollm2_135m|tiny_llama] [--n 16] [--batch 8] [--reps 3]
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import common
import torch

from harmsweep.batches import iter_batches
from harmsweep.calibration.pairs import encode_pairs, file_pairs
from harmsweep.data import load_records, take
from harmsweep.scoring.snip import signed_snip, wanda


def bare_loop(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    """What a user would write: all parameters trainable, HF loss, backward, drop the grads."""
    for p in model.parameters():
        p.requires_grad_(True)
    for batch in batches:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        )
        out.loss.backward()
        model.zero_grad(set_to_none=True)


def main() -> None:
    p = common.parser(__doc__, "scoring", reps=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args()

    lm = common.model(args.model)
    data_root = common.data_root()
    pairs = file_pairs(take(load_records("alpaca", data_root), args.n, seed=0), "alpaca")
    tensors = encode_pairs(lm.tokenizer, pairs, "chat", args.max_length)
    batches = list(iter_batches(tensors, args.batch, by_length=True))
    tokens = int(tensors["attention_mask"].sum())

    times: dict[str, list[float]] = {"bare forward+backward": [], "signed SNIP": [], "Wanda": []}
    bare_loop(lm.model, batches[:1])  # warm-up
    for _ in range(args.reps):
        for name in times:  # alternate the variants within each repetition
            start = time.perf_counter()
            if name == "signed SNIP":
                signed_snip(lm.model, batches, n_samples=args.n)
            elif name == "Wanda":
                wanda(lm.model, batches)
            else:
                bare_loop(lm.model, batches)
            times[name].append(time.perf_counter() - start)

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["signed SNIP"] / med["bare forward+backward"]
    print(f"model {args.model}, {args.n} samples in {len(batches)} batches, {tokens} tokens, {args.reps} reps")
    print(f"{'variant':<24}{'median s':>10}{'min s':>10}{'max s':>10}")
    for k, v in times.items():
        print(f"{k:<24}{med[k]:>10.2f}{min(v):>10.2f}{max(v):>10.2f}")
    wanda_ratio = med["Wanda"] / med["signed SNIP"]
    print(f"ratio signed SNIP / bare: {ratio:.3f} (goal <= 1.15)")
    print(f"ratio Wanda / signed SNIP: {wanda_ratio:.3f} (a forward without backward: expected about 1/3)")
    common.write(args.out, {
        "model": args.model, "n": args.n, "batch": args.batch, "tokens": tokens, "times_s": times,
        "median_s": med, "ratio": ratio, "wanda_over_snip": wanda_ratio, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "torch": torch.__version__,
    })  # fmt: skip


if __name__ == "__main__":
    main()
