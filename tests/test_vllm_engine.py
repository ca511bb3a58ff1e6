"""The vLLM backend without vLLM: engine sizing and reuse, HF -> fused names, where the weights come from, and the
in-engine mask against a stand-in for vLLM's fused, tensor-parallel layers (their weight loaders re-implemented here
from vllm/model_executor/layers/linear.py)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny, tiny_spec

import harmsweep.generation.vllm as ve
from harmsweep.devices import GIB
from harmsweep.errors import HarmsweepError
from harmsweep.generation.hf import generate
from harmsweep.generation.sampling import EngineInputs, Sampling
from harmsweep.models.loading import build_tiny
from harmsweep.pruning.masks import apply_mask, pruned

H, HEADS, KV_HEADS, HEAD_DIM, MLP = 16, 4, 2, 4, 24  # GQA: k/v heads are replicated at tp=4


def test_engine_is_sized_from_free_memory_and_the_jobs_gpus():
    spec = ve.engine_spec("/ckpt", "bfloat16", 700, free_bytes=60 * GIB, total_bytes=80 * GIB, n_gpus=2, seed=3)
    assert spec.gpu_memory_utilization == 0.725  # (60 - 2 GiB headroom) / 80: vLLM's fraction is of the total
    assert (spec.tensor_parallel_size, spec.max_model_len, spec.seed) == (2, 2048, 3)
    assert ve.engine_spec("/c", "bfloat16", 3000, 60 * GIB, 80 * GIB, 1).max_model_len == 3072
    assert ve.engine_spec("/c", "bfloat16", 700, 60 * GIB, 80 * GIB, 1, max_positions=1024).max_model_len == 1024
    assert ve.engine_spec("/c", "bfloat16", 10, 200 * GIB, 141 * GIB, 1).gpu_memory_utilization == 0.95
    with pytest.raises(HarmsweepError, match="backend=hf"):
        ve.engine_spec("/c", "bfloat16", 10, free_bytes=4 * GIB, total_bytes=80 * GIB, n_gpus=1, weight_bytes=2 * GIB)
    ve.engine_spec("/c", "bfloat16", 10, free_bytes=4 * GIB, total_bytes=80 * GIB, n_gpus=2, weight_bytes=2 * GIB)


@pytest.mark.parametrize(
    ("hf", "fused", "shard"),
    [
        ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.qkv_proj.weight", "q"),
        ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.qkv_proj.weight", "k"),
        ("model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.qkv_proj.weight", "v"),
        ("model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.gate_up_proj.weight", 0),
        ("model.layers.3.mlp.up_proj.weight", "model.layers.3.mlp.gate_up_proj.weight", 1),
        ("model.layers.3.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight", None),
        ("model.layers.1.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight", None),
    ],
)
def test_hf_weights_map_to_the_engines_fused_parameters(hf, fused, shard):
    assert ve.fused_layout(hf) == (fused, shard)


class QKV(torch.nn.Module):
    """QKVParallelLinear.weight_loader: q, k, v rows stacked per rank; k/v heads replicated when tp > kv heads."""

    def __init__(self, tp: int, rank: int):
        super().__init__()
        self.rank, self.heads = rank, HEADS // tp
        self.kv, self.replicas = max(1, KV_HEADS // tp), max(1, tp // KV_HEADS)
        rows = (self.heads + 2 * self.kv) * HEAD_DIM
        self.weight = torch.nn.Parameter(torch.zeros(rows, H), requires_grad=False)
        self.weight.weight_loader = self.load

    def load(self, param, loaded, shard):
        q, kv = self.heads * HEAD_DIM, self.kv * HEAD_DIM
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard]
        shard_rank = self.rank if shard == "q" else self.rank // self.replicas
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, shard_rank * size, size))


class Merged(torch.nn.Module):
    """MergedColumnParallelLinear.weight_loader: gate then up rows, each row-sharded."""

    def __init__(self, tp: int, rank: int):
        super().__init__()
        self.tp, self.rank = tp, rank
        self.weight = torch.nn.Parameter(torch.zeros(2 * MLP // tp, H), requires_grad=False)
        self.weight.weight_loader = self.load

    def load(self, param, loaded, shard):
        size = MLP // self.tp
        param.data.narrow(0, shard * size, size).copy_(loaded.narrow(0, self.rank * size, size))


class Row(torch.nn.Module):
    """RowParallelLinear.weight_loader: the input dimension is sharded."""

    def __init__(self, out: int, inp: int, tp: int, rank: int):
        super().__init__()
        self.rank = rank
        self.weight = torch.nn.Parameter(torch.zeros(out, inp // tp), requires_grad=False)
        self.weight.weight_loader = self.load

    def load(self, param, loaded):
        size = param.data.shape[1]
        param.data.copy_(loaded.narrow(1, self.rank * size, size))


def hf_layer(extra: bool = False) -> torch.nn.Module:
    """HF names and shapes of one decoder layer's projections."""
    torch.manual_seed(0)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {"self_attn.q_proj": (H, q), "self_attn.k_proj": (H, kv), "self_attn.v_proj": (H, kv),
              "self_attn.o_proj": (q, H), "mlp.gate_proj": (H, MLP), "mlp.up_proj": (H, MLP),
              "mlp.down_proj": (MLP, H), **({"mlp.extra": (H, H)} if extra else {})}  # fmt: skip
    m = torch.nn.Module()
    m.self_attn, m.mlp = torch.nn.Module(), torch.nn.Module()
    for name, (inp, out) in shapes.items():
        parent, attr = name.split(".")
        setattr(getattr(m, parent), attr, torch.nn.Linear(inp, out, bias=False))
    return m.requires_grad_(False)


