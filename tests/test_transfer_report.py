"""experiment=orgad2026_transfer: the sweep's pairs come from one key, and harmsweep-report draws the A x B matrix.

The report tests write result.json files by hand (the numbers are the test's own), run the real `harmsweep-report`
entry point in-process, and read back the CSV, the PNG and the page.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from harmsweep.cli import _run_id_resolver
from harmsweep.config.schema import register, to_config
from harmsweep.data.spec import CHOSEN_FIVE
from harmsweep.report import cli
from harmsweep.report.transfer import COLUMNS, Run, matrices, pair_of, run_of

CONF = Path(__file__).resolve().parents[1] / "conf"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OmegaConf.register_new_resolver("harmsweep_run_id", _run_id_resolver, replace=True)
register()

HHV, MAL, ADULT, PHYS = "hate_harass_violence", "malware", "adult_content", "physical_harm"


# ---------------------------------------------------------------- the preset


def compose_transfer(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["experiment=orgad2026_transfer", *overrides],
                       return_hydra_config=hydra)  # fmt: skip


def test_preset_sweeps_every_ordered_pair_without_the_diagonal() -> None:
    cfg = compose_transfer("calibration.btap_data=/their/data", hydra=True)
    assert set(cfg.hydra.sweeper.params) == {"transfer"}
    (override,) = OverridesParser.create().parse_overrides([f"transfer={cfg.hydra.sweeper.params.transfer}"])
    pairs = [(d["prune"], d["eval"]) for d in override.value().list]  # the parsed {prune: A, eval: B} values
    assert sorted(pairs) == sorted((a, b) for a in CHOSEN_FIVE for b in CHOSEN_FIVE if a != b)
    assert len(pairs) == 20 == len(set(pairs))


def test_one_pair_resolves_data_calibration_and_prefix_files() -> None:
    plain = OmegaConf.to_container(
        compose_transfer("calibration.btap_data=/their/data", f"transfer={{prune:{MAL},eval:{ADULT}}}"), resolve=True
    )
    assert plain["experiment"] == "orgad2026_transfer" and plain["transfer"] == {"prune": MAL, "eval": ADULT}
    assert plain["data"]["harmful"] == {"name": "hexphi", "file": "/their/data/HEx-PHI.jsonl", "categories": None,
                                        "category": ADULT, "minus_category": MAL}  # fmt: skip
    assert plain["calibration"]["prune_data"] == "advbench_malware_not_adult_content_align_anti"
    assert plain["calibration"]["format"] == "btap" and plain["pruning"]["protect"] == 5e-5
    gen = plain["eval"]["generation"]
    assert (gen["attack"], gen["prefix"], gen["prefix_file"], gen["prefill_tokens"]) == (
        "prefill", "file", "/their/data/Harmful-HEx-PHI.jsonl", 10
    )  # fmt: skip
    assert plain["eval"]["n"] is None
    assert plain["eval"]["metrics"] == ["refusal", "strongreject_finetuned", "perplexity"]
    assert plain["judges"]["strongreject_finetuned"]["judged_text"] == "separated"
    assert plain["logger"]["aliases"] == "orgad2026" and plain["judges"]["refusal"]["phrases"] == "orgad2026"
    cfg = to_config(plain)  # the typed config reads category B as categories=[B]
    assert cfg.data.harmful.categories == [ADULT] and cfg.transfer is not None and cfg.transfer.prune == MAL


def test_gpu_hardware_keeps_the_authors_generation_settings() -> None:
    """hardware=gpu80 swaps in eval=gpu (batch sizes); the preset's own eval keys still win."""
    gen = compose_transfer("calibration.btap_data=/d", "hardware=gpu80").eval.generation
    assert (gen.prefix, gen.prefill_tokens, gen.sampling, gen.max_new_tokens) == ("file", 10, "model", 256)


def test_pairs_give_distinct_run_ids() -> None:
    ids = {
        _run_id_resolver(_root_=compose_transfer("calibration.btap_data=/d", f"transfer={{prune:{a},eval:{b}}}"))
        for a, b in ((MAL, ADULT), (ADULT, MAL), (MAL, PHYS))
    }
    assert len(ids) == 3


# ---------------------------------------------------------------- the report


