"""harmsweep's batched signed SNIP (all layers in one pass) vs the B-TAP authors' per-layer scheme, on one model.

The authors' scheme (btap_reference.md section 3, re-implemented here from that spec, not their code): for each
decoder layer l, every other weight frozen and only layer l's linear weights requiring grad, each example runs
forward and backward alone (batch of one, transformers' own loss with labels, no attention mask), and the
gradients are summed over examples: L x n passes per calibration set. harmsweep scores every layer with one
forward+backward per batch of ``--batch`` (pipeline default 8): ceil(n / batch) passes. Both in fp32 here, on the
same calibration set (n pairs cut at ``--length`` tokens, template "plain"), so the two score sets must agree up
to fp32 rounding: harmsweep's S is the mean over examples, the per-layer sum is divided by n to compare. Reported:
seconds, passes, the ratio (goal: harmsweep >= 10x faster at SmolLM2 size), the worst matrix's
max |difference| / max |S|, and the agreement of the per-matrix top q = 1e-3 of H = -S (the authors' selection
unit). ``--layers K`` runs the per-layer scheme on K of the L layers, spread evenly over the depth (a backward
stops at layer l, so low layers cost more than high ones), and extrapolates its time linearly to L, saying so.
Prints a table and a JSON line; writes outputs/bench/per_layer_btap.json.

    python bench/per_layer_btap.py [--model smollm2_135m | tiny] [--n 8] [--layers K] [--length 64] [--reps 1]
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping, Sequence

import common
import torch
from torch import nn

from harmsweep.batches import iter_batches
from harmsweep.calibration.pairs import Pair, encode_pairs
from harmsweep.devices import input_device
from harmsweep.models.parts import scored_parameters
from harmsweep.scoring.snip import signed_snip

Q = 1e-3  # per-matrix prune fraction for the mask comparison
GOAL = 10.0  # harmsweep's batched pass at least this much faster than the per-layer scheme


def pairs(n: int) -> list[Pair]:
    """Calibration pairs long enough to be cut at any ``--length`` up to a few hundred tokens."""
    return [
        Pair(
            f"How do I do task {i}?",
            f"Sure, here is how to finish task {i}: " + "gather the parts, then put them together quietly. " * 20,
            f"pair-{i}",
        )
        for i in range(n)
    ]


def spread_layers(total: int, count: int | None) -> list[int]:
    """``count`` layers spread evenly over 0..total-1 (both ends included), or all of them."""
    if count is None or count >= total:
        return list(range(total))
    if count == 1:
        return [total // 2]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def per_layer_scores(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], layers: Sequence[int]
) -> dict[str, torch.Tensor]:
    """S = W * sum_i dL_i/dW for the weights of ``layers``, one layer and one example per forward+backward."""
    named = dict(model.named_parameters())
    params = scored_parameters(model)
    device = input_device(model)
    previous = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    scores = {}
    try:
        for layer in layers:
            names = [n for n, p in params.items() if p.layer == layer]
            sums = {n: torch.zeros_like(named[n]) for n in names}
            for n in names:
                named[n].requires_grad_(True)
            for i in range(tensors["input_ids"].size(0)):
                model.zero_grad(set_to_none=True)
                width = int(tensors["attention_mask"][i].sum())
                ids = tensors["input_ids"][i : i + 1, :width].to(device)
                labels = tensors["labels"][i : i + 1, :width].to(device)
                model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
                for n in names:
                    sums[n].add_(named[n].grad)
            for n in names:
                named[n].requires_grad_(False)
                scores[n] = named[n].detach().float() * sums.pop(n).float()
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in previous.items():
            p.requires_grad_(flag)
    return scores


def top_agreement(a: torch.Tensor, b: torch.Tensor, q: float) -> tuple[int, int]:
    """How many of the top int(q * numel) entries of H = -S the two score matrices share, and that count."""
    k = int(q * a.numel())
    if k == 0:
        return 0, 0
    ta, tb = torch.topk(-a.flatten(), k).indices, torch.topk(-b.flatten(), k).indices
    return int(torch.isin(ta, tb).sum()), k


def synced(fn):
    """Run ``fn`` and return (its result, seconds), waiting for the GPU if there is one."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def load(name: str):
    lm = common.model("tiny_llama" if name == "tiny" else name)
    lm.model.eval()
    return lm