def engine_rank(hf: dict, tp: int, rank: int) -> torch.nn.Module:
    """One rank's layers, loaded from HF weights the way vLLM's load_weights does (stacked_params_mapping)."""
    model = torch.nn.Module()
    model.self_attn, model.mlp = torch.nn.Module(), torch.nn.Module()
    model.self_attn.qkv_proj, model.self_attn.o_proj = QKV(tp, rank), Row(H, HEADS * HEAD_DIM, tp, rank)
    model.mlp.gate_up_proj, model.mlp.down_proj = Merged(tp, rank), Row(H, MLP, tp, rank)
    params = dict(model.named_parameters())
    for name, w in hf.items():
        target, shard = ve.fused_layout(name)
        p = params[target]
        p.weight_loader(p, w) if shard is None else p.weight_loader(p, w, shard)
    return model


class Worker(ve.MaskWorkerExtension):
    def __init__(self, model):
        self.model = model

    def get_model(self):
        return self.model


class FakeLLM:
    """collective_rpc as vLLM does it: the named method on every worker, with the arguments as sent."""

    def __init__(self, workers=(), **kwargs):
        self.workers, self.kwargs, self.resets, self.calls = list(workers), kwargs, 0, []
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=lambda: self.calls.append("shutdown")))

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(method)
        return [getattr(w, method)(*args) for w in self.workers] if self.workers else [0]

    def reset_prefix_cache(self):
        self.resets += 1

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self):
        self.calls.append("wake_up")

    def generate(self, prompts, params, use_tqdm):
        self.calls.append(("generate", prompts, params))
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7, 8, 9])]) for _ in prompts]


