"""Signed SNIP (one forward+backward per batch, all layers at once) vs Wei et al.'s per-layer scheme.

The per-layer scheme (re-implemented here, not AAC's code) scores one decoder layer at a time: for
each layer l and each sample, one forward+backward with only layer l's linear weights requiring
grad, L x N passes. Scores are linear in the gradient, so the per-layer sum of per-sample scores
equals signed SNIP's batched score (checked, allclose rtol 1e-4). Random-init Llama models with
hidden 256, intermediate 688, 4 heads and 2/4/8 layers, N byte-tokenised pairs, template "plain".

Time: both variants in this process, alternated over repetitions after a discarded warm-up; the
ratio per L is the claim (goal >= L/1.5). Signed SNIP with batch 1 is timed as well, to separate the
layer factor from batching and padding. Each layer's passes are timed too, as a fraction of one full
forward+backward: the per-layer scheme freezes every other weight, so autograd stops the backward at
layer l and a pass for a high layer costs well under a full pass (the ratio tends to about L/2, not
L; the L/1.5 goal assumes full passes). Memory: peak RSS of a fresh subprocess per measurement
(`python bench/per_layer.py --child VARIANT L`), read as VmHWM, the counter ru_maxrss reports for
the process's own memory (ru_maxrss itself also carries the parent's RSS at fork, so a large parent
would mask the child's peak); the mark is reset through /proc/self/clear_refs once the model and
data exist, and the peak is taken minus the RSS at that point. It is compared to the
scores' fp32 buffer + activations, where "activations" is the extra peak of the same
forward+backward with every weight's gradient dropped as it lands (no score buffer). Each child does
a tiny warm-up pass first (one-time runtime allocations) and runs with MALLOC_MMAP_THRESHOLD_=65536,
so freed tensors go back to the OS and RSS follows live memory.
Sequential pruning (pruning.sequential=true: score layer l with layers < l already pruned, then prune
it) is timed too, against one signed-SNIP pass plus a per-matrix selection of the same rule: its L
partial passes (each a forward and a backward that stops at layer l) are its cost.
Writes JSON to outputs/bench/per_layer.json.

    python bench/per_layer.py [--layers 2 4 8] [--n 16] [--batch 8] [--reps 5] [--mem-reps 2]
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

import common
import torch
from torch import nn

from harmsweep.batches import iter_batches
from harmsweep.calibration.pairs import Pair, encode_pairs
from harmsweep.losses import per_sample_nll
from harmsweep.models.loading import LoadedModel, build_tiny
from harmsweep.models.parts import scored_parameters
from harmsweep.pruning.masks import apply_mask
from harmsweep.pruning.select import select
from harmsweep.pruning.sequential import select_sequential
from harmsweep.pruning.spec import PruneSpec
from harmsweep.scoring.snip import signed_snip

VARIANTS = ("signed SNIP", "per-layer", "fwd+bwd, grads dropped")
BATCH1 = "signed SNIP, batch 1"  # timed too: separates the layer factor from batching and padding
CHILD = {"signed": "signed SNIP", "per_layer": "per-layer", "activations": "fwd+bwd, grads dropped"}


def tiny_llama(layers: int, hidden: int = 256, intermediate: int = 688, heads: int = 4) -> LoadedModel:
    """A random-init Llama like conf/model/tiny_llama.yaml's, larger, with the byte tokenizer."""
    spec = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": 512, "seed": 0}  # fmt: skip
    lm = build_tiny(spec)
    lm.model.eval()
    return lm


def pairs(n: int) -> list[Pair]:
    """Simple pairs of varied length (so batches carry padding)."""
    return [
        Pair(
            f"How do I finish task number {i}?",
            f"Sure, here is task {i}: " + "gather the parts, then put them together. " * (1 + i % 3),
            f"pair-{i}",
        )
        for i in range(n)
    ]


def encoded(lm: LoadedModel, n: int) -> dict[str, torch.Tensor]:
    return encode_pairs(lm.tokenizer, pairs(n), "plain", 512)


def _sample_nll(model: nn.Module, tensors: Mapping[str, torch.Tensor], i: int) -> torch.Tensor:
    """One sample's response NLL, its padding trimmed."""
    width = int(tensors["attention_mask"][i].sum())
    ids, mask, labels = (tensors[k][i : i + 1, :width] for k in ("input_ids", "attention_mask", "labels"))
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return per_sample_nll(logits, labels).sum()


