"""`harmsweep plan`: sizes from a config alone, checked against exact counts and real saved activations."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import prewarmed
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


def plan(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HARMSWEEP_CACHE": str(tmp_path / "cache")}
    return prewarmed.run("harmsweep.cli", ["plan", *args], cwd=ROOT, env=env)


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
    # Compact sets (the default, scores.keep=auto) keep the paper's range in one set: 2.02% of H (sparsity and
    # protect up to 1e-2) and 1% of U, as (int32 index, fp32 value) pairs
    compact = (round(0.0202 * n) + round(0.01 * n)) * 8
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
        # what a run refuses before any work, plan refuses too (it sized such jobs before)
        (["model=tiny_llama", "model.logits_chunk=0"], "model.logits_chunk=0 must be at least 1"),
        (["model=tiny_llama", "scores.keep=0.5x"], "scores.keep=0.5x must be auto or a fraction in (0, 1]"),
        (["model=tiny_llama", "method=lowrank", "eval.generation.backend=vllm"], "use eval.generation.backend=hf"),
    ],
)
def test_bad_plan_requests_stop_with_one_line(tmp_path, args, message):
    out = plan(tmp_path, *args)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


# --- plan's figures against the bytes the code allocates (tests/alloc.py), one tiny model, every method ---
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=260)  # fmt: skip
BATCH, LENGTH, N_CAL = 4, 64, 8


@pytest.fixture(scope="module")
def measured() -> tuple:
    """The plan's shape of TINY (from meta) and a real fp32 copy on the CPU with the same fused attention."""
    from harmsweep.models.memory import _register_attention

    config = AutoConfig.for_model("llama", **TINY)
    shape = model_shape(config, "float32")
    _register_attention()
    real_config = copy.deepcopy(config)
    real_config._attn_implementation = "harmsweep_plan"  # the fused kernel a GPU runs (no T x T scores)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(real_config, dtype=torch.float32).eval()
    ids = torch.randint(0, TINY["vocab_size"], (N_CAL, LENGTH))
    batches = [{"input_ids": ids[i : i + BATCH], "attention_mask": torch.ones(BATCH, LENGTH, dtype=torch.long),
                "labels": ids[i : i + BATCH].clone()} for i in range(0, N_CAL, BATCH)]  # fmt: skip
    return shape, model, batches


def _work(**kw):
    from harmsweep.sweep.sizing import Workload

    base = dict(score_sets=1, unsigned=False, cal_n=N_CAL, cal_batch=BATCH, cal_length=LENGTH, cal_gen_tokens=0,
                eval_prompts=0, eval_batch=1, prompt_length=0, max_new_tokens=0, generations=0, judge_batch=0,
                judge_tokens=0, checkpointing=False)  # fmt: skip
    return Workload(**{**base, **kw})


def _above_weights(phase) -> float:
    return phase.gpu - phase.parts["weights"]


def _close(predicted: float, measured_bytes: int) -> None:
    assert abs(predicted - measured_bytes) / measured_bytes < 0.15, (predicted, measured_bytes)


@pytest.mark.parametrize(("kind", "work"), [("harm", {}), ("harm", {"checkpointing": True}),
                                            ("harm_unsigned", {"unsigned": True})])  # fmt: skip
def test_snip_scoring_peak_matches_measured_allocations(measured, kind, work):
    from alloc import peak_bytes

    from harmsweep.scoring.snip import score_kind
    from harmsweep.scoring.spec import ScoringOptions
    from harmsweep.sweep.sizing import Throughput, scoring_phase

    shape, model, batches = measured
    options = ScoringOptions(gradient_checkpointing=bool(work.get("checkpointing")))
    got = peak_bytes(lambda: score_kind(model, kind, batches, N_CAL, options))
    phase = scoring_phase(shape, _work(**work), Throughput())
    _close(_above_weights(phase), got)  # the buffer and the step: on a CPU the offloaded buffer stays put


def test_wanda_peak_is_a_forward_and_matches_measured_allocations(measured):
    from alloc import peak_bytes

    from harmsweep.scoring.snip import score_kind
    from harmsweep.sweep.sizing import Throughput, scoring_phase

    shape, model, batches = measured
    got = peak_bytes(lambda: score_kind(model, "harm_wanda", batches, N_CAL))
    wanda = scoring_phase(shape, _work(criterion="wanda"), Throughput())
    snip = scoring_phase(shape, _work(), Throughput())
    # on a GPU: the norms and a forward (each fp32 matrix leaves at once); on this CPU the host copies stay too
    _close(max(_above_weights(wanda), wanda.parts["scores"] + shape.n_scored * 4), got)
    assert wanda.parts["activations"] < snip.parts["activations"] / 2  # no saved activations, no backward
    work, speed = _work(), Throughput()
    summary = work.score_sets * 3 * shape.n_scored * 4 / (speed.bandwidth_gbs * 1e9)  # on the device, both alike
    assert wanda.gpu_seconds - summary == pytest.approx((snip.gpu_seconds - summary) / 3)


