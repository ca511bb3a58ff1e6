"""A 4-level sparsity sweep through the real CLI: scoring passes and wall time vs independent runs.

Variants, alternated over repetitions, each from scratch (fresh artifact cache and output folders):
- sweep: `harmsweep -m pruning.sparsity=a,b,c,d` with the content-keyed artifact cache
  (calibration, scores and the unpruned evaluation are shared by the 4 runs);
- sweep, cache off: the same multirun with paths.artifacts=null (one process, every run recomputes);
- independent: 4 separate `harmsweep` processes with paths.artifacts=null, each its own hydra.run.dir.
Scoring passes are summed over the runs' result.json["scoring_passes"] (forward+backward passes spent
scoring); the goal is that the sweep scores each calibration set exactly once, so its total equals one
run's. File calibration (pairs written here, no generation), like tests/test_cli.py's file runs.
Writes JSON to outputs/bench/sweep_reuse.json.

    python bench/sweep_reuse.py [--model tiny_llama|smollm2_135m] [--n 16] [--eval-n 4] [--reps 2]
        [--sparsities 0.01 0.02 0.03 0.04] [--extra KEY=VALUE ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

SPARSITIES = {"tiny_llama": ["0.01", "0.02", "0.03", "0.04"], "smollm2_135m": ["1e-6", "3e-6", "1e-5", "3e-5"]}
VARIANTS = ("sweep", "sweep, cache off", "independent")


def harmsweep(args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "harmsweep.cli", *args], cwd=common.ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"harmsweep {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def run_variant(variant: str, base: list[str], sparsities: list[str], folder: Path, env: dict[str, str]) -> list[Path]:
    """Run one variant from scratch in ``folder``; returns the result.json files it wrote."""
    if variant == "independent":
        for i, s in enumerate(sparsities):
            harmsweep([*base, f"pruning.sparsity={s}", "paths.artifacts=null", f"hydra.run.dir={folder}/run{i}"], env)
    else:
        cache = "paths.artifacts=null" if variant == "sweep, cache off" else f"paths.artifacts={folder}/artifacts"
        harmsweep(["-m", *base, f"pruning.sparsity={','.join(sparsities)}", cache, f"hydra.sweep.dir={folder}/sweep"],
                  env)  # fmt: skip
    return sorted(folder.rglob("result.json"))


def main() -> None:
    p = common.parser(__doc__, "sweep_reuse", n=16, reps=2)
    p.set_defaults(model="tiny_llama")
    p.add_argument("--eval-n", type=int, default=4)
    p.add_argument("--sparsities", nargs=4)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = p.parse_args()
    sparsities = args.sparsities or SPARSITIES.get(args.model, SPARSITIES["smollm2_135m"])

    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        harmful, benign = common.pair_files(Path(tmp), args.n + args.eval_n)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if args.model.startswith("tiny_"):
            env["HARMSWEEP_CACHE"] = f"{tmp}/cache"  # nothing to convert; keep the user's cache untouched
        keep = 0.2 if args.model.startswith("tiny_") else 0.011  # tiny models sweep big sparsities
        base = [f"model={args.model}", "calibration=file", f"calibration.harmful.file={harmful}",
                f"calibration.benign.file={benign}", f"calibration.n={args.n}", f"eval.n={args.eval_n}",
                "eval.benign_references=dataset", "data.root=null", f"scores.keep={keep}", *args.extra]  # fmt: skip
        for rep in range(args.reps):
            for variant in args.variants:
                folder = Path(tmp) / f"rep{rep}-{variant.replace(' ', '').replace(',', '-')}"
                start = time.perf_counter()
                files = run_variant(variant, base, sparsities, folder, env)
                seconds = time.perf_counter() - start
                runs = [json.loads(f.read_text()) for f in files]
                passes = [r["scoring_passes"] for r in runs]
                results[variant].append({"seconds": seconds, "runs": len(runs), "scoring_passes": passes,
                                         "computed": [r["computed"] for r in runs],
                                         "timings_s": [r["timings_s"] for r in runs]})  # fmt: skip
                print(f"rep {rep} {variant}: {seconds:.1f} s, scoring passes {passes}", flush=True)

    one_run = max(max(r["scoring_passes"]) for rs in results.values() for r in rs)  # a run that scored both sets
    summary = {}
    for variant, rs in results.items():
        totals = [sum(r["scoring_passes"]) for r in rs]
        summary[variant] = {"time_s": common.spread([r["seconds"] for r in rs]), "scoring_passes": totals,
                            "runs_that_scored": [sum(1 for p in r["scoring_passes"] if p) for r in rs]}  # fmt: skip
    ref = summary[args.variants[0]]["time_s"]["median"]
    goal_met = "sweep" in summary and all(t == one_run for t in summary["sweep"]["scoring_passes"])

    print(f"\n{len(sparsities)}-level sparsity sweep {','.join(sparsities)} on {args.model}, calibration n={args.n} "
          f"per set, eval n={args.eval_n}, {args.reps} reps (median, min-max)")  # fmt: skip
    rows = [[v, f"{s['time_s']['median']:.1f} ({s['time_s']['min']:.1f}-{s['time_s']['max']:.1f})",
             f"{s['time_s']['median'] / ref:.2f}", str(sorted(set(s["scoring_passes"]))),
             str(sorted(set(s["runs_that_scored"])))] for v, s in summary.items()]  # fmt: skip
    print(common.table(["variant", "wall s", f"/ {args.variants[0]}", "scoring passes", "runs that scored"], rows))
    print(
        f"one run scores both sets in {one_run} passes; sweep scores each set once: {'met' if goal_met else 'NOT met'}"
    )
    common.write(args.out, {"benchmark": "sweep_reuse", "machine": common.machine(), "model": args.model,
                            "n": args.n, "eval_n": args.eval_n, "sparsities": sparsities, "extra": args.extra,
                            "passes_per_run": one_run, "summary": summary, "goal_met": goal_met,
                            "reps": results})  # fmt: skip


if __name__ == "__main__":
    main()
