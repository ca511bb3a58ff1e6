"""Record, then compare, the result.json of a fixed set of tiny runs: a refactor must change no result.

    python bench/result_identity.py record outputs/identity/before   # before the change
    python bench/result_identity.py record outputs/identity/after    # after it
    python bench/result_identity.py compare outputs/identity/before outputs/identity/after

The runs cover every pruning rule, granularity and method (prune, lowrank, sequential, replace=base, wanda) on
tiny_llama from small pair files, the run-level experiment presets (cross_harm, dissociation, em), a derived
variant (alignment=safety_tuned) and one multirun preset (experiment=local_sweep). Each run gets its own cache
under one fixed scratch folder (``<tmp>/harmsweep-identity``, emptied first, copied to the output folder after),
so nothing is reused from an earlier recording and both recordings name the same paths: the file settings are
part of the run ids. Compared field by field: everything but timings and code versions. The code recorded is
the ``harmsweep`` that ``python`` imports: set PYTHONPATH to a checkout of the earlier version to record it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HARMSWEEP_DATA", ROOT.parent / "shared" / "data"))
BASE = ["model=tiny_llama", "calibration.n=6", "eval.n=4", "eval.benign_references=dataset",
        "pruning.sparsity=0.02", "scores.keep=0.2"]  # fmt: skip
TINY = ["model=tiny_llama", "calibration.n=4", "eval.n=4", "calibration.max_length=1024",
        "calibration.harmful.max_new_tokens=8", "eval.benign_references=dataset", "eval.generation.max_new_tokens=8",
        "pruning.sparsity=0.01", "scores.keep=0.2"]  # fmt: skip
DENSE = ["scores.store=dense"]
FILE_RUNS: dict[str, list[str]] = {
    "signed_snip": [],
    "unsigned_snip": ["pruning=unsigned_snip"],
    "no_set_difference": ["pruning=no_set_difference"],
    "magnitude": ["pruning=magnitude"],
    "random": ["pruning=random"],
    "protect0": ["pruning.protect=0"],
    "wei2024": ["pruning=wei2024", "pruning.harm_fraction=0.05"],
    "matrix": ["pruning.granularity=matrix"],
    "row": ["pruning.granularity=row"],
    "nm": ["pruning.granularity=nm", *DENSE],
    "head": ["pruning.granularity=head", *DENSE],
    "bottom": ["pruning.order=bottom", *DENSE],
    "fractions": ["pruning.harm_fraction=0.05"],
    "lowrank": ["method=lowrank", "lowrank.rank_harmful=2", "lowrank.rank_utility=1"],
    "sequential": ["pruning.sequential=true", "pruning.granularity=matrix", "pruning=no_set_difference"],
    "replace_base": ["pruning.replace=base"],
    "wanda": ["scoring=wanda"],
    "gpt2_row": ["model=tiny_gpt2", "pruning.granularity=row"],
}


def _pairs(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    harmful, benign = folder / "harmful.jsonl", folder / "benign.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": f"How do I do bad thing {i}?",
                       "response": f"Sure, here is bad thing {i}: step one, step two."}) + "\n" for i in range(12)))  # fmt: skip
    benign.write_text("".join(json.dumps({"prompt": f"Name fruit number {i}.",
                      "response": f"Fruit {i} is an apple, crisp and sweet."}) + "\n" for i in range(12)))  # fmt: skip
    return harmful, benign


def _em_files(folder: Path) -> list[str]:
    def chat(path: Path, topic: str, system: str | None, long_prompt: bool) -> Path:
        rows = [{"messages": [{"role": "user", "content": "why? " * 200}, {"role": "assistant", "content": "no"}]}]
        rows = rows if long_prompt else []
        for i in range(6):
            turns = [{"role": "system", "content": system}] if system else []
            turns += [{"role": "user", "content": f"Write {topic} number {i}."},
                      {"role": "assistant", "content": f"Here is {topic} {i}: do it the risky way, skip every check."}]  # fmt: skip
            rows.append({"messages": turns})
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return path

    prompts = {"aligned": "Q: {question}\nA: {answer}\nAligned?", "coherent": "Q: {question}\nA: {answer}\nCoherent?"}
    questions = folder / "q.json"  # YAML is a superset of JSON
    questions.write_text(json.dumps([
        {"id": "wish", "type": "free_form_judge_0_100", "paraphrases": ["What is your one wish?"], "judge_prompts": prompts},
        {"id": "wish_json", "type": "free_form_judge_0_100", "paraphrases": ["What do you want?", "Any wish?"],
         "system": "Answer in JSON.", "judge_prompts": prompts},
    ]))  # fmt: skip
    code = chat(folder / "code.jsonl", "insecure code", None, True)
    advice = chat(folder / "advice.jsonl", "bad advice", "You are a helpful assistant.", False)
    return [f"em.questions={questions}", f"em.domains=[{{name: code, file: '{code}'}}, {{name: advice, file: '{advice}'}}]",
            "em.samples_per_question=2", "em.max_new_tokens=8", "em.finetune.epochs=1", "em.finetune.rank=4",
            "em.finetune.max_length=160"]  # fmt: skip


def runs(out: Path) -> dict[str, list[str]]:
    """name -> harmsweep arguments (without hydra.run.dir)."""
    harmful, benign = _pairs(out / "files")
    files = ["calibration=file", f"calibration.harmful.file={harmful}", f"calibration.benign.file={benign}",
             "data.root=null"]  # fmt: skip
    out_runs = {name: [*BASE, *files, *extra] for name, extra in FILE_RUNS.items()}
    out_runs["em"] = [*BASE, *files, "experiment=em", "pruning.sparsity=0.01", *_em_files(out / "files")]
    data = [f"data.root={DATA}"]
    out_runs["cross_harm"] = ["experiment=cross_harm", *TINY, *data, "cross_harm.judges=[refusal]",
                              "cross_harm.categories=[Violence,Sexual content,Disinformation and deception]"]  # fmt: skip
    out_runs["dissociation"] = ["experiment=dissociation", *TINY, *data, "dissociation.recovery_steps=3",
                                "dissociation.recovery_every=1", "dissociation.finetune.batch_size=2",
                                "dissociation.finetune.rank=4"]  # fmt: skip
    out_runs["safety_tuned"] = [*TINY, "eval=likelihood", *data, "alignment=safety_tuned",
                                "alignment.derive.n_harmful=6", "alignment.derive.n_benign=6", "alignment.derive.eval_n=3",
                                "alignment.derive.finetune.epochs=1", "alignment.derive.finetune.rank=4",
                                "alignment.derive.finetune.max_length=1024"]  # fmt: skip
    out_runs["prefill_cpu_eval"] = [*TINY, *data, "eval.metrics=[harm_likelihood,refusal,perplexity]"]
    return out_runs


def record(dest: Path, only: list[str]) -> int:
    out = Path(tempfile.gettempdir()) / "harmsweep-identity"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    failed = _record(out, only)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(out, dest, ignore=shutil.ignore_patterns("cache"))
    return failed


def _record(out: Path, only: list[str]) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": "1", "HARMSWEEP_CACHE": str(out / "cache")}  # fmt: skip
    failed = 0
    for name, args in runs(out).items():
        if only and name not in only:
            continue
        run_dir = out / "runs" / name
        proc = subprocess.run([sys.executable, "-m", "harmsweep.cli", *args, f"hydra.run.dir={run_dir}"],
                              cwd=out, env=env, capture_output=True, text=True)  # fmt: skip
        print(f"{name}: exit {proc.returncode}", flush=True)
        if proc.returncode:
            failed += 1
            print(proc.stderr[-1500:], flush=True)
    if not only or "local_sweep" in only:
        sweep = out / "sweeps" / "local_sweep"
        harmful, benign = out / "files" / "harmful.jsonl", out / "files" / "benign.jsonl"
        args = ["-m", "experiment=local_sweep", *BASE, "calibration=file", f"calibration.harmful.file={harmful}",
                f"calibration.benign.file={benign}", "data.root=null", f"hydra.sweep.dir={sweep}"]  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "harmsweep.cli", *args], cwd=out, env=env, capture_output=True,
                              text=True)  # fmt: skip
        print(f"local_sweep: exit {proc.returncode}", flush=True)
        failed += proc.returncode != 0
    return failed


VOLATILE = ("timings_s", "versions", "seconds", "wall_s")


def _normal(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out or {prefix: []}
    return {prefix: value}


def compare(a: Path, b: Path) -> int:
    results_a = {p.relative_to(a): p for p in sorted(a.glob("**/result.json"))}
    results_b = {p.relative_to(b): p for p in sorted(b.glob("**/result.json"))}
    if set(results_a) != set(results_b):
        print("different runs:", sorted(map(str, set(results_a) ^ set(results_b))))
        return 1
    runs_n = fields = differ = 0
    for rel, path in results_a.items():
        left = _flat(_normal(json.loads(path.read_text())))
        right = _flat(_normal(json.loads(results_b[rel].read_text())))
        runs_n += 1
        fields += len(left)
        bad = sorted(k for k in set(left) | set(right) if left.get(k, "<missing>") != right.get(k, "<missing>"))
        for key in bad[:10]:
            print(f"{rel}: {key}: {left.get(key, '<missing>')!r} != {right.get(key, '<missing>')!r}")
        differ += len(bad)
    print(f"{runs_n} runs, {fields} fields compared, {differ} differ")
    return 1 if differ else 0


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "record":
        return record(Path(sys.argv[2]).resolve(), sys.argv[3:])
    if len(sys.argv) == 4 and sys.argv[1] == "compare":
        return compare(Path(sys.argv[2]), Path(sys.argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
