"""Generation throughput: batched vs one-prompt-at-a-time greedy decoding on the same prompts.

Same process, same prompts, variants alternated over repetitions; the ratio is the claim. Both
variants produce identical tokens (checked), so tokens/s compares like with like. Writes JSON to
outputs/bench/generation.json.

    python bench/generation.py [--model smollm2_135m] [--n 16] [--batch 16] [--new 48] [--reps 2]
"""

from __future__ import annotations

import statistics
import time

import common

from harmsweep.calibration.pairs import attack_prompts
from harmsweep.data import load_records, take
from harmsweep.generation.hf import generate
from harmsweep.generation.sampling import Sampling


def main() -> None:
    p = common.parser(__doc__, "generation", reps=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new", type=int, default=48)
    args = p.parse_args()

    lm = common.model(args.model)
    root = common.data_root()
    prompts, _ = attack_prompts(lm.tokenizer, take(load_records("advbench", root), args.n, seed=0), "chat", 0)
    sampling = Sampling(max_new_tokens=args.new)
    sizes = {"batched": args.batch, "one at a time": 1}
    times: dict[str, list[float]] = {k: [] for k in sizes}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(args.reps):
        for name, size in sizes.items():
            start = time.perf_counter()
            outputs[name] = generate(lm.model, lm.tokenizer, prompts, sampling, batch_size=size, desc=name)
            times[name].append(time.perf_counter() - start)
    tokens = sum(len(o) for o in outputs["batched"])
    same = outputs["batched"] == outputs["one at a time"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"model {args.model}: {args.n} AdvBench prompts, greedy, up to {args.new} new tokens, {tokens} tokens generated"
    )
    print(f"{'variant':<16}{'median s':>10}{'min s':>10}{'max s':>10}{'tokens/s':>10}")
    for name in sizes:
        print(
            f"{name:<16}{med[name]:>10.2f}{min(times[name]):>10.2f}{max(times[name]):>10.2f}{tokens / med[name]:>10.1f}"
        )
    speedup = med["one at a time"] / med["batched"]
    print(f"speed-up {speedup:.2f}x (goal >= 5x); identical outputs: {same}")
    record = {"model": args.model, "n": args.n, "batch": args.batch, "new_tokens": args.new, "tokens": tokens,
              "times_s": times, "median_s": med, "speedup": speedup, "identical_outputs": same,
              "machine": common.machine()}  # fmt: skip
    common.write(args.out, record)


if __name__ == "__main__":
    main()
