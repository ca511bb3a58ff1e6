"""base_values: the base variant's values at a mask's indices, read tensor by tensor from safetensors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from harmsweep.errors import HarmsweepError
from harmsweep.models import base_weights
from harmsweep.models.base_weights import base_values, checkpoint_tensors
from harmsweep.models.loading import build_tiny
from harmsweep.models.spec import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
CFG = yaml.safe_load((ROOT / "conf" / "model" / "tiny_llama.yaml").read_text())
ALIGNED, BASE = (CFG["variants"][v]["tiny"] for v in ("aligned", "base"))
MASKED = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight")


def params(spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    return dict(build_tiny(dict(spec)).model.named_parameters())


def some_mask(like: dict[str, torch.Tensor], names: tuple[str, ...] = MASKED) -> dict[str, torch.Tensor]:
    """A few scattered indices per named parameter, an empty one for another (skipped)."""
    gen = torch.Generator().manual_seed(0)
    mask = {n: torch.randperm(like[n].numel(), generator=gen)[:7] for n in names}
    mask["model.layers.0.mlp.up_proj.weight"] = torch.zeros(0, dtype=torch.int64)
    return mask


def cfg(base: dict[str, Any]) -> ModelConfig:
    return ModelConfig(name="t", dtype="float32", variants={"aligned": {"tiny": dict(ALIGNED)}, "base": base})


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts the tensors base_values reads (get_slice/get_tensor) through safe_open, by name."""
    counts: Counter[str] = Counter()
    real = base_weights.safe_open

    class Counting:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.inner = real(*args, **kwargs)

        def __enter__(self) -> Counting:
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: Any) -> None:
            self.inner.__exit__(*exc)

        def keys(self) -> list[str]:
            return self.inner.keys()

        def get_slice(self, name: str) -> Any:
            counts[name] += 1
            return self.inner.get_slice(name)

        def get_tensor(self, name: str) -> torch.Tensor:
            counts[name] += 1
            return self.inner.get_tensor(name)

    monkeypatch.setattr(base_weights, "safe_open", Counting)
    return counts


def test_sharded_dir_gives_base_values_and_reads_only_masked_tensors(tmp_path: Path, reads: Counter[str]) -> None:
    base = build_tiny(dict(BASE)).model
    base.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    assert (tmp_path / "base" / base_weights.INDEX).is_file()
    assert len(set(checkpoint_tensors(tmp_path / "base").values())) > 2  # several shards
    like = params(ALIGNED)
    mask = some_mask(like)
    got = base_values(cfg({"path": str(tmp_path / "base")}), "base", tmp_path / "cache", mask, like)
    want = dict(base.named_parameters())
    assert set(got) == set(MASKED)
    for name in MASKED:
        assert got[name].dtype == like[name].dtype and got[name].shape == mask[name].shape
        assert torch.equal(got[name], want[name].detach().view(-1)[mask[name]])
    assert not torch.equal(got[MASKED[0]], like[MASKED[0]].detach().view(-1)[mask[MASKED[0]]])  # seeds differ
    assert reads == Counter(dict.fromkeys(MASKED, 1))


def test_unsharded_dir_indexed_by_file_keys_and_dtype_follows_like(tmp_path: Path, reads: Counter[str]) -> None:
    base = build_tiny(dict(BASE)).model
    base.save_pretrained(tmp_path / "base")
    assert not (tmp_path / "base" / base_weights.INDEX).exists()
    assert set(checkpoint_tensors(tmp_path / "base")) >= set(MASKED)
    like = {n: p.to(torch.bfloat16) for n, p in params(ALIGNED).items()}
    mask = some_mask(like)
    got = base_values(cfg({"path": str(tmp_path / "base")}), "base", tmp_path / "cache", mask, like)
    want = dict(base.named_parameters())
    for name in MASKED:
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], want[name].detach().view(-1)[mask[name]].to(torch.bfloat16))
    assert reads == Counter(dict.fromkeys(MASKED, 1))


