"""Global mask selection at 7B scale: streaming radix select vs a full sort of a concatenated copy.

Synthetic harm and benign signed-SNIP score sets of 1e8 (and 1e9) fp32 values, laid out as a
7B Llama's decoder matrices (32 layers x q,k,v,o 4096x4096 and gate,up 11008x4096, down
4096x11008), each side scaled so the total matches; every matrix is drawn from N(0, 1) with its own
seeded torch.Generator, so ties are negligible. The rule: H = -S_harm, eligible H > 0, protect the
top p = 1% by |S_benign|, prune K = round(rho N) down the H ranking, rho = 5e-6.

Variants, each in a fresh subprocess per measurement, alternated over repetitions:
- streaming: harmsweep.pruning.select (the real path: one matrix-sized temporary at a time);
- full sort: concatenate, torch.sort (stable, so ties break by matrix order then flat index, like
  select): the reference; at 1e8 its selected set must equal streaming's exactly;
- topk: concatenate, torch.topk (a partial sort, still a full copy).
Peak extra memory = peak RSS (VmHWM, the process's own ru_maxrss counter) minus RSS once the score
tensors exist (the peak is reset at that point through /proc/self/clear_refs). At 1e9 the scores alone take 8 GB; the baselines need ~25 bytes per
score, over the memory budget, so only streaming runs there (the JSON says why).
Writes JSON to outputs/bench/mask_select.json.

    python bench/mask_select.py [--sizes 1e8] [--sizes 1e8 1e9] [--reps 3] [--reps-large 1]
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

from harmsweep.models.parts import ScoredParam
from harmsweep.pruning.select import select
from harmsweep.pruning.spec import PruneSpec

MATRICES_7B = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
               "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
               "mlp.down_proj": (4096, 11008)}  # fmt: skip
LAYERS_7B = 32
RHO = 5e-6
PROTECT = 0.01
BASELINE_BYTES_PER_SCORE = 25  # two score sets (8) + concatenated copy (4) + sorted values (4) + int64 order (8) + mask
VARIANTS = ("streaming", "full sort", "topk")


def layout(total: float, layers: int = LAYERS_7B) -> dict[str, tuple[int, int]]:
    """Matrix shapes of a 7B Llama's decoder, each side scaled by sqrt(total / 6.5e9)."""
    full = layers * sum(a * b for a, b in MATRICES_7B.values())
    f = math.sqrt(total / full)
    return {
        f"model.layers.{layer}.{m}.weight": (max(1, round(a * f)), max(1, round(b * f)))
        for layer in range(layers)
        for m, (a, b) in MATRICES_7B.items()
    }


def scored(shapes: dict[str, tuple[int, int]]) -> dict[str, ScoredParam]:
    return {n: ScoredParam(n, int(n.split(".")[2]), n.split(".")[-2], 0) for n in shapes}


def make_scores(shapes: dict[str, tuple[int, int]], which: str) -> dict[str, torch.Tensor]:
    """Deterministic N(0, 1) scores per matrix, generated in place (no temporaries)."""
    base = {"harm": 1, "benign": 2}[which] * 1_000_003
    return {
        n: torch.randn(shape, generator=torch.Generator().manual_seed(base + i))
        for i, (n, shape) in enumerate(shapes.items())
    }


def streaming(harm: dict[str, torch.Tensor], benign: dict[str, torch.Tensor], rho: float, protect: float):
    """The real path: select() with a signed_snip spec over the given score dicts; flat indices per matrix."""
    spec = PruneSpec(rule="signed_snip", sparsity=rho, protect=protect)
    shapes = {n: tuple(t.shape) for n, t in harm.items()}
    return select(spec, scored(shapes), harm, {"harm": harm, "benign": benign})


