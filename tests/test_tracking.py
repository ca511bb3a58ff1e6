"""harmsweep.tracking: W&B offline logging read back from the run files, resume, failures, the no-op logger.

Read-back uses the bundled `wandb leet inspect --json` on the offline run folder (the supported path in
wandb 0.31; see shared/notes/infra.md section 3). Every W&B location points into tmp_path.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import wandb_offline

from harmsweep import tracking
from harmsweep.tracking import LoggerConfig, Tracker, open_tracker

wandb = pytest.importorskip("wandb")
omegaconf = pytest.importorskip("omegaconf")

ROOT = Path(__file__).resolve().parents[1]
WANDB_CLI = Path(sys.executable).parent / "wandb"  # works when the venv is not on PATH
RID = "19502be5b3d2"
FAKE_KEY = "0123456789abcdef" * 2 + "fedcba98"  # 40 characters, like a W&B key


@pytest.fixture(autouse=True)
def wb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb_offline(tmp_path, monkeypatch)


def logger_cfg(**overrides: Any) -> LoggerConfig:
    """conf/logger/wandb.yaml as Hydra would load it, offline, with overrides."""
    cfg = yaml.safe_load((ROOT / "conf" / "logger" / "wandb.yaml").read_text())
    return LoggerConfig(**{**cfg, "mode": "offline", **overrides})


def run_config(tmp_path: Path) -> dict[str, Any]:
    """A config with interpolations, resolved the way cli.py does it."""
    cfg = omegaconf.OmegaConf.create(
        {
            "model": {"name": "smollm2_135m", "dtype": "float32"},
            "alignment": {"name": "aligned", "template": "chat"},
            "pruning": {"rule": "signed_snip", "sparsity": 1e-5, "protect": 0.01, "harm_fraction": None},
            "eval": {"n": 32, "metrics": ["harm_likelihood", "refusal"]},
            "judges": {"strongreject_rubric": {"api_key_env": "OPENAI_API_KEY", "api_key": "sk-not-a-real-key"}},
            "seed": 0,
            "paths": {"root": str(tmp_path), "cache_dir": "${paths.root}/cache"},
        }
    )
    return omegaconf.OmegaConf.to_container(cfg, resolve=True)


def make_result(run_dir: Path, harm_after: float = 4.87) -> dict[str, Any]:
    """The structure of a real result.json (outputs/runs/19502be5b3d2), shortened."""
    return {
        "run_id": RID,
        "model": "smollm2_135m",
        "alignment": "aligned",
        "n_scored": 106168320,
        "n_pruned": 1062,
        "actual_sparsity": 1.0002983940972222e-05,
        "metrics": {
            "nll_harmful_before": 0.9087387174367905,
            "nll_harmful_after": harm_after,
            "asr_keyword_n_before": 32,
            "refusal_rate_after": 0.0,
            "delta_nll_harmful": harm_after - 0.9087387174367905,
            "selectivity": None,  # not numeric: left out of the summary
            "n_pruned": 1062,
        },
        "skipped_metrics": {"strongreject_finetuned": "no judge weights"},
        "pruning": {
            "rule": "signed_snip",
            "sparsity": 1e-05,
            "harm_fraction": None,
            "per_layer": {"0": 49, "1": 15, "2": 998},
            "per_module_type": {"down_proj": 341, "q_proj": 721},
        },
        "artifacts": {"mask": str(run_dir / "mask.safetensors"), "items": str(run_dir / "items.jsonl")},
    }


ITEMS = [
    *(
        {"stage": stage, "metric": "refusal", "attack": "none", "source_id": f"advbench:{i}", "category": None,
         "prompt": f"harmful prompt {i}", "response": f"answer {i}", "score": float(i % 2)}
        for stage in ("before", "after") for i in range(3)
    ),
    {"stage": "before", "metric": "recognition", "prompt": "benign prompt", "label": "benign", "p_yes": 0.25,
     "predicted": "No"},
]  # fmt: skip


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def inspect(run: Path) -> dict[str, Any]:
    """Records of one offline run by type (`--json`), plus the `--summary --json` view."""
    cmd = [str(WANDB_CLI), "leet", "inspect", "--json", str(run)]
    lines = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout.splitlines()
    records: dict[str, list[dict[str, Any]]] = {}
    for rec in map(json.loads, lines):
        records.setdefault(rec["type"], []).append(rec[rec["type"]])
    summary = subprocess.run([*cmd[:3], "--summary", "--json", str(run)], check=True, capture_output=True, text=True)
    return {"records": records, **json.loads(summary.stdout)}


def read_table(run: Path, summary: dict[str, Any], key: str) -> dict[str, Any]:
    return json.loads((run / "files" / summary[key]["path"]).read_text())


def logged(tmp_path: Path, cfg: LoggerConfig, failed: bool = False) -> tuple[dict[str, Any], Path]:
    """Open, log the constructed result, finish (in finally); return the read-back and the run folder."""
    run_dir = tmp_path / "runs" / RID
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "mask.safetensors").write_bytes(b"fake mask bytes")
    tracker = open_tracker(cfg, run_id=RID, run_dir=run_dir, config=run_config(tmp_path))
    try:
        assert isinstance(tracker, tracking.WandbTracker)
        tracker.log_result(make_result(run_dir), ITEMS, run_dir / "mask.safetensors")
    finally:
        tracker.finish(failed=failed)
        tracker.finish()  # idempotent
    assert wandb.run is None  # the run was finished
    (run,) = offline_runs(run_dir)
    return inspect(run), run


def test_logs_result_offline(tmp_path: Path) -> None:
    cfg = logger_cfg(group="sweepA", job_type="exp1", tags=["ci"])
    back, run = logged(tmp_path, cfg)
    assert back["run_id"] == tracking.wandb_id(RID, run.parents[1]) and back["state"] == "finished"
    assert back["exit_code"] == 0
    assert back["project"] == "harmsweep"
    (run_rec,) = back["records"]["run"]
    assert run_rec["run_group"] == "sweepA" and run_rec["job_type"] == "exp1"
    assert back["tags"] == ["smollm2_135m", "aligned", "signed_snip", "ci"]

    config = back["config"]
    assert "${" not in json.dumps(config)
    assert config["paths"]["cache_dir"] == f"{tmp_path}/cache"
    assert config["pruning"]["sparsity"] == 1e-5 and config["eval"]["metrics"] == ["harm_likelihood", "refusal"]
    assert config["judges"]["strongreject_rubric"] == {"api_key_env": "OPENAI_API_KEY", "api_key": "<redacted>"}

    summary = back["summary"]
    result = make_result(run.parent)
    for key, value in result["metrics"].items():
        assert summary.get(key) == value if value is not None else key not in summary
    assert {k: summary[k] for k in ("n_pruned", "n_scored", "actual_sparsity")} == {
        "n_pruned": 1062, "n_scored": 106168320, "actual_sparsity": result["actual_sparsity"]
    }  # fmt: skip
    assert {k: v for k, v in summary.items() if k.startswith("pruned/")} == {
        "pruned/layer_0": 49, "pruned/layer_1": 15, "pruned/layer_2": 998, "pruned/down_proj": 341, "pruned/q_proj": 721
    }  # fmt: skip

    assert summary["items"]["nrows"] == len(ITEMS)
    table = read_table(run, summary, "items")
    assert table["columns"] == ["stage", "metric", "source_id", "category", "score"]  # no text by default
    assert table["data"][0] == ["before", "refusal", "advbench:0", None, 0.0]
    assert table["data"][-1] == ["before", "recognition", None, None, 0.25]  # p_yes stands in for score
    assert "harmful prompt" not in (run / "files").joinpath(summary["items"]["path"]).read_text()
    assert not [a for a in back["records"].get("artifact", []) if a["type"] == "mask"]


def test_generations_and_mask_and_failed_exit(tmp_path: Path) -> None:
    back, run = logged(tmp_path, logger_cfg(log_generations=True, log_mask=True), failed=True)
    assert back["exit_code"] == 1  # finish(failed=True) marks the W&B run failed
    table = read_table(run, back["summary"], "items")
    assert table["columns"] == ["stage", "metric", "source_id", "category", "score", "prompt", "response"]
    assert table["data"][0][5:] == ["harmful prompt 0", "answer 0"] and len(table["data"]) == len(ITEMS)
    (mask,) = [a for a in back["records"]["artifact"] if a["type"] == "mask"]
    assert mask["name"] == f"mask-{RID}" and mask["run_id"] == tracking.wandb_id(RID, run.parents[1])
    assert [f["path"] for f in mask["manifest"]["contents"]] == ["mask.safetensors"]
    assert json.loads(mask["metadata"])["rule"] == "signed_snip"


def test_requeue_resumes_same_id(tmp_path: Path) -> None:
    """Offline, each attempt is its own offline-run-* folder, all with the same id; the later says resume."""
    run_dir = tmp_path / "runs" / RID
    for harm_after in (1.0, 2.0):
        tracker = open_tracker(logger_cfg(), run_id=RID, run_dir=run_dir, config=run_config(tmp_path))
        try:
            tracker.log_result(make_result(run_dir, harm_after), ITEMS, None)
        finally:
            tracker.finish()
    runs = offline_runs(run_dir)
    assert len(runs) == 2
    backs = [inspect(r) for r in runs]
    assert {b["run_id"] for b in backs} == {tracking.wandb_id(RID, tmp_path / "runs" / RID)}
    assert [b["summary"]["nll_harmful_after"] for b in backs] == [1.0, 2.0]
    assert all(b["records"]["run"][0]["resume"] for b in backs)  # resume="allow" is recorded for sync


def test_wandb_init_failure_is_one_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("network is down\nsecond line")

    monkeypatch.setattr(wandb, "init", broken)
    with caplog.at_level(logging.WARNING, logger="harmsweep.tracking"):
        tracker = open_tracker(logger_cfg(), run_id=RID, run_dir=tmp_path / "run", config=run_config(tmp_path))
        tracker.log_result(make_result(tmp_path), ITEMS, None)
        tracker.finish()
    assert type(tracker) is Tracker
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "\n" not in record.getMessage()
    assert "W&B init failed" in record.getMessage() and "RuntimeError: network is down" in record.getMessage()


def test_failure_while_logging_still_finishes(tmp_path: Path, monkeypatch, caplog) -> None:
    def broken_table(*args: Any, **kwargs: Any) -> None:
        raise ValueError("bad table")

    monkeypatch.setattr(wandb, "Table", broken_table)
    with caplog.at_level(logging.WARNING, logger="harmsweep.tracking"):
        back, _ = logged(tmp_path, logger_cfg(log_mask=True))
    assert [r.getMessage() for r in caplog.records] == [
        "W&B items table failed, the run goes on without it: ValueError: bad table"
    ]
    assert back["summary"]["n_pruned"] == 1062 and "items" not in back["summary"]  # the rest was logged
    assert back["state"] == "finished" and [a for a in back["records"]["artifact"] if a["type"] == "mask"]


def test_missing_wandb_package_is_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with caplog.at_level(logging.WARNING, logger="harmsweep.tracking"):
        tracker = open_tracker(logger_cfg(), run_id=RID, run_dir=tmp_path / "run", config={})
    tracker.finish()
    assert type(tracker) is Tracker
    assert "ModuleNotFoundError" in caplog.text or "ImportError" in caplog.text


def test_none_logger_does_nothing(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # it must not even try to import wandb
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with caplog.at_level(logging.DEBUG):
        tracker = open_tracker(LoggerConfig(name="none"), run_id=RID, run_dir=run_dir, config=run_config(tmp_path))
        tracker.log_result(make_result(run_dir), ITEMS, None)
        tracker.finish()
    assert type(tracker) is Tracker and not caplog.records
    assert yaml.safe_load((ROOT / "conf" / "logger" / "none.yaml").read_text()) == {"name": "none"}
    assert list(run_dir.iterdir()) == [] and not (tmp_path / "wb").exists()


def test_no_secrets_written(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("HARMSWEEP_TEST_SECRET", "env-value-never-logged")
    logged(tmp_path, logger_cfg(log_generations=True, log_mask=True))
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        text = path.read_bytes()
        assert FAKE_KEY.encode() not in text and b"env-value-never-logged" not in text, path
        assert b"sk-not-a-real-key" not in text, path


def test_auto_mode(tmp_path: Path, monkeypatch) -> None:
    answered: list[tuple[str, int]] = []

    class Conn:
        def close(self) -> None:
            return None

    def connect(address: tuple[str, int], timeout: float) -> Conn:
        answered.append(address)
        return Conn()

    def unreachable(address: tuple[str, int], timeout: float) -> None:
        raise TimeoutError("timed out")

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.resolve_mode("auto") == "offline"  # WANDB_MODE decides when set
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setattr(tracking.socket, "create_connection", connect)
    assert tracking.resolve_mode("auto") == "offline" and answered == []  # no key: no probe at all
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert tracking.resolve_mode("auto") == "online" and answered == [("api.wandb.ai", 443)]
    monkeypatch.setattr(tracking.socket, "create_connection", unreachable)
    assert tracking.resolve_mode("auto") == "offline"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.local:8080")
    (tmp_path / "netrc").write_text(f"machine wandb.local:8080 login user password {FAKE_KEY}\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setattr(tracking.socket, "create_connection", connect)
    assert tracking.resolve_mode("auto") == "online" and answered[-1] == ("wandb.local", 8080)
    assert tracking.resolve_mode("offline") == "offline"
    with pytest.raises(ValueError, match=r"logger\.mode"):
        tracking.resolve_mode("sometimes")


def test_a_harmsweep_multirun_logs_one_wandb_run_per_run_grouped_by_sweep(tmp_path: Path) -> None:
    """End to end: the real app, two runs, offline W&B files read back."""
    from test_cli import file_run_args, harmsweep

    harmful, benign = tmp_path / "h.jsonl", tmp_path / "b.jsonl"
    for path, kind in ((harmful, "bad"), (benign, "good")):
        path.write_text(
            "".join(
                json.dumps({"prompt": f"{kind} q{i}?", "response": f"{kind} answer number {i}."}) + "\n"
                for i in range(10)
            )
        )
    args = [a for a in file_run_args(tmp_path / "x", harmful, benign) if not a.startswith("hydra.run")]
    proc = harmsweep("-m", *args, "eval=likelihood", "pruning=signed_snip,random", "logger=wandb",
                     "logger.mode=offline", f"hydra.sweep.dir={tmp_path}/sweep-42", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run_dirs = sorted(p.parent for p in (tmp_path / "sweep-42").glob("*/result.json"))
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        result = json.loads((run_dir / "result.json").read_text())
        (run,) = offline_runs(run_dir)
        back = inspect(run)
        assert back["run_id"] == tracking.wandb_id(result["run_id"], run_dir) and result["run_id"] == run_dir.name
        assert f"W&B: offline run in {run}; upload it with: wandb sync {run}" in proc.stdout
        assert back["records"]["run"][0]["run_group"] == "sweep-42"
        assert "${" not in json.dumps(back["config"]) and back["config"]["pruning"]["rule"] == result["pruning"]["rule"]
        assert back["summary"]["nll_harmful_after"] == result["metrics"]["nll_harmful_after"]
        assert back["summary"]["n_pruned"] == result["n_pruned"]


def test_experiment_figures_are_logged_as_tables(tmp_path: Path) -> None:
    """An experiment's matrices (result["figures"]: name -> JSON file) come back as W&B tables, row by row."""
    from harmsweep.experiments import save_figures
    from harmsweep.experiments.matrices import Matrix

    run_dir = tmp_path / "runs" / RID
    run_dir.mkdir(parents=True)
    transfer = Matrix(rows=["violence", "control: random"], cols=["violence", "hate"],
                      values=[[0.5, 0.25], [0.0, None]], kind="relative_reduction")  # fmt: skip
    result = {**make_result(run_dir), "figures": save_figures({"transfer_nll": transfer}, run_dir)}
    tracker = open_tracker(logger_cfg(), run_id=RID, run_dir=run_dir, config=run_config(tmp_path))
    try:
        tracker.log_result(result, [], None)
    finally:
        tracker.finish()
    (run,) = offline_runs(run_dir)
    back = inspect(run)
    table = read_table(run, back["summary"], "figures/transfer_nll")
    assert table["columns"] == ["row", "violence", "hate"]
    assert table["data"] == [["violence", 0.5, 0.25], ["control: random", 0.0, None]]


def test_the_wandb_id_is_stable_per_folder_and_unique_across_folders(tmp_path: Path) -> None:
    """The same config in two sweep folders: two W&B runs (one dashboard each); a requeue of one folder: the same."""
    first, second = tmp_path / "sweep-a" / RID, tmp_path / "sweep-b" / RID
    assert tracking.wandb_id(RID, first) == tracking.wandb_id(RID, tmp_path / "sweep-a" / ".." / "sweep-a" / RID)
    assert tracking.wandb_id(RID, first) != tracking.wandb_id(RID, second)
    assert tracking.wandb_id(RID, first).startswith(f"{RID}-")


def test_wandb_dir_is_honoured_and_the_run_says_where_it_went(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    run_dir = tmp_path / "runs" / RID
    tracker = open_tracker(logger_cfg(), run_id=RID, run_dir=run_dir, config=run_config(tmp_path))
    tracker.finish()
    (run,) = sorted((tmp_path / "elsewhere" / "wandb").glob("offline-run-*"))
    assert not offline_runs(run_dir)
    assert (
        capsys.readouterr().out.splitlines().count(f"W&B: offline run in {run}; upload it with: wandb sync {run}") == 1
    )