def masked(hf: dict, mask: dict) -> dict:
    out = {n: w.clone() for n, w in hf.items()}
    for n, idx in mask.items():
        out[n].view(-1)[idx] = 0
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_the_mask_lands_on_the_engines_fused_sharded_weights_and_comes_back_off(tp):
    layer = hf_layer()
    hf = {n: p.detach() for n, p in layer.named_parameters()}
    g = torch.Generator().manual_seed(1)
    draws = [{n: torch.randperm(w.numel(), generator=g)[: w.numel() // 5].sort().values for n, w in hf.items()}
             for _ in range(2)]  # fmt: skip
    llm = FakeLLM([Worker(engine_rank(hf, tp, r)) for r in range(tp)])
    original = [{n: p.clone() for n, p in w.model.named_parameters()} for w in llm.workers]
    for mask in draws:  # the second mask replaces the first: its zeros are restored before
        with pruned(layer, mask):  # the engine serves the in-memory model's weights at the masked entries
            zeroed = ve.set_mask(llm, layer, mask)
        expected = [dict(engine_rank(masked(hf, mask), tp, r).named_parameters()) for r in range(tp)]
        for w, want in zip(llm.workers, expected, strict=True):
            for n, p in w.model.named_parameters():
                assert torch.equal(p, want[n]), (tp, n)
        assert zeroed == sum(int((p == 0).sum()) for want in expected for p in want.values())
    assert llm.resets == 2  # prompt KV cached with other weights is dropped
    ve.set_mask(llm, layer, None)  # the unpruned model again, exactly
    for w, want in zip(llm.workers, original, strict=True):
        for n, p in w.model.named_parameters():
            assert torch.equal(p, want[n]), n


def test_a_mask_the_engine_cannot_place_is_one_line_and_changes_nothing():
    layer = hf_layer(extra=True)
    hf = {n: p.detach() for n, p in layer.named_parameters() if "extra" not in n}
    llm = FakeLLM([Worker(engine_rank(hf, 1, 0))])
    before = {n: p.clone() for n, p in llm.workers[0].model.named_parameters()}
    mask = {"mlp.extra.weight": torch.tensor([0, 3]), "mlp.up_proj.weight": torch.tensor([1])}
    with pytest.raises(HarmsweepError, match=r"no parameter for 1 masked weight.*mlp\.extra\.weight"):
        ve.set_mask(llm, layer, mask)
    assert all(torch.equal(p, before[n]) for n, p in llm.workers[0].model.named_parameters())


def test_gpt2_conv1d_masks_are_sent_transposed_as_vllm_loads_them():
    lm = tiny("gpt2")
    name = next(n for n, _ in lm.model.named_parameters() if n.endswith("attn.c_attn.weight"))
    w = dict(lm.model.named_parameters())[name]
    idx = torch.tensor([0, 5, w.shape[1] + 2, w.numel() - 1])
    (shape, sent, values), = ve.mask_payload(lm.model, {name: idx}).values()  # fmt: skip
    assert shape == (w.shape[1], w.shape[0])
    assert torch.equal(
        ve.keep_matrix(shape, sent, torch.float32, "cpu"), ve.keep_matrix(w.shape, idx, torch.float32, "cpu").T
    )
    assert torch.equal(values, w.detach().T.reshape(-1)[sent])  # each value travels with its transposed index
    decoded = ve.decode_payload(ve.encode_payload({name: (shape, sent, values)}))[name]
    assert torch.equal(decoded[1], sent) and torch.equal(decoded[2], values)
    apply_mask(lm.model, {name: idx})
    assert ve.mask_payload(lm.model, {name: idx})[name][2] is None  # zeros travel as no bytes


def test_scratch_is_node_local(monkeypatch, tmp_path):
    monkeypatch.delenv("SLURM_TMPDIR", raising=False)
    monkeypatch.delenv("TMPDIR", raising=False)
    assert ve.scratch_dir() == Path("/tmp")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    assert ve.scratch_dir() == tmp_path / "tmp"
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "slurm"))
    assert ve.scratch_dir() == tmp_path / "slurm"


class Saveable:
    def __init__(self, name_or_path: str = ""):
        self.name_or_path, self.saves = name_or_path, 0

    def save_pretrained(self, folder):
        self.saves += 1
        (Path(folder) / "config.json").write_text("{}")


