"""Per-prompt seeded sampling: an answer depends on (seed, prompt key) only, and the sampler samples softmax(logits/T)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import tiny
from transformers import GenerationConfig

from harmsweep.calibration.pairs import attack_prompts, generate_responses
from harmsweep.data.records import Record
from harmsweep.errors import HarmsweepError
from harmsweep.generation.hf import generate
from harmsweep.generation.sampling import GenerationConfig as GenBlock
from harmsweep.generation.sampling import Sampling, decoding_for, sampling_from_model
from harmsweep.generation.seeded import SeededSampler, key_seed, repetition_penalty, warp

PROMPTS = ["Tell me a story", "x", "a much longer prompt that pads the others", "why?", "Name a colour", "hi there"]
SAMPLE = Sampling(max_new_tokens=10, do_sample=True, temperature=1.0, seed=7)


def records(prompts: list[str] = PROMPTS) -> list[Record]:
    return [Record(prompt=p, source_id=f"q:{p}") for p in prompts]


def answers(lm, recs: list[Record], sampling: Sampling, batch: int) -> list[str]:
    pairs = generate_responses(
        lm.model, lm.tokenizer, recs, "chat", prefill_tokens=0, sampling=sampling, batch_size=batch, desc="t"
    )
    return [p.response for p in pairs]


def test_a_prompts_answer_is_the_same_alone_in_any_batch_and_on_a_rerun():
    lm = tiny()
    recs = records()
    alone = answers(lm, recs[:1], SAMPLE, 1)[0]
    # four different neighbours, the prompt in a different place of a batch of 5 (sorted by length there)
    batch = answers(lm, [recs[1], recs[2], recs[0], recs[3], recs[4]], SAMPLE, 5)
    other = answers(lm, [recs[5], recs[0], recs[2], recs[4], recs[1]], SAMPLE, 5)
    assert alone == batch[2] == other[1] == answers(lm, recs[:1], SAMPLE, 1)[0]
    assert len({alone, batch[0], batch[1]}) == 3  # really sampled per prompt, not one stream
    changed = answers(lm, recs[:1], replace(SAMPLE, seed=8), 1)[0]
    assert changed != alone
    warped = replace(SAMPLE, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.3)  # Qwen-like settings
    assert answers(lm, recs[:1], warped, 1)[0] == answers(lm, [recs[2], recs[0], recs[1]], warped, 3)[1] != alone
    # the key, not the text, seeds: the same prompt under another source id is another draw
    assert answers(lm, [Record(prompt=PROMPTS[0], source_id="other:0")], SAMPLE, 1)[0] != alone


def test_keys_and_repeats_without_keys():
    lm = tiny()
    prompts, _ = attack_prompts(lm.tokenizer, records(PROMPTS[:3]), "chat", 0)
    keyless = replace(SAMPLE, max_new_tokens=8)
    a = generate(lm.model, lm.tokenizer, prompts, keyless, batch_size=3)
    assert a == [generate(lm.model, lm.tokenizer, [p], keyless, 1)[0] for p in prompts]  # keyed by the ids
    twice = generate(lm.model, lm.tokenizer, [prompts[0], prompts[0]], keyless, batch_size=2)
    assert twice[0] == a[0] and twice[1] != twice[0]  # a repeated prompt is a second sample (EM's k samples)
    with pytest.raises(HarmsweepError, match="2 prompt keys for 3 prompts"):
        generate(lm.model, lm.tokenizer, prompts, replace(keyless, keys=("a", "b")), 3)


def test_model_generation_config_greedy_is_greedy_generate():
    lm = tiny()
    recs = records(PROMPTS[:3])
    lm.model.generation_config.do_sample = False
    lm.model.generation_config.temperature = 0.6  # ignored when the config does not sample, as in HF
    sampling = sampling_from_model(lm.model, 12, seed=3)
    assert sampling == Sampling(max_new_tokens=12, seed=3)
    prompts, _ = attack_prompts(lm.tokenizer, recs, "chat", 0)
    ours = answers(lm, recs, sampling, 3)
    expected = []
    for ids in prompts:
        with torch.no_grad():
            out = lm.model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                max_new_tokens=12, pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=lm.tokenizer.eos_token_id,
            )  # fmt: skip
        expected.append(lm.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))
    assert ours == expected


def test_model_generation_config_sampling_mirrors_hf_defaults():
    lm = tiny()
    lm.model.generation_config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9)  # Llama-3.1's
    assert sampling_from_model(lm.model, 256, 1) == Sampling(256, True, 0.6, 0.9, 1, top_k=50)  # HF's default k
    lm.model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05
    )  # Qwen2.5-Instruct's
    assert sampling_from_model(lm.model, 256, 1) == Sampling(256, True, 0.7, 0.8, 1, top_k=20, repetition_penalty=1.05)
    lm.model.generation_config = GenerationConfig(do_sample=True, top_k=0)
    assert sampling_from_model(lm.model, 8, 0) == Sampling(8, True, 1.0, 1.0, 0, top_k=None)
    block = GenBlock(sampling="model", max_new_tokens=8)
    assert decoding_for(block, lm.model, 0) == Sampling(8, True, 1.0, 1.0, 0)
    fixed = GenBlock(max_new_tokens=5, do_sample=True, temperature=0.5, top_p=0.7)
    assert decoding_for(fixed, lm.model, 4) == Sampling(5, True, 0.5, 0.7, 4)
    with pytest.raises(HarmsweepError, match=r"eval\.generation\.sampling=mine"):
        decoding_for(GenBlock(sampling="mine"), lm.model, 0)


def test_the_sampler_draws_from_softmax_of_the_tempered_logits():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    temperature, n = 0.8, 4000
    draws = torch.zeros(logits.size(1))
    for key in range(n):
        sampler = SeededSampler([key_seed(11, f"k{key}")], [0], temperature=temperature)
        draws[int(sampler(torch.zeros(1, 1, dtype=torch.long), logits.clone()).argmax())] += 1
    expected = torch.softmax(logits[0] / temperature, -1)
    assert float((draws / n - expected).abs().max()) < 0.03
    chi2 = float(((draws - n * expected) ** 2 / (n * expected)).sum())
    assert chi2 < 20.5  # 5 degrees of freedom, p = 0.001


def test_warping_matches_hf_processors():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    hf = TopPLogitsWarper(0.8)(ids, TopKLogitsWarper(7)(ids, TemperatureLogitsWarper(0.7)(ids, scores)))
    torch.testing.assert_close(warp(scores, 0.7, 7, 0.8), hf)
    pads = [0, 3, 5]  # one row at a time: a per-row tensor of lengths is only accepted from transformers 5.23
    expected = torch.cat([
        RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=pad)(ids[i : i + 1], scores[i : i + 1].clone())
        for i, pad in enumerate(pads)
    ])  # fmt: skip
    torch.testing.assert_close(repetition_penalty(scores, ids, pads, 1.3), expected)
    assert torch.equal(repetition_penalty(scores, ids, [9, 9, 9], 1.3), scores)  # nothing seen: unchanged


def test_vllm_requests_carry_their_prompts_seed(monkeypatch):
    import sys
    import types

    from harmsweep.generation import vllm as ve

    sent: list = []

    class FakeLLM:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def generate(self, prompts, params, use_tqdm):
            sent.append(params)
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[7])]) for _ in prompts]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: kw))
    monkeypatch.setattr(ve, "_engine", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(ve, "gpu_memory", lambda: (60 * 2**30, 80 * 2**30))
    lm = tiny()
    sampling = Sampling(8, True, 0.7, 0.8, 5, top_k=20, repetition_penalty=1.05, keys=("a", "b", "a"))
    ve.generate_vllm(lm.model, lm.tokenizer, [[1, 2], [3], [1, 2]], sampling, "dir:/ckpt", "fp", None)
    params = sent[-1]
    assert [p["seed"] for p in params] == [key_seed(5, "a"), key_seed(5, "b"), key_seed(5, "a#1")]
    assert {(p["temperature"], p["top_p"], p["top_k"], p["repetition_penalty"]) for p in params} == {
        (0.7, 0.8, 20, 1.05)
    }
    ve.generate_vllm(lm.model, lm.tokenizer, [[3]], replace(sampling, top_k=None, repetition_penalty=None, keys=("b",)),
                     "dir:/ckpt", "fp", None)  # fmt: skip
    assert [(p["seed"], p["top_k"], p["repetition_penalty"]) for p in sent[-1]] == [(key_seed(5, "b"), -1, 1.0)]
    ve.generate_vllm(lm.model, lm.tokenizer, [[3]], Sampling(max_new_tokens=4), "dir:/ckpt", "fp", None)
    assert sent[-1]["temperature"] == 0.0  # greedy: one set of parameters, as before
    ve.release_engine()
