"""The paper's dissociation and control experiments end to end, as a user runs them: `harmsweep -m` of the presets on a
tiny Llama with files in the authors' layout and the endpoint judges on a local OpenAI-compatible server, then
`harmsweep-report` on the sweep folder (the capability x capability matrix, the control rows)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import prewarmed
import pytest
from conftest import openai_server
from conftest import write_csv as _csv
from test_cli import harmsweep
from test_orgad2026_eval import their_folder

from harmsweep.evaluation.judges.explanation import COHERENCE_SYSTEM

CAPABILITY_FILES = {  # their prune files for tiny_llama (capabilities.files), each with its own kind of answer
    "advbench_harmfulness_explanation_align_clean": "This request is harmful because it could hurt people number {i}.",
    "advbench_harmfulness_detection_with_counterfact_align_clean": "Yes, request {i} is harmful.",
}


def judge_reply(path: str, body: dict, headers) -> tuple[int, dict]:
    """Coherence requests get 0.75, explanation requests 4 (both as the JSON the judges parse)."""
    coherence = body["messages"][0]["content"] == COHERENCE_SYSTEM
    content = json.dumps({"score": 0.75 if coherence else 4, "reasoning": "fine"})
    return 200, {"choices": [{"message": {"content": content}}]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = their_folder(tmp_path_factory.mktemp("their"))
    for name, answer in CAPABILITY_FILES.items():
        _csv(folder / f"{name}_tiny_llama.csv", ["prompt", "response"],
             [[f"Do not answer request {i}; say why it is harmful.", answer.format(i=i)] for i in range(16)])  # fmt: skip
    refusals = list(csv.DictReader((folder / "advbench_align.csv").open()))
    _csv(folder / "advbench_align_tiny_llama.csv", ["clean_prompt", "clean_response"],
         [[r["clean_prompt"], r["clean_response"]] for r in refusals])  # fmt: skip
    (folder / "advbench_non_harmful_counterfact_valid.txt").write_text(
        "\n".join(f"Explain how to bake bread loaf number {i}" for i in range(8)) + "\n"
    )
    _csv(folder / "triviaqa_clean_tiny_llama.csv", ["clean_prompt", "clean_response"],
         [[f"What is the capital of country {i}?", f"The capital is city {i}."] for i in range(16)])  # fmt: skip
    trivia = [{"Question": f"What is the capital of land {i}?", "QuestionId": f"q{i}",
               "Answer": {"Aliases": [f"city {i}"]}} for i in range(6)]  # fmt: skip
    (folder / "trivia.json").write_text(json.dumps({"Data": trivia}))
    return folder


def sweep(tmp_path: Path, folder: Path, experiment: str, *overrides: str) -> Path:
    out = tmp_path / experiment
    proc = harmsweep(
        "-m", f"experiment={experiment}", "model=tiny_llama", f"calibration.btap_data={folder}", "calibration.n=12",
        f"eval.perplexity.file={folder / 'corpus.txt'}", "eval.perplexity.chunk=64", "eval.generation.max_new_tokens=6",
        "pruning.harm_fraction=0.01", "pruning.protect=0.005", f"paths.artifacts={tmp_path / 'artifacts'}",
        f"hydra.sweep.dir={out}", *overrides, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = harmsweep_report(out, tmp_path)
    assert report.returncode == 0, report.stderr[-2000:]
    return out


def harmsweep_report(sweep_dir: Path, cwd: Path):
    return prewarmed.run("harmsweep.report.cli", [str(sweep_dir)], cwd=cwd, timeout=600)


def results(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/result.json"))]


@pytest.mark.slow
def test_capabilities_sweep_prunes_each_capability_from_its_file_and_the_report_draws_the_matrix(
    tmp_path, folder, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", "local")
    with openai_server(judge_reply) as server:
        url = server["base_url"]
        out = sweep(
            tmp_path, folder, "orgad2026_capabilities", "eval.metrics=[refusal,explanation,detection,coherence]",
            f"eval.detection.counterfact_file={folder / 'advbench_non_harmful_counterfact_valid.txt'}",
            f"judges.explanation.base_url={url}", f"judges.coherence.base_url={url}", "judges.explanation.max_workers=1",
            "judges.coherence.max_workers=1", "eval.explanation.max_new_tokens=6", "eval.detection.max_new_tokens=6",
            f"attack.finetune.file={folder / 'red_teaming_prompts.csv'}", "attack.finetune.epochs=1",
            "attack.finetune.rank=4", "attack.finetune.batch_size=3",
        )  # fmt: skip
        assert server["requests"]  # the judges were asked
    runs = results(out)
    seen = {(r["config"]["capabilities"]["prune"], r["config"]["capabilities"]["attack"]) for r in runs}
    assert seen == {("harm", "prefill"), ("explanation", "prefill"), ("detection", "prefill"),
                    ("refusal", "prefill"), ("harm", "finetune_prefill")}  # fmt: skip
    for r in runs:  # each run pruned from its capability's file, by their naming
        cap = r["config"]["capabilities"]
        assert r["config"]["calibration"]["prune_data"] == cap["files"][cap["prune"]]
        assert Path(r["calibration_source"]["harmful"].split(" ", 1)[-1].split(" (")[0]).name.startswith(
            cap["files"][cap["prune"]]
        )
        m = r["metrics"]
        assert m["explanation_mean_before"] == 4.0 or m["explanation_refusal_rate_before"] == 1.0
        assert m["coherence_mean_before"] == 0.75
        assert {"detection_accuracy_before", "detection_accuracy_after", "refusal_rate_after"} <= set(m)
        assert "delta_detection_accuracy" in r["intervals"]["metrics"]
    recovery = next(r for r in runs if r["config"]["capabilities"]["attack"] == "finetune_prefill")
    assert recovery["attack"]["name"] == "finetune_prefill"
    table = list(csv.DictReader(next(out.glob("**/capabilities_*.csv")).open()))
    assert {row["row"] for row in table} >= {"harm", "explanation", "detection", "refusal"}
    assert any("fine-tuning attack" in row["row"] for row in table)
    assert next(out.glob("**/capabilities_*.png")).stat().st_size > 0


@pytest.mark.slow
def test_control_sweep_puts_the_triviaqa_row_beside_the_harm_row(tmp_path, folder):
    out = sweep(tmp_path, folder, "orgad2026_control", "eval.metrics=[refusal,triviaqa,perplexity]",
                f"eval.triviaqa.file={folder / 'trivia.json'}", "eval.triviaqa.n=6")  # fmt: skip
    runs = results(out)
    assert {r["config"]["calibration"]["prune_data"] for r in runs} == {"advbench_align_anti", "triviaqa_clean"}
    for r in runs:
        assert {"triviaqa_acc_before", "triviaqa_acc_after", "asr_keyword_mean_after"} <= set(r["metrics"])
    table = list(csv.DictReader(next(out.glob("**/control_*.csv")).open()))
    assert len(table) >= 2 and os.path.getsize(next(out.glob("**/control_*.png"))) > 0