def per_layer_scores(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], on_layer: Callable[[int], None] | None = None
) -> dict[str, torch.Tensor]:
    """Wei et al.'s scheme with the signed score: per layer, per sample, only that layer's weights trainable.

    Each sample's loss is divided by N, so the sum over samples is the same mean loss signed SNIP uses.
    With every other weight frozen, autograd stops each backward at layer l and computes no weight
    gradient above it, so a pass for a high layer costs less than a full forward+backward.
    `on_layer(l)` is called when layer l is done (the benchmark times each layer's passes with it).
    """
    n = tensors["input_ids"].size(0)
    named = dict(model.named_parameters())
    params = scored_parameters(model)
    scores = {name: torch.zeros_like(named[name], dtype=torch.float32) for name in params}
    layers = sorted({p.layer for p in params.values()})
    previous = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for layer in layers:
            names = [name for name, p in params.items() if p.layer == layer]
            for name in names:
                named[name].requires_grad_(True)
            for i in range(n):
                (_sample_nll(model, tensors, i) / n).backward()
                for name in names:
                    w = named[name]
                    scores[name].addcmul_(w.detach(), w.grad)
                    w.grad = None
            for name in names:
                named[name].requires_grad_(False)
            if on_layer is not None:
                on_layer(layer)
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)
            p.grad = None
    return scores


def grads_dropped(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    """Signed SNIP's passes without its score buffer: each weight gradient is freed as it lands."""
    scored = scored_parameters(model)
    params = [p for n, p in model.named_parameters() if n in scored]
    previous = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles = []
    for p in params:
        p.requires_grad_(True)
        handles.append(p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)))
    try:
        for batch in batches:
            width = int(batch["attention_mask"].sum(dim=1).max())
            b = {k: v[:, :width] for k, v in batch.items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            per_sample_nll(logits, b["labels"]).sum().backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in previous.items():
            p.requires_grad_(flag)


def run_variant(variant: str, lm: LoadedModel, tensors: dict[str, torch.Tensor], batch: int):
    n = tensors["input_ids"].size(0)
    if variant == "signed SNIP":
        return signed_snip(lm.model, list(iter_batches(tensors, batch, by_length=True)), n_samples=n, desc=variant)
    if variant == "per-layer":
        return per_layer_scores(lm.model, tensors)
    return grads_dropped(lm.model, list(iter_batches(tensors, batch, by_length=True)))


def child(variant: str, layers: int, n: int, batch: int) -> None:
    """One measurement in a fresh process: prints RSS once model and data exist, and the peak after."""
    lm = tiny_llama(layers)
    tensors = encoded(lm, n)
    warm = encode_pairs(lm.tokenizer, [Pair("Hi?", "Sure.", "warm-up")], "plain", 64)
    grads_dropped(lm.model, [warm])  # one-time runtime allocations (kernels, thread pools) happen here
    base = common.status_bytes("VmRSS")
    reset = common.reset_peak()
    start = time.perf_counter()
    run_variant(CHILD[variant], lm, tensors, batch)
    seconds = time.perf_counter() - start
    peak = common.status_bytes("VmHWM")
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"base_rss": base, "peak_rss": peak, "ru_maxrss": ru_maxrss, "peak_reset": reset,
                      "seconds": seconds}))  # fmt: skip