def test_the_engine_reads_the_models_own_checkpoint_and_copies_only_a_model_without_one(monkeypatch, tmp_path):
    monkeypatch.setattr(ve, "_saved_models", {})
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path))
    tok = SimpleNamespace(save_pretrained=lambda folder: None)
    assert ve.checkpoint_for(Saveable(), tok, "dir:/ckpt/llama", "f") == "/ckpt/llama"
    assert ve.checkpoint_for(Saveable(), tok, "hub:org/model", "f") == "org/model"
    (tmp_path / "converted" / "config.json").parent.mkdir()
    (tmp_path / "converted" / "config.json").write_text("{}")
    for source in ("gguf:/m/model.gguf", "derived:llama-abc"):
        assert ve.checkpoint_for(Saveable(str(tmp_path / "converted")), tok, source, "f") == str(tmp_path / "converted")
    model, mask = Saveable(), {"w": torch.tensor([1, 2])}
    first = ve.checkpoint_for(model, tok, "tiny:llama", "fp")
    assert Path(first).parent == tmp_path
    assert ve.checkpoint_for(model, tok, "tiny:llama", "fp", mask) == first and model.saves == 1
    pruned = Saveable()  # first seen pruned: that copy holds the mask's zeros and serves that mask only
    copy = ve.checkpoint_for(pruned, tok, "tiny:llama", "fp2", mask)
    assert ve.checkpoint_for(pruned, tok, "tiny:llama", "fp2", {"w": torch.tensor([1, 2])}) == copy
    assert ve.checkpoint_for(pruned, tok, "tiny:llama", "fp2", None) != copy and pruned.saves == 2
    with pytest.raises(HarmsweepError, match="fingerprint"):
        ve.checkpoint_for(Saveable(), tok, "", "")


@pytest.fixture
def fake_vllm(monkeypatch):
    """A vllm module whose LLM is FakeLLM, and an empty engine holder."""
    built: list[FakeLLM] = []

    def make(**kwargs):
        built.append(FakeLLM(**kwargs))
        return built[-1]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=make, SamplingParams=lambda **kw: kw))
    monkeypatch.setattr(ve, "_engine", {})
    yield built
    ve.release_engine()


def test_one_engine_per_job_that_sleeps_wakes_and_is_replaced_when_it_no_longer_fits(fake_vllm, monkeypatch):
    memory = iter([(f * GIB, 80 * GIB) for f in (10, 50, 55, 10, 50, 11)])  # around each sleep, then at wake
    monkeypatch.setattr(ve, "gpu_memory", lambda: next(memory))
    spec = ve.engine_spec("/ckpt", "bfloat16", 100, 60 * GIB, 80 * GIB, 2)
    llm = ve.get_engine(spec)
    assert ve.get_engine(spec) is llm and len(fake_vllm) == 1
    assert llm.kwargs["enable_sleep_mode"] and llm.kwargs["tensor_parallel_size"] == 2
    assert llm.kwargs["worker_extension_cls"] == "harmsweep.generation.vllm.MaskWorkerExtension"
    ve.sleep_engine()  # frees 40 GiB
    assert ve.get_engine(spec) is llm and llm.calls == ["sleep1", "wake_up"]  # 55 GiB free: it wakes
    ve.sleep_engine()
    assert ve.get_engine(spec) is not llm and llm.calls[-1] == "shutdown"  # 11 GiB free: too little to wake
    other = ve.get_engine(ve.engine_spec("/other", "bfloat16", 100, 60 * GIB, 80 * GIB, 2))
    assert other is fake_vllm[-1] and fake_vllm[1].calls == ["shutdown"] and len(fake_vllm) == 3


