"""``harmsweep --help``: harmsweep's own page (conf/hydra/help/harmsweep.yaml), every config group described, its
examples valid."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from test_cli import harmsweep

from harmsweep.config.schema import register


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> str:
    proc = harmsweep("--help", cwd=tmp_path_factory.mktemp("help"))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _section(page: str, title: str) -> list[str]:
    body = page.split(f"== {title} ==\n", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in body.splitlines() if line.strip()]


def test_the_page_is_harmsweeps_own(page):
    assert page.startswith("harmsweep: where does harmful generation live") and "powered by Hydra" not in page
    assert "harmsweep plan" in page and "harmsweep-report" in page and "launchers/slurm-local.sh" in page
    assert "harmsweep --cfg job" in page  # the whole config, under another flag
    assert "\nmodel:\n  name:" not in page  # ... and not on this page


def test_every_config_group_has_a_line_and_its_options(page):
    groups = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name != "hydra")
    described = sorted(line.split()[0] for line in _section(page, "Config groups"))
    assert described == groups
    listed = {line.split(":")[0] for line in _section(page, "Options of each group")}
    assert listed == set(groups)


def test_the_five_examples_compose(page):
    examples = [re.split(r"\s{2,}", line)[0] for line in _section(page, "Examples")]
    assert len(examples) == 5 and all(e.startswith("harmsweep ") for e in examples)
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for example in examples:
            args = [a for a in example.split()[1:] if a not in ("plan", "-m")]
            overrides = [a.split(",")[0] for a in args]  # a sweep's first value
            cfg = compose(config_name="config", overrides=overrides)
            assert cfg.model.name, example
