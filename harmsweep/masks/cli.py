"""``harmsweep mask-from-checkpoint`` and ``harmsweep compare-masks``: argparse, one-line errors, printed summaries.

torch and safetensors are imported by the commands themselves, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from harmsweep.errors import HarmsweepError, exit_usage

COMMANDS = ("mask-from-checkpoint", "compare-masks")


def main(argv: Sequence[str]) -> None:
    """``argv``: the command name, then its arguments."""
    command, rest = argv[0], list(argv[1:])
    prog = f"harmsweep {command}"
    try:
        if command == "mask-from-checkpoint":
            from_checkpoint(_checkpoint_parser(prog).parse_args(rest))
        elif command == "compare-masks":
            compare_masks(_compare_parser(prog).parse_args(rest))
        else:
            raise HarmsweepError(f"unknown command {command}: one of {', '.join(COMMANDS)}")
    except HarmsweepError as exc:
        exit_usage(str(exc).splitlines()[0], prog)


def _checkpoint_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="The mask a pruned checkpoint holds: every 2-D decoder-layer weight that is zero in PRUNED and "
        "non-zero in BASE (e.g. hadasor/Llama-3.1-8B-Instruct-Pruned vs meta-llama/Llama-3.1-8B-Instruct). "
        "Read shard by shard, in row blocks: no model is loaded.",
    )
    p.add_argument("pruned", help="the pruned checkpoint: a local folder or a hub id (owner/name[@revision])")
    p.add_argument("base", help="the checkpoint it was pruned from: a local folder or a hub id")
    p.add_argument("--out", default="mask.safetensors", help="where the mask goes (default: mask.safetensors)")
    p.add_argument("--block", type=int, default=None, help="entries per row block read at once (default 2**24)")
    return p


def _compare_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Compare two harmsweep masks (mask.safetensors): Jaccard, counts of A, B and both, per matrix "
        "and per layer, the matrices that differ; writes a per-matrix CSV and a per-layer plot.",
    )
    p.add_argument("a", help="mask A (a run's mask.safetensors, or one from mask-from-checkpoint)")
    p.add_argument("b", help="mask B")
    p.add_argument("--out", default=None, help="folder for the CSV and the PNG (default: A's folder)")
    return p


def from_checkpoint(args: argparse.Namespace) -> None:
    from harmsweep.masks import checkpoint
    from harmsweep.pruning.masks import save_mask

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise HarmsweepError(f"--out {out}: a mask is a .safetensors file")
    pruned = checkpoint.open_checkpoint(args.pruned, "PRUNED")
    base = checkpoint.open_checkpoint(args.base, "BASE")
    mask, shapes = checkpoint.mask_from_checkpoints(pruned, base, block=args.block or checkpoint.BLOCK)
    summary = checkpoint.summarise(checkpoint.matrix_counts(mask, shapes))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_mask(mask, out)
    info = out.with_name(out.stem + "_summary.json")
    info.write_text(json.dumps({"pruned": args.pruned, "base": args.base, **summary}, indent=1))
    for line in checkpoint.summary_lines(summary):
        print(line)
    print(f"mask: {out}\nsummary: {info}")


def _load(path: str, what: str) -> dict:
    from safetensors import SafetensorError

    from harmsweep.masks.options import refuse_pickle
    from harmsweep.pruning.masks import load_mask

    refuse_pickle(path, what)
    if not Path(path).is_file():
        raise HarmsweepError(f"{what} not found: {path}")
    try:
        mask = load_mask(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise HarmsweepError(f"{what} {path} is not a harmsweep mask.safetensors: {exc}") from None
    bad = [n for n, t in mask.items() if t.dim() != 1 or t.is_floating_point()]
    if bad:
        raise HarmsweepError(f"{what} {path} is not a harmsweep mask (flat indices per parameter): see {bad[0]}")
    return mask


def compare_masks(args: argparse.Namespace) -> None:
    from harmsweep.masks.compare import compare, plot_layers, write_csv

    a, b = _load(args.a, "mask A"), _load(args.b, "mask B")
    out = Path(args.out) if args.out else Path(args.a).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    result = compare(a, b)
    print(f"A {args.a}: {result.a:,}   B {args.b}: {result.b:,}")
    print(f"both {result.both:,}   only A {result.a - result.both:,}   only B {result.b - result.both:,}   "
          f"Jaccard {result.jaccard:.4f}")  # fmt: skip
    print(f"{'layer':>6} {'A':>10} {'B':>10} {'both':>10}")
    for layer, (na, nb, both) in result.per_layer().items():
        print(f"{layer if layer >= 0 else 'other':>6} {na:>10,} {nb:>10,} {both:>10,}")
    differing = result.differing()
    print(f"{len(differing)} of {len(result.rows)} matrices differ" + (":" if differing else ""))
    for r in differing[:20]:
        print(f"  {r.name}: A {r.a:,}, B {r.b:,}, both {r.both:,}")
    if len(differing) > 20:
        print(f"  ... {len(differing) - 20} more in the CSV")
    table, figure = out / "mask_comparison.csv", out / "mask_comparison_layers.png"
    write_csv(result, table)
    plot_layers(result, figure, ("A", "B"))
    print(f"per-matrix table: {table}\nper-layer plot: {figure}")
