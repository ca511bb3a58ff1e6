"""The vLLM backend without vLLM: engine sizing, HF -> fused names, and the in-engine mask against a stand-in
for vLLM's fused, tensor-parallel layers (its weight loaders re-implemented here from vLLM's layout)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import tiny

from harmsweep.devices import GIB
from harmsweep.errors import HarmsweepError
from harmsweep.generation import EngineInputs, Sampling, generate
from harmsweep.pruning import apply_mask
from harmsweep.vllm_engine import apply_mask_in_model, engine_spec, fused_layout, scratch_dir

H, Q, KV, MLP = 8, 8, 4, 12  # hidden, q rows, k/v rows (GQA), MLP intermediate


def test_engine_is_sized_from_free_memory_and_the_jobs_gpus():
    spec = engine_spec("/ckpt", "bfloat16", 700, free_bytes=60 * GIB, total_bytes=80 * GIB, n_gpus=2, seed=3)
    assert spec.gpu_memory_utilization == round(58 / 80, 3)  # 2 GiB headroom
    assert (spec.tensor_parallel_size, spec.max_model_len, spec.seed) == (2, 768, 3)
    assert engine_spec("/c", "bfloat16", 10, 200 * GIB, 141 * GIB, 1).gpu_memory_utilization == 0.95
    with pytest.raises(HarmsweepError, match="backend=hf"):
        engine_spec("/c", "bfloat16", 10, free_bytes=3 * GIB, total_bytes=80 * GIB, n_gpus=1)


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
    assert fused_layout(hf) == (fused, shard)


class Column(torch.nn.Module):
    """vLLM's QKVParallelLinear / MergedColumnParallelLinear: sub-matrices stacked by rows, each row-sharded."""

    def __init__(self, rows: dict, tp: int, rank: int):
        super().__init__()
        self.rows, self.tp, self.rank = rows, tp, rank
        self.weight = torch.nn.Parameter(torch.zeros(sum(rows.values()) // tp, H), requires_grad=False)
        self.weight.weight_loader = self.load

    def load(self, param, loaded, shard):
        offset = sum(
            n // self.tp for s, n in self.rows.items() if list(self.rows).index(s) < list(self.rows).index(shard)
        )
        size = self.rows[shard] // self.tp
        param.data[offset : offset + size] = loaded[self.rank * size : (self.rank + 1) * size]


class Row(torch.nn.Module):
    """vLLM's RowParallelLinear: the input dimension is sharded."""

    def __init__(self, out: int, inp: int, tp: int, rank: int):
        super().__init__()
        self.tp, self.rank = tp, rank
        self.weight = torch.nn.Parameter(torch.zeros(out, inp // tp), requires_grad=False)
        self.weight.weight_loader = self.load

    def load(self, param, loaded):
        size = loaded.size(1) // self.tp
        param.data.copy_(loaded[:, self.rank * size : (self.rank + 1) * size])


def engine_rank(hf: dict, tp: int, rank: int) -> torch.nn.Module:
    """One rank's layers, loaded from the HF weights through the stand-in loaders."""
    model = torch.nn.Module()
    model.self_attn = torch.nn.Module()
    model.self_attn.qkv_proj = Column({"q": Q, "k": KV, "v": KV}, tp, rank)
    model.self_attn.o_proj = Row(H, Q, tp, rank)
    model.mlp = torch.nn.Module()
    model.mlp.gate_up_proj = Column({0: MLP, 1: MLP}, tp, rank)
    model.mlp.down_proj = Row(H, MLP, tp, rank)
    for name, w in hf.items():
        target, shard = fused_layout(name)
        p = dict(model.named_parameters())[target]
        p.weight_loader(p, w) if shard is None else p.weight_loader(p, w, shard)
    return model


@pytest.mark.parametrize("tp", [1, 2])
def test_the_mask_lands_on_the_engines_fused_sharded_weights_and_comes_back_off(tp):
    g = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj.weight": (Q, H), "self_attn.k_proj.weight": (KV, H), "self_attn.v_proj.weight": (KV, H),
              "self_attn.o_proj.weight": (H, Q), "mlp.gate_proj.weight": (MLP, H), "mlp.up_proj.weight": (MLP, H),
              "mlp.down_proj.weight": (H, MLP)}  # fmt: skip
    hf = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    mask = {n: torch.randperm(w.numel(), generator=g)[: w.numel() // 5].sort().values for n, w in hf.items()}
    pruned_hf = {n: w.clone() for n, w in hf.items()}
    for n, idx in mask.items():
        pruned_hf[n].view(-1)[idx] = 0
    for rank in range(tp):
        engine = engine_rank(hf, tp, rank)
        original = {n: p.detach().clone() for n, p in engine.named_parameters()}
        expected = {n: p.detach() for n, p in engine_rank(pruned_hf, tp, rank).named_parameters()}
        zeroed = apply_mask_in_model(engine, {n: (shapes[n], idx) for n, idx in mask.items()})
        for n, p in engine.named_parameters():
            assert torch.equal(p, expected[n]), n
        assert zeroed == sum(int((expected[n] == 0).sum()) for n in expected)
        apply_mask_in_model(engine, {})  # the unpruned model again, exactly
        for n, p in engine.named_parameters():
            assert torch.equal(p, original[n]), n


def test_scratch_is_node_local(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.delenv("SLURM_TMPDIR", raising=False)
    assert scratch_dir() == tmp_path / "tmp"
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "slurm"))
    assert scratch_dir() == tmp_path / "slurm"


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None, reason="needs CUDA and vLLM"
)
def test_hf_and_vllm_greedy_outputs_agree_before_and_after_a_mask(tmp_path):
    lm = tiny("llama")
    lm.model.save_pretrained(tmp_path / "ckpt")
    lm.tokenizer.save_pretrained(tmp_path / "ckpt")
    lm.model.to("cuda")
    prompts = [[256, 10, 20, 30], [256, 40, 50, 60, 70, 80], [256, 90]]
    sampling = Sampling(max_new_tokens=16)
    source = EngineInputs(f"dir:{tmp_path / 'ckpt'}", "tiny")
    assert generate(lm.model, lm.tokenizer, prompts, sampling, 3, backend="vllm", engine=source) == generate(
        lm.model, lm.tokenizer, prompts, sampling, 3
    )
    mask = {
        n: torch.arange(0, p.numel(), 7) for n, p in lm.model.named_parameters() if "layers.0." in n and p.dim() == 2
    }
    apply_mask(lm.model, mask)
    pruned = EngineInputs(source.source, source.fingerprint, mask)
    assert generate(lm.model, lm.tokenizer, prompts, sampling, 3, backend="vllm", engine=pruned) == generate(
        lm.model, lm.tokenizer, prompts, sampling, 3
    )