def global_indices(selected: dict[str, torch.Tensor], harm: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-matrix flat indices -> sorted positions in the concatenation of all matrices (in dict order)."""
    out, offset = [], 0
    for n, t in harm.items():
        out.append(selected.get(n, torch.empty(0, dtype=torch.long)) + offset)
        offset += t.numel()
    return torch.cat(out).sort().values


def reference(harm, benign, rho: float, protect: float, how: str = "full sort") -> torch.Tensor:
    """The same rule over concatenated copies; positions in the concatenation, sorted.

    "full sort": torch.sort(stable) breaks ties by position, as select does; "topk": torch.topk.
    """
    n_total = sum(t.numel() for t in harm.values())
    kp, k = round(protect * n_total), round(rho * n_total)

    def top(values: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        if how == "topk":
            return torch.topk(values, count, sorted=False)
        vals, idx = torch.sort(values, descending=True, stable=True)
        return vals[:count].clone(), idx[:count].clone()

    u = torch.cat([t.reshape(-1) for t in benign.values()]).abs_()
    protected = torch.zeros(n_total, dtype=torch.bool)
    protected[top(u, kp)[1]] = True
    del u
    h = torch.cat([t.reshape(-1) for t in harm.values()]).neg_()
    h.masked_fill_((h <= 0) | protected, float("-inf"))
    del protected
    vals, idx = top(h, k)
    return idx[vals > float("-inf")].sort().values


def child(variant: str, total: float, save: str | None) -> None:
    """One measurement in a fresh process; prints JSON, saves the selected positions to ``save``."""
    shapes = layout(total)
    harm, benign = make_scores(shapes, "harm"), make_scores(shapes, "benign")
    base = common.status_bytes("VmRSS")
    reset = common.reset_peak()
    start = time.perf_counter()
    if variant == "streaming":
        chosen = global_indices(streaming(harm, benign, RHO, PROTECT), harm)
    else:
        chosen = reference(harm, benign, RHO, PROTECT, variant)
    seconds = time.perf_counter() - start
    # VmHWM: ru_maxrss's counter for this process alone (ru_maxrss also carries the parent's RSS at fork)
    peak = common.status_bytes("VmHWM")
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if save:
        torch.save(chosen, save)
    n = sum(t.numel() for t in harm.values())
    print(json.dumps({"n": n, "base_rss": base, "peak_rss": peak, "ru_maxrss": ru_maxrss, "peak_reset": reset,
                      "seconds": seconds, "selected": chosen.numel()}))  # fmt: skip


def measure(variant: str, total: float, save: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, repr(total)] + (["--save", str(save)] if save else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = common.parser(__doc__, "mask_select", reps=3)
    p.add_argument("--sizes", type=float, nargs="+", default=[1e8])
    p.add_argument("--reps-large", type=int, default=1, help="repetitions for sizes above 1e8")
    p.add_argument("--mem-budget-gb", type=float, default=14.0)
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "SIZE"), help="internal: one measurement")
    p.add_argument("--save", help="internal: where the child saves its selection")
    args = p.parse_args()
    if args.child:
        child(args.child[0], float(args.child[1]), args.save)
        return

    results, all_equal = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for total in args.sizes:
            n = sum(a * b for a, b in layout(total).values())
            need = BASELINE_BYTES_PER_SCORE * n
            variants = list(VARIANTS) if need <= args.mem_budget_gb * 1e9 else ["streaming"]
            skipped = None if len(variants) > 1 else (
                f"baselines need ~{need / 1e9:.0f} GB (2 score sets {8 * n / 1e9:.0f} GB + concatenated copy, sorted "
                f"values and int64 order), over the {args.mem_budget_gb:g} GB budget of this machine"
            )  # fmt: skip
            reps = args.reps if total <= 1e8 else args.reps_large
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for rep in range(reps):
                for v in variants:
                    save = Path(tmp) / f"{v.replace(' ', '_')}-{total:g}.pt" if rep == 0 else None
                    runs[v].append(measure(v, total, save))
                    print(f"{total:.0e} {v}: {runs[v][-1]['seconds']:.2f} s", flush=True)
            chosen = {v: torch.load(Path(tmp) / f"{v.replace(' ', '_')}-{total:g}.pt") for v in variants}
            same = {v: torch.equal(chosen[v], chosen["full sort"]) for v in variants if "full sort" in chosen}
            all_equal &= all(same.values())
            results.append({
                "size": total, "n": n, "k": round(RHO * n), "protected": round(PROTECT * n), "matrices": len(layout(total)),
                "runs": runs, "time_s": {v: common.spread([r["seconds"] for r in rs]) for v, rs in runs.items()},
                "peak_extra_bytes": {v: statistics.median(r["peak_rss"] - r["base_rss"] for r in rs)
                                     for v, rs in runs.items()},
                "selected": {v: rs[0]["selected"] for v, rs in runs.items()}, "same_set_as_full_sort": same,
                "baselines_skipped": skipped,
            })  # fmt: skip

    print(f"\nglobal selection, signed_snip, protect {PROTECT}, rho {RHO}; fresh process per run (median, min-max)")
    rows = []
    for r in results:
        for v, t in r["time_s"].items():
            extra = r["peak_extra_bytes"][v]
            rows.append([f"{r['n']:.2e}", v, f"{t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f})",
                         f"{common.mib(extra):.0f}", f"{extra / (4 * r['n']):.3f}", str(r["selected"][v]),
                         str(r["same_set_as_full_sort"].get(v, "-"))])  # fmt: skip
        if r["baselines_skipped"]:
            rows.append([f"{r['n']:.2e}", "full sort, topk", "skipped (*)", "-", "-", "-", "-"])
    print(common.table(["N", "variant", "time s", "peak extra MiB", "extra / 4N", "selected", "same as sort"], rows))
    for r in results:
        if r["baselines_skipped"]:
            print(f"(*) N={r['n']:.2e}: {r['baselines_skipped']}")
    print("extra / 4N: peak extra memory over one fp32 copy of the N scores")
    for r in results:
        if "streaming" in r["time_s"] and "full sort" in r["time_s"]:
            st, so = r["time_s"]["streaming"]["median"], r["time_s"]["full sort"]["median"]
            xs, xo = r["peak_extra_bytes"]["streaming"], r["peak_extra_bytes"]["full sort"]
            print(
                f"N={r['n']:.2e}: full sort / streaming: time {so / st:.2f}x, peak extra memory {xo / max(xs, 1):.1f}x"
            )
    common.write(args.out, {"benchmark": "mask_select", "machine": common.machine(), "rho": RHO,
                            "protect": PROTECT, "results": results, "all_sets_equal": all_equal})  # fmt: skip
    if not all_equal:
        sys.exit("streaming selection differs from the full-sort reference")


if __name__ == "__main__":
    main()