def measure_memory(variant: str, layers: int, n: int, batch: int) -> dict[str, int]:
    key = next(k for k, v in CHILD.items() if v == variant)
    cmd = [sys.executable, __file__, "--child", key, str(layers), "--n", str(n), "--batch", str(batch)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors go back to the OS: RSS tracks live memory
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def sequential_cost(lm: LoadedModel, tensors: dict[str, torch.Tensor], batch: int, reps: int) -> dict[str, object]:
    """Seconds of a sequential mask vs a single-pass mask (no_set_difference, per matrix, sparsity 1e-3)."""
    model = lm.model
    batches = list(iter_batches(tensors, batch, by_length=True))
    n = tensors["input_ids"].size(0)
    params = scored_parameters(model)
    named = dict(model.named_parameters())
    weights = {k: named[k] for k in params}
    single = PruneSpec(rule="no_set_difference", granularity="matrix", sparsity=1e-3)
    spec = replace(single, sequential=True)

    def one_pass() -> dict[str, torch.Tensor]:
        return select(single, params, weights, {"harm": signed_snip(model, batches, n)})

    def layered() -> dict[str, torch.Tensor]:
        return select_sequential(spec, params, model, lambda _, names, __: signed_snip(model, batches, n, names=names),
                                 lambda m: apply_mask(model, m))  # fmt: skip

    times: dict[str, list[float]] = {"single pass": [], "sequential": []}
    masks = {}
    for _ in range(reps):
        for name, fn in (("single pass", one_pass), ("sequential", layered)):
            start = time.perf_counter()
            masks[name] = fn()
            times[name].append(time.perf_counter() - start)
    agree = sum(int(torch.isin(masks["sequential"][k], masks["single pass"][k]).sum()) for k in params)
    total = sum(int(v.numel()) for v in masks["sequential"].values())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"times_s": times, "median_s": med, "ratio": med["sequential"] / med["single pass"],
            "masks_agree": agree, "mask_size": total}  # fmt: skip