def write_result(folder: Path, rid: str, pair: tuple[str, str] | None, sr: tuple[float, float] | None = None,
                 ci: tuple[float, float] | None = None, kw: tuple[float, float] | None = None,
                 experiment: str = "orgad2026_transfer", model: str = "tiny_llama", failed: bool = False) -> None:  # fmt: skip
    """One run folder with a result.json as pipeline/run.py writes it (the fields the report reads)."""
    run_dir = folder / rid
    run_dir.mkdir(parents=True)
    metrics, intervals = {}, {}
    for key, stages in (("strongreject_mean", sr), ("asr_keyword_mean", kw)):
        if stages is not None:
            before, after = stages
            metrics |= {f"{key}_before": before, f"{key}_after": after, f"delta_{key}": after - before}
            if ci is not None:
                intervals[f"delta_{key}"] = {"value": after - before, "lo": ci[0], "hi": ci[1], "n": 27}
    config = {"experiment": experiment, "seed": 0}
    if pair is not None:
        config |= {"transfer": {"prune": pair[0], "eval": pair[1]},
                   "data": {"harmful": {"name": "hexphi", "category": pair[1], "minus_category": pair[0]}}}  # fmt: skip
    result = {"run_id": rid, "model": model, "alignment": "aligned", "n_scored": 1000, "n_pruned": 3,
              "actual_sparsity": 0.003, "metrics": metrics, "intervals": {"metrics": intervals},
              "pruning": {"rule": "signed_snip", "sparsity": 1e-5, "protect": 5e-5}, "config": config}  # fmt: skip
    (run_dir / "result.json").write_text(json.dumps(result))
    if failed:
        (run_dir / "FAILED").write_text("{}")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    sweep = tmp_path_factory.mktemp("sweep")
    write_result(sweep, "a00000000001", (MAL, ADULT), sr=(0.60, 0.45), ci=(-0.25, -0.05))
    write_result(sweep, "a00000000002", (ADULT, MAL), sr=(0.70, 0.72), ci=(-0.04, 0.08))
    write_result(sweep, "a00000000003", (HHV, MAL), sr=(0.50, 0.20), ci=(-0.41, -0.19), kw=(0.9, 0.1))
    write_result(sweep, "a00000000004", (HHV, ADULT), sr=(0.40, 0.30))  # no intervals recorded: bare point
    write_result(sweep, "a00000000005", (MAL, HHV), sr=(0.1, 0.9), ci=(0.7, 0.9), failed=True)  # failed: left out
    # other experiments under the same folder: never pooled into the matrix, even with a pair in their config
    write_result(sweep, "b00000000001", (ADULT, HHV), sr=(0.9, 0.0), ci=(-1.0, -0.8), experiment="orgad2026_harm")
    write_result(sweep, "b00000000002", None, sr=(0.9, 0.1), ci=(-1.0, -0.7), experiment="compression")
    # another model, judged by keywords only: its own matrix, in keyword ASR
    write_result(sweep, "c00000000001", (PHYS, MAL), kw=(0.8, 0.5), ci=(-0.5, -0.1), model="tiny_qwen2")
    out = sweep / "report"
    cli.main([str(sweep), "--out", str(out)])
    return sweep, out


def test_csv_holds_exactly_the_cells(built: tuple[Path, Path]) -> None:
    _, out = built
    rows = read_csv(out / "transfer_tiny_llama_aligned.csv")
    assert list(rows[0]) == list(COLUMNS)
    cats = [HHV, MAL, ADULT]  # the categories its runs name, in the authors' chosen_five order
    assert [(r["prune_category"], r["eval_category"]) for r in rows] == [(a, b) for a in cats for b in cats if a != b]
    by_pair = {(r["prune_category"], r["eval_category"]): r for r in rows}
    assert {(r["measure"], r["metric"]) for r in rows} == {("strongreject", "delta_strongreject_mean")}
    expected = {  # pair -> value, lo, hi, n, before, after, run id
        (MAL, ADULT): (0.45 - 0.60, -0.25, -0.05, 27, 0.60, 0.45, "a00000000001"),
        (ADULT, MAL): (0.72 - 0.70, -0.04, 0.08, 27, 0.70, 0.72, "a00000000002"),
        (HHV, MAL): (0.20 - 0.50, -0.41, -0.19, 27, 0.50, 0.20, "a00000000003"),
        (HHV, ADULT): (0.30 - 0.40, None, None, None, 0.40, 0.30, "a00000000004"),
    }
    for pair, (value, lo, hi, n, before, after, rid) in expected.items():
        row = by_pair[pair]
        assert float(row["value"]) == value and float(row["before"]) == before and float(row["after"]) == after
        assert (row["lo"], row["hi"], row["n"]) == (("", "", "") if lo is None else (str(lo), str(hi), str(n)))
        assert row["run_id"] == rid and row["note"] == ""
    for pair in set(by_pair) - set(expected):  # the failed run's pair and pairs never run: blank, labels kept
        assert [by_pair[pair][c] for c in ("value", "lo", "hi", "n", "before", "after", "run_id")] == [""] * 7
    assert (MAL, HHV) in by_pair and by_pair[MAL, HHV]["value"] == ""  # the FAILED run is not read
    assert not (out / "transfer_None_None.csv").exists()


