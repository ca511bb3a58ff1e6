"""harmsweep-report: a real tiny sweep aggregated into CSVs, PNGs, one self-contained HTML page and a W&B run.

The sweep (2 rules x 2 sparsities x 2 variants of tiny_llama, judge-free) runs once per module through the real
`harmsweep -m`; the report is built once through the real `harmsweep-report`. Headless Chromium renders the page
when it is installed (HARMSWEEP_REQUIRE_CHROMIUM=1 makes its absence a failure, for CI).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import prewarmed
import pytest
from conftest import write_pairs

from harmsweep.experiments.matrices import Matrix
from harmsweep.report.build import Report, build_report, compression_rows, summary_text
from harmsweep.report.collect import ReportError, from_wandb, harm_reduction, row_from_result, utility_ratio
from harmsweep.report.compression import CurvePoint, threshold_sparsity

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABEL = re.compile(r"^(>?\d(\.\d)?e[-+]\d+|n/a)$")


def wandb_env(root: Path) -> dict[str, str]:
    """Every W&B location inside ``root``, offline, no key."""
    env = {var: str(root / sub) for var, sub in (("WANDB_DIR", "wb"), ("WANDB_DATA_DIR", "wbdata"),
                                                 ("WANDB_CACHE_DIR", "wbcache"), ("WANDB_CONFIG_DIR", "wbconfig"))}  # fmt: skip
    return {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def report_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_BASE_URL")}
    return prewarmed.run("harmsweep.report.cli", args, cwd=cwd, env={**full, **(env or {})})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 finished runs: pruning.rule=signed_snip,random x sparsity=0.01,0.05 x alignment=aligned,base."""
    from test_cli import file_run_args, harmsweep

    root = tmp_path_factory.mktemp("report_sweep")
    harmful, benign = write_pairs(root, 12)
    args = [a for a in file_run_args(root / "x", harmful, benign) if not a.startswith(("hydra.run", "pruning."))]
    start = time.perf_counter()
    proc = harmsweep("-m", *args, "eval=likelihood", "pruning.rule=signed_snip,random", "pruning.sparsity=0.01,0.05",
                     "alignment=aligned,base", f"hydra.sweep.dir={root}/sweep", cwd=root)  # fmt: skip
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 120, f"the tiny sweep took {elapsed:.0f} s"  # ~25 s on 2 cores
    return root / "sweep"


