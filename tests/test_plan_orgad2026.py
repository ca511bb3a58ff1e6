"""`harmsweep plan` of the paper's EM and capability experiments: each stage's counts worked out by hand, the EM model
paid once per sweep, em.prune_file, the CLI (btap_reference.md sections 6.4 and 11)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import prewarmed
import pytest
from conftest import ROOT

EM = "experiment=orgad2026_em"
ONCE = ("EM fine-tune (EM model)", "EM answers", "EM model evaluation", "EM model judge calls")
EVERY_JOB = ("EM fine-tune (pruned)", "EM evaluation", "EM judge calls")


def _domain(folder: Path, rows: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    line = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (folder / "risky_financial_advice.jsonl").write_text("".join(json.dumps(line) + "\n" for _ in range(rows)) + "\n")
    return folder


# a small EM config: 37 rows, 5 held out -> 32 pairs; batch 2, accumulation 3, 2 epochs; 2 questions x 3 samples
SMALL = ["em.held_out=5", "em.finetune.batch_size=2", "em.finetune.grad_accum=3", "em.finetune.epochs=2",
         "em.finetune.max_length=64", "em.question_ids=[quick_buck,dinner_party]", "em.samples_per_question=3",
         "em.max_new_tokens=20", "em.answer_tokens=10", "em.in_domain=true", "em.judge.max_workers=4"]  # fmt: skip


def _build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> dict:
    from omegaconf import OmegaConf

    from harmsweep.cli import _run_id_resolver
    from harmsweep.config.schema import register
    from harmsweep.sweep.plan import build

    monkeypatch.setenv("HARMSWEEP_CACHE", str(tmp_path / "cache"))
    OmegaConf.register_new_resolver("harmsweep_run_id", _run_id_resolver, replace=True)  # as `harmsweep plan`
    register()
    _, problems = build([*overrides, "--json", str(tmp_path / "plan.json")])
    assert not problems, problems
    return json.loads((tmp_path / "plan.json").read_text())


def _by_name(items: list[dict]) -> dict[str, dict]:
    return {item["name"]: item for item in items}


def test_em_stage_counts_worked_out_by_hand(tmp_path, monkeypatch):
    data = _domain(tmp_path / "em", 37)
    job = _build(tmp_path, monkeypatch, EM, "model=tiny_llama", f"em.data_dir={data}", *SMALL)["jobs"][0]
    stages, phases = _by_name(job["stages"]), _by_name(job["phases"])
    steps = math.ceil(math.ceil(32 / 2) / 3) * 2  # ceil(16 / 3) = 6 optimizer steps an epoch
    assert steps == 12
    for name in ("EM fine-tune (EM model)", "EM fine-tune (pruned)"):
        assert (stages[name]["pairs"], stages[name]["steps"]) == (32, 12)
        assert stages[name]["tune"]["length"] == 64 and stages[name]["tune"]["accum"] == 3
        assert phases[name]["passes"] == 12 * 3  # micro-batches of 2
        assert "32 pairs (37 rows in risky_financial_advice.jsonl; 5 held out)" in phases[name]["note"]
    assert (stages["EM answers"]["prompts"], stages["EM answers"]["tokens"]) == (5, 5 * 10)
    for name in ("EM model evaluation", "EM evaluation"):
        assert (stages[name]["prompts"], stages[name]["tokens"]) == (6, 6 * 20)
        assert phases[name]["parts"]["kv"] > 0 and phases[name]["gpu"] > phases[name]["parts"]["weights"]
    for name in ("EM model judge calls", "EM judge calls"):
        assert stages[name]["requests"] == 6 * 3  # aligned, coherent, in_domain
        assert phases[name]["gpu"] == 0 and phases[name]["gpu_seconds"] == 0
        assert phases[name]["host_seconds"] == pytest.approx(math.ceil(18 / 4) * 1.5)  # 4 in flight, 1.5 s each
    # the eval block is not what this experiment measures: no generic evaluation or generation phase
    assert not {"evaluation", "generation", "judging"} & set(phases)
    assert job["generated_tokens"] == 50 + 2 * 120
    order = [p["name"] for p in job["phases"]]
    assert order.index("EM model judge calls") < order.index("scoring") < order.index("EM fine-tune (pruned)")
    assert job["peak"] == max(p["gpu"] for p in job["phases"])


def test_scoring_reads_at_most_the_held_out_answers(tmp_path, monkeypatch):
    """Stage 3 is calibration=btap's scoring with n = min(calibration.n, held_out) harmful pairs."""
    data = _domain(tmp_path / "em", 37)
    em = _build(tmp_path, monkeypatch, EM, "model=tiny_llama", f"em.data_dir={data}", *SMALL)["jobs"][0]
    plain = _build(tmp_path, monkeypatch, "model=tiny_llama", "calibration=btap", "calibration.n=5",
                   "calibration.n_benign=412", "eval=likelihood", "pruning=orgad2026")["jobs"][0]  # fmt: skip
    assert _by_name(em["phases"])["scoring"] == _by_name(plain["phases"])["scoring"]


