"""A run's calibration and reference sets: cached by content, benign references shared across harmful data."""

from __future__ import annotations

import torch
import yaml
from conftest import ROOT
from omegaconf import OmegaConf

from harmsweep.calibration import sets
from harmsweep.calibration.pairs import resolve_template
from harmsweep.config.schema import Config, to_config
from harmsweep.models.loading import load_model


def _cfg(tmp_path, shared_data, harmful: str) -> Config:
    cfg = OmegaConf.to_container(OmegaConf.structured(Config), resolve=True)
    cfg["model"] = yaml.safe_load((ROOT / "conf" / "model" / "tiny_llama.yaml").read_text())
    cfg["data"]["root"] = str(shared_data)
    cfg["data"]["harmful"]["name"] = harmful
    cfg["calibration"].update(n=3)
    cfg["calibration"]["harmful"].update(responses="on_policy", max_new_tokens=6)
    cfg["eval"].update(n=2, benign_references="model")
    cfg["paths"]["cache_dir"] = str(tmp_path / "cache")
    return to_config(cfg)


def _calibrate(cfg: Config, lm, template, root):
    splits = sets.held_out_splits(cfg.calibration, cfg.data, cfg.eval.n, cfg.seed)
    return sets.calibrate(cfg.calibration, lm, template, splits, root, dtype=cfg.model.dtype,
                          benign_references=cfg.eval.benign_references)  # fmt: skip


def _entries(folder) -> int:
    return sum(p.is_dir() for p in folder.iterdir())  # lock files sit beside the entries


def test_runs_that_differ_on_the_harmful_side_generate_benign_references_once(tmp_path, shared_data, monkeypatch):
    lm = load_model(_cfg(tmp_path, shared_data, "advbench").model, "aligned", tmp_path)
    template = resolve_template(lm.tokenizer, "chat")
    generated: list[str] = []
    real = sets.generate_responses
    monkeypatch.setattr(sets, "generate_responses", lambda *a, **kw: generated.append(kw["desc"]) or real(*a, **kw))
    root = tmp_path / "artifacts"
    built = {}
    for harmful in ("advbench", "strongreject"):
        cfg = _cfg(tmp_path, shared_data, harmful)
        built[harmful] = _calibrate(cfg, lm, template, root)
    assert generated.count("harmful responses") == 2 and generated.count("benign references") == 1
    (adv, adv_entry, _), (sr, sr_entry, _) = built["advbench"], built["strongreject"]
    assert adv_entry != sr_entry and not torch.equal(adv["harmful"]["input_ids"], sr["harmful"]["input_ids"])
    for field, tensor in adv["eval_benign"].items():
        assert torch.equal(tensor, sr["eval_benign"][field])
    assert _entries(root / "references") == 1
    # other held-out benign prompts are other references
    cfg = _cfg(tmp_path, shared_data, "advbench")
    cfg.eval.n = 3
    _calibrate(cfg, lm, template, root)
    assert generated.count("benign references") == 2 and _entries(root / "references") == 2
