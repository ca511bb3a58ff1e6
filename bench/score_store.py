"""Compact vs dense score sets: bytes on disk, bytes a cached run reads, write and selection time.

Real signed SNIP scores of the embedded model (harm set on AdvBench prefill pairs, benign set on
Alpaca), written both ways, then the default run's mask selected from each (identical masks are
checked) and the report's metrics B, Gini and C computed from each. Bytes are extrapolated per scored
weight to Llama-3.1-8B and a 70B model. Prints a table and writes outputs/bench/score_store.json.

    python bench/score_store.py [--model smollm2_135m] [--n 16] [--reps 2]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import common
import torch

from harmsweep.batches import iter_batches
from harmsweep.calibration.pairs import Pair, encode_pairs, file_pairs
from harmsweep.data import load_records, take
from harmsweep.models.parts import scored_parameters
from harmsweep.pruning.select import select
from harmsweep.pruning.spec import PruneSpec
from harmsweep.report.compression import concentration, gini, separation
from harmsweep.scoring import store, writer
from harmsweep.scoring.snip import signed_snip

SCORED = {"Llama-3.1-8B": 6_979_321_856, "Llama-3.1-70B": 68_451_041_280}  # harmsweep plan's N


def timed(fn: Callable[[], object], reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    p = common.parser(__doc__, "score_store", n=16, reps=2)
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args()
    lm = common.model(args.model)
    root = common.data_root()
    harmful = [
        Pair(r.prompt, r.target or "Sure, here is", r.source_id)
        for r in take(load_records("advbench", root), args.n, 0)
    ]
    benign = file_pairs(take(load_records("alpaca", root), args.n, seed=0), "alpaca")
    sets = {kind: signed_snip(lm.model, list(iter_batches(encode_pairs(lm.tokenizer, pairs, "chat", args.max_length),
                                                          8, by_length=True)), n_samples=args.n)
            for kind, pairs in (("harm", harmful), ("benign", benign))}  # fmt: skip
    params = scored_parameters(lm.model)
    weights = {n: w for n, w in lm.model.named_parameters() if n in params}
    n_scored = sum(w.numel() for w in weights.values())
    spec = PruneSpec()  # the default run: signed_snip, sparsity 1e-5, protect 0.01, global
    k_report = max(1, round(5e-6 * n_scored))
    rows: dict[str, dict[str, float]] = {}
    masks = {}
    metrics = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("dense", "compact"):
            kept = store.StoreSpec(store=fmt)
            paths = {kind: Path(tmp) / f"{kind}-{fmt}.safetensors" for kind in sets}
            write_s, _ = timed(lambda: [writer.write(sets[k], paths[k], k, kept, "global", store.order_of(k))  # noqa: B023
                                        for k in sets], 1)  # fmt: skip
            files = {k: store.open_scores(paths[k]) for k in sets}
            select_s, masks[fmt] = timed(lambda: select(spec, params, weights, files), args.reps)  # noqa: B023
            report_s, metrics[fmt] = timed(
                lambda: (concentration(files["harm"], k_report), gini(files["harm"]),  # noqa: B023
                         separation(files["harm"], files["benign"], k_report)), args.reps)  # noqa: B023  # fmt: skip
            size = sum(path.stat().st_size for path in paths.values())
            rows[fmt] = {"bytes_per_variant": size, "bytes_per_weight": size / n_scored, "write_s": write_s,
                         "select_s": select_s, "report_s": report_s}  # fmt: skip
    identical = all(torch.equal(masks["dense"][n], masks["compact"][n]) for n in params)
    same_metrics = metrics["dense"] == metrics["compact"]
    ratio = rows["dense"]["bytes_per_variant"] / rows["compact"]["bytes_per_variant"]
    print(f"\n{args.model}: N = {n_scored:,} scored weights; harm + benign set per variant, default settings "
          f"(scores.keep={store.StoreSpec().keep}, keep_benign={store.StoreSpec().keep_benign})")  # fmt: skip
    head = f"{'store':<9}{'on disk':>12}{'B/weight':>10}" + "".join(f"{m:>16}" for m in SCORED)
    print(head + f"{'write s':>9}{'select s':>10}{'report s':>10}")
    for fmt, r in rows.items():
        extra = "".join(f"{r['bytes_per_weight'] * n / 1e9:>13.2f} GB" for n in SCORED.values())
        print(f"{fmt:<9}{r['bytes_per_variant'] / 1e6:>9.1f} MB{r['bytes_per_weight']:>10.3f}{extra}"
              f"{r['write_s']:>9.2f}{r['select_s']:>10.2f}{r['report_s']:>10.2f}")  # fmt: skip
    print(
        f"dense / compact bytes (= bytes a cached run reads): {ratio:.1f}x; "
        f"selection {rows['dense']['select_s'] / rows['compact']['select_s']:.2f}x; "
        f"masks identical: {identical}; B, Gini, C identical: {same_metrics}"
    )
    common.write(args.out, {"model": args.model, "n_scored": n_scored, "rows": rows, "ratio": ratio,
                            "extrapolated_gb": {fmt: {m: r["bytes_per_weight"] * n / 1e9 for m, n in SCORED.items()}
                                                for fmt, r in rows.items()},
                            "masks_identical": identical, "metrics_identical": same_metrics,
                            "metrics": metrics["compact"], "machine": common.machine()})  # fmt: skip
    if not (identical and same_metrics):
        raise SystemExit("compact and dense disagree")


if __name__ == "__main__":
    main()