def main() -> None:
    p = common.parser(__doc__, "per_layer_btap", n=8, reps=1)
    p.add_argument("--layers", type=int, default=None, help="run the per-layer scheme on this many layers only")
    p.add_argument("--length", type=int, default=64, help="tokens per pair (prompt + response, cut at the end)")
    p.add_argument("--batch", type=int, default=8, help="harmsweep's batch (calibration.batch_size)")
    args = p.parse_args()
    lm = load(args.model)
    model = lm.model
    tensors = encode_pairs(lm.tokenizer, pairs(args.n), "plain", args.length)
    tokens = int(tensors["attention_mask"].sum())
    params = scored_parameters(model)
    total_layers = len({q.layer for q in params.values()})
    layers = spread_layers(total_layers, args.layers)
    batches = list(iter_batches(tensors, args.batch, by_length=True))

    signed_snip(model, batches[:1], n_samples=args.n)  # warm-ups: one-time allocations and kernel choices
    per_layer_scores(model, {k: v[:1] for k, v in tensors.items()}, layers[-1:])
    times = []
    for _ in range(args.reps):
        batched, seconds = synced(lambda: signed_snip(model, batches, n_samples=args.n))
        times.append(seconds)
    layered, per_layer_s = synced(lambda: per_layer_scores(model, tensors, layers))
    scale = total_layers / len(layers)
    per_layer_full = per_layer_s * scale
    batched_s = statistics.median(times)

    rel, agree, picked = 0.0, 0, 0
    for name, s in layered.items():
        mean = s / args.n  # harmsweep's S is the mean over examples
        rel = max(rel, float((batched[name] - mean).abs().max()) / max(float(mean.abs().max()), 1e-30))
        a, k = top_agreement(batched[name], mean, Q)
        agree, picked = agree + a, picked + k
    ratio = per_layer_full / batched_s
    record = {
        "benchmark": "per_layer_btap", "model": args.model, "n": args.n, "length": args.length, "tokens": tokens,
        "batch": args.batch, "layers_total": total_layers, "layers_run": layers, "extrapolated": scale != 1.0,
        "passes": {"harmsweep": len(batches), "per_layer": total_layers * args.n,
                   "per_layer_run": len(layers) * args.n},
        "seconds": {"harmsweep": batched_s, "harmsweep_reps": times, "per_layer_run": per_layer_s,
                    "per_layer": per_layer_full},
        "ratio": ratio, "goal": GOAL, "goal_met": ratio >= GOAL, "max_rel_diff": rel, "mask_q": Q,
        "mask_agree": agree, "mask_size": picked, "matrices_compared": len(layered), "device": str(input_device(model)),
    }  # fmt: skip

    note = f" (extrapolated x{scale:.2f} from {len(layers)} of {total_layers} layers: {layers})" if scale != 1 else ""
    print(f"\nsigned SNIP, {args.model}, n={args.n} pairs, {tokens} tokens, one calibration set, {record['device']}")
    rows = [
        ["harmsweep (batched, all layers)", str(len(batches)), f"{batched_s:.2f}"],
        ["per-layer, authors' scheme", str(total_layers * args.n), f"{per_layer_full:.2f}{'*' if note else ''}"],
    ]
    print(common.table(["scheme", "passes", "seconds"], rows))
    if note:
        print(f"* per-layer time{note}; measured {per_layer_s:.2f} s over {len(layers) * args.n} passes")
    print(f"ratio per-layer / harmsweep: {ratio:.1f}x; goal >= {GOAL:.0f}x (at SmolLM2 size): "
          f"{'met' if ratio >= GOAL else 'NOT met'}")  # fmt: skip
    print(f"scores: max |diff| / max |S| over {len(layered)} matrices {rel:.2e}; per-matrix top q={Q:g} of -S: "
          f"{agree} of {picked} shared")  # fmt: skip
    print(json.dumps(record))
    common.write(args.out, {**record, "machine": common.machine()})


if __name__ == "__main__":
    main()