def test_generate_vllm_reuses_the_engine_sets_each_mask_once_and_decodes_like_hf(fake_vllm, monkeypatch):
    lm = tiny("llama")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(ve, "gpu_memory", lambda: (60 * GIB, 80 * GIB))
    prompts, greedy = [[256, 1, 2], [256, 3]], Sampling(max_new_tokens=8)
    out = ve.generate_vllm(lm.model, lm.tokenizer, prompts, greedy, "dir:/ckpt", "fp", None)
    (llm,) = fake_vllm
    assert out == [[7, 8, 9]] * 2 and llm.kwargs["model"] == "/ckpt" and llm.kwargs["dtype"] == "float32"
    assert llm.kwargs["gpu_memory_utilization"] == 0.725 and llm.kwargs["tensor_parallel_size"] == 2
    _, sent, params = llm.calls[-1]
    assert sent == [{"prompt_token_ids": p} for p in prompts]
    assert params["temperature"] == 0.0 and lm.tokenizer.eos_token_id in params["stop_token_ids"]
    monkeypatch.setattr(ve, "gpu_memory", lambda: (1 * GIB, 80 * GIB))  # the awake engine holds the memory now
    mask = {"model.layers.0.mlp.up_proj.weight": torch.tensor([0, 9])}
    for m in (mask, mask, None):
        ve.generate_vllm(lm.model, lm.tokenizer, prompts, greedy, "dir:/ckpt", "fp", m)
    assert len(fake_vllm) == 1 and llm.calls.count("harmsweep_set_mask") == 2 and llm.resets == 2


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None, reason="needs CUDA and vLLM"
)
def test_hf_and_vllm_greedy_outputs_agree_before_and_after_a_mask(tmp_path):
    # tiny("llama") with head_dim 32: the smallest that vLLM's CUDA attention backends all take
    lm = build_tiny({**tiny_spec("llama"), "hidden_size": 128, "intermediate_size": 256})
    lm.model.eval()
    lm.model.save_pretrained(tmp_path / "ckpt")
    lm.tokenizer.save_pretrained(tmp_path / "ckpt")
    lm.model.to("cuda")
    prompts = [[256, 10, 20, 30], [256, 40, 50, 60, 70, 80], [256, 90]]
    sampling = Sampling(max_new_tokens=16)
    source = EngineInputs(f"dir:{tmp_path / 'ckpt'}", "tiny")
    try:
        before = generate(lm.model, lm.tokenizer, prompts, sampling, 3)
        assert generate(lm.model, lm.tokenizer, prompts, sampling, 3, backend="vllm", engine=source) == before
        mask = {
            n: torch.arange(0, p.numel(), 7) for n, p in lm.model.named_parameters() if ".layers." in n and p.dim() == 2
        }
        apply_mask(lm.model, mask)
        pruned = EngineInputs(source.source, source.fingerprint, mask)
        after = generate(lm.model, lm.tokenizer, prompts, sampling, 3)
        assert after != before  # the mask changes what the model says
        assert generate(lm.model, lm.tokenizer, prompts, sampling, 3, backend="vllm", engine=pruned) == after
    finally:
        ve.release_engine()


# ---------------------------------------------------------------- the run's weights, and the GPU shared with HF


def replaced(hf: dict, mask: dict, values: dict) -> dict:
    out = {n: w.clone() for n, w in hf.items()}
    for n, idx in mask.items():
        out[n].view(-1)[idx] = values[n]
    return out


