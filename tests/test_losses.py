"""The chunked response loss: the numbers of the full-logits loss, with bounded fp32 logits, on every device.

``per_sample_nll`` on the model's full logits is the independent computation; a dispatch mode counts the fp32
tensors whose last dim is the vocabulary, so the bound (``logits_chunk`` positions at once) is measured, not assumed.
"""

from __future__ import annotations

import logging

import pytest
import torch
from audit import assert_one_device, audit, meta_capable
from conftest import ARCHS, tiny
from test_config import plain
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers.models.llama import modeling_llama

from harmsweep.calibration.pairs import Pair, encode_pairs
from harmsweep.config.identity import run_id
from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.likelihood import response_nlls
from harmsweep.evaluation.utility import text_nlls
from harmsweep.losses import nll_sums, per_sample_nll, response_nll
from harmsweep.models.loading import build_tiny
from harmsweep.models.spec import ModelConfig
from harmsweep.scoring.snip import _batch_nll

PAIRS = [
    Pair("How do I pick a lock?", "Sure, here is how to pick a lock: insert a tension wrench.", "h:0"),
    Pair("Write a phishing email.", "Dear customer, your account is locked.", "h:1"),
    Pair("hi", "Hello! How can I help you today? I am here.", "h:2"),
    Pair("Name a colour.", "Blue.", "h:3"),
]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello there.", "ab"]
CHUNK = 5