def test_prune_file_skips_the_answers_but_the_baseline_still_needs_the_em_model(tmp_path, monkeypatch):
    data = _domain(tmp_path / "em", 37)
    (tmp_path / "selfgen.csv").write_text("clean_prompt,clean_response\nP,R\n")
    job = _build(tmp_path, monkeypatch, EM, "model=tiny_llama", f"em.data_dir={data}", *SMALL,
                 f"em.prune_file={tmp_path / 'selfgen.csv'}")["jobs"][0]  # fmt: skip
    stages, phases = _by_name(job["stages"]), _by_name(job["phases"])
    assert stages["EM answers"]["tokens"] == 0 and phases["EM answers"]["gpu"] == 0
    assert phases["EM answers"]["note"].startswith("skipped: em.prune_file")
    assert stages["EM fine-tune (EM model)"]["steps"] == 12 and phases["EM fine-tune (EM model)"]["passes"] == 36
    assert job["generated_tokens"] == 2 * 120  # the baseline's and the pruned model's answers only


def test_without_the_domain_file_their_6000_rows_are_assumed(tmp_path, monkeypatch):
    job = _build(tmp_path, monkeypatch, EM, "model=tiny_llama", f"em.data_dir={tmp_path / 'nowhere'}")["jobs"][0]
    tune = _by_name(job["stages"])["EM fine-tune (EM model)"]
    assert tune["pairs"] == 6000 - 1000 and tune["steps"] == math.ceil(math.ceil(5000 / 2) / 8)  # 313
    assert "their domains' 6,000 rows assumed" in tune["note"]
    answers = _by_name(job["stages"])["EM answers"]
    assert answers["tokens"] == 1000 * 256 and _by_name(job["stages"])["EM evaluation"]["tokens"] == 16 * 50 * 600


def test_their_training_file_sets_the_split_when_it_is_there(tmp_path, monkeypatch):
    data = _domain(tmp_path / "em", 37)
    line = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    (data / "risky_financial_advice_remove1000.jsonl").write_text((line + "\n") * 30)
    job = _build(tmp_path, monkeypatch, EM, "model=tiny_llama", f"em.data_dir={data}", *SMALL)["jobs"][0]
    stages = _by_name(job["stages"])
    assert stages["EM fine-tune (EM model)"]["pairs"] == 30 and stages["EM answers"]["prompts"] == 7


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    """The preset's 16-job p x q grid on tiny_llama, through the command line."""
    tmp = tmp_path_factory.mktemp("grid")
    data = _domain(tmp / "em", 37)
    env = {**os.environ, "HARMSWEEP_CACHE": str(tmp / "cache")}
    out = prewarmed.run("harmsweep.cli", ["plan", "-m", EM, "model=tiny_llama", f"em.data_dir={data}", *SMALL,
                                          "--json", str(tmp / "plan.json")], cwd=ROOT, env=env)  # fmt: skip
    return out, json.loads((tmp / "plan.json").read_text()) if out.returncode == 0 else {}


@pytest.mark.slow
def test_the_grid_makes_the_em_model_once(grid):
    out, plan = grid
    assert out.returncode == 0, out.stderr
    jobs = plan["jobs"]
    assert len(jobs) == 16
    for job in jobs:
        stages = _by_name(job["stages"])
        for name in ONCE:
            assert stages[name]["made_by"] == (None if job["job"] == 0 else 0)
            if job["job"]:
                assert _by_name(job["phases"])[name] == {**_by_name(job["phases"])[name], "gpu": 0,
                                                         "gpu_seconds": 0, "note": "cached, made by job 0"}  # fmt: skip
        assert stages["EM fine-tune (pruned)"]["made_by"] is None
    totals = _by_name(plan["phases"])
    assert all(totals[name]["jobs"] == [0] for name in (*ONCE, "scoring"))
    assert all(totals[name]["jobs"] == list(range(16)) for name in EVERY_JOB)
    assert sum(j["generated_tokens"] for j in jobs) == 50 + 120 + 16 * 120  # answers and baseline once
    assert sum(j["disk"]["evaluations"] for j in jobs) == (5 + 6 + 16 * 6) * 4096
    assert plan["gpu_hours"] == pytest.approx(sum(j["gpu_hours"] for j in jobs))


