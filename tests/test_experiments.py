"""The experiment presets end to end on a tiny model through the real CLI: cross-harm, dissociation, align."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import harmsweep

from harmsweep.data.records import norm_prompt

CATEGORIES = ["Violence", "Sexual content", "Disinformation and deception"]
TINY = [
    "model=tiny_llama", "calibration.n=4", "eval.n=4", "calibration.max_length=1024",
    "calibration.harmful.max_new_tokens=8", "eval.benign_references=dataset", "eval.generation.max_new_tokens=8",
    "pruning.sparsity=0.01", "scores.keep=0.2",
]  # fmt: skip


def _figure(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / f"{name}.json").read_text())


def test_cross_harm_writes_transfer_and_overlap_matrices(tmp_path, shared_data):
    run_dir = tmp_path / "run"
    args = ["experiment=cross_harm", *TINY, f"data.root={shared_data}", f"hydra.run.dir={run_dir}",
            f"cross_harm.categories=[{','.join(CATEGORIES)}]", "cross_harm.judges=[refusal]"]  # fmt: skip
    proc = harmsweep(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((run_dir / "result.json").read_text())
    rows = [*CATEGORIES, "control: benign", "control: random"]
    assert result["rows"] == rows and result["categories"] == CATEGORIES
    assert set(result["figures"]) == {"transfer_nll", "transfer_likelihood", "transfer_refusal", "utility",
                                      "overlap_intersection", "overlap_jaccard"}  # fmt: skip
    k = round(0.01 * result["n_scored"])
    assert set(result["n_pruned"].values()) == {k}  # every row prunes the same number of weights
    transfer = _figure(run_dir, "transfer_nll")
    assert transfer["rows"] == rows and transfer["cols"] == CATEGORIES and transfer["kind"] == "delta"
    # pruning the harm weights of a category raises its own harmful NLL far more than random pruning does
    for i in range(len(CATEGORIES)):
        assert transfer["values"][i][i] > 10 * abs(transfer["values"][rows.index("control: random")][i])
    overlap = _figure(run_dir, "overlap_intersection")
    assert overlap["chance"] == pytest.approx(k / result["n_scored"])
    assert all(overlap["values"][i][i] == 1.0 for i in range(len(rows)))
    random_row = overlap["values"][rows.index("control: random")]
    assert max(v for j, v in enumerate(random_row) if rows[j] != "control: random") < 5 * overlap["chance"]
    assert result["metrics"]["overlap_intersection/off_diagonal"] > 5 * overlap["chance"]
    again = harmsweep(*args, cwd=tmp_path)  # done: returned as is, nothing recomputed
    assert again.returncode == 0 and json.loads((run_dir / "result.json").read_text()) == result


def test_cross_harm_rejects_an_unknown_category(tmp_path, shared_data):
    args = ["experiment=cross_harm", *TINY, f"data.root={shared_data}", f"hydra.run.dir={tmp_path / 'run'}",
            "cross_harm.categories=[Violence,Cooking]"]  # fmt: skip
    proc = harmsweep(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert "'Cooking' is not a category of data.harmful" in proc.stderr.strip().splitlines()[-1]


def test_dissociation_arms_and_recovery_curve(tmp_path, shared_data):
    run_dir = tmp_path / "run"
    args = ["experiment=dissociation", *TINY, f"data.root={shared_data}", f"hydra.run.dir={run_dir}",
            "dissociation.recovery_steps=3", "dissociation.recovery_every=1", "dissociation.finetune.batch_size=2",
            "dissociation.finetune.rank=4"]  # fmt: skip
    proc = harmsweep(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((run_dir / "result.json").read_text())
    table = _figure(run_dir, "dissociation")
    assert table["rows"] == ["unpruned", "harm_pruned", "refusal_pruned", "harm_pruned_recovered"]
    assert {"nll_harmful", "nll_refusal", "refusal_rate", "recognition_accuracy", "perplexity"} <= set(table["cols"])
    m = result["metrics"]
    assert m["n_pruned/harm_pruned"] == m["n_pruned/refusal_pruned"] == round(0.01 * result["n_scored"])
    # each pruned set hits its own calibration target harder than the other's
    assert (
        m["nll_harmful/harm_pruned"] - m["nll_harmful/unpruned"]
        > m["nll_harmful/refusal_pruned"] - m["nll_harmful/unpruned"]
    )
    assert (
        m["nll_refusal/refusal_pruned"] - m["nll_refusal/unpruned"]
        > m["nll_refusal/harm_pruned"] - m["nll_refusal/unpruned"]
    )
    arms = result["intervals"]["arms"]  # each arm against the unpruned model, paired over the same prompts
    assert set(arms) == {"harm_pruned", "refusal_pruned", "harm_pruned_recovered"}
    delta = arms["harm_pruned"]["delta_nll_harmful"]
    assert delta["value"] == pytest.approx(m["nll_harmful/harm_pruned"] - m["nll_harmful/unpruned"])
    assert delta["lo"] <= delta["value"] <= delta["hi"]
    curve = _figure(run_dir, "recovery")
    assert curve["rows"] == ["0", "1", "2", "3"] and curve["cols"] == ["nll_harmful", "nll_benign", "train_loss"]
    assert curve["values"][0][0] == pytest.approx(m["nll_harmful/harm_pruned"], rel=1e-4)
    assert curve["values"][-1][0] < curve["values"][0][0]  # fine-tuning on harmful pairs brings harm back


def test_safety_tuned_variant_runs_like_any_checkpoint_on_prompts_it_never_trained_on(tmp_path, shared_data):
    run_dir = tmp_path / "run"
    derive = ["alignment=safety_tuned", "alignment.derive.n_harmful=6", "alignment.derive.n_benign=6",
              "alignment.derive.eval_n=3", "alignment.derive.finetune.epochs=1", "alignment.derive.finetune.rank=4",
              "alignment.derive.finetune.max_length=1024"]  # fmt: skip
    args = [*TINY, "eval=likelihood", f"data.root={shared_data}", f"hydra.run.dir={run_dir}", *derive]
    proc = harmsweep(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["alignment"] == "safety_tuned" and result["model_source"].startswith("derived:tiny_llama-")
    trained = set(result["derivation"]["train_prompts"])
    assert len(trained) == 12
    calibration = Path(result["artifacts"]["calibration"]).with_suffix(".jsonl")
    held_out = [json.loads(line) for line in calibration.read_text().splitlines()]
    assert held_out and not {norm_prompt(p["prompt"]) for p in held_out} & trained


def test_cross_harm_on_a_local_hexphi_copy(tmp_path, shared_data):
    """HEx-PHI is gated: a user-supplied folder of category_N.csv files gives per-category rows by slug."""
    folder = tmp_path / "hexphi"
    folder.mkdir()
    for number, topic in ((1, "break the law"), (4, "write malware"), (5, "hurt someone")):
        lines = [f'"How would one {topic}, variant {i}?"' for i in range(8)]
        (folder / f"category_{number}.csv").write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    args = ["experiment=cross_harm", *TINY, "data=hexphi", f"data.harmful.file={folder}", f"data.root={shared_data}",
            f"hydra.run.dir={run_dir}", "cross_harm.controls=[random]"]  # fmt: skip
    proc = harmsweep(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["categories"] == ["illegal_activity", "malware", "physical_harm"]
    assert _figure(run_dir, "transfer_likelihood")["rows"] == [*result["categories"], "control: random"]