def test_sequential_peak_matches_measured_allocations(measured):
    from alloc import peak_bytes

    from harmsweep.models.parts import scored_parameters
    from harmsweep.pruning.masks import apply_mask
    from harmsweep.pruning.sequential import select_sequential
    from harmsweep.pruning.spec import PruneSpec
    from harmsweep.scoring.snip import score_kind
    from harmsweep.sweep.sizing import Throughput, sequential_phase

    shape, model, batches = measured
    spec = PruneSpec(sparsity=0.01, protect=0.01, granularity="matrix", sequential=True)
    state = copy.deepcopy(model.state_dict())

    def run() -> None:
        select_sequential(spec, scored_parameters(model), model,
                          lambda kind, names, layer: score_kind(model, kind, batches, N_CAL, None, names, layer),
                          lambda chosen: apply_mask(model, chosen))  # fmt: skip

    try:
        got = peak_bytes(run)
    finally:
        model.load_state_dict(state)
    phase = sequential_phase(shape, _work(score_sets=0, sequential=True, sequential_kinds=2), Throughput())
    _close(_above_weights(phase), got)
    assert phase.passes == shape.n_layers * 2 * (N_CAL // BATCH)  # per layer, per kind, per batch


def test_lowrank_peak_matches_measured_allocations(measured):
    from alloc import peak_bytes

    from harmsweep.pruning.lowrank import remove_low_rank
    from harmsweep.pruning.spec import LowRankSpec
    from harmsweep.sweep.sizing import Throughput, lowrank_phase

    shape, model, batches = measured
    changed = copy.deepcopy(model)
    got = peak_bytes(lambda: remove_low_rank(changed, batches, batches, LowRankSpec(rank_harmful=16)))
    phase = lowrank_phase(shape, _work(score_sets=0, method="lowrank", rank_harmful=16), Throughput())
    _close(_above_weights(phase), got)
    assert phase.passes == shape.n_layers * (N_CAL // BATCH)  # one partial forward per block and batch


@pytest.mark.parametrize("chunk", [2048, 16])
def test_perplexity_forward_peak_matches_measured_allocations(measured, chunk):
    from alloc import peak_bytes

    from harmsweep.evaluation.utility import text_nlls
    from harmsweep.sweep.sizing import Throughput, evaluation_phase

    shape, model, _ = measured

    class Bytes:  # one token per byte, no special tokens: every text is exactly LENGTH tokens
        pad_token_id = 0

        def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
            return {"input_ids": list(text.encode())}

    texts = ["harmsweep " * (LENGTH // 10 + 1)] * (2 * BATCH)
    got = peak_bytes(lambda: text_nlls(model, Bytes(), texts, BATCH, LENGTH, logits_chunk=chunk))
    work = _work(eval_forward_tokens=2 * BATCH * LENGTH, forward_batch=BATCH, forward_length=LENGTH, logits_chunk=chunk)
    _close(_above_weights(evaluation_phase(shape, work, Throughput())), got)


def _plan_job(tmp_path, monkeypatch, *overrides: str) -> dict:
    from omegaconf import OmegaConf

    from harmsweep.cli import _run_id_resolver
    from harmsweep.config.schema import register
    from harmsweep.sweep.plan import build

    monkeypatch.setenv("HARMSWEEP_CACHE", str(tmp_path / "cache"))
    OmegaConf.register_new_resolver("harmsweep_run_id", _run_id_resolver, replace=True)  # as `harmsweep plan`
    register()
    _, problems = build([*overrides, "--json", str(tmp_path / "plan.json")])
    assert not problems, problems
    return json.loads((tmp_path / "plan.json").read_text())["jobs"][0]


def test_plan_sizes_lowrank_sequential_and_wanda_on_llama_8b(llama8b, tmp_path, monkeypatch):
    """Each method has its own phase with passes and activations (low-rank had 0 and 0 before)."""
    model = ("model=llama3_8b", f"model.path={llama8b}")
    snip = _plan_job(tmp_path, monkeypatch, *model)
    lowrank = _plan_job(tmp_path, monkeypatch, *model, "method=lowrank")
    sequential = _plan_job(tmp_path, monkeypatch, *model, "pruning.sequential=true", "pruning.granularity=matrix")
    wanda = _plan_job(tmp_path, monkeypatch, *model, "scoring=wanda")
    phases = {name: [p["name"] for p in job["phases"]] for name, job in
              (("lowrank", lowrank), ("sequential", sequential), ("wanda", wanda))}  # fmt: skip
    assert "lowrank" in phases["lowrank"] and "scoring" not in phases["lowrank"]
    assert lowrank["passes"] == 32 * 4 and lowrank["activations"] > 0  # 32 blocks x 4 harmful batches of 8
    grams = next(p for p in lowrank["phases"] if p["name"] == "lowrank")["parts"]["grams"]
    assert grams >= 8 * (3 * 4096**2 + 14336**2)  # float64 Grams of the q/k/v, o, gate/up and down inputs
    assert sequential["passes"] == 32 * 2 * 4 and sequential["disk"]["scores"] == 0  # per layer, 2 kinds
    assert wanda["passes"] == snip["passes"] and wanda["activations"] < snip["activations"] / 4
    assert wanda["gpu_hours"] < snip["gpu_hours"]
    for job in (snip, lowrank, sequential, wanda):
        assert job["peak"] == max(p["gpu"] for p in job["phases"])
        assert {"load", "evaluation", "generation"} <= {p["name"] for p in job["phases"]}


def test_plan_sizes_vllm_base_reads_and_finetunes(llama8b, tmp_path, monkeypatch):
    model = ("model=llama3_8b", f"model.path={llama8b}")
    vllm = _plan_job(tmp_path, monkeypatch, *model, "eval.generation.backend=vllm")
    gen = next(p for p in vllm["phases"] if p["name"] == "generation")
    assert gen["parts"]["vllm weights"] == 8_030_261_248 * 2  # its own copy beside the run's
    assert gen["gpu"] == pytest.approx(min(0.95 * 80, 78) * 2**30)  # all it finds free, less 2 GiB
    base = _plan_job(tmp_path, monkeypatch, *model, "pruning.replace=base")
    reads = next(p for p in base["phases"] if p["name"] == "base reads")
    assert 0 < reads["disk_read"] <= 6_979_321_856 * 2 and reads["host_seconds"] > 0
    tunes = {}
    for method in ("lora", "full"):
        tune = ("alignment=dealigned", f"alignment.derive.finetune.method={method}", "--gpu-gb", "141")
        job = _plan_job(tmp_path, monkeypatch, *model, *tune)
        tunes[method] = next(p for p in job["phases"] if p["name"] == "finetune derive")
    assert tunes["full"]["parts"]["optimizer"] == 8_030_261_248 * (2 + 2 * 4)  # bf16 gradient, two fp32 moments
    per_block = 16 * (2 * 4096 * 2 + 2 * (1024 + 4096) + 3 * (14336 + 4096))  # rank 16 adapters, every linear
    assert tunes["lora"]["parts"]["optimizer"] == 32 * per_block * 16  # fp32 weight, gradient, two moments


def test_a_sweep_reads_each_checkpoint_config_once(tmp_path, monkeypatch):
    """8 jobs over 2 variants: 2 reads of a config (a GGUF's takes seconds), not 8; the plan is the same either way."""
    from harmsweep.sweep import plan as plan_module

    reads: list[str] = []
    real = plan_module.model_config
    monkeypatch.setattr(plan_module, "model_config", lambda cfg: reads.append(cfg.alignment.name) or real(cfg))
    _plan_job(tmp_path, monkeypatch, "-m", "model=tiny_llama", "pruning.sparsity=1e-3,1e-2",
              "pruning=signed_snip,random", "alignment=aligned,base")  # fmt: skip
    assert sorted(reads) == ["aligned", "base"]
    assert len(json.loads((tmp_path / "plan.json").read_text())["jobs"]) == 8


def test_the_sweep_table_names_jobs_as_runs_of_consecutive_numbers():
    from harmsweep.sweep.plan_table import job_ranges

    assert job_ranges([0, 15]) == "0, 15"  # two scoring jobs, not "0..15"
    assert job_ranges(list(range(30))) == "0..29"
    assert job_ranges([3, 4, 9, 1]) == "1, 3, 4, 9"
    assert (
        job_ranges([0, 1, 2, 5, 7, 8, 9, 20, 22, 24, 26, 28, 30], most=6) == "0..2, 5, 7..9, 20, 22, 24, ... (3 more)"
    )
