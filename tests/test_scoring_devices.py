"""Scoring passes that are right on a GPU and on a model split over GPUs (issue 23, defects 5, 6, 9, 11).

No GPU here: tensors that would sit on a GPU go on ``meta`` and run under the device audit (tests/audit.py).
``MetaValues`` lets a meta run go to its end: a value read on meta returns 0 and a copy out of meta to the host
returns zeros (that is the offload), so the audit covers the forward, the backward and fold, and the offload.
Values are checked on the CPU against independent computations.
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from accelerate import dispatch_model
from accelerate.hooks import AlignDevicesHook, ModelHook, SequentialHook, add_hook_to_module
from audit import assert_one_device, audit, meta_capable
from conftest import tiny
from test_scoring import encoded
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from harmsweep.batches import iter_batches
from harmsweep.losses import IGNORE
from harmsweep.models.activations import fold_inputs
from harmsweep.models.parts import decoder_blocks, scored_parameters
from harmsweep.scoring.snip import signed_snip, unsigned_snip, wanda
from harmsweep.scoring.spec import ScoringOptions

_READ = torch.ops.aten._local_scalar_dense.default
_COPY = torch.ops.aten._to_copy.default


class MetaValues(TorchDispatchMode):
    """Meta runs that go to their end: value reads give 0 (``truth`` if boolean), copies to the host give
    tensors of those values (counted in ``offloaded``; ``.tolist()`` reads through such a copy).

    ``watch_shapes``: fp32 meta tensors of these shapes (score matrices) are tracked while alive;
    ``peak_bytes`` is the most bytes of them alive at once.
    """

    def __init__(self, watch_shapes: set[tuple[int, ...]] = frozenset(), truth: bool = False) -> None:
        super().__init__()
        self.truth = truth  # what a boolean read gives
        self.reads = 0
        self.offloaded: list[tuple[int, ...]] = []
        self.watch = watch_shapes
        self.live = 0
        self.peak_bytes = 0

    def _untrack(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func is _READ and src is not None and src.is_meta:
            self.reads += 1
            return self.truth if src.dtype == torch.bool else 0
        if (
            func is _COPY
            and src is not None
            and src.is_meta
            and torch.device(kwargs.get("device") or "meta").type == "cpu"
        ):
            self.offloaded.append(tuple(src.shape))
            dtype = kwargs.get("dtype") or src.dtype
            return torch.full(src.shape, self.truth if dtype == torch.bool else 0, dtype=dtype)
        out = func(*args, **kwargs)
        if self.watch and not any(r.alias_info for r in func._schema.returns):  # fresh storage, not a view
            for t in tree_leaves(out):
                if (
                    isinstance(t, torch.Tensor)
                    and t.is_meta
                    and t.dtype == torch.float32
                    and tuple(t.shape) in self.watch
                ):
                    nbytes = t.numel() * 4
                    self.live += nbytes
                    self.peak_bytes = max(self.peak_bytes, self.live)
                    weakref.finalize(t, self._untrack, nbytes)
        return out


def batches_of(lm, size: int = 2) -> list[dict[str, torch.Tensor]]:
    return list(iter_batches(encoded(lm), size))


def assert_scores_close(got, expected, rtol=1e-5, atol=1e-8):
    assert got.keys() == expected.keys()
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=rtol, atol=atol)


# ---- defect 5: checkpointing keeps accelerate's hooks ------------------------------------------------------------


class Counting(ModelHook):
    def __init__(self) -> None:
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def dispatched(model: torch.nn.Module) -> None:
    """accelerate's own placement, every module on the CPU, hooks forced (as ``device_map=auto`` puts them)."""
    names = [n for n, _ in model.model.named_children() if n != "layers"]
    device_map = {f"model.{n}": "cpu" for n in names} | {"lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "cpu" for i in range(len(model.model.layers))}
    dispatch_model(model, device_map, main_device="cpu", force_hooks=True)


@pytest.mark.parametrize("placed", ["add_hook", "dispatch_model"])
@pytest.mark.parametrize("scorer", ["signed", "unsigned"])
def test_checkpointing_keeps_accelerate_hooks_which_run_in_forward_and_recomputation(scorer, placed):
    lm = tiny("llama")
    plain = copy.deepcopy(lm.model)
    batches = batches_of(lm)
    _, blocks = decoder_blocks(lm.model)
    counters = []
    if placed == "dispatch_model":
        dispatched(lm.model)
        assert all(isinstance(block._hf_hook, AlignDevicesHook) for block in blocks)
    for block in blocks:
        counters.append(Counting())
        if placed == "dispatch_model":
            add_hook_to_module(block, counters[-1], append=True)  # after accelerate's device hook
        else:
            add_hook_to_module(block, SequentialHook(AlignDevicesHook(execution_device="cpu"), counters[-1]))
    forwards = [block.__dict__["forward"] for block in blocks]

    def score(model, checkpointing):
        options = ScoringOptions(gradient_checkpointing=checkpointing)
        if scorer == "signed":
            return signed_snip(model, batches, n_samples=5, options=options)
        return unsigned_snip(model, batches, options=options)

    got = score(lm.model, True)
    passes = len(batches) if scorer == "signed" else sum(b["input_ids"].size(0) for b in batches)
    assert [c.calls for c in counters] == [2 * passes] * len(blocks)  # forward + recomputation, both hooked
    assert [block.__dict__.get("forward") for block in blocks] == forwards
    assert all(block.__dict__["forward"] is f for block, f in zip(blocks, forwards, strict=True))
    lm.model(input_ids=batches[0]["input_ids"])
    assert [c.calls for c in counters] == [2 * passes + 1] * len(blocks)  # the next forward still runs the hooks
    assert_scores_close(got, score(plain, False))


def test_checkpointing_a_block_without_hooks_leaves_no_instance_forward():
    lm = tiny("llama")
    signed_snip(lm.model, batches_of(lm), 5, options=ScoringOptions(gradient_checkpointing=True))
    assert all("forward" not in block.__dict__ for block in decoder_blocks(lm.model)[1])


# ---- defect 6: fp16 scoring scales the loss ----------------------------------------------------------------------


def fp16_pair():
    """A tiny fp16 model whose gradients underflow (a small final norm), and its exact fp32 twin."""
    lm16 = tiny("llama", torch.float16)
    with torch.no_grad():
        lm16.model.model.norm.weight.mul_(1e-4)
    lm32 = tiny("llama")
    lm32.model.load_state_dict({k: v.float() for k, v in lm16.model.state_dict().items()})
    return lm16, lm32


@pytest.mark.parametrize("scorer", ["signed", "unsigned"])
def test_fp16_scores_are_loss_scaled_and_match_fp32(scorer):
    lm16, lm32 = fp16_pair()
    batches = batches_of(lm16)

    def score(model):
        if scorer == "signed":
            return signed_snip(model, batches, n_samples=5)
        return unsigned_snip(model, batches)

    reference = score(lm32.model)
    got = score(lm16.model)
    # the plain fp16 gradient of the first batch underflows to exact zeros that fp32 does not have
    loss = torch.nn.functional.cross_entropy(
        lm16.model(input_ids=batches[0]["input_ids"]).logits[:, :-1].float().flatten(0, 1),
        batches[0]["labels"][:, 1:].flatten(),
        ignore_index=IGNORE,
    )
    params = scored_parameters(lm16.model)
    named = dict(lm16.model.named_parameters())
    grads16 = torch.autograd.grad(loss / 5, [named[n] for n in params])
    assert sum(int((g == 0).sum()) for g in grads16) > 1000
    assert sum(int((reference[n] == 0).sum()) for n in params) == 0
    assert sum(int((got[n] == 0).sum()) for n in params) < 10  # the few left are 1e-4 of the largest score
    for n in params:
        assert got[n].dtype == torch.float32
        scale = reference[n].abs().max()
        torch.testing.assert_close(got[n] / scale, reference[n] / scale, rtol=0, atol=2e-2)
    flat_got = torch.cat([got[n].flatten() for n in params])
    flat_ref = torch.cat([reference[n].flatten() for n in params])
    assert torch.corrcoef(torch.stack([flat_got, flat_ref]))[0, 1] > 0.999


def test_bf16_and_fp32_scores_are_not_scaled():
    lm = tiny("llama", torch.bfloat16)
    batches = batches_of(lm)
    seen = []
    real_backward = torch.Tensor.backward

    def spy(self, *args, **kwargs):
        seen.append(float(self.detach()))
        return real_backward(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "backward", spy)
        signed_snip(lm.model, batches, n_samples=5)
    assert all(v < 100 for v in seen)  # mean NLLs of a tiny vocabulary, never multiplied by a scale


# ---- defect 9: Wanda offloads one matrix at a time ---------------------------------------------------------------


@pytest.mark.parametrize("offload", [True, False])
def test_wanda_holds_one_score_matrix_on_the_compute_device_at_a_time(monkeypatch, offload):
    """Offloaded, each matrix leaves before the next is made; kept on the device (the score writer's input),
    each is made when read, so a reader going matrix by matrix holds one."""
    lm = tiny("llama", torch.bfloat16)
    batches = batches_of(lm)
    model = lm.model.to("meta")
    named = dict(model.named_parameters())
    shapes = {tuple(named[n].shape) for n in scored_parameters(model)}
    largest = max(named[n].numel() * 4 for n in scored_parameters(model))
    watch = MetaValues(shapes)
    with meta_capable(monkeypatch), watch:
        scores = wanda(model, batches, options=ScoringOptions(offload=offload))
        read = [tuple(scores[n].shape) for n in scores]  # as the writer reads them: one at a time
    assert len(read) == len(scores) == len(scored_parameters(model))
    if offload:
        assert len(watch.offloaded) == len(scores)
        assert all(s.device.type == "cpu" for s in scores.values())
    assert watch.peak_bytes == largest


def test_wanda_made_on_demand_equals_the_offloaded_scores():
    lm = tiny("llama")
    batches = batches_of(lm)
    host = wanda(lm.model, batches, options=ScoringOptions(offload=True))
    lazy = wanda(lm.model, batches, options=ScoringOptions(offload=False))
    assert list(lazy) == list(host)
    for n in host:
        torch.testing.assert_close(lazy[n], host[n], rtol=0, atol=0)


# ---- defect 11: the activation fold reads no device value --------------------------------------------------------


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_fold_inputs_never_reads_a_device_value(tokens):
    lm = tiny("llama")
    batches = batches_of(lm)
    model = lm.model.to("meta")
    names = list(scored_parameters(model))
    seen: dict[str, list[int]] = {n: [] for n in names}
    named = dict(model.named_parameters())

    def fold(name, x):
        assert x.is_meta and x.dtype == torch.float32 and x.dim() == 2
        assert x.size(1) == named[name].size(1)
        seen[name].append(x.size(0))

    bare, watch = MetaValues(), MetaValues()
    with bare:  # the same forwards with no hook: what the model reads by itself (transformers' mask checks)
        fold_inputs(model, batches, [], fold, tokens)
    with watch:
        fold_inputs(model, batches, names, fold, tokens)
    assert watch.reads == bare.reads  # the hooks add no read, whatever the number of layers
    counts = []
    for b in batches:
        width = int(b["attention_mask"].sum(1).max())
        chosen = b["labels"] != IGNORE if tokens == "response" else b["attention_mask"] == 1
        counts.append(int(chosen[:, :width].sum()))
    assert all(seen[n] == counts for n in names)


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_fold_inputs_gives_the_rows_a_boolean_mask_picks(tokens):
    lm = tiny("llama")
    batches = batches_of(lm)
    names = list(scored_parameters(lm.model))
    modules = dict(lm.model.named_modules())
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    fold_inputs(lm.model, batches, names, lambda n, x: got[n].append(x.clone()), tokens)
    expected: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for b in batches:
        width = int(b["attention_mask"].sum(1).max())
        b = {k: v[:, :width] for k, v in b.items()}
        chosen = b["labels"] != IGNORE if tokens == "response" else b["attention_mask"] == 1
        handles = [modules[n.rsplit(".", 1)[0]].register_forward_pre_hook(
            lambda m, a, n=n, c=chosen: expected[n].append(a[0][c].float())) for n in names]  # fmt: skip
        with torch.no_grad():
            lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        for h in handles:
            h.remove()
    for n in names:
        assert len(got[n]) == len(expected[n]) == len(batches)
        for g, e in zip(got[n], expected[n], strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


# ---- the device audit: every scoring pass on a device that is not the CPU ----------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("kind", ["harm", "harm_unsigned", "harm_wanda"])
def test_scoring_on_a_device_mixes_no_devices_through_forward_backward_and_offload(kind, checkpointing):
    from harmsweep.scoring.snip import score_kind

    lm = tiny("llama")
    batches = batches_of(lm)
    model = lm.model.to("meta")
    options = ScoringOptions(gradient_checkpointing=checkpointing, offload=True)
    values = MetaValues()
    result = {}

    def run():
        with values:
            result.update(score_kind(model, kind, batches, 5, options))

    watch = audit(run)
    assert_one_device(watch)
    n = len(scored_parameters(model))
    assert len(values.offloaded) == n and len(result) == n  # the run reached its end: every buffer offloaded
    assert all(s.device.type == "cpu" and s.dtype == torch.float32 for s in result.values())


@pytest.mark.parametrize("kind", ["harm", "harm_unsigned"])
def test_fp16_scoring_with_its_overflow_checks_mixes_no_devices(kind):
    from harmsweep.scoring.snip import score_kind

    lm = tiny("llama", torch.float16)
    batches = batches_of(lm)
    model = lm.model.to("meta")
    values = MetaValues(truth=True)  # every overflow flag reads "finite"
    result = {}

    def run():
        with values:
            result.update(score_kind(model, kind, batches, 5, ScoringOptions(gradient_checkpointing=True)))

    watch = audit(run)
    assert_one_device(watch)
    passes = len(batches) if kind == "harm" else sum(b["input_ids"].size(0) for b in batches)
    n = len(scored_parameters(model))
    flag_reads = [shape for shape in values.offloaded if shape == (n,)]
    assert len(flag_reads) == passes  # one host read of all overflow flags per backward, no more
    assert len(values.offloaded) == passes + n and len(result) == n
    assert all(s.device.type == "cpu" and s.dtype == torch.float32 for s in result.values())


@pytest.mark.parametrize("scorer", ["signed"])
def test_an_fp16_overflow_backs_the_scale_off_and_still_matches_fp32(scorer, monkeypatch):
    from harmsweep.scoring import snip

    lm16, lm32 = fp16_pair()
    batches = batches_of(lm16)
    scales: list[float] = []
    overflowed = snip._LossScale.overflowed

    def spy(self, flags):
        bad = overflowed(self, flags)
        scales.append(self.scale)
        return bad

    def score(model):
        if scorer == "signed":
            return signed_snip(model, batches, n_samples=5)
        return unsigned_snip(model, batches)

    reference = score(lm32.model)
    monkeypatch.setattr(snip._LossScale, "overflowed", spy)
    monkeypatch.setattr(snip._LossScale, "START", 2.0**40)  # every gradient overflows fp16 at first
    got = score(lm16.model)
    passes = len(batches) if scorer == "signed" else sum(b["input_ids"].size(0) for b in batches)
    assert scales[0] == 2.0**39 and len(scales) > passes  # backed off, with redone passes
    for n in reference:
        scale = reference[n].abs().max()
        torch.testing.assert_close(got[n] / scale, reference[n] / scale, rtol=0, atol=2e-2)


def test_only_the_weights_that_overflowed_are_redone_so_each_batch_counts_once():
    """Two fp16 layers: at scale 2^16 the second's gradient overflows (inputs ~4000), the first's does not."""
    from harmsweep.scoring.snip import _backward_each

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 3, bias=False)).half()
    with torch.no_grad():
        model[0].weight.uniform_(900, 1100)
        model[1].weight.uniform_(-2e-3, 2e-3)
    params = {"first": model[0].weight, "second": model[1].weight}
    xs = [torch.rand(2, 4).half() for _ in range(3)]
    batches = [{"attention_mask": torch.ones(2, 4), "x": x} for x in xs]  # trim_padding keeps all 4
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    calls = dict.fromkeys(params, 0)

    def fold(name, p, grad, unscale):
        calls[name] += 1
        sums[name].addcmul_(p.detach(), grad, value=unscale)

    _backward_each(model, params, batches, lambda b: model(b["x"]).float().sum(), fold, "test")
    w0, w1 = model[0].weight.detach().double(), model[1].weight.detach().double()
    expected = {"first": torch.zeros_like(w0), "second": torch.zeros_like(w1)}
    for x in xs:  # loss = sum(W1 W0 x): dL/dW1 = 1 (W0 x)^T, dL/dW0 = (W1^T 1) x^T
        h = x.double() @ w0.T
        expected["second"] += w1 * (torch.ones(3, 2, dtype=torch.float64) @ h)
        expected["first"] += w0 * ((w1.T @ torch.ones(3, 2, dtype=torch.float64)) @ x.double())
    assert calls["first"] < calls["second"]  # the second was folded again in redone passes, the first was not
    for n in params:
        torch.testing.assert_close(sums[n].double(), expected[n], rtol=2e-3, atol=0)
