"""The paper's emergent-misalignment experiment (experiment=orgad2026_em) on one offline model, at CPU size, with the
judges behind a local endpoint.

The model-organisms domains (risky_financial_advice, ...) are not here: the domain is Betley et al.'s insecure-code
stand-in (20 chat pairs in em/insecure_small.jsonl under the data root), of which --held-out are held out (the EM model
answers them and those answers are the prune data), the rest train. Their recipe's single epoch at lr 1e-5 over
6,000 pairs is ~375 optimizer steps; over 12 pairs it would be one step, so the bench trains harder (--lr, --epochs,
no accumulation) and says so. The judges (aligned, coherent, in-domain) are the model named by --judge served by
bench/judge_server.py, asked for a number as text (em.judge.logprobs=false: a small model's tokenizer splits
"85" into digits, so the logprob-weighted 0-100 score of GPT-4o does not carry over); its numbers show the endpoint
path working and are not comparable with published EM rates.

    python bench/orgad2026_em.py [--model smollm2_135m] [--judge qwen25_coder_05b] [--samples 2] [--max-new 96]
                                 [--protect 2e-4,1e-3] [--harm-fraction 1e-5,7e-5] [--set ...]
Writes outputs/bench/orgad2026_em_<model>.json and the sweep's report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common
from orgad2026_dissociation import serve_judge

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def main() -> None:
    p = common.parser(__doc__, "orgad2026_em")
    p.add_argument("--judge", default="qwen25_coder_05b")
    p.add_argument("--samples", type=int, default=2, help="answers per question (theirs: 50)")
    p.add_argument("--max-new", type=int, default=96, help="answer length (theirs: 600)")
    p.add_argument("--held-out", type=int, default=8, help="domain items held out (theirs: 1,000)")
    p.add_argument("--lr", default="1e-4", help="EM fine-tune learning rate (theirs: 1e-5)")
    p.add_argument("--epochs", type=int, default=5, help="EM fine-tune epochs (theirs: 1)")
    p.add_argument("--protect", default="2e-4,1e-3", help="p values of the grid (theirs: 2e-4,5e-4,7e-4,1e-3)")
    p.add_argument("--harm-fraction", default="1e-5,7e-5", help="q values (theirs: 1e-5,2e-5,4e-5,7e-5)")
    p.add_argument("--set", nargs="*", default=[], help="more overrides for every run")
    args = p.parse_args()
    out_root = ROOT / "outputs" / "bench" / f"orgad2026_em_{args.model}"
    domains = out_root / "domains"
    domains.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(common.data_root()) / "em" / "insecure_small.jsonl", domains / "insecure.jsonl")
    server, url = serve_judge(args.judge)
    os.environ.setdefault("OPENAI_API_KEY", "local")
    sweep_dir = out_root / "sweep"
    argv = [str(BIN / "harmsweep"), "-m", "experiment=orgad2026_em", f"model={args.model}", f"em.data_dir={domains}",
            "em.domain=insecure", f"em.held_out={args.held_out}", f"em.samples_per_question={args.samples}",
            f"em.max_new_tokens={args.max_new}", f"em.answer_tokens={args.max_new}", f"em.judge.base_url={url}",
            f"em.judge.model={args.judge}", "+em.judge.logprobs=false", "em.judge.max_workers=1",
            f"em.finetune.lr={args.lr}", f"em.finetune.epochs={args.epochs}", "em.finetune.grad_accum=1",
            "em.finetune.max_length=512", f"pruning.protect={args.protect}",
            f"pruning.harm_fraction={args.harm_fraction}", f"hydra.sweep.dir={sweep_dir}",
            f"paths.artifacts={out_root}/artifacts", "hydra/launcher=local", *args.set]  # fmt: skip
    record: dict[str, object] = {"model": args.model, "judge": args.judge, "machine": common.machine(),
                                 "argv": argv[1:]}  # fmt: skip
    start = time.perf_counter()
    try:
        subprocess.run(argv, check=True, cwd=ROOT)
    finally:
        server.terminate()
        server.wait(timeout=30)
    record["seconds"] = round(time.perf_counter() - start, 1)
    subprocess.run([str(BIN / "harmsweep-report"), str(sweep_dir)], check=True, cwd=ROOT)
    cells = {}
    for path in sorted(sweep_dir.glob("*/result.json")):
        result = json.loads(path.read_text())
        em = result.get("em2026") or {}
        cells[path.parent.name] = {
            "p": em.get("p"), "q": em.get("q"), "n_pruned": em.get("n_pruned"), "stages": em.get("stages"),
            "arms": em.get("arms"), "delta": em.get("delta"), "timings_s": result.get("timings_s"),
        }  # fmt: skip
    record["cells"] = cells
    common.write(str(out_root.with_suffix(".json")), record)
    print(json.dumps(cells, indent=1)[:4000])


if __name__ == "__main__":
    main()
