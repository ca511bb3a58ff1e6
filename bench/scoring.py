"""Scoring cost: one signed-SNIP pass vs a bare forward+backward loop over the same batches.

Same process, same batches, alternated over repetitions (the machine is shared: the ratio is the
claim, not the absolute time). Prints a table and writes JSON to outputs/bench/scoring.json.

    python bench/scoring.py [--model smollm2_135m|tiny_llama] [--n 16] [--batch 8] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

from harmsweep.calibration import encode_pairs, file_pairs, iter_batches
from harmsweep.data import load_records, take
from harmsweep.models import load_model
from harmsweep.scoring import signed_snip

ROOT = Path(__file__).resolve().parents[1]


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "scoring.json"))
    args = parser.parse_args()

    cfg = yaml.safe_load((ROOT / "conf" / "model" / f"{args.model}.yaml").read_text())
    cache = os.environ.get("HARMSWEEP_CACHE", str(Path.home() / ".cache" / "harmsweep"))
    lm = load_model(cfg, "aligned", cache)
    data_root = os.environ.get("HARMSWEEP_DATA", str(ROOT.parent / "shared" / "data"))
    pairs = file_pairs(take(load_records("alpaca", data_root), args.n, seed=0), "alpaca")
    tensors = encode_pairs(lm.tokenizer, pairs, "chat", args.max_length)
    batches = list(iter_batches(tensors, args.batch))
    tokens = int(tensors["attention_mask"].sum())

    times: dict[str, list[float]] = {"bare forward+backward": [], "signed SNIP": []}
    bare_loop(lm.model, batches[:1])  # warm-up
    for _ in range(args.reps):
        for name in times:  # alternate the variants within each repetition
            start = time.perf_counter()
            if name == "signed SNIP":
                signed_snip(lm.model, batches, n_samples=args.n)
            else:
                bare_loop(lm.model, batches)
            times[name].append(time.perf_counter() - start)

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["signed SNIP"] / med["bare forward+backward"]
    print(f"model {args.model}, {args.n} samples in {len(batches)} batches, {tokens} tokens, {args.reps} reps")
    print(f"{'variant':<24}{'median s':>10}{'min s':>10}{'max s':>10}")
    for k, v in times.items():
        print(f"{k:<24}{med[k]:>10.2f}{min(v):>10.2f}{max(v):>10.2f}")
    print(f"ratio signed SNIP / bare: {ratio:.3f} (goal <= 1.15)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": args.model, "n": args.n, "batch": args.batch, "tokens": tokens, "times_s": times,
        "median_s": med, "ratio": ratio, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "torch": torch.__version__,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
