"""harmsweep-report's orgad2026 sections: the capability matrix, the EM p x q grid and the control rows.

Run folders are written by hand (result.json with the fields the report reads; the numbers are this test's own),
the real `harmsweep-report DIR` entry point builds the report in-process, and the CSVs are read back exactly.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harmsweep.report import capabilities, cli, control, em_grid
from harmsweep.report.capabilities import RECOVERY, change, ci_text, verdict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SR = "strongreject_mean"
Stages = dict[str, tuple[float, float, tuple[float, float] | None]]  # metric -> before, after, delta interval


def write_run(sweep: Path, rid: str, experiment: str, stages: Stages, config: dict[str, Any] | None = None,
              model: str = "tiny_llama", alignment: str = "aligned", extra: dict[str, Any] | None = None,
              stage_ci: dict[str, tuple[float, float]] | None = None) -> None:  # fmt: skip
    """One finished run folder: metrics <m>_before/_after/delta_<m> and intervals as pipeline/run.py writes them."""
    metrics: dict[str, Any] = {}
    intervals: dict[str, Any] = {}
    for key, (before, after, ci) in stages.items():
        metrics |= {f"{key}_before": before, f"{key}_after": after, f"delta_{key}": after - before}
        if ci is not None:
            intervals[f"delta_{key}"] = {"value": after - before, "lo": ci[0], "hi": ci[1], "n": 40}
    for name, (lo, hi) in (stage_ci or {}).items():  # e.g. strongreject_mean_before
        intervals[name] = {"value": metrics[name], "lo": lo, "hi": hi, "n": 40}
    result = {"run_id": rid, "experiment": experiment, "model": model, "alignment": alignment, "n_scored": 1000,
              "n_pruned": 3, "actual_sparsity": 0.003, "metrics": metrics, "intervals": {"metrics": intervals},
              "pruning": {"rule": "signed_snip", "sparsity": 1e-5, "protect": 5e-5},
              "config": {"experiment": experiment, "seed": 0, **(config or {})}, **(extra or {})}  # fmt: skip
    (sweep / rid).mkdir(parents=True)
    (sweep / rid / "result.json").write_text(json.dumps(result))


def caps(prune: str, attack: str = "prefill") -> dict[str, Any]:
    return {"capabilities": {"prune": prune, "attack": attack}}


def calib(prune_data: str) -> dict[str, Any]:
    return {"calibration": {"prune_data": prune_data}}


def stat(value: float, lo: float, hi: float, n: int = 800) -> dict[str, Any]:
    return {"value": value, "lo": lo, "hi": hi, "n": n}


def em_block(p: float, q: float, rate: tuple[float, float, float], judge: str, domain: str = "risky_financial_advice",
             hold: bool = False, ref: float = 0.30) -> dict[str, Any]:  # fmt: skip
    """em2026 as experiment=orgad2026_em writes it (arms with intervals, delta = pruned - em_model)."""
    value, lo, hi = rate
    return {"em2026": {
        "domain": domain, "p": p, "q": q, "hold_zeros": hold, "judge": judge, "in_domain_judge": None,
        "arms": {"em_model": {"em_rate": stat(ref, ref - 0.05, ref + 0.05)},
                 "pruned": {"em_rate": stat(value, lo, hi), "coherent_mean": {"value": 70.0 + value, "n": 800},
                            "in_domain_rate": {"value": 0.1, "n": 800}}},
        "per_question": {}, "delta": {"em_rate": stat(value - ref, value - ref - 0.06, value - ref + 0.06)},
    }}  # fmt: skip


PROXY = "em_proxy/v1-lexicon-proxy"
ENDPOINT = "em_endpoint/gpt-4o-2024-08-06/ab12cd"
P1, P2, Q1, Q2 = 2e-4, 5e-4, 1e-5, 2e-5


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    sweep = tmp_path_factory.mktemp("sweep")
    exp = "orgad2026_capabilities"
    write_run(sweep, "cap01", exp, {SR: (0.6, 0.2, (-0.5, -0.3)), "explanation_mean": (3.0, 2.9, (-0.3, 0.1)),
                                    "detection_accuracy": (0.9, 0.88, (-0.06, 0.02)),
                                    "refusal_rate": (0.8, 0.6, (-0.3, -0.1)), "coherence_mean": (0.9, 0.8, None)},
              caps("harm"), stage_ci={f"{SR}_before": (0.55, 0.65), f"{SR}_after": (0.15, 0.25)})  # fmt: skip
    write_run(sweep, "cap02", exp, {SR: (0.6, 0.58, (-0.05, 0.01)), "explanation_mean": (3.0, 1.5, (-1.8, -1.2)),
                                    "detection_accuracy": (0.9, 0.9, (-0.03, 0.03)),
                                    "refusal_rate": (0.8, 0.8, (-0.02, 0.02))}, caps("explanation"))  # fmt: skip
    write_run(
        sweep,
        "cap03",
        exp,
        {
            SR: (0.6, 0.61, (-0.03, 0.05)),
            "detection_accuracy": (0.9, 0.5, (-0.5, -0.3)),
            "refusal_rate": (0.8, 0.79, (-0.04, 0.02)),
        },
        caps("detection"),
    )  # no explanation
    write_run(sweep, "cap04", exp, {SR: (0.6, 0.9, (0.2, 0.4)), "refusal_rate": (0.8, 0.1, (-0.8, -0.6))},
              caps("refusal"))  # fmt: skip
    write_run(sweep, "cap05", exp, {SR: (0.7, 0.5, (-0.3, -0.1))}, caps("harm", "finetune_prefill"),
              stage_ci={f"{SR}_after": (0.45, 0.55)})  # fmt: skip
    write_run(sweep, "cap06", exp, {SR: (0.6, 0.0, (-0.7, -0.5))}, caps("harm"))  # a repeat: cap01 is shown
    ctl = "orgad2026_control"
    write_run(sweep, "ctl01", ctl, {SR: (0.6, 0.2, (-0.5, -0.3)), "triviaqa_acc": (0.5, 0.49, (-0.03, 0.01)),
                                    "refusal_rate": (0.8, 0.3, (-0.6, -0.4)), "perplexity": (10.0, 10.5, (0.2, 0.8))},
              calib("advbench_align_anti"))  # fmt: skip
    write_run(
        sweep,
        "ctl02",
        ctl,
        {SR: (0.6, 0.6, (-0.04, 0.04)), "triviaqa_acc": (0.5, 0.2, (-0.35, -0.25)), "refusal_rate": (0.8, 0.8, None)},
        calib("triviaqa_clean"),
    )  # no perplexity
    write_run(sweep, "ctl03", ctl, {SR: (0.6, 0.5, (-0.2, 0.0))}, calib("alpaca_raw"))
    em = "orgad2026_em"
    write_run(sweep, "em01", em, {}, extra=em_block(P1, Q1, (0.20, 0.15, 0.25), PROXY))
    write_run(sweep, "em02", em, {}, extra=em_block(P1, Q2, (0.10, 0.07, 0.13), PROXY))
    write_run(sweep, "em03", em, {}, extra=em_block(P2, Q2, (0.05, 0.03, 0.08), PROXY))
    write_run(sweep, "em04", em, {}, extra=em_block(P2, Q2, (0.50, 0.40, 0.60), PROXY))  # repeat of (P2, Q2)
    write_run(sweep, "em05", em, {}, extra=em_block(P1, Q1, (0.40, 0.30, 0.50), ENDPOINT, "bad_medical_advice", True))
    # a plain pruning run of another variant: the only row of compression.csv
    write_run(sweep, "plain1", "compression", {SR: (0.6, 0.3, None), "perplexity": (10.0, 10.1, None)},
              alignment="dealigned")  # fmt: skip
    cli.main([str(sweep)])  # harmsweep-report DIR: the report lands in DIR/report
    return sweep, sweep / "report"


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def as_cells(rows: list[dict[str, str]], keys: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [tuple(r[k] for k in keys) for r in rows]


def test_capability_matrix_csv(built: tuple[Path, Path]) -> None:
    _, out = built
    rows = read_csv(out / "capabilities_tiny_llama_aligned.csv")
    assert list(rows[0]) == list(capabilities.COLUMNS)
    harm_col = f"harm ({SR})"
    cols = [harm_col, "explanation", "detection", "refusal", "coherence"]  # coherence: one run recorded it
    order = ["harm", "explanation", "detection", "refusal", RECOVERY]
    assert [(r["row"], r["column"]) for r in rows] == [(a, b) for a in order for b in cols]
    by = {(r["row"], r["column"]): r for r in rows}
    keys = ("before", "after", "delta", "lo", "hi", "n", "metric", "run_id")
    expected = {
        ("harm", harm_col): ("0.6", "0.2", str(0.2 - 0.6), "-0.5", "-0.3", "40", f"delta_{SR}", "cap01"),
        ("harm", "coherence"): ("0.9", "0.8", str(0.8 - 0.9), "", "", "", "delta_coherence_mean", "cap01"),
        ("explanation", "explanation"): ("3.0", "1.5", "-1.5", "-1.8", "-1.2", "40", "delta_explanation_mean", "cap02"),
        ("detection", "explanation"): ("", "", "", "", "", "", "delta_explanation_mean", "cap03"),  # not measured
        ("detection", "detection"): ("0.9", "0.5", str(0.5 - 0.9), "-0.5", "-0.3", "40", "delta_detection_accuracy", "cap03"),
        ("refusal", harm_col): ("0.6", "0.9", str(0.9 - 0.6), "0.2", "0.4", "40", f"delta_{SR}", "cap04"),
        ("refusal", "refusal"): ("0.8", "0.1", str(0.1 - 0.8), "-0.8", "-0.6", "40", "delta_refusal_rate", "cap04"),
        (RECOVERY, harm_col): ("0.7", "0.5", str(0.5 - 0.7), "-0.3", "-0.1", "40", f"delta_{SR}", "cap05"),
        (RECOVERY, "refusal"): ("", "", "", "", "", "", "delta_refusal_rate", "cap05"),
    }  # fmt: skip
    for cell, values in expected.items():
        assert tuple(by[cell][k] for k in keys) == values, cell
    assert not any(r["run_id"] == "cap06" for r in rows)  # the repeat of harm is named on the page, not a row


def test_capability_png_and_page(built: tuple[Path, Path]) -> None:
    _, out = built
    assert (out / "capabilities_tiny_llama_aligned.png").read_bytes().startswith(PNG_MAGIC)
    html = (out / "report.html").read_text()
    body = html.split('id="capabilities"')[1].split("</section>")[0]
    assert "Dissociation: capability x capability" in html and "capabilities_tiny_llama_aligned.csv" in body
    assert "-1.500 [-1.800, -1.200]" in body and "cap06" in body  # a cell; the repeat named under its row's run
    assert "harm vs explanation: double dissociation (" in body
    assert "harm vs detection: double dissociation (" in body
    assert "harm vs refusal: no double dissociation shown (" in body  # pruning harm also lowers refusal here
    assert ("Recovery (strongreject_mean): before pruning 0.600 [0.550, 0.650] -&gt; after pruning harm 0.200 "
            "[0.150, 0.250] -&gt; after pruning and the fine-tuning attack 0.500 [0.450, 0.550] (run cap05).") in body  # fmt: skip


def test_dissociation_needs_intervals_and_falls_back_to_keyword_asr() -> None:
    runs = [
        {"run_id": "r1", "model": "m", "alignment": "a", "config": caps("harm"),
         "metrics": {"asr_keyword_mean_before": 0.9, "asr_keyword_mean_after": 0.4, "refusal_rate_before": 0.5,
                     "refusal_rate_after": 0.5}},
        {"run_id": "r2", "model": "m", "alignment": "a", "config": caps("refusal"),
         "metrics": {"refusal_rate_before": 0.5, "refusal_rate_after": 0.1}},
        {"run_id": "r3", "model": "m", "alignment": "a", "config": {}},  # no capabilities block: not a row
    ]  # fmt: skip
    (matrix,) = capabilities.build_matrices(runs)
    assert matrix.harm == "asr_keyword_mean" and next(iter(matrix.columns)) == "harm (asr_keyword_mean)"
    assert matrix.rows == ["harm", "refusal"] and matrix.cell("harm", "harm")["delta"] == 0.4 - 0.9
    assert capabilities.dissociation_lines(matrix) == [
        "harm vs refusal: no double dissociation shown (pruning harm: harm no interval -0.500, refusal no interval "
        "+0.000; pruning refusal: refusal no interval -0.400, harm not measured )."
    ]
    assert capabilities.recovery_line(matrix).startswith("Recovery: no run with capabilities.attack=finetune_prefill")


def test_small_readers() -> None:
    result = {"metrics": {"x_before": 1.0, "x_after": 3.0}, "intervals": {"metrics": {"delta_x": {"value": 2.0}}}}
    assert change(result, "x") == {"before": 1.0, "after": 3.0, "delta": 2.0, "lo": None, "hi": None, "n": None}
    assert change({}, "x")["delta"] is None and ci_text(None) == ""
    assert ci_text(0.25, -0.5, 1.0) == "+0.250 [-0.500, +1.000]" and ci_text(0.25, signed=False) == "0.250"
    assert [verdict({"delta": -1, "lo": -2, "hi": -0.1}), verdict({"delta": -1, "lo": -2, "hi": 0.0})] == [
        "lowered", "not lowered"
    ]  # fmt: skip


def test_em_grid_csv(built: tuple[Path, Path]) -> None:
    _, out = built
    assert sorted(p.name for p in out.glob("em_grid_*")) == [
        "em_grid_tiny_llama_bad_medical_advice_hold_zeros.csv", "em_grid_tiny_llama_bad_medical_advice_hold_zeros.png",
        "em_grid_tiny_llama_risky_financial_advice.csv", "em_grid_tiny_llama_risky_financial_advice.png",
    ]  # fmt: skip
    rows = read_csv(out / "em_grid_tiny_llama_risky_financial_advice.csv")
    assert list(rows[0]) == list(em_grid.COLUMNS)
    keys = ("p", "q", "em_rate", "lo", "hi", "delta", "delta_lo", "delta_hi", "coherent_mean", "in_domain_rate", "n",
            "run_id")  # fmt: skip
    blank = ("",) * 10
    assert as_cells(rows, keys) == [
        (str(P1), str(Q1), "0.2", "0.15", "0.25", str(0.2 - 0.3), str(0.2 - 0.3 - 0.06), str(0.2 - 0.3 + 0.06),
         str(70.2), "0.1", "800", "em01"),
        (str(P1), str(Q2), "0.1", "0.07", "0.13", str(0.1 - 0.3), str(0.1 - 0.3 - 0.06), str(0.1 - 0.3 + 0.06),
         str(70.1), "0.1", "800", "em02"),
        (str(P2), str(Q1), *blank),  # never run
        (str(P2), str(Q2), "0.05", "0.03", "0.08", str(0.05 - 0.3), str(0.05 - 0.3 - 0.06), str(0.05 - 0.3 + 0.06),
         str(70.05), "0.1", "800", "em03"),  # em04 repeats it: the first by run id is shown
    ]  # fmt: skip


def test_em_grid_png_and_judge_text(built: tuple[Path, Path]) -> None:
    _, out = built
    for name in (
        "em_grid_tiny_llama_risky_financial_advice.png",
        "em_grid_tiny_llama_bad_medical_advice_hold_zeros.png",
    ):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    body = (out / "report.html").read_text().split('id="em_grid"')[1].split("</section>")[0]
    parts = {part.split("</h3>")[0].split(" · ")[-1]: part for part in body.split("<h3>")[1:]}  # domain -> its part
    risky, medical = parts["risky_financial_advice"], parts["bad_medical_advice"]
    assert f"Judge: {PROXY}. These are proxy numbers" in risky
    assert f"Judge: {ENDPOINT}." in medical and "proxy numbers" not in medical
    assert "EM model (fine-tuned, unpruned): 0.300 [0.250, 0.350]" in risky and "em04" in risky
    assert "held at zero during fine-tuning" in medical


def test_control_csv_png_and_reading(built: tuple[Path, Path]) -> None:
    _, out = built
    rows = read_csv(out / "control_tiny_llama_aligned.csv")
    assert list(rows[0]) == list(control.COLUMNS)
    keys = ("row", "prune_data", "column", "before", "after", "delta", "lo", "hi", "n", "run_id")
    harm = f"harm ({SR})"
    assert as_cells(rows, keys) == [
        ("harm", "advbench_align_anti", harm, "0.6", "0.2", str(0.2 - 0.6), "-0.5", "-0.3", "40", "ctl01"),
        ("harm", "advbench_align_anti", "triviaqa_acc", "0.5", "0.49", str(0.49 - 0.5), "-0.03", "0.01", "40", "ctl01"),
        ("harm", "advbench_align_anti", "refusal_rate", "0.8", "0.3", str(0.3 - 0.8), "-0.6", "-0.4", "40", "ctl01"),
        ("harm", "advbench_align_anti", "perplexity", "10.0", "10.5", "0.5", "0.2", "0.8", "40", "ctl01"),
        ("control", "triviaqa_clean", harm, "0.6", "0.6", "0.0", "-0.04", "0.04", "40", "ctl02"),
        ("control", "triviaqa_clean", "triviaqa_acc", "0.5", "0.2", str(0.2 - 0.5), "-0.35", "-0.25", "40", "ctl02"),
        ("control", "triviaqa_clean", "refusal_rate", "0.8", "0.8", "0.0", "", "", "", "ctl02"),  # no interval
        ("control", "triviaqa_clean", "perplexity", "", "", "", "", "", "", "ctl02"),  # not measured
        ("alpaca_raw", "alpaca_raw", harm, "0.6", "0.5", str(0.5 - 0.6), "-0.2", "0.0", "40", "ctl03"),
        ("alpaca_raw", "alpaca_raw", "triviaqa_acc", "", "", "", "", "", "", "ctl03"),
        ("alpaca_raw", "alpaca_raw", "refusal_rate", "", "", "", "", "", "", "ctl03"),
        ("alpaca_raw", "alpaca_raw", "perplexity", "", "", "", "", "", "", "ctl03"),
    ]  # fmt: skip
    assert (out / "control_tiny_llama_aligned.png").read_bytes().startswith(PNG_MAGIC)
    body = (out / "report.html").read_text().split('id="control"')[1].split("</section>")[0]
    assert ("Expected: harm pruning lowers harm, the control does not; the control lowers TriviaQA accuracy. Here: "
            "harm pruning lowers harm: lowered -0.400 [-0.500, -0.300]; the control lowers harm: not lowered +0.000 "
            "[-0.040, +0.040]; the control lowers TriviaQA accuracy: lowered -0.300 [-0.350, -0.250].") in body  # fmt: skip


def test_these_runs_stay_out_of_the_compression_table(built: tuple[Path, Path]) -> None:
    _, out = built
    comp = read_csv(out / "compression.csv")
    assert [(r["model"], r["alignment"], r["n_runs"]) for r in comp] == [("tiny_llama", "dealigned", "1")]
    runs = read_csv(out / "runs.csv")
    assert {r["run_id"] for r in runs if r["harm_reduction"]} == {"plain1"}  # experiments get no derived harm


def test_a_folder_without_such_runs_adds_no_section(built: tuple[Path, Path], tmp_path: Path) -> None:
    sweep, _ = built
    out = tmp_path / "out"
    out.mkdir()
    for stale in ("capabilities_x_a.csv", "em_grid_x_d.png", "control_x_a.csv"):
        (out / stale).write_text("stale")
    cli.main([str(sweep / "plain1"), "--out", str(out)])
    html = (out / "report.html").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(("capabilities_", "em_grid_", "control_"))]
    assert all(f'id="{a}"' not in html for a in ("capabilities", "em_grid", "control"))


def test_broken_records_give_empty_cells_not_crashes(tmp_path: Path) -> None:
    write_run(tmp_path, "em_bad", "orgad2026_em", {}, extra={"em2026": {"domain": "d", "p": 1e-4, "q": 1e-5}})
    write_run(tmp_path, "em_nopq", "orgad2026_em", {}, extra={"em2026": {"domain": "d"}})  # no p, q: left out
    write_run(tmp_path, "cap_none", "orgad2026_capabilities", {}, caps("harm"))  # nothing measured
    write_run(tmp_path, "ctl_none", "orgad2026_control", {}, calib("triviaqa_clean"))
    cli.main([str(tmp_path), "--out", str(tmp_path / "report")])
    out = tmp_path / "report"
    (em,) = read_csv(out / "em_grid_tiny_llama_d.csv")
    assert em["run_id"] == "em_bad" and em["em_rate"] == "" and em["n"] == ""
    assert {r["delta"] for r in read_csv(out / "capabilities_tiny_llama_aligned.csv")} == {""}
    assert {r["delta"] for r in read_csv(out / "control_tiny_llama_aligned.csv")} == {""}
    html = (out / "report.html").read_text()
    assert "Judge: not recorded." in html and "Recovery: no harm judge recorded." in html


def test_console_script(built: tuple[Path, Path], tmp_path: Path) -> None:
    """The installed `harmsweep-report DIR` command (not the in-process main) writes the same tables."""
    sweep, out = built
    script = Path(sys.executable).parent / "harmsweep-report"
    done = subprocess.run([str(script), str(sweep), "--out", str(tmp_path / "r")], capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name in ("capabilities_tiny_llama_aligned.csv", "control_tiny_llama_aligned.csv",
                 "em_grid_tiny_llama_risky_financial_advice.csv"):  # fmt: skip
        assert (tmp_path / "r" / name).read_text() == (out / name).read_text()