@pytest.mark.parametrize("tp", [1, 4])
def test_replaced_values_reach_the_engine_not_zeros(tp):
    """pruning.replace=base: the engine serves the base values the in-memory model holds at the masked entries."""
    layer = hf_layer()
    hf = {n: p.detach().clone() for n, p in layer.named_parameters()}
    g = torch.Generator().manual_seed(2)
    mask = {n: torch.randperm(w.numel(), generator=g)[: w.numel() // 4].sort().values for n, w in hf.items()}
    base = {n: torch.randn(idx.numel(), generator=g) for n, idx in mask.items()}
    llm = FakeLLM([Worker(engine_rank(hf, tp, r)) for r in range(tp)])
    apply_mask(layer, mask, base)  # the run's weights, in memory
    ve.set_mask(llm, layer, mask)
    expected = [dict(engine_rank(replaced(hf, mask, base), tp, r).named_parameters()) for r in range(tp)]
    for w, want in zip(llm.workers, expected, strict=True):
        for n, p in w.model.named_parameters():
            assert torch.equal(p, want[n]), (tp, n)
    ve.set_mask(llm, layer, None)  # the checkpoint's values come back
    original = [dict(engine_rank(hf, tp, r).named_parameters()) for r in range(tp)]
    for w, want in zip(llm.workers, original, strict=True):
        assert all(torch.equal(p, want[n]) for n, p in w.model.named_parameters())


def _check(*overrides):
    from test_config import plain

    from harmsweep.config.checks import check_config
    from harmsweep.config.schema import to_config

    return check_config(to_config(plain(*overrides, "data.root=/tmp")))


def test_lowrank_with_vllm_generation_stops_in_one_line_before_any_work():
    with pytest.raises(HarmsweepError, match=r"method=lowrank.*backend=hf") as err:
        _check("method=lowrank", "eval.generation.backend=vllm", "eval.metrics=[harm_likelihood,refusal]")
    assert "\n" not in str(err.value)
    _check("method=lowrank", "eval.generation.backend=vllm", "eval.metrics=[harm_likelihood]")  # nothing generates
    _check("method=lowrank", "eval.metrics=[refusal]")  # HF generation reads the in-memory model


def test_em_arms_with_vllm_generation_stop_in_one_line_before_any_work():
    """EM answers from fine-tuned weights in memory: an engine would answer from the checkpoint instead."""
    with pytest.raises(HarmsweepError, match=r"experiment=em.*backend=hf") as err:
        _check("experiment=em", "eval.generation.backend=vllm")
    assert "\n" not in str(err.value)
    _check("experiment=em")


def test_a_peft_adapter_with_vllm_stops_in_one_line(tmp_path, fake_vllm, monkeypatch):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(HarmsweepError, match=r"adapter.*backend=hf") as err:
        _check(f"model.path={tmp_path}", "eval.generation.backend=vllm", "eval.metrics=[refusal]")
    assert "\n" not in str(err.value)
    _check(f"model.path={tmp_path}", "eval.metrics=[refusal]")
    # an adapter from the hub is only seen once loaded: one line there too, before an engine starts
    lm = tiny("llama")
    lm.model._hf_peft_config_loaded = True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ve, "gpu_memory", lambda: (60 * GIB, 80 * GIB))
    with pytest.raises(HarmsweepError, match=r"adapter.*backend=hf"):
        ve.generate_vllm(lm.model, lm.tokenizer, [[256, 1]], Sampling(max_new_tokens=2), "hub:org/adapter", "f", None)
    assert fake_vllm == []


def test_a_hub_model_reaches_vllm_at_the_commit_hf_loaded(fake_vllm, monkeypatch):
    lm = tiny("llama")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(ve, "gpu_memory", lambda: (60 * GIB, 80 * GIB))
    lm.model.config._commit_hash = "0123abcd" * 5
    ve.generate_vllm(lm.model, lm.tokenizer, [[256, 1]], Sampling(max_new_tokens=2), "hub:org/model", "f", None)
    (llm,) = fake_vllm
    assert llm.kwargs["model"] == "org/model"
    assert llm.kwargs["revision"] == llm.kwargs["tokenizer_revision"] == "0123abcd" * 5
    ve.release_engine()
    lm.model.config._commit_hash = None
    ve.generate_vllm(lm.model, lm.tokenizer, [[256, 1]], Sampling(max_new_tokens=2), "dir:/ckpt", "f", None)
    assert fake_vllm[-1].kwargs["revision"] is None  # a folder has no revision


class StubJudge:
    """A judge model: scoring it is an HF forward on the GPU."""

    version = "stub"

    def __init__(self, events: list, heavy: bool):
        self.events, self.heavy = events, heavy

    def score(self, prompts, responses):
        if self.heavy:
            self.events.append("hf")
        return [0.0] * len(prompts)


def test_the_engine_sleeps_before_every_hf_forward_of_the_suite(fake_vllm, monkeypatch):
    """attack=prefill and every metric: generation wakes the engine; no HF forward runs while it is awake."""
    from harmsweep.calibration.pairs import Pair, encode_pairs
    from harmsweep.data.records import Record
    from harmsweep.evaluation import utility
    from harmsweep.evaluation.judges.source import JudgeSource
    from harmsweep.evaluation.spec import EvalConfig, LmEvalConfig
    from harmsweep.evaluation.suite import HeldOut, Suite
    from harmsweep.generation.sampling import GenerationConfig

    events: list[str] = []
    real_sleep, real_wake, real_generate = FakeLLM.sleep, FakeLLM.wake_up, FakeLLM.generate
    monkeypatch.setattr(FakeLLM, "sleep", lambda self, level: events.append("sleep") or real_sleep(self, level))
    monkeypatch.setattr(FakeLLM, "wake_up", lambda self: events.append("wake") or real_wake(self))
    monkeypatch.setattr(
        FakeLLM, "generate", lambda self, *a, **k: events.append("generate") or real_generate(self, *a, **k)
    )
    build = sys.modules["vllm"].LLM
    monkeypatch.setattr(sys.modules["vllm"], "LLM", lambda **kw: events.append("build") or build(**kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(ve, "gpu_memory", lambda: (60 * GIB, 80 * GIB))
    monkeypatch.setattr(
        utility, "lm_eval_tasks", lambda model, tok, *a, **k: model(torch.tensor([[256, 5]])) and {"lm_eval/t/acc": 0.5}
    )

    lm = tiny("llama")
    lm.model.register_forward_pre_hook(lambda module, args: events.append("hf"))
    harmful = [
        Record(f"how do I do bad thing {i}?", "Sure, here.", None, f"h:{i}", "Sure, here is how") for i in range(3)
    ]
    benign = [Record(f"tell me about cats {i}", f"Cats are nice {i}.", None, f"b:{i}") for i in range(3)]
    refs = {f"eval_{side}": encode_pairs(lm.tokenizer, [Pair(r.prompt, str(r.response), r.source_id) for r in recs], "chat", 128)
            for side, recs in (("harmful", harmful), ("benign", benign))}  # fmt: skip
    ev = EvalConfig(
        metrics=["harm_likelihood", "refusal", "strongreject_finetuned", "perplexity", "recognition", "lm_eval"],
        batch_size=2, lm_eval=LmEvalConfig(tasks=["t"]),
        generation=GenerationConfig(attack="prefill", prefill_tokens=2, max_new_tokens=3, backend="vllm"),
    )  # fmt: skip
    judges = JudgeSource({"strongreject_finetuned": {"path": "/judge"}, "strongreject_rubric": {}})
    monkeypatch.setattr(JudgeSource, "build", lambda self, name: StubJudge(events, heavy=name != "refusal"))
    suite = Suite(ev, judges, lm, "chat", HeldOut(harmful, benign, refs))
    suite.run("before")
    mask = {"model.layers.0.mlp.up_proj.weight": torch.tensor([0, 9])}
    apply_mask(lm.model, mask)
    suite.mask = mask
    suite.run("after")

    awake, during = False, []
    for event in events:
        awake = {"build": True, "wake": True, "sleep": False}.get(event, awake)
        if event == "hf" and awake:
            during.append(len(during))
        assert event != "generate" or awake
    assert events.count("generate") == 4  # prefilled and plain answers, per stage
    assert events.count("hf") > 0 and during == [], events
