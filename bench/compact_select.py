"""Mask selection from a compact score set (stored tails only) vs from the dense set, at 1e8 scores.

Synthetic harm and benign signed-SNIP sets (bench/mask_select.py's 7B layout scaled to the size, N(0, 1)
per matrix) are written once with harmsweep.scoring.writer.write: dense, and compact at the default
``scores`` block (keep 0.011 harm, 0.01 benign) per ranking unit. Each measurement opens the files in a
fresh process and runs harmsweep.pruning.select with the run's default rule (signed_snip, sparsity 1e-5,
protect 0.01), global and per matrix:
- dense: DenseScores, read and ranked one matrix at a time (the radix select streams all N scores);
- compact: TailScores, a top-k over the stored (index, value) tails alone (about 1% of N).
The masks must be identical. Time and peak extra memory (VmHWM minus RSS before the call) per variant;
repetitions alternate the variants. The files sit in the page cache, so this is the ranking, not the disk.
Writes JSON to outputs/bench/compact_select.json.

    python bench/compact_select.py [--sizes 1e8] [--reps 3] [--granularity global matrix] [--dir DIR]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch
from mask_select import layout, make_scores, scored

from harmsweep.pruning.select import select
from harmsweep.pruning.spec import PruneSpec
from harmsweep.scoring import store, writer

SPARSITY, PROTECT = 1e-5, 0.01
VARIANTS = ("dense", "compact")


def spec_for(granularity: str) -> PruneSpec:
    return PruneSpec(rule="signed_snip", sparsity=SPARSITY, protect=PROTECT, granularity=granularity)


def files(folder: Path, variant: str, granularity: str) -> dict[str, Path]:
    unit = "" if variant == "dense" else f"-{granularity}"
    return {kind: folder / f"{kind}-{variant}{unit}.safetensors" for kind in ("harm", "benign")}


def prepare(folder: Path, total: float, granularities: list[str]) -> None:
    """The dense files and one compact pair per granularity, written as a run writes them (kept ones reused)."""
    shapes = layout(total)
    for kind in ("harm", "benign"):
        todo = [g for g in granularities if not files(folder, "compact", g)[kind].exists()]
        if not todo and files(folder, "dense", "")[kind].exists():
            continue
        scores = make_scores(shapes, kind)
        if not files(folder, "dense", "")[kind].exists():
            writer.write(scores, files(folder, "dense", "")[kind], kind, store.StoreSpec(store="dense"))
        for granularity in todo:
            path = files(folder, "compact", granularity)[kind]
            writer.write(scores, path, kind, store.StoreSpec(), granularity, store.order_of(kind))
        del scores


def child(folder: Path, variant: str, granularity: str, total: float, save: str) -> None:
    """One selection in a fresh process; prints JSON, saves the mask."""
    shapes = layout(total)
    # select reads only sizes from the weights here (signed_snip ranks scores): shape-only stand-ins
    weights = {n: torch.empty(s, device="meta") for n, s in shapes.items()}
    sets = {kind: store.open_scores(path) for kind, path in files(folder, variant, granularity).items()}
    base = common.status_bytes("VmRSS")
    reset = common.reset_peak()
    start = time.perf_counter()
    mask = select(spec_for(granularity), scored(shapes), weights, sets, device="cpu")
    seconds = time.perf_counter() - start
    peak = common.status_bytes("VmHWM")
    torch.save(mask, save)
    print(json.dumps({"seconds": seconds, "base_rss": base, "peak_rss": peak, "peak_reset": reset,
                      "selected": sum(t.numel() for t in mask.values())}))  # fmt: skip


def measure(folder: Path, variant: str, granularity: str, total: float, save: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), variant, granularity, repr(total), str(save)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = common.parser(__doc__, "compact_select", reps=3)
    p.add_argument("--sizes", type=float, nargs="+", default=[1e8])
    p.add_argument("--granularity", nargs="+", default=["global", "matrix"], choices=["global", "matrix"])
    p.add_argument("--dir", help="keep the score files here (per size) and reuse them on the next run")
    p.add_argument("--child", nargs=5, metavar=("DIR", "VARIANT", "GRANULARITY", "SIZE", "SAVE"), help="internal")
    args = p.parse_args()
    if args.child:
        folder, variant, granularity, size, save = args.child
        child(Path(folder), variant, granularity, float(size), save)
        return

    results, all_equal = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for total in args.sizes:
            folder = Path(args.dir) / f"{total:g}" if args.dir else Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            prepare(folder, total, args.granularity)
            n = sum(a * b for a, b in layout(total).values())
            print(f"{n:.2e} scores: files written in {time.perf_counter() - start:.0f} s", flush=True)
            for granularity in args.granularity:
                runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
                for rep in range(args.reps):
                    for v in VARIANTS:
                        runs[v].append(measure(folder, v, granularity, total, Path(tmp) / f"{v}-{rep}.pt"))
                        print(f"{n:.2e} {granularity} {v}: {runs[v][-1]['seconds']:.2f} s", flush=True)
                masks = {v: torch.load(Path(tmp) / f"{v}-0.pt") for v in VARIANTS}
                same = masks["dense"].keys() == masks["compact"].keys() and all(
                    torch.equal(masks["dense"][k], masks["compact"][k]) for k in masks["dense"]
                )
                all_equal &= same
                times = {v: common.spread([r["seconds"] for r in rs]) for v, rs in runs.items()}
                results.append({
                    "size": total, "n": n, "granularity": granularity, "runs": runs, "time_s": times,
                    "peak_extra_bytes": {v: min(r["peak_rss"] - r["base_rss"] for r in rs) for v, rs in runs.items()},
                    "selected": runs["dense"][0]["selected"], "same_mask": same,
                    "speedup": times["dense"]["median"] / times["compact"]["median"],
                })  # fmt: skip

    print(f"\nselection from files, signed_snip, sparsity {SPARSITY}, protect {PROTECT}; fresh process per run")
    rows = []
    for r in results:
        for v, t in r["time_s"].items():
            rows.append([f"{r['n']:.2e}", r["granularity"], v, f"{t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f})",
                         f"{common.mib(r['peak_extra_bytes'][v]):.0f}", str(r["selected"]), str(r["same_mask"])])  # fmt: skip
    print(common.table(["N", "unit", "scores", "time s", "peak extra MiB", "selected", "same mask"], rows))
    for r in results:
        print(f"N={r['n']:.2e} {r['granularity']}: dense / compact time {r['speedup']:.1f}x (goal >= 10x)")
    common.write(args.out, {"benchmark": "compact_select", "machine": common.machine(), "sparsity": SPARSITY,
                            "protect": PROTECT, "keep": store.StoreSpec().keep, "keep_benign": store.StoreSpec().keep_benign,
                            "results": results, "all_masks_equal": all_equal})  # fmt: skip
    if not all_equal:
        sys.exit("selection from the compact set differs from selection from the dense set")


if __name__ == "__main__":
    main()