def test_names_without_model_prefix_are_found(tmp_path: Path) -> None:
    """A checkpoint saved from the inner model (keys without ``model.``) still matches the parameter names."""
    base = build_tiny(dict(BASE)).model
    base.model.save_pretrained(tmp_path / "inner")
    assert "layers.0.self_attn.q_proj.weight" in checkpoint_tensors(tmp_path / "inner")
    like = params(ALIGNED)
    mask = {
        "model.layers.0.self_attn.q_proj.weight": torch.tensor([0, 5, 4095]),  # first and last row
        "model.embed_tokens.weight": torch.tensor([64 * 12 + 1, 64 * 10 + 3, 64 * 10]),  # rows 10-12 only, unsorted
    }
    got = base_values(cfg({"path": str(tmp_path / "inner")}), "base", tmp_path, mask, like)
    want = dict(base.named_parameters())
    for name, idx in mask.items():
        assert torch.equal(got[name], want[name].detach().view(-1)[idx])


def test_tiny_variant_equals_build_tiny_weights(tmp_path: Path) -> None:
    like = params(ALIGNED)
    mask = some_mask(like)
    got = base_values(cfg({"tiny": dict(BASE)}), "base", tmp_path, mask, like)
    want = params(BASE)
    for name in MASKED:
        assert torch.equal(got[name], want[name].detach().view(-1)[mask[name]])


def test_empty_mask_reads_nothing(tmp_path: Path, reads: Counter[str]) -> None:
    build_tiny(dict(BASE)).model.save_pretrained(tmp_path / "base")
    like = params(ALIGNED)
    empty = {MASKED[0]: torch.zeros(0, dtype=torch.int64)}
    assert base_values(cfg({"path": str(tmp_path / "base")}), "base", tmp_path, empty, like) == {}
    assert not reads


def test_base_of_another_shape_fails_naming_tensor_and_shapes(tmp_path: Path) -> None:
    other = {**BASE, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}
    build_tiny(dict(other)).model.save_pretrained(tmp_path / "other")
    like = params(ALIGNED)
    mask = some_mask(like)
    for spec in ({"path": str(tmp_path / "other")}, {"tiny": other}):
        with pytest.raises(HarmsweepError, match=r"q_proj\.weight .*shape \[32, 32\].*\[64, 64\]"):
            base_values(cfg(spec), "base", tmp_path / "cache", mask, like)


def test_missing_variant_fails_listing_the_variants(tmp_path: Path) -> None:
    like = params(ALIGNED)
    model_cfg = {"name": "t", "path": "/some/dir", "variants": {"aligned": {"tiny": dict(ALIGNED)}}}
    with pytest.raises(HarmsweepError, match=r"no base checkpoint.*it has: aligned.*variants\.base\.path") as err:
        base_values(ModelConfig(**model_cfg), "base", tmp_path, some_mask(like), like)
    assert "\n" not in str(err.value)


def test_bin_only_folder_fails_asking_for_safetensors(tmp_path: Path) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({MASKED[0]: torch.zeros(64, 64)}, folder / "pytorch_model.bin")
    like = params(ALIGNED)
    with pytest.raises(HarmsweepError, match=r"no safetensors \(pytorch_model\.bin\)"):
        base_values(cfg({"path": str(folder)}), "base", tmp_path, some_mask(like), like)


def test_absent_tensor_and_missing_path_fail(tmp_path: Path) -> None:
    build_tiny(dict(BASE)).model.save_pretrained(tmp_path / "base")
    like = {**params(ALIGNED), "extra.weight": torch.zeros(3)}
    with pytest.raises(HarmsweepError, match=r"tensor extra\.weight is not in the base checkpoint"):
        base_values(cfg({"path": str(tmp_path / "base")}), "base", tmp_path, {"extra.weight": torch.tensor([1])}, like)
    with pytest.raises(HarmsweepError, match=r"variants\.base\.path not found"):
        base_values(cfg({"path": str(tmp_path / "nope")}), "base", tmp_path, some_mask(like), like)


def test_hub_offline_fails_with_download_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    like = params(ALIGNED)
    with pytest.raises(HarmsweepError, match=r"base checkpoint someone/absent-model could not be fetched.*path=DIR"):
        base_values(cfg({"hub_id": "someone/absent-model"}), "base", tmp_path, some_mask(like), like)
