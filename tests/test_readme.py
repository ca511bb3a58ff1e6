"""The README is executable: every command of its ```bash blocks runs here, as written, in README order.

The stand-ins for what this machine lacks (no GPU, model hub or W&B account) are the README's list under "How these
commands are tested", and only those. A README line that no test below runs, or names as not run with its reason,
fails ``test_every_readme_command_is_run_or_says_why_not``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import prewarmed
import pytest
import torch
from conftest import write_pairs
from test_btap_parity import write_btap_files
from test_plan import LLAMA31_8B

from harmsweep.models.loading import build_tiny
from harmsweep.pruning.masks import save_mask

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TINY_SPEC = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 12,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}  # fmt: skip
TINY = ["model=tiny_llama"] + [f"model.variants.{v}.tiny.num_hidden_layers=12" for v in ("aligned", "base")]
NOT_RUN = {
    "make test": "it is this test suite (.ci/run runs it)",
    "wandb login": "interactive, and needs a W&B account: without a key runs log offline (logger.mode=auto)",
}
NEEDS_INTERNET = {"harmsweep-report --from-wandb myteam/harmsweep": "W&B is offline here"}
MODULES = {"harmsweep": "harmsweep.cli", "harmsweep-report": "harmsweep.report.cli"}


@dataclass(frozen=True)
class Line:
    text: str  # as in the README: continuations joined, the comment dropped
    argv: tuple[str, ...]


def readme_lines(text: str) -> list[Line]:
    """The commands of every ```bash block, in order."""
    lines, block, pending = [], False, ""
    for raw in text.splitlines():
        if raw.startswith("```"):
            block = raw.strip() == "```bash"
            continue
        if not block:
            continue
        pending += raw.rstrip().removesuffix("\\")
        if raw.rstrip().endswith("\\"):
            continue
        argv = tuple(shlex.split(pending, comments=True))
        pending = ""
        if argv:
            lines.append(Line(" ".join(argv), argv))
    return lines


def kind(line: Line) -> str:
    """Which test runs the line."""
    head = line.argv[0]
    if line.text in NOT_RUN:
        return "not run"
    if line.text in NEEDS_INTERNET:
        return "needs internet"
    if head == "pip":
        return "pip"
    if line.argv[1:2] == ("plan",):
        return "plan"
    slurm = head.startswith("launchers/") or head == "tail" or "hydra/launcher=slurm_local" in line.argv
    return "slurm" if slurm or line.argv[1:] == ("outputs/sweeps/qwen-compression",) else "local"


LINES = readme_lines(README.read_text())


def of_kind(name: str) -> list[Line]:
    return [line for line in LINES if kind(line) == name]


def test_every_readme_command_is_run_or_says_why_not():
    kinds = {line.text: kind(line) for line in LINES}
    assert set(NOT_RUN) | set(NEEDS_INTERNET) <= set(kinds), "a README line named here is gone from the README"
    assert {"local", "slurm", "plan", "pip"} <= set(kinds.values())
    unknown = [line.text for line in LINES if line.argv[0] not in {*MODULES, "make", "pip", "tail", "wandb"}
               and not line.argv[0].startswith("launchers/")]  # fmt: skip
    assert not unknown, f"README commands no test knows how to run: {unknown}"
    assert len(LINES) >= 30


# ---------------------------------------------------------------- the machine's stand-ins


def save_tiny(folder: Path, seed: int, zero_some: bool = False) -> None:
    """A tiny random Llama checkpoint (safetensors, config, byte tokenizer) in ``folder``."""
    lm = build_tiny({**TINY_SPEC, "seed": seed})
    if zero_some:  # a "pruned" release: a few weights zeroed
        with torch.no_grad():
            lm.model.model.layers[3].mlp.down_proj.weight[0, :5] = 0
            lm.model.model.layers[11].self_attn.q_proj.weight[2, 7:9] = 0
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)


def hub_ids(lines: list[Line]) -> set[str]:
    """Every hub id the lines name, directly or through a model preset."""
    import yaml

    ids = set()
    for line in lines:
        for arg in line.argv:
            if re.fullmatch(r"[\w.-]+/[\w.-]+", arg) and line.argv[1:2] == ("mask-from-checkpoint",):
                ids.add(arg)
            if arg.startswith("model=") and not arg.startswith("model=tiny"):
                variants = yaml.safe_load((ROOT / "conf" / "model" / f"{arg[6:]}.yaml").read_text())["variants"]
                ids |= {v["hub_id"] for v in variants.values() if "hub_id" in v}
    return ids