@pytest.mark.slow
def test_the_command_line_prints_the_stages_and_the_sweep_by_phase(grid):
    out, _ = grid
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for name in (*ONCE, *EVERY_JOB):
        assert any(line.strip().startswith(name) for line in lines), name
    made_once = next(
        line for line in lines if line.strip().startswith("EM fine-tune (EM model)") and "job 0 only" in line
    )
    assert made_once.split()[4] == "1"  # one job of 16 runs it
    assert "sweep by phase (the jobs that run it, of 16" in out.stdout


def test_a_config_error_exits_2_in_one_line(tmp_path):
    env = {**os.environ, "HARMSWEEP_CACHE": str(tmp_path / "cache")}
    out = prewarmed.run("harmsweep.cli", ["plan", "-m", EM, "model=tiny_llama", "em.finetune.batch_sise=2"], cwd=ROOT,
                        env=env)  # fmt: skip
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "batch_sise" in out.stderr


CAPABILITIES = ["experiment=orgad2026_capabilities", "model=tiny_llama", "eval.n=6", "judges.explanation.base_url=http://x",
                "judges.coherence.base_url=http://x", "judges.explanation.max_workers=5",
                "eval.explanation.max_new_tokens=30", "eval.detection.max_new_tokens=40"]  # fmt: skip


def test_capability_stages_worked_out_by_hand(tmp_path, monkeypatch):
    (tmp_path / "counterfact.txt").write_text("a\nb\n\nc\nd\n")  # 4 harmless rewrites
    job = _build(tmp_path, monkeypatch, *CAPABILITIES,
                 f"eval.detection.counterfact_file={tmp_path / 'counterfact.txt'}")["jobs"][0]  # fmt: skip
    stages, phases = _by_name(job["stages"]), _by_name(job["phases"])
    # 6 held-out prompts, evaluated before and after pruning (the first job evaluates the unpruned model too)
    assert (stages["explanation answers"]["prompts"], stages["explanation answers"]["tokens"]) == (12, 12 * 30)
    assert (stages["detection answers"]["prompts"], stages["detection answers"]["tokens"]) == (20, 20 * 40)
    assert stages["explanation judge calls"]["requests"] == 12
    assert stages["coherence judge calls"]["requests"] == (6 + 6) * 2  # harmful answers and explanations
    assert phases["explanation judge calls"]["host_seconds"] == pytest.approx(math.ceil(12 / 5) * 4.0)
    assert phases["coherence judge calls"]["gpu"] == 0 and phases["detection answers"]["gpu"] > 0
    assert {"generation", "scoring"} <= set(phases)  # what plan sized before is still there


def test_capability_metrics_that_would_be_skipped_add_nothing(tmp_path, monkeypatch):
    job = _build(tmp_path, monkeypatch, "experiment=orgad2026_capabilities", "model=tiny_llama", "eval.n=6")
    assert job["jobs"][0]["stages"] == []  # no endpoints, no counterfactual file: explanation etc. are skipped


def test_control_sizes_triviaqa_answers(tmp_path, monkeypatch):
    """orgad2026_control adds nothing new: TriviaQA's answers are in the generation phase and the token count."""
    base = ("experiment=orgad2026_control", "model=tiny_llama", "eval.n=4", "eval.triviaqa.max_new_tokens=7")
    small = _build(tmp_path, monkeypatch, *base, "eval.triviaqa.n=10")["jobs"][0]
    large = _build(tmp_path, monkeypatch, *base, "eval.triviaqa.n=20")["jobs"][0]
    assert large["generated_tokens"] - small["generated_tokens"] == 10 * 7 * 2  # before and after pruning
    gen = [_by_name(j["phases"])["generation"]["gpu_seconds"] for j in (small, large)]
    assert gen[1] > gen[0] and small["stages"] == []
