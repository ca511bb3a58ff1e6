"""The demo's time budget: what `make demo` sweeps and trains, and the trimmed fine-tune batches that keep it short."""

from __future__ import annotations

import copy

import torch
import yaml
from conftest import ROOT, tiny
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harmsweep.alignment import finetune as ft
from harmsweep.alignment.spec import FinetuneSpec
from harmsweep.calibration.pairs import Pair, encode_pairs
from harmsweep.config.schema import register
from harmsweep.losses import response_nll


def test_a_batch_loses_only_the_columns_that_are_padding_in_every_row():
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    batch = {"input_ids": torch.arange(12).view(2, 6), "attention_mask": mask, "labels": torch.full((2, 6), -100)}
    trimmed = ft._trimmed(batch)
    assert {k: tuple(v.shape) for k, v in trimmed.items()} == dict.fromkeys(batch, (2, 4))
    assert torch.equal(trimmed["input_ids"], batch["input_ids"][:, :4])
    left = {**batch, "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])}
    assert ft._trimmed(left)["input_ids"].shape == (2, 6)  # left padding: nothing trailing to drop


def test_trimming_changes_no_loss_and_no_trained_weight():
    lm = tiny()
    pairs = [Pair(f"Q {i}?", "yes" if i % 2 else "a much longer answer " * 6, f"t:{i}", None) for i in range(8)]
    tensors = encode_pairs(lm.tokenizer, pairs, "plain", 128)
    short = {k: v[1::2] for k, v in tensors.items()}  # the short answers: most columns are padding for them
    with torch.no_grad():
        full = response_nll(lm.model, short["input_ids"], short["attention_mask"], short["labels"])
        cut = ft._trimmed(short)
        assert cut["input_ids"].shape[1] < short["input_ids"].shape[1]
        torch.testing.assert_close(response_nll(lm.model, cut["input_ids"], cut["attention_mask"], cut["labels"]), full)
    spec = FinetuneSpec(method="full", lr=1e-3, batch_size=2, epochs=1)
    twin = copy.deepcopy(lm.model)
    ft.finetune(lm.model, tensors, spec)
    original, ft._trimmed = ft._trimmed, lambda batch: batch
    try:
        ft.finetune(twin, tensors, spec)
    finally:
        ft._trimmed = original
    for (name, a), b in zip(lm.model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_the_demo_sweeps_twelve_runs_and_its_safety_tune_takes_24_steps():
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=demo"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    axes = [str(v).split(",") for v in params.values()]
    assert [len(a) for a in axes] == [2, 2, 3] and axes[2] == ["1e-6", "3e-6", "1e-5"]
    derive = yaml.safe_load((ROOT / "conf" / "alignment" / "safety_tuned.yaml").read_text())["derive"]
    spec = FinetuneSpec(**derive["finetune"])
    assert spec.steps(derive["n_harmful"] + derive["n_benign"]) == 24
    assert derive["eval_n"] == 32 and derive["check_tokens"] == 32  # 64 held-out prompts still checked