def hub_cache(folder: Path, ids: set[str]) -> Path:
    """A Hugging Face hub cache laid out by hand: each id a tiny Llama (the "-Pruned" one the Instruct one with a
    few weights zeroed)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    for hub_id in sorted(ids):
        repo = folder / f"models--{hub_id.replace('/', '--')}"
        save_tiny(repo / "snapshots" / commit, seed=0 if "Instruct" in hub_id else 1, zero_some="Pruned" in hub_id)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    return folder


@dataclass
class Session:
    """One scratch folder the README's lines run in, one after another, as a user's shell would."""

    cwd: Path
    hub: Path
    data: Path
    last_run: str = ""

    def env(self, line: Line) -> dict[str, str]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HARMSWEEP_CACHE": str(self.cwd / "cache"),
               "HARMSWEEP_DATA": str(self.data), "WANDB_DIR": str(self.cwd / "wandb")}  # fmt: skip
        env.pop("WANDB_API_KEY", None)
        names_hub = any(a.startswith("model=") for a in line.argv) or "mask-from-checkpoint" in line.argv
        if names_hub and kind(line) in ("local", "slurm"):  # plan reads configs only: its folders hold them
            env["HF_HUB_CACHE"] = str(self.hub)  # a fresh interpreter (prewarmed.py): only where a hub id is named
        return env

    def argv(self, line: Line) -> list[str]:
        """The line's arguments with this machine's stand-ins (the README's list under "How these commands are tested")."""
        args = [self._path(a) for a in line.argv[1:]]
        names_model = any(a.startswith(("model=", "model.path=")) for a in args)
        if line.argv[0] == "harmsweep" and args[:1] not in (["plan"], ["mask-from-checkpoint"], ["compare-masks"]):
            args += [] if names_model else TINY
        return args

    def _path(self, arg: str) -> str:
        for prefix, local in (("/models/", f"{self.cwd}/models/"), ("/data/btap", f"{self.cwd}/data/btap"),
                              ("/shared/harm-data", str(self.data))):  # fmt: skip
            arg = arg.replace(f"={prefix}", f"={local}") if "=" in arg else arg
        return arg.replace("<run_id>", self.last_run)

    def run(self, line: Line, args: list[str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        module = MODULES[Path(line.argv[0]).name]
        start = time.monotonic()
        proc = prewarmed.run(module, args or self.argv(line), cwd=self.cwd, env=self.env(line), timeout=timeout)
        print(f"[readme] {time.monotonic() - start:6.1f}s exit {proc.returncode}: {line.text}")
        found = re.findall(r"results in (\S+)", proc.stdout)
        if len(found) == 1 and "-m" not in line.argv:
            self.last_run = Path(found[0]).name
        return proc


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Session:
    data = Path(os.environ.get("HARMSWEEP_DATA", ROOT.parent / "shared" / "data"))
    if not (data / "advbench").is_dir():
        pytest.skip(f"shared data not found at {data}")
    cwd = tmp_path_factory.mktemp("readme")
    hub = hub_cache(cwd / "hub", hub_ids(of_kind("local") + of_kind("slurm")))
    for name in ("Llama-3.1-8B-Instruct", "Llama-3.1-8B"):  # what plan reads: the real config.json, no weights
        (cwd / "models" / name).mkdir(parents=True)
        (cwd / "models" / name / "config.json").write_text(json.dumps(LLAMA31_8B))
    save_tiny(cwd / "models" / "Qwen2.5-0.5B-Instruct", seed=2)
    write_btap_files(cwd / "data" / "btap", "Llama-3.1-8B-Instruct")
    harmful, benign = write_pairs(cwd / "pairs", 80)  # calibration.n + eval.n of each
    harmful.rename(cwd / "h.jsonl")
    benign.rename(cwd / "b.jsonl")
    save_mask({"model.layers.3.mlp.down_proj.weight": torch.tensor([0, 1, 2, 3]),
               "model.layers.11.self_attn.q_proj.weight": torch.tensor([5, 6])}, cwd / "theirs.safetensors")  # fmt: skip
    return Session(cwd, hub, data)


# ---------------------------------------------------------------- the lines


def make_lines(target: str) -> list[Line]:
    """The commands ``make <target>`` runs (``make -n``), as README lines of their own."""
    out = subprocess.run(["make", "-n", "-s", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    argvs = [shlex.split(s) for s in out.splitlines() if s.strip()]
    argvs = [[Path(a[0]).name, *a[1:]] for a in argvs]
    return [Line(" ".join(a), tuple(a)) for a in argvs if a[0] in MODULES]


def test_pip_lines_resolve_the_project_and_its_extras():
    for line in of_kind("pip"):
        assert line.argv[:2] == ("pip", "install"), line.text
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--no-build-isolation"]
        proc = subprocess.run([*cmd, *line.argv[2:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "Would install harmsweep" in proc.stdout, proc.stdout + proc.stderr
        assert "does not provide the extra" not in proc.stdout + proc.stderr, line.text


def readme_plan_excerpt() -> list[str]:
    """The rows of the README's printed plan that depend on the model and the jobs (not on this disk)."""
    text = README.read_text()
    block = text[text.index("```\nevery job:") + 4 :].split("```", 1)[0]
    keep = re.compile(r"^\s+\d+\s+[\d,]+\s|^\s+(load|scoring|evaluation|generation|judging)\s+\d|^GPU-hours")
    return [row.rstrip() for row in block.splitlines() if keep.search(row)]


def test_plan_lines_size_the_8b_jobs_as_the_readme_prints(session):
    lines = of_kind("plan")
    assert len(lines) == 2
    for line in lines:
        proc = session.run(line)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "GPU-hours (estimate)" in proc.stdout
    rows = {row.rstrip() for row in proc.stdout.splitlines()}
    excerpt = readme_plan_excerpt()
    assert len(excerpt) >= 9 and [row for row in excerpt if row not in rows] == []  # the last line's output
    jobs = json.loads((session.cwd / "plan.json").read_text())
    assert len(jobs["jobs"]) == 30


def test_lines_that_need_the_internet_stop_in_one_line_and_write_nothing(session, tmp_path):
    for line in of_kind("needs internet"):
        proc = prewarmed.run(MODULES[line.argv[0]], list(line.argv[1:]), cwd=tmp_path, env=session.env(line))
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert len(proc.stderr.splitlines()) == 1 and NEEDS_INTERNET[line.text] in proc.stderr, proc.stderr
        assert list(tmp_path.iterdir()) == []


def _single_run(proc: subprocess.CompletedProcess) -> dict:
    found = re.findall(r"results in (\S+)", proc.stdout)
    assert len(found) == 1, proc.stdout[-2000:]
    return json.loads((Path(found[0]) / "result.json").read_text())


@pytest.mark.slow
def test_local_lines_run_as_written(session):
    """Every other line, in README order, in one folder: each exits 0 and leaves what it says it does."""
    lines = []
    for line in of_kind("local"):
        lines += make_lines(line.argv[1]) if line.argv[0] == "make" else [line]
    assert [line.text for line in lines[:2]] == ["harmsweep -m experiment=demo", "harmsweep-report outputs/demo"]
    sweeps: list[Path] = []
    for line in lines:
        args = session.argv(line)
        if line.argv[0] == "harmsweep-report" and "--wandb" in line.argv:
            args = [str(sweeps[0]), str(sweeps[1]), *args[2:]]  # outputs/sweeps/a and b: two sweeps made above
        proc = session.run(line, args)
        assert proc.returncode == 0, f"{line.text}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if line.argv[0] == "harmsweep-report":
            folder = Path(args[0]) if Path(args[0]).is_absolute() else session.cwd / args[0]
            assert (folder / "report" / "report.html").is_file() and (folder / "report" / "runs.csv").is_file()
            if "--wandb" in line.argv:
                assert list((session.cwd / "wandb").glob("wandb/offline-run-*")), proc.stdout
        elif "-m" in line.argv:
            summary = re.search(r"^sweep (\S+): (\d+) runs: .*, 0 failed$", proc.stdout, re.M)
            assert summary, proc.stdout[-2000:]
            sweeps.append(Path(summary[1]))
        elif line.argv[1:2] == ("mask-from-checkpoint",):
            assert (session.cwd / "theirs.safetensors").is_file()
        elif line.argv[1:2] == ("compare-masks",):
            assert (session.cwd / "compare" / "mask_comparison.csv").is_file()
        elif "--cfg" in line.argv:
            assert "pruning:" in proc.stdout and "model:" in proc.stdout
        else:
            result = _single_run(proc)
            _check_run(line, result)
    assert len(sweeps) == 3


def _check_run(line: Line, result: dict) -> None:
    """What a line's own words promise of its run: the model, the variant and every dotted option it sets."""
    options = dict(a.split("=", 1) for a in line.argv[1:] if "=" in a)
    assert result["model"] == options.get("model", Path(options.get("model.path", "tiny_llama")).name)
    assert result["alignment"] == options.get("alignment", "aligned")
    for key, value in options.items():
        if "." not in key or key.startswith(("model.", "hydra.")) or key.endswith(("file", "btap_data")):
            continue
        node = result["config"]
        for part in key.split("."):
            node = node[part]
        assert _same(node, value), (line.text, key, node)


def _same(node: object, value: str) -> bool:
    if str(node).replace(" ", "").lower() == value.lower():
        return True
    try:
        return float(node) == float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