@pytest.fixture(scope="module")
def built(sweep: Path) -> tuple[Path, subprocess.CompletedProcess]:
    proc = report_cli(str(sweep), cwd=sweep.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep / "report", proc


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_runs_and_compression_tables(built: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = built
    runs = read_csv(out / "runs.csv")
    assert len(runs) == 8
    expected = {"run_id", "folder", "model", "alignment", "rule", "sparsity", "protect", "n_pruned",
                "actual_sparsity", "harm_reduction", "harm_measure", "utility_ratio", "utility_measure",
                "nll_harmful_before", "delta_nll_harmful", "pruned/layer_0", "pruned/o_proj"}  # fmt: skip
    assert expected <= set(runs[0])
    assert {(r["alignment"], r["rule"], float(r["sparsity"])) for r in runs} == {
        (a, rule, s) for a in ("aligned", "base") for rule in ("signed_snip", "random") for s in (0.01, 0.05)
    }
    for r in runs:
        assert r["harm_measure"] == r["utility_measure"] == "likelihood"
        assert float(r["harm_reduction"]) == pytest.approx(1 - math.exp(-float(r["delta_nll_harmful"])))
        assert Path(r["folder"]).name == r["run_id"]
    run_ids = {r["run_id"] for r in runs}

    comp = read_csv(out / "compression.csv")
    assert [c["alignment"] for c in comp] == ["aligned", "base"]
    for c in comp:
        assert LABEL.match(c["A50"]) and LABEL.match(c["A80"]), (c["A50"], c["A80"])
        assert c["n_runs"] == "2" and c["K"] == "1" and c["N"] == runs[0]["n_scored"]
        for key in ("B_concentration", "gini", "C_separation"):
            assert 0.0 <= float(c[key]) <= 1.0, key
        assert c["scores_run"] in run_ids and Path(c["scores_harm"]).is_file()
        assert set(c["A50_runs"].split()) <= run_ids and set(c["A80_runs"].split()) <= run_ids
    assert "tiny_llama/aligned" in proc.stdout and "tiny_llama/base" in proc.stdout
    assert proc.stdout.splitlines()[-1] == f"report: {out / 'report.html'}" and proc.stdout.startswith("8 runs\n")


def test_pngs_and_self_contained_html(built: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = built
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {"curves.png", "pruned_layers.png", "pruned_module_types.png"}
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, png
    page = (out / "report.html").read_text()
    assert 'src="http' not in page and "<script" not in page and 'href="http' not in page
    assert page.count('src="data:image/png;base64,') == len(pngs)
    for section in ("Compression per variant", "Harm and utility vs sparsity", "Where the pruned weights sit",
                    "All runs"):  # fmt: skip
        assert section in page
    for r in read_csv(out / "runs.csv"):
        assert r["run_id"] in page  # every run is traceable from the page


def _pixels(path: Path):
    try:
        import numpy as np
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB"), dtype=float) / 255.0
    except ImportError:
        from matplotlib.image import imread

        return imread(str(path))[..., :3]


def test_html_renders_in_headless_chromium(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("HARMSWEEP_REQUIRE_CHROMIUM") == "1":
            pytest.fail("HARMSWEEP_REQUIRE_CHROMIUM=1 but no chromium / chromium-browser on PATH")
        pytest.skip("chromium not installed")
    out, _ = request.getfixturevalue("built")  # only now: a skip costs no sweep
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", "--window-size=1280,2000", (out / "report.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    bad = [line for line in proc.stderr.splitlines() if "Uncaught" in line or "ERR_FILE_NOT_FOUND" in line]
    assert not bad, bad
    pixels = _pixels(shot)
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 0.05 and (pixels < 0.98).any(axis=-1).mean() > 0.02  # drawn, not a blank page


def test_wandb_report_run_read_back_offline(sweep: Path, tmp_path: Path) -> None:
    from test_tracking import inspect, offline_runs, read_table

    out = tmp_path / "wbreport"
    proc = report_cli(str(sweep), "--out", str(out), "--wandb", "--wandb-mode", "offline", "--wandb-group",
                      "sweep-7", cwd=tmp_path, env=wandb_env(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B report run: report-" in proc.stdout
    (run,) = offline_runs(tmp_path / "wb")  # WANDB_DIR, as for runs
    assert f"W&B: offline run in {run}; upload it with: wandb sync {run}" in proc.stdout
    back = inspect(run)
    (record,) = back["records"]["run"]
    assert record["job_type"] == "report" and record["run_group"] == "sweep-7" and back["exit_code"] == 0
    table = read_table(run, back["summary"], "compression")
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["model"], r["alignment"]) for r in rows] == [("tiny_llama", "aligned"), ("tiny_llama", "base")]
    for logged, written in zip(rows, read_csv(out / "compression.csv"), strict=True):
        assert logged["A50"] == written["A50"] and logged["scores_run"] == written["scores_run"]
        assert logged["gini"] == pytest.approx(float(written["gini"]), rel=1e-12)
    assert back["summary"]["runs"]["nrows"] == 8
    assert {k for k in back["summary"] if k.startswith("figures/")} == {
        "figures/curves", "figures/pruned_layers", "figures/pruned_module_types"
    }  # fmt: skip


def test_wandb_failure_is_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    wandb = pytest.importorskip("wandb")
    from harmsweep.report.wandb_run import log_report

    def broken(*args, **kwargs):
        raise RuntimeError("no network\nmore")

    monkeypatch.setattr(wandb, "init", broken)
    report = Report(tmp_path, tmp_path / "r.html", tmp_path / "r.csv", tmp_path / "c.csv", [], [], [])
    with caplog.at_level(logging.WARNING):
        assert log_report(report, "g", mode="offline") is None
    (record,) = caplog.records
    assert "W&B report init failed" in record.getMessage() and "\n" not in record.getMessage()


def test_experiment_figures_become_heatmaps_and_tables(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp" / "c0ffee000001"
    run_dir.mkdir(parents=True)
    figures = {
        "transfer_nll": Matrix(["violence", "hate", "control: random"], ["violence", "hate"],
                               [[0.5, 0.1], [-0.2, 0.4], [0.0, None]], "delta", "harm NLL change"),
        "overlap_intersection": Matrix(["violence", "hate"], ["violence", "hate"], [[1.0, 0.25], [0.25, 1.0]],
                                       "intersection", "share of the row's set", chance=0.0123),
        "utility": Matrix(["violence", "hate"], ["delta_nll_benign", "n_pruned"], [[0.01, 7.0], [0.02, 7.0]],
                          "values"),
    }  # fmt: skip
    paths = {}
    for name, matrix in figures.items():
        (run_dir / f"{name}.json").write_text(json.dumps(matrix.to_json()))
        paths[name] = str(run_dir / f"{name}.json")
    result = {"run_id": "c0ffee000001", "experiment": "cross_harm", "model": "tiny_llama", "alignment": "aligned",
              "n_scored": 1000, "metrics": {"transfer_nll/diagonal": 0.45}, "figures": paths,
              "pruning": {"rule": "signed_snip", "sparsity": 0.01, "protect": 0.01}}  # fmt: skip
    (run_dir / "result.json").write_text(json.dumps(result))
    report = build_report([tmp_path / "exp"], tmp_path / "out")
    heatmaps = sorted(p.name for p in report.images)
    assert heatmaps == ["exp_00_c0ffee000001_transfer_nll.png", "exp_01_c0ffee000001_overlap_intersection.png"]
    for png in report.images:
        assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 5000
    page = report.html.read_text()
    assert "Experiment figures" in page and "cross_harm · transfer_nll" in page and "utility" in page
    assert "chance level K/N = 0.0123" in page and "control: random" in page
    assert page.count('src="data:image/png;base64,') == 2  # no plain runs: no curves, no bars
    (row,) = report.runs
    assert row["experiment"] == "cross_harm" and row["harm_reduction"] is None and report.compression == []


# ---------------------------------------------------------------- pure: derived columns and metric A


def test_harm_reduction_measures() -> None:
    assert harm_reduction({"delta_nll_harmful": math.log(2)}) == (pytest.approx(0.5, abs=1e-15), "likelihood")
    assert harm_reduction({"nll_harmful_before": 1.0, "nll_harmful_after": 1.0 + math.log(2)})[0] == pytest.approx(0.5)
    judged = {"strongreject_mean_before": 0.8, "strongreject_mean_after": 0.2, "asr_keyword_mean_before": 0.5,
              "asr_keyword_mean_after": 0.5, "delta_nll_harmful": 1.0}  # fmt: skip
    assert harm_reduction(judged) == (pytest.approx(0.75), "strongreject")  # judges first
    assert harm_reduction(judged, "asr_keyword") == (0.0, "asr_keyword")
    assert harm_reduction(judged, "likelihood") == (pytest.approx(1 - math.exp(-1)), "likelihood")
    assert harm_reduction(judged, "rubric") == (None, "rubric")  # forced but not measured
    assert harm_reduction({"rubric_mean_before": 0.0, "rubric_mean_after": 0.3}) == (None, "rubric")
    assert harm_reduction({}) == (None, None)


def test_utility_ratio_measures() -> None:
    both = {"perplexity_before": 10.0, "perplexity_after": 12.5, "delta_nll_benign": math.log(2)}
    assert utility_ratio(both) == (0.8, "perplexity")
    assert utility_ratio(both, "likelihood") == (pytest.approx(0.5), "likelihood")
    assert utility_ratio({"delta_nll_benign": 0.0}) == (1.0, "likelihood")
    assert utility_ratio({"perplexity_before": 10.0}) == (None, None)


def test_row_from_result_flattens_counts_and_skips_experiments() -> None:
    result = {"run_id": "r1", "model": "m", "alignment": "aligned", "n_scored": 100, "n_pruned": 2,
              "actual_sparsity": 0.02, "metrics": {"delta_nll_harmful": math.log(2), "delta_nll_benign": 0.0,
                                                    "selectivity": None, "n_pruned": 2},
              "pruning": {"rule": "signed_snip", "sparsity": 0.02, "protect": 0.01, "per_layer": {"10": 1, "2": 1},
                          "per_module_type": {"q_proj": 2}},
              "artifacts": {"scores_harm": "/h", "scores_benign": "/b"}}  # fmt: skip
    row = row_from_result(result, "/f", utility_measure="likelihood")
    assert row["harm_reduction"] == pytest.approx(0.5) and row["utility_ratio"] == 1.0
    assert [k for k in row if k.startswith("pruned/")] == ["pruned/layer_2", "pruned/layer_10", "pruned/q_proj"]
    assert "selectivity" not in row and row["scores_harm"] == "/h" and row["sparsity"] == 0.02
    experiment = row_from_result({**result, "experiment": "em"}, "/f")
    assert experiment["harm_reduction"] is None and experiment["harm_measure"] is None


def test_compression_rows_interpolate_metric_a_with_run_ids() -> None:
    def run(rid: str, sparsity: float, harm: float, utility: float, rule: str = "signed_snip") -> dict:
        return {"run_id": rid, "model": "m", "alignment": "aligned", "rule": rule, "sparsity": sparsity,
                "protect": 0.01, "n_scored": 10**6, "harm_reduction": harm, "utility_ratio": utility,
                "harm_measure": "likelihood", "utility_measure": "perplexity"}  # fmt: skip

    rows = [
        run("a", 1e-5, 0.3, 1.0),
        run("b", 1e-4, 0.7, 0.99),
        run("c", 1e-3, 0.9, 0.5),
        run("z", 1e-3, 0.0, 1, "random"),
    ]
    (row,) = compression_rows(rows, k_sparsity=5e-6)
    assert row["A50"] == "3.2e-05" and row["A50_sparsity"] == pytest.approx(10**-4.5) and row["A50_runs"] == "a b"
    assert row["A80"] == ">1e-03" and row["A80_sparsity"] is None  # 0.9 at 1e-3 breaks the utility floor
    assert row["n_runs"] == 3 and row["K"] == 5 and row["B_concentration"] is None and "no score files" in row["note"]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args,expected",
    [
        ((), "no finished runs (result.json) found under"),
        (("--harm-measure", "vibes"), "unknown harm measure 'vibes' (available: strongreject, rubric"),
        (("--utility-measure", "speed"), "unknown utility measure 'speed'"),
        (("--k-sparsity", "lots"), "argument --k-sparsity: invalid float value: 'lots'"),
    ],
)
def test_errors_are_one_line(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    (tmp_path / "empty").mkdir()
    proc = report_cli(str(tmp_path / "empty"), *args, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("harmsweep-report: error: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "empty" / "report").exists()


def test_missing_folder_and_offline_wandb_source_are_one_line(tmp_path: Path) -> None:
    proc = report_cli(str(tmp_path / "nope"), cwd=tmp_path)
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == f"harmsweep-report: error: folder not found: {tmp_path / 'nope'}"
    )
    proc = report_cli("--from-wandb", "someone/harmsweep", cwd=tmp_path, env=wandb_env(tmp_path))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "W&B is offline here" in lines[0], proc.stderr


def test_from_wandb_refuses_offline_and_bad_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ReportError, match="W&B is offline here"):
        from_wandb("someone/harmsweep")
    with pytest.raises(ReportError, match="expects entity/project"):
        from_wandb("just-a-project")


# ---------------------------------------------------------------- intervals, seeds and variant differences


def _result(folder: Path, rid: str, alignment: str, seed: int, sparsity: float, effect: float, noise: float) -> None:
    """A finished run with per-item harmful and benign NLLs: harm rises by ``effect`` x log-sparsity, plus noise."""
    from harmsweep.intervals import mean_sample, samples_to_json

    rng = np.random.default_rng(zlib.crc32(f"{alignment}-{seed}-{sparsity:g}".encode()))  # stable across processes
    n = 24
    harm_ids = [f"advbench:{seed}-{i}" for i in range(n)]  # each seed holds out its own prompts
    ben_ids = [f"alpaca:{seed}-{i}" for i in range(n)]
    base_h, base_b = rng.normal(2.0, 0.3, n), rng.normal(1.5, 0.3, n)
    rise = effect * (math.log10(sparsity) + 7)
    after_h = base_h + rise + rng.normal(0, noise, n)
    after_b = base_b + 0.01 + rng.normal(0, 0.002, n)
    samples = {
        "before": samples_to_json({"nll_harmful": mean_sample(harm_ids, base_h), "nll_benign": mean_sample(ben_ids, base_b)}),
        "after": samples_to_json({"nll_harmful": mean_sample(harm_ids, after_h), "nll_benign": mean_sample(ben_ids, after_b)}),
    }  # fmt: skip
    metrics = {"nll_harmful_before": base_h.mean(), "nll_harmful_after": after_h.mean(),
               "nll_benign_before": base_b.mean(), "nll_benign_after": after_b.mean()}  # fmt: skip
    run = folder / rid
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({
        "run_id": rid, "model": "m", "alignment": alignment, "metrics": metrics, "samples": samples,
        "pruning": {"rule": "signed_snip", "sparsity": sparsity, "protect": 0.01}, "config": {"seed": seed},
    }))  # fmt: skip


def test_intervals_seeds_and_differences_in_the_report(tmp_path: Path) -> None:
    from harmsweep.intervals import BootstrapSpec

    sweep = tmp_path / "sweep"
    for alignment, effect, noise in (("aligned", 0.5, 0.05), ("twin", 0.5, 0.05), ("base", 0.1, 0.05)):
        for seed in (0, 1):
            for sparsity in (1e-6, 1e-5, 1e-4):
                _result(sweep, f"{alignment}-{seed}-{sparsity:g}", alignment, seed, sparsity, effect, noise)
    report = build_report([sweep], tmp_path / "out", bootstrap=BootstrapSpec(400, 0.95, 0))
    comp = {r["alignment"]: r for r in read_csv(report.compression_csv)}
    runs = read_csv(report.runs_csv)
    for alignment in ("aligned", "twin"):  # harm 0.5 x decades: A50 lies between 1e-6 and 1e-5
        row = comp[alignment]
        assert row["n_seeds"] == "2" and row["n_items"] == "24 harmful / 24 benign"
        assert float(row["A50_lo"]) <= float(row["A50_sparsity"]) <= float(row["A50_hi"])
        per_seed = dict(item.split(":") for item in row["A50_seeds"].split())
        for seed in ("0", "1"):  # independently: each seed's own curve, from runs.csv
            points = [CurvePoint(float(r["sparsity"]), float(r["harm_reduction"]), float(r["utility_ratio"]),
                                 r["run_id"]) for r in runs if r["alignment"] == alignment and r["seed"] == seed]  # fmt: skip
            assert per_seed[seed] == threshold_sparsity(points, 0.5, 0.95).label
        assert float(row["area_lo"]) <= float(row["area"]) <= float(row["area_hi"])
    assert comp["base"]["A50"].startswith(">") and comp["base"]["A50_ci"].endswith(">1e-04]")
    diffs = {
        (d["first"], d["second"], d["figure"].split(" ")[1]): d for d in read_csv(tmp_path / "out" / "differences.csv")
    }
    assert diffs["m/aligned", "m/base", "A50"]["verdict"] == "m/aligned more compressed"
    assert diffs["m/aligned", "m/base", "area"]["verdict"] == "m/aligned more selective"
    assert float(diffs["m/aligned", "m/base", "area"]["p"]) < 0.01
    assert diffs["m/aligned", "m/twin", "area"]["verdict"] == "not distinguishable"
    assert float(diffs["m/aligned", "m/twin", "area"]["p"]) > 0.05
    html = report.html.read_text()
    assert "Differences between variants" in html and "not distinguishable" in html and "A50 per seed" in html
    assert "m/aligned - m/base: log10 A50" in summary_text(report)


def test_runs_without_per_item_values_get_no_intervals(tmp_path: Path) -> None:
    sweep = tmp_path / "old"
    for sparsity, harm in ((1e-6, 2.1), (1e-5, 2.9)):
        run = sweep / f"r{sparsity:g}"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps({
            "run_id": f"r{sparsity:g}", "model": "m", "alignment": "aligned",
            "metrics": {"nll_harmful_before": 2.0, "nll_harmful_after": harm, "nll_benign_before": 1.0,
                        "nll_benign_after": 1.01},
            "pruning": {"rule": "signed_snip", "sparsity": sparsity, "protect": 0.01}}))  # fmt: skip
    report = build_report([sweep], tmp_path / "out")
    assert report.compression[0]["A50"] == "6.5e-06" and "A50_ci" not in report.compression[0]  # interpolated
    assert "No intervals for m/aligned" in report.html.read_text()


def test_seeds_are_a_sweep_axis_with_their_own_prompts(tmp_path: Path) -> None:
    """seed=0,1 as a real multirun: each seed calibrates and holds out its own prompts; the report shows both."""
    from test_cli import file_run_args, harmsweep

    harmful, benign = write_pairs(tmp_path, 12)
    args = [a for a in file_run_args(tmp_path / "x", harmful, benign) if not a.startswith(("hydra.run", "pruning."))]
    proc = harmsweep("-m", *args, "eval=likelihood", "pruning.sparsity=0.01,0.05", "seed=0,1",
                     f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").rglob("result.json"))]
    by_seed = {r["config"]["seed"]: r for r in results}
    assert len(results) == 4 and set(by_seed) == {0, 1}
    held = {seed: r["samples"]["after"]["nll_harmful"]["ids"] for seed, r in by_seed.items()}
    assert held[0] != held[1]  # another seed: another held-out sample
    assert by_seed[0]["artifacts"]["calibration"] != by_seed[1]["artifacts"]["calibration"]
    report = build_report([tmp_path / "sweep"], tmp_path / "out", harm_measure="likelihood")
    row = report.compression[0]
    assert row["n_seeds"] == 2 and set(dict(i.split(":") for i in row["A50_seeds"].split())) == {"0", "1"}
    assert "A50 per seed" in report.html.read_text()