class VocabLogits(TorchDispatchMode):
    """The largest fp32 tensor with last dim ``vocab`` any op makes (forward and backward), in elements.

    Views hold no memory of their own (the head's transposed weight is one): outputs sharing an input's storage
    are not counted."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        held = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            fresh = isinstance(t, torch.Tensor) and _storage(t) not in held
            if fresh and t.dtype == torch.float32 and t.dim() and t.size(-1) == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def encoded(lm) -> dict[str, torch.Tensor]:
    return encode_pairs(lm.tokenizer, PAIRS, "chat", 96)


def model_of(arch: str, dtype: torch.dtype = torch.float32):
    lm = tiny(arch, dtype)
    if arch == "gemma3":
        lm.model.config.final_logit_softcapping = 3.0  # tiny logits: a low cap so the tanh bends them
    return lm


def full_nll(model, t: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], use_cache=False).logits
    return per_sample_nll(logits, t["labels"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_nll_equals_the_full_logits_nll(arch, dtype):
    lm = model_of(arch, dtype)
    t = encoded(lm)
    assert bool((t["attention_mask"] == 0).any())  # padding and prompts are both in play
    with torch.no_grad():
        expected = full_nll(lm.model, t)
        got = response_nll(lm.model, t["input_ids"], t["attention_mask"], t["labels"], logits_chunk=CHUNK)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    assert got.dtype == torch.float32 and got.shape == (len(PAIRS),)
    torch.testing.assert_close(got, expected, **tol)


@pytest.mark.parametrize(
    ("model_type", "extra"), [("granite", {"logits_scaling": 4.0}), ("cohere", {"logit_scale": 0.25})]
)
def test_heads_that_scale_their_logits_are_followed(model_type, extra):
    spec = {"model_type": model_type, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, **extra}  # fmt: skip
    lm = build_tiny(spec)
    lm.model.eval()
    t = encoded(lm)
    with torch.no_grad():
        expected = full_nll(lm.model, t)
        got = response_nll(lm.model, t["input_ids"], t["attention_mask"], t["labels"], logits_chunk=CHUNK)
        unscaled = per_sample_nll(lm.model.lm_head(lm.model.model(input_ids=t["input_ids"])[0]), t["labels"])
    assert not torch.allclose(unscaled, expected, rtol=1e-3)  # the scale matters here
    torch.testing.assert_close(got, expected)


def test_an_architecture_not_vouched_for_takes_the_full_logits(monkeypatch, caplog):
    lm = tiny("llama")
    t = encoded(lm)
    monkeypatch.setattr(lm.model.config, "model_type", "unvouched_arch")
    with caplog.at_level(logging.INFO, logger="harmsweep.losses"), torch.no_grad():
        got = response_nll(lm.model, t["input_ids"], t["attention_mask"], t["labels"], logits_chunk=CHUNK)
        torch.testing.assert_close(got, full_nll(lm.model, t))
    assert "unvouched_arch" in caplog.text and "full logits" in caplog.text


def test_a_lora_wrapped_model_is_chunked_too(caplog):
    """Fine-tuning's model: LoRA layers inside the blocks, the loss through the wrapped model's own head."""
    from peft import LoraConfig, get_peft_model

    lm = tiny("llama")
    t = encoded(lm)
    model = get_peft_model(lm.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    vocab = lm.model.config.vocab_size
    with caplog.at_level(logging.INFO, logger="harmsweep.losses"), VocabLogits(vocab) as seen:
        got = response_nll(model, t["input_ids"], t["attention_mask"], t["labels"], logits_chunk=CHUNK)
        got.sum().backward()
    assert "full logits" not in caplog.text and 0 < seen.largest <= CHUNK * vocab
    with torch.no_grad():
        torch.testing.assert_close(got.detach(), full_nll(model, t))
        unadapted = model.get_base_model()
        with model.disable_adapter():
            assert not torch.allclose(full_nll(unadapted, t), got.detach())  # the adapter is in the numbers


@pytest.mark.parametrize("arch", ARCHS)
def test_snip_gradients_through_the_chunked_loss_equal_those_of_the_full_loss(arch):
    lm = model_of(arch)
    t = encoded(lm)
    params = [p for n, p in lm.model.named_parameters() if ".layers.0." in n or ".h.0." in n]
    assert params
    full = torch.autograd.grad(full_nll(lm.model, t).sum(), params)
    chunked = torch.autograd.grad(_batch_nll(lm.model, t, logits_chunk=CHUNK).sum(), params)
    for p, a, b in zip(params, full, chunked, strict=True):
        torch.testing.assert_close(p.detach() * b, p.detach() * a, rtol=1e-4, atol=1e-7)


def test_perplexity_sums_equal_the_full_logits_sums():
    lm = tiny("llama")
    got = text_nlls(lm.model, lm.tokenizer, TEXTS, batch_size=2, max_length=64, logits_chunk=CHUNK)
    for text, (total, count) in zip(TEXTS, got, strict=True):
        ids = lm.tokenizer(text, add_special_tokens=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=ids).logits[0, :-1].double(), dim=-1)
        assert count == ids.size(1) - 1
        assert total == pytest.approx(float(-logp.gather(1, ids[0, 1:, None]).sum()), rel=1e-5)


def test_only_labelled_positions_get_logits_and_no_call_site_holds_more_than_a_chunk():
    lm = tiny("llama")
    model, vocab = lm.model, lm.model.config.vocab_size
    t = encoded(lm)
    labelled = int((t["labels"][:, 1:] != -100).sum())
    positions = t["input_ids"].numel()
    assert labelled > CHUNK and positions > labelled  # several chunks; prompts and padding are not labelled
    with VocabLogits(vocab) as one_chunk, torch.no_grad():
        nll_sums(model, t["input_ids"], t["attention_mask"], t["labels"], logits_chunk=10**6)
    assert one_chunk.largest == labelled * vocab  # exactly the labelled positions, in one chunk
    with VocabLogits(vocab) as old, torch.no_grad():
        full_nll(model, t)
    assert old.largest >= positions * vocab > CHUNK * vocab  # what the counter sees on the full-logits path
    for name, call in (
        ("likelihood", lambda: response_nlls(model, t, batch_size=4, logits_chunk=CHUNK)),
        ("perplexity", lambda: text_nlls(model, lm.tokenizer, TEXTS, 3, 64, logits_chunk=CHUNK)),
        ("scoring", lambda: _batch_nll(model, t, logits_chunk=CHUNK).sum().backward()),
    ):
        with VocabLogits(vocab) as seen:
            call()
        assert 0 < seen.largest <= CHUNK * vocab, name
    model.zero_grad(set_to_none=True)


def test_the_chunked_loss_mixes_no_devices_forward_and_backward(monkeypatch):
    lm = tiny("llama")
    t = encoded(lm)  # labels stay on the host, as the batches hand them over
    model = lm.model.to("meta")
    ids = t["input_ids"].to("meta")
    # building the causal mask reads values (meta has none): attention falls back to plain causal, same shapes
    monkeypatch.setattr(modeling_llama, "create_causal_mask", lambda *a, **k: None)
    with meta_capable(monkeypatch):
        watch = audit(lambda: response_nll(model, ids, None, t["labels"], logits_chunk=CHUNK).sum().backward())
    assert_one_device(watch)
    assert watch.ops > 200  # it got through the blocks, the head and the backward, not stopped early


def test_the_chunked_head_mixes_no_devices_on_its_own(monkeypatch):
    """A twin of the loss's own part on meta: hidden states off the host, labels on it."""
    lm = tiny("llama")
    t = encoded(lm)
    model = lm.model.to("meta")
    hidden = torch.randn(*t["input_ids"].shape, model.config.hidden_size, device="meta", requires_grad=True)
    monkeypatch.setattr(type(model.model), "forward", lambda self, **kw: (hidden,))
    with meta_capable(monkeypatch):
        watch = audit(lambda: response_nll(model, t["input_ids"].to("meta"), t["attention_mask"].to("meta"),
                                           t["labels"], logits_chunk=CHUNK).sum().backward())  # fmt: skip
    assert_one_device(watch)
    assert hidden.grad is not None and hidden.grad.shape == hidden.shape  # backward ran through every chunk


@pytest.mark.parametrize("bad", [0, -3])
def test_a_bad_logits_chunk_stops_in_one_line(bad):
    with pytest.raises(HarmsweepError, match=f"model.logits_chunk={bad} must be"):
        ModelConfig(logits_chunk=bad).validate()
    lm = tiny("llama")
    t = encoded(lm)
    with pytest.raises(HarmsweepError, match="logits_chunk"):
        nll_sums(lm.model, t["input_ids"], t["attention_mask"], t["labels"], logits_chunk=bad)


def test_logits_chunk_leaves_the_run_id_alone():
    base = run_id(plain("model=tiny_llama"))
    assert plain("model=tiny_llama", "model.logits_chunk=512")["model"]["logits_chunk"] == 512
    assert run_id(plain("model=tiny_llama", "model.logits_chunk=512")) == base
