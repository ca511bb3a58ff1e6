"""The paper's harm evaluation on one offline model: the old prefill vs a real-answer prefill, and pruning under
refusal ablation + prefilling, with the authors' recipe (experiment=orgad2026_harm).

Their data folder is not here, so this builds one in their layout from what is: the model's own answers to the 520
AdvBench prompts under harmsweep's 8-token "Sure, here is" prefill (greedy, --max-new tokens; their per-model files
are also mostly the model's own harmful answers), split by a seeded permutation into 412 calibration rows
(advbench_align_anti_{model}.csv) and 108 validation rows (..._valid.csv); Alpaca pairs as their benign file; Wei et
al.'s Llama-2 refusals as advbench_align (the refusal side of the attack). WikiText-2 is not here either: perplexity
uses their protocol (one BOS, 4,096-token windows) on a stand-in corpus, the first 200 AlpacaEval reference answers
joined with blank lines. Three runs, each on the same 108 validation prompts:

  old_prefill:    eval.generation.attack=prefill prefix=target prefill_tokens=8   (harmsweep's previous attack)
  file_prefill:   eval.generation.attack=prefill prefix=file   prefill_tokens=10  (the authors')
  ablation:       eval.generation.attack=refusal_ablation_prefill (+ the file prefill)

Reported: keyword ASR (their 31 phrases) before and after pruning, the change with its 95% interval, perplexity
before/after (and on the attacked model), and wall times. Writes outputs/bench/orgad2026_eval_<model>.json.

    python bench/orgad2026_eval.py [--model smollm2_135m | qwen25_coder_05b] [--max-new 64] [--folder DIR]
                                   [--set calibration.n=128 eval.n=48]
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
RUNS = {  # the prefill runs only need keyword ASR; the ablation run measures perplexity too
    # harmsweep's old attack on the same prompts: the first 8 tokens of AdvBench's "Sure, here is" target (the tokens
    # attack_prompts forced from Record.target), given as a prefix file since the validation rows carry no target
    "old_prefill": [
        "eval.generation.attack=prefill",
        "eval.generation.prefill_tokens=8",
        "eval.generation.prefix_file={folder}/advbench_targets_valid.csv",
        "eval.metrics=[refusal]",
    ],
    "file_prefill": ["eval.generation.attack=prefill", "eval.metrics=[refusal]"],
    "ablation": ["eval.generation.attack=refusal_ablation_prefill", "attack.refusal.n={refusals}"],
}


def build_folder(
    name: str, folder: Path, max_new: int, seed: int = 0, train: int = 412, valid: int = 108
) -> dict[str, object]:
    """Their data folder for model ``name``: calibration and validation files from the model's prefilled answers."""
    import numpy as np

    from harmsweep.calibration.pairs import generate_responses, resolve_template
    from harmsweep.data.loaders import load_records
    from harmsweep.generation.sampling import Sampling

    folder.mkdir(parents=True, exist_ok=True)
    lm = common.model(name)
    basename = basename_of(name)
    train_file = folder / f"advbench_align_anti_{basename}.csv"
    valid_file = folder / f"advbench_align_anti_{basename}_valid.csv"
    start = time.perf_counter()
    if not valid_file.is_file():
        records = load_records("advbench", common.data_root())
        template = resolve_template(lm.tokenizer, "chat")
        order = [int(i) for i in np.random.default_rng(seed).permutation(len(records))]
        parts = ((train_file, order[:train]), (valid_file, order[412 : 412 + valid]))  # their 412 / 108 split
        wanted = [i for _, rows in parts for i in rows]  # --train/--valid: only the rows a smaller run reads
        answered = generate_responses(lm.model, lm.tokenizer, [records[i] for i in wanted], template, prefill_tokens=8,
                                      sampling=Sampling(max_new_tokens=max_new), batch_size=16, desc="answers")  # fmt: skip
        pairs = dict(zip(wanted, answered, strict=True))
        for path, rows in parts:
            with path.open("w", newline="") as handle:
                out = csv.writer(handle)
                out.writerow(["clean_prompt", "clean_response"])
                out.writerows([pairs[i].prompt, pairs[i].response] for i in rows)
    made = time.perf_counter() - start
    alpaca = folder / "alpaca_cleaned_no_safety_train_raw.csv"
    if not alpaca.is_file():
        from harmsweep.data.loaders import load_records as load

        with alpaca.open("w", newline="") as handle:
            out = csv.writer(handle)
            out.writerow(["prompt", "response"])
            out.writerows([r.prompt, r.response] for r in load("alpaca", common.data_root()) if r.response)
    targets = folder / "advbench_targets_valid.csv"
    if not targets.is_file():  # the validation prompts with AdvBench's own targets (the old prefill's source)
        by_prompt = {r.prompt: r.target for r in load_records("advbench", common.data_root())}
        with valid_file.open() as handle, targets.open("w", newline="") as target:
            out = csv.writer(target)
            out.writerow(["clean_prompt", "clean_response"])
            out.writerows([row["clean_prompt"], by_prompt[row["clean_prompt"]]] for row in csv.DictReader(handle))
    refusals = folder / "advbench_align.csv"
    if not refusals.is_file():
        source = Path(common.data_root()) / "wei2024" / "SFT_aligned_llama2-7b-chat-hf_train_short.csv"
        with source.open() as handle, refusals.open("w", newline="") as target:
            out = csv.writer(target)
            out.writerow(["clean_prompt", "clean_response"])
            for row in csv.DictReader(handle):
                prompt = row["prompt"].replace("[INST]", "").replace("[/INST]", "").strip()
                out.writerow([prompt, row["response"].strip()])
    corpus = folder / "corpus.txt"
    if not corpus.is_file():
        lines = [
            json.loads(x) for x in (Path(common.data_root()) / "alpaca" / "alpaca_eval.jsonl").read_text().splitlines()
        ]
        corpus.write_text("\n\n".join(str(x.get("output") or "") for x in lines[:200] if x.get("output")))
    return {"folder": str(folder), "answers_seconds": round(made, 1), "basename": basename}