def test_keyword_asr_when_no_strongreject_and_one_matrix_per_model(built: tuple[Path, Path]) -> None:
    _, out = built
    assert sorted(p.name for p in out.glob("transfer_*")) == [
        "transfer_tiny_llama_aligned.csv", "transfer_tiny_llama_aligned.png",
        "transfer_tiny_qwen2_aligned.csv", "transfer_tiny_qwen2_aligned.png",
    ]  # fmt: skip
    rows = read_csv(out / "transfer_tiny_qwen2_aligned.csv")
    assert [(r["prune_category"], r["eval_category"], r["measure"]) for r in rows] == [
        (MAL, PHYS, "asr_keyword"), (PHYS, MAL, "asr_keyword")
    ]  # fmt: skip
    assert float(rows[1]["value"]) == 0.5 - 0.8 and (rows[1]["lo"], rows[1]["hi"]) == ("-0.5", "-0.1")
    assert rows[0]["value"] == ""


def test_png_and_page(built: tuple[Path, Path]) -> None:
    _, out = built
    for name in ("transfer_tiny_llama_aligned.png", "transfer_tiny_qwen2_aligned.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    page = (out / "report.html").read_text()
    assert "Transfer between harm categories" in page and "transfer_tiny_llama_aligned.csv" in page
    assert "-0.150 [-0.250, -0.050]" in page and "a00000000001" in page
    assert "b00000000001" not in page.split('id="transfer"')[1].split("</section>")[0]  # other experiments


def test_rebuild_removes_a_previous_matrix(built: tuple[Path, Path], tmp_path: Path) -> None:
    sweep, _ = built
    out = tmp_path / "out"
    out.mkdir()
    (out / "transfer_gone_aligned.csv").write_text("stale")
    cli.main([str(sweep / "b00000000002"), "--out", str(out)])  # a folder without transfer runs
    assert not list(out.glob("transfer_*")) and "Transfer between" not in (out / "report.html").read_text()


def test_pair_from_data_block_and_duplicate_runs_are_named() -> None:
    config = {"experiment": "orgad2026_transfer", "transfer": {"prune": MAL, "eval": ADULT}}
    assert run_of({"run_id": "r", "model": "m", "alignment": "a", "config": config}).eval == ADULT
    assert run_of({"run_id": "r", "config": {**config, "experiment": "orgad2026_harm"}}) is None
    assert run_of({"run_id": "r", "config": {"experiment": "orgad2026_transfer"}}) is None  # no pair recorded
    assert pair_of({"data": {"harmful": {"categories": [ADULT], "minus_category": MAL}}}) == (MAL, ADULT)
    assert pair_of({"data": {"harmful": {"categories": [ADULT, MAL], "minus_category": MAL}}}) is None
    first = Run("r1", "m", "aligned", MAL, ADULT, {"delta_strongreject_mean": -0.1}, {})
    second = Run("r2", "m", "aligned", MAL, ADULT, {"delta_strongreject_mean": -0.3}, {})
    (matrix,) = matrices([second, first])
    assert matrix.categories == [MAL, ADULT] and matrix.values() == [[None, -0.1], [None, None]]
    assert matrix.cells[MAL, ADULT]["run_id"] == "r1" and matrix.cells[MAL, ADULT]["note"] == "also run r2"
