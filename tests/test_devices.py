"""Every stage keeps its tensors on the device they live on: no op may mix devices.

There is no GPU here, so the checks run on the ``meta`` device and watch every aten op through a
dispatch mode: an op whose tensor arguments sit on two devices is the device-mismatch error a GPU job
would hit. Meta tensors hold no data, so a run ends at the first op that must read values (the
histogram's count); everything before it must stay on one device.
"""

from __future__ import annotations

import pytest
import torch
from audit import assert_one_device, audit, meta_capable
from conftest import tiny

from harmsweep.devices import auto_max_memory, input_device, place_model, visiting
from harmsweep.models.parts import ScoredParam
from harmsweep.pruning.select import select
from harmsweep.pruning.spec import PruneSpec
from harmsweep.scoring.topk import float_keys, top_k_threshold


@pytest.fixture(autouse=True)
def _meta(monkeypatch):
    with meta_capable(monkeypatch):
        yield


def test_streaming_top_k_keeps_histograms_on_the_keys_device():
    keys = {n: float_keys(torch.randn(8, 16, device="meta")) for n in ("a", "b")}
    watch = audit(lambda: top_k_threshold(list(keys), keys.__getitem__, 5))
    assert_one_device(watch)


@pytest.mark.parametrize("rule", ["signed_snip", "magnitude", "random"])
def test_selection_on_scores_off_the_cpu_mixes_no_devices(rule):
    shapes = {"l0.q": (8, 16), "l1.down": (16, 12)}
    params = {n: ScoredParam(n, i, n.split(".")[1], 0) for i, n in enumerate(shapes)}
    weights = {n: torch.randn(s, device="meta") for n, s in shapes.items()}
    scores = {kind: {n: torch.randn(s, device="meta") for n, s in shapes.items()} for kind in ("harm", "benign")}
    watch = audit(lambda: select(PruneSpec(rule=rule, sparsity=0.1), params, weights, scores))
    assert_one_device(watch)


def test_weight_budgets_leave_each_gpu_room_for_its_score_buffer():
    gib = 1 << 30
    budget = auto_max_memory({0: 80 * gib, 1: 40 * gib}, weight_bytes=2, reserve_bytes=8 * gib, cpu_bytes=gib)
    assert budget == {0: int(72 * gib / 3), 1: int(32 * gib / 3), "cpu": gib}
    # bf16 weights at the budget plus their fp32 buffers fill what is left after the reserve, not more
    assert budget[0] * 3 <= 72 * gib
    assert auto_max_memory({0: gib}, weight_bytes=4, reserve_bytes=2 * gib) == {0: 0}


def test_a_device_map_places_blocks_and_inputs_follow_the_embedding():
    lm = tiny("llama")
    blocks = {f"model.layers.{i}": "cpu" for i in range(lm.model.config.num_hidden_layers)}
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        **blocks,
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = lm.model(input_ids=ids).logits
    place_model(lm.model, "cpu", device_map)
    assert lm.model.hf_device_map == device_map
    assert input_device(lm.model) == torch.device("cpu")
    torch.testing.assert_close(lm.model(input_ids=ids).logits, expected)
    assert place_model(lm.model, "meta") is lm.model  # placed models are never moved again


def test_a_visit_to_the_resting_device_moves_nothing():
    lm = tiny("llama")
    before = [p.data_ptr() for p in lm.model.parameters()]
    with visiting(lm.model, "cpu") as model:
        assert model is lm.model
    assert [p.data_ptr() for p in lm.model.parameters()] == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_judge_visit_gives_its_gpu_memory_back():
    lm = tiny("llama")
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    with visiting(lm.model, "cuda"):
        assert next(lm.model.parameters()).is_cuda and torch.cuda.memory_allocated() > start
    assert next(lm.model.parameters()).device.type == "cpu"
    assert torch.cuda.memory_allocated() == start