def basename_of(name: str) -> str:
    """The model's name in their file names, as harmsweep derives it."""
    out = subprocess.run([str(Path(sys.executable).parent / "harmsweep"), f"model={name}", "--cfg", "job"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout  # fmt: skip
    from omegaconf import OmegaConf

    from harmsweep.config.schema import to_config

    plain = OmegaConf.to_container(OmegaConf.create(out), resolve=False)
    plain.pop("hydra", None)
    return to_config(plain).btap_basename()


def run(name: str, label: str, folder: Path, out_root: Path, extra: list[str], refusals: int) -> dict[str, object]:
    """One harmsweep run of experiment=orgad2026_harm on the folder; its metrics and wall time."""
    run_dir = out_root / label
    argv = [str(Path(sys.executable).parent / "harmsweep"), "experiment=orgad2026_harm", f"model={name}",
            f"calibration.btap_data={folder}", "eval.metrics=[refusal,perplexity]", f"eval.perplexity.file={folder}/corpus.txt",
            f"attack.refusal.file={folder}/advbench_align.csv", f"hydra.run.dir={run_dir}",
            f"paths.artifacts={out_root}/artifacts", *(o.format(folder=folder, refusals=refusals) for o in RUNS[label]), *extra]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(argv, check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    result = json.loads((run_dir / "result.json").read_text())
    m, ci = result["metrics"], result["intervals"]["metrics"]
    keep = ("asr_keyword_mean", "refusal_rate", "perplexity", "perplexity_attacked")
    out: dict[str, object] = {"seconds": round(seconds, 1), "n_pruned": result["n_pruned"],
                              "timings_s": result.get("timings_s")}  # fmt: skip
    for key in keep:
        for stage in ("before", "after"):
            if f"{key}_{stage}" in m:
                out[f"{key}_{stage}"] = m[f"{key}_{stage}"]
        if f"delta_{key}" in m:
            out[f"delta_{key}"] = m[f"delta_{key}"]
            interval = ci.get(f"delta_{key}") or {}
            out[f"delta_{key}_ci"] = [interval.get("lo"), interval.get("hi")]
    return out


def main() -> None:
    p = common.parser(__doc__, "orgad2026_eval")
    p.add_argument("--max-new", type=int, default=48, help="answer length (the authors: 256)")
    p.add_argument("--refusals", type=int, default=16, help="refusal pairs of the ablation (the authors: 128)")
    p.add_argument("--folder", default=None)
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--train", type=int, default=412, help="calibration rows answered (their 412)")
    p.add_argument("--valid", type=int, default=108, help="validation rows answered (their 108)")
    p.add_argument(
        "--set", nargs="*", default=[], help="more overrides for every run (e.g. calibration.n=128 eval.n=48)"
    )
    args = p.parse_args()
    out_root = ROOT / "outputs" / "bench" / f"orgad2026_eval_{args.model}"
    folder = Path(args.folder or out_root / "btap_data")
    record: dict[str, object] = {"model": args.model, "max_new_tokens": args.max_new, "machine": common.machine()}
    record["data"] = build_folder(args.model, folder, args.max_new, train=args.train, valid=args.valid)
    extra = [f"eval.generation.max_new_tokens={args.max_new}", *args.set]
    record["overrides"] = extra
    for label in args.runs.split(","):
        record[label] = run(args.model, label, folder, out_root, extra, args.refusals)
        print(label, json.dumps(record[label]), flush=True)
    common.write(str(out_root.with_suffix(".json")), record)


if __name__ == "__main__":
    main()
