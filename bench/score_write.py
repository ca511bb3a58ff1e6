"""Writing a score set (tails + N + sums + Gini) from the buffer, against one streaming pass over it.

One streaming pass, the yardstick: every matrix read once and reduced the cheapest way a writer must at
least do once, its ranking values turned into float keys (``topk.float_keys``) and their top 16 bits counted
into a 65,536-bin histogram (``summary.histogram``: where + bincount, no host sync), the histograms joined,
one copy to the host. That is the first pass of the radix select every tail needs, so no exact writer can
cost less than about one of it. The write is ``scoring.writer.write`` as pipeline.stages calls it, from the
same buffer: a compact harm set (global unit, kept at ``--keep``: tails, N, the positive sum, the exact
Gini) and a compact benign set (|S|, no Gini). Scores are synthetic, SNIP-like (heavy tails: N(0,1) * U^3),
in Llama-shaped matrices, on the CPU unless ``--device`` says otherwise. Prints a table and writes
outputs/bench/score_write.json.

    python bench/score_write.py [--n-scores 1e8] [--reps 2] [--device cpu]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import common
import torch

from harmsweep.scoring import store, summary, writer
from harmsweep.scoring.topk import _BINS, _HALF, float_keys, ranking

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # q/o, k/v, gate/up, down of Llama-3.1-8B


def scores(n: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """About ``n`` synthetic raw scores in Llama-shaped matrices, cycling through SHAPES."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    total = 0
    while total < n:
        rows, cols = SHAPES[len(out) % len(SHAPES)]
        rows = min(rows, max(1, (n - total) // cols))
        out[f"m{len(out)}"] = (torch.randn(rows, cols, generator=g) * torch.rand(rows, cols, generator=g) ** 3).to(
            device
        )
        total += rows * cols
    return out


def streaming_pass(buffer: dict[str, torch.Tensor], order: str) -> torch.Tensor:
    """The yardstick (module docstring): keys and a top-16-bit histogram per matrix, joined, one host copy."""
    hist: torch.Tensor | None = None
    for s in buffer.values():
        keys = float_keys(ranking(s, order))
        part = summary.histogram((keys >> 16) + _HALF, keys != torch.iinfo(torch.int32).min, _BINS)
        hist = part if hist is None else hist.add_(part.to(hist.device))
    assert hist is not None
    return hist.cpu()


def timed(fn: Callable[[], object], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = common.parser(__doc__, "score_write", reps=2)
    p.add_argument("--n-scores", type=float, default=1e8)
    p.add_argument("--keep", type=float, default=0.0202, help="harm tail kept (scores.keep=auto's floor)")
    p.add_argument("--keep-benign", type=float, default=0.01)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    buffer = scores(int(args.n_scores), args.device)
    n = sum(t.numel() for t in buffer.values())
    kept = store.StoreSpec(keep=args.keep, keep_benign=args.keep_benign)
    rows, record = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, order in (("harm", "neg"), ("benign", "abs")):
            path = Path(tmp) / f"{kind}.safetensors"
            stream = timed(lambda o=order: streaming_pass(buffer, o), args.reps)
            write = timed(lambda k=kind, o=order, p=path: writer.write(buffer, p, k, kept, "global", o), args.reps)
            ratio = statistics.median(write) / statistics.median(stream)
            rows.append([kind, f"{n:.3g}", statistics.median(stream), statistics.median(write), f"{ratio:.2f}x",
                         "yes" if ratio <= 1.5 else "no"])  # fmt: skip
            record[kind] = {"stream_s": common.spread(stream), "write_s": common.spread(write), "ratio": ratio,
                            "bytes": path.stat().st_size}  # fmt: skip
    print(f"\nscore set write vs one streaming pass, {n:,} scores on {args.device} "
          f"(scores.keep={args.keep}, keep_benign={args.keep_benign}, {torch.get_num_threads()} threads)")  # fmt: skip
    print(common.table(["set", "scores", "stream s", "write s", "write/stream", "<= 1.5x"], rows))
    common.write(args.out, {"n_scores": n, "device": args.device, "keep": args.keep, "keep_benign": args.keep_benign,
                            "sets": record, "machine": common.machine()})  # fmt: skip


if __name__ == "__main__":
    main()
