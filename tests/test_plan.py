"""`harmsweep plan`: sizes from a config alone, checked against exact counts and real saved activations."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from transformers import AutoConfig, AutoModelForCausalLM

from harmsweep.devices import SCORE_BYTES
from harmsweep.models.memory import model_shape, saved_bytes

# Llama-3.1-8B's published config.json (only the fields that shape the model and its tokens)
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}  # fmt: skip
HARMSWEEP = [sys.executable, "-c", "from harmsweep.cli import main; main()"]


def plan(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HARMSWEEP_CACHE": str(tmp_path / "cache")}
    return subprocess.run([*HARMSWEEP, "plan", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama31_8b")
    (folder / "config.json").write_text(json.dumps(LLAMA31_8B))
    return folder


def test_plan_of_llama_8b_from_its_config_alone(llama8b, tmp_path):
    out = plan(tmp_path, "model=llama3_8b", f"model.path={llama8b}", "--json", str(tmp_path / "plan.json"))
    assert out.returncode == 0, out.stderr
    job = json.loads((tmp_path / "plan.json").read_text())["jobs"][0]
    assert job["n_scored"] == 6_979_321_856
    assert job["weights"] == 8_030_261_248 * 2  # bf16, embeddings and lm_head included
    assert job["score_buffer"] == 6_979_321_856 * SCORE_BYTES
    assert job["passes"] == 8  # harm and benign sets: 32 pairs each in batches of 8
    assert "6,979,321,856" in out.stdout


def test_a_job_that_cannot_fit_its_gpu_stops_with_one_line(llama8b, tmp_path):
    out = plan(tmp_path, "model=llama3_8b", f"model.path={llama8b}", "--gpu-gb", "40")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("harmsweep plan: error: job 0") and "more than --gpu-gb 40" in last
    assert "gradient_checkpointing" in last
    light = plan(tmp_path, "model=llama3_8b", f"model.path={llama8b}", "--gpu-gb", "48",
                 "scoring.gradient_checkpointing=true")  # fmt: skip
    assert light.returncode == 0, light.stderr


def test_a_sweep_counts_shared_scores_once(tmp_path):
    out = plan(tmp_path, "-m", "model=tiny_llama", "pruning.sparsity=1e-3,1e-2", "pruning=signed_snip,random",
               "--json", str(tmp_path / "plan.json"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "plan.json").read_text())
    jobs = result["jobs"]
    assert len(jobs) == 4
    n = jobs[0]["n_scored"]
    # signed_snip needs harm + benign scores (computed by the first job); random needs none.
    # Compact sets (the default) keep 1.1% of H and 1% of U, as (int32 index, fp32 value) pairs
    compact = (round(0.011 * n) + round(0.01 * n)) * 8
    assert [j["disk"]["scores"] for j in jobs] == [compact, 0, 0, 0]
    assert [j["passes"] > 0 for j in jobs] == [True, False, False, False]
    assert result["disk"]["scores"] == compact
    dense = plan(tmp_path, "-m", "model=tiny_llama", "pruning.sparsity=1e-3,1e-2", "scores.store=dense",
                 "--json", str(tmp_path / "dense.json"))  # fmt: skip
    assert dense.returncode == 0, dense.stderr
    assert json.loads((tmp_path / "dense.json").read_text())["disk"]["scores"] == 2 * n * SCORE_BYTES


@pytest.mark.parametrize(("content", "message"), [("{}", "is not a model config"), (None, "has no config.json")])
def test_a_folder_without_a_model_config_gives_one_line(tmp_path, content, message):
    folder = tmp_path / "m"
    folder.mkdir()
    if content is not None:
        (folder / "config.json").write_text(content)
    out = plan(tmp_path, f"model.path={folder}")
    assert out.returncode == 2
    assert out.stderr.strip().startswith("harmsweep plan: error:") and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_activation_estimate_matches_a_real_model_saved_bytes():
    """The plan measures 1- and 2-layer copies on meta; a real 4-layer model on the CPU must agree."""
    config = AutoConfig.for_model("llama", hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512)  # fmt: skip
    shape = model_shape(config, "float32")
    real_config = copy.deepcopy(config)
    real_config._attn_implementation = "harmsweep_plan"  # the fused-attention stand-in the plan counts with
    real = AutoModelForCausalLM.from_config(real_config, dtype=torch.float32)
    batch, length = 3, 40
    measured = saved_bytes(real, batch, length)
    tokens = batch * length
    predicted = shape.head_act_bytes_per_token * tokens + shape.n_layers * shape.block_act_bytes_per_token * tokens
    assert abs(predicted - measured) / measured < 0.02
    assert shape.n_scored == sum(p.numel() for n, p in real.named_parameters() if ".layers." in n and p.dim() == 2)
    assert shape.activation_bytes(tokens, True) < shape.activation_bytes(tokens, False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model=tiny_llama", "pruning.sparsty=1"], "Key 'sparsty' not in 'PruningConfig'"),
        (["model=tiny_llama", "pruning.sparsity=1e-3,1e-2"], "needs -m"),
    ],
)
def test_bad_plan_requests_stop_with_one_line(tmp_path, args, message):
    out = plan(tmp_path, *args)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
