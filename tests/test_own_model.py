"""model.path alone is a model of its own: named after its path, in its config.json's dtype, with no variants but
those given (addable without Hydra's +); another alignment without its checkpoint is a one-line error."""

from __future__ import annotations

import json

import yaml
from test_cli import harmsweep

from harmsweep.config.compose import with_own_model


def _folder(tmp_path, dtype="bfloat16"):
    folder = tmp_path / "Llama-3.1-8B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": dtype}))
    return folder


def test_a_path_alone_gets_its_own_name_dtype_and_no_variants(tmp_path):
    folder = _folder(tmp_path)
    assert with_own_model([f"model.path={folder}", "pruning.sparsity=1e-4"]) == [
        f"model.path={folder}", "model=own", "model.name=Llama-3.1-8B-Instruct", "model.dtype=bfloat16",
        "pruning.sparsity=1e-4",
    ]  # fmt: skip
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert with_own_model([f"model.path={gguf}"])[2:] == [
        "model.name=SmolLM2-135M-Instruct.Q4_1",
        "model.dtype=float32",
    ]
    hub = with_own_model(["model.path=someone/not-cached-model"])  # not in the local cache: no network asked
    assert hub[2:] == ["model.name=not-cached-model", "model.dtype=float32"]
    assert with_own_model([f"model.path={folder}", "model.name=mine", "model.dtype=float16"]) == [
        f"model.path={folder}", "model=own", "model.name=mine", "model.dtype=float16"
    ]  # fmt: skip


def test_a_preset_with_a_path_or_a_sweep_over_paths_is_left_as_given(tmp_path):
    folder = _folder(tmp_path)
    assert with_own_model(["model=llama3_8b", f"model.path={folder}"]) == ["model=llama3_8b", f"model.path={folder}"]
    assert with_own_model([f"model.path={folder},{folder}"]) == [f"model.path={folder},{folder}"]
    assert with_own_model(["model.variants.base.path=/b"]) == ["++model.variants.base.path=/b"]  # no + needed


def test_the_composed_config_and_a_missing_variant(tmp_path):
    folder = _folder(tmp_path)
    proc = harmsweep(f"model.path={folder}", "model.variants.base.hub_id=org/base", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    model = yaml.safe_load(proc.stdout)["model"]
    assert model["name"] == "Llama-3.1-8B-Instruct" and model["dtype"] == "bfloat16"
    assert model["variants"] == {"base": {"hub_id": "org/base"}}
    run_dir = tmp_path / "run"
    proc = harmsweep(
        f"model.path={folder}", "alignment=base", "data.root=/tmp", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "alignment=base needs its own: model.variants.base.path=DIR" in proc.stderr and not run_dir.exists()