def main() -> None:
    p = common.parser(__doc__, "per_layer", n=16, reps=5)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mem-reps", type=int, default=2, help="fresh subprocesses per variant and L")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "L"), help=argparse_help())
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.n, args.batch)
        return

    results = []
    for layers in args.layers:
        lm = tiny_llama(layers)
        tensors = encoded(lm, args.n)
        tokens = int(tensors["attention_mask"].sum())
        snip = run_variant("signed SNIP", lm, tensors, args.batch)  # warm-up, and the equality check
        ref = run_variant("per-layer", lm, tensors, args.batch)
        scale = max(float(s.abs().max()) for s in snip.values())
        max_diff = max(float((snip[k] - ref[k]).abs().max()) for k in snip)
        same = all(torch.allclose(ref[k], snip[k], rtol=1e-4, atol=1e-6 * scale) for k in snip)
        times: dict[str, list[float]] = {v: [] for v in (*VARIANTS[:2], BATCH1)}
        by_layer: list[list[float]] = []  # per repetition: seconds of each layer's N passes
        for _ in range(args.reps):
            for variant in times:
                start = time.perf_counter()
                if variant == BATCH1:
                    run_variant("signed SNIP", lm, tensors, 1)
                elif variant == "per-layer":
                    marks = [start]
                    per_layer_scores(lm.model, tensors, on_layer=lambda _, m=marks: m.append(time.perf_counter()))
                    by_layer.append([b - a for a, b in itertools.pairwise(marks)])
                else:
                    run_variant(variant, lm, tensors, args.batch)
                times[variant].append(time.perf_counter() - start)
        full_pass = statistics.median(times[BATCH1])  # N full forward+backward passes, one sample each
        pass_cost = [statistics.median(rep[i] for rep in by_layer) / full_pass for i in range(layers)]
        seq = sequential_cost(lm, tensors, args.batch, args.reps)
        memory: dict[str, list[dict[str, int]]] = {v: [] for v in VARIANTS}
        for _ in range(args.mem_reps):
            for variant in VARIANTS:
                memory[variant].append(measure_memory(variant, layers, args.n, args.batch))
        named = dict(lm.model.named_parameters())
        weights = sum(t.numel() * t.element_size() for t in lm.model.state_dict().values())
        buffer = sum(named[k].numel() * 4 for k in snip)
        largest = max(named[k].numel() * 4 for k in snip)
        extra = {v: statistics.median(m["peak_rss"] - m["base_rss"] for m in memory[v]) for v in VARIANTS}
        budget = buffer + extra[VARIANTS[2]] + largest
        ratio = statistics.median(times["per-layer"]) / statistics.median(times["signed SNIP"])
        ratio_b1 = statistics.median(times["per-layer"]) / statistics.median(times[BATCH1])
        results.append({
            "layers": layers, "n": args.n, "batch": args.batch, "tokens": tokens, "scores_equal": same,
            "max_abs_diff": max_diff, "max_abs_score": scale, "times_s": times,
            "time": {v: common.spread(t) for v, t in times.items()}, "ratio_per_layer_over_snip": ratio,
            "ratio_per_layer_over_snip_batch1": ratio_b1, "pass_cost_by_layer": pass_cost,
            "goal_ratio": layers / 1.5, "goal_met": ratio >= layers / 1.5, "passes": {"signed SNIP":
            -(-args.n // args.batch), "per-layer": layers * args.n}, "memory_runs": memory,
            "peak_rss_bytes": {v: statistics.median(m["peak_rss"] for m in memory[v]) for v in VARIANTS},
            "peak_extra_bytes": extra, "weights_bytes": weights, "score_buffer_bytes": buffer,
            "largest_matrix_grad_bytes": largest, "budget_extra_bytes": budget,
            "memory_goal_met": extra["signed SNIP"] <= budget, "sequential": seq,
        })  # fmt: skip
        print(f"L={layers}: scores equal {same} (max |diff| {max_diff:.2e}, max |S| {scale:.2e})", flush=True)

    mb = common.mib
    print(
        f"\nsigned SNIP vs per-layer scoring, N={args.n} pairs, batch {args.batch}, {args.reps} reps (median, min-max)"
    )
    rows = []
    for r in results:
        t = r["time"]
        rows.append([str(r["layers"]), f"{r['passes']['signed SNIP']} / {r['passes']['per-layer']}",
                     f"{t['signed SNIP']['median']:.3f} ({t['signed SNIP']['min']:.3f}-{t['signed SNIP']['max']:.3f})",
                     f"{t['per-layer']['median']:.3f} ({t['per-layer']['min']:.3f}-{t['per-layer']['max']:.3f})",
                     f"{r['ratio_per_layer_over_snip']:.2f}", f">= {r['goal_ratio']:.2f}",
                     "met" if r["goal_met"] else "NOT met", str(r["scores_equal"]),
                     f"{t[BATCH1]['median']:.3f} ({t[BATCH1]['min']:.3f}-{t[BATCH1]['max']:.3f})",
                     f"{r['ratio_per_layer_over_snip_batch1']:.2f}"])  # fmt: skip
    print(common.table(["L", "passes", "signed SNIP s", "per-layer s", "ratio", "goal", "", "same scores",
                        "signed SNIP batch 1 s", "ratio to batch 1"], rows))  # fmt: skip
    print("\ncost of one per-layer pass, as a fraction of one full forward+backward (signed SNIP, batch 1),"
          " from layer 0 (backward through every layer) up")  # fmt: skip
    for r in results:
        print(f"L={r['layers']}: " + " ".join(f"{c:.2f}" for c in r["pass_cost_by_layer"])
              + f"  (mean {statistics.mean(r['pass_cost_by_layer']):.2f})")  # fmt: skip
    print("\nsequential pruning (L partial passes) vs one pass + per-matrix selection, no_set_difference at 1e-3")
    for r in results:
        q = r["sequential"]
        print(f"L={r['layers']}: single pass {q['median_s']['single pass']:.3f} s, sequential "
              f"{q['median_s']['sequential']:.3f} s, ratio {q['ratio']:.2f}; masks agree on "
              f"{q['masks_agree']} of {q['mask_size']} weights")  # fmt: skip
    print(
        f"\npeak RSS in a fresh process (MiB; median of {args.mem_reps}); extra = peak - RSS with model and data loaded"
    )
    rows = []
    for r in results:
        pk, ex = r["peak_rss_bytes"], r["peak_extra_bytes"]
        rows.append([str(r["layers"]), f"{mb(r['weights_bytes']):.1f}", f"{mb(r['score_buffer_bytes']):.1f}",
                     f"{mb(ex[VARIANTS[2]]):.1f}", f"{mb(r['budget_extra_bytes']):.1f}",
                     f"{mb(pk['signed SNIP']):.0f} / +{mb(ex['signed SNIP']):.1f}",
                     f"{mb(pk['per-layer']):.0f} / +{mb(ex['per-layer']):.1f}",
                     "met" if r["memory_goal_met"] else "NOT met"])  # fmt: skip
    print(common.table(["L", "weights", "score buffer", "activations", "budget", "signed SNIP peak/extra",
                        "per-layer peak/extra", ""], rows))  # fmt: skip
    print(
        "budget = score buffer (fp32) + activations (the same passes with every gradient dropped as it lands)"
        " + one matrix-sized slack"
    )
    common.write(args.out, {"benchmark": "per_layer", "machine": common.machine(), "results": results})


def argparse_help() -> str:
    return f"internal: measure one variant ({', '.join(CHILD)}) on L layers in this process"


if __name__ == "__main__":
    main()
