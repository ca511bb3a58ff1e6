"""Evaluation suite: metric planning, stage names, deltas, held-out splits, generation settings."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import tiny

from harmsweep.calibration.pairs import attack_prompts
from harmsweep.calibration.spec import CalibrationConfig, HarmfulCalibration
from harmsweep.data.records import Record
from harmsweep.data.spec import DataConfig, DatasetRef
from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.likelihood import mean_response_nll, response_nlls
from harmsweep.evaluation.spec import EvalConfig, LmEvalConfig, metric_plan
from harmsweep.evaluation.suite import deltas
from harmsweep.generation.hf import generate
from harmsweep.generation.sampling import GenerationConfig, Sampling
from harmsweep.intervals import with_stage

EVAL = EvalConfig(metrics=["harm_likelihood", "refusal", "strongreject_finetuned", "strongreject_rubric", "lm_eval"])
JUDGES = {"strongreject_finetuned": {"path": None}, "strongreject_rubric": {"base_url": None}}


def test_unconfigured_judges_are_skipped_with_the_reason():
    run, skipped = metric_plan(EVAL, JUDGES)
    assert run == ["harm_likelihood", "refusal"]
    assert set(skipped) == {"strongreject_finetuned", "strongreject_rubric", "lm_eval"}
    assert "judges.strongreject_finetuned.path" in skipped["strongreject_finetuned"]
    configured = {
        "strongreject_finetuned": {"path": "/judge"},
        "strongreject_rubric": {"base_url": "http://127.0.0.1:1"},
    }
    run, skipped = metric_plan(replace(EVAL, lm_eval=LmEvalConfig(tasks=["arc_easy"])), configured)
    assert run == EVAL.metrics and not skipped


@pytest.mark.parametrize(
    "change,message",
    [
        ({"metrics": ["harm_likelihood", "vibes"]}, "unknown vibes"),
        ({"generation": GenerationConfig(attack="gcg")}, "eval.generation.attack=gcg"),
        ({"generation": GenerationConfig(backend="tgi")}, "eval.generation.backend=tgi"),
    ],
)
def test_bad_eval_settings_fail_in_one_line(change, message):
    with pytest.raises(HarmsweepError, match=message) as err:
        metric_plan(replace(EVAL, **change), JUDGES)
    assert "\n" not in str(err.value)


def test_stage_names_and_deltas():
    assert with_stage("refusal_rate", "before") == "refusal_rate_before"
    assert with_stage("strongreject_mean/Violence", "after") == "strongreject_mean_after/Violence"
    before = {"nll_harmful_before": 1.0, "nll_benign_before": 2.0, "x_before/c": 0.5, "y_before": None, "j_n_before": 5}
    after = {"nll_harmful_after": 4.0, "nll_benign_after": 2.5, "x_after/c": 0.25, "y_after": 1.0, "j_n_after": 5}
    d = deltas(before, after)
    assert d == {"delta_nll_harmful": 3.0, "delta_nll_benign": 0.5, "delta_x/c": -0.25, "selectivity": 6.0}
    flat = deltas(
        {"nll_harmful_before": 1.0, "nll_benign_before": 2.0}, {"nll_harmful_after": 2.0, "nll_benign_after": 2.0}
    )
    assert flat["selectivity"] is None  # benign NLL did not rise: the ratio is undefined, not infinite


def test_harm_likelihood_is_the_mean_of_per_sample_response_nll():
    lm = tiny("llama")
    from harmsweep.calibration.pairs import Pair, encode_pairs

    pairs = [Pair("a", "short answer", "x:0"), Pair("a longer prompt", "a much longer answer with many tokens", "x:1")]
    enc = encode_pairs(lm.tokenizer, pairs, "chat", 256)
    expected = []
    with torch.no_grad():
        for i in range(2):
            keep = enc["attention_mask"][i].bool()
            ids, labels = enc["input_ids"][i][keep], enc["labels"][i][keep]
            logp = torch.log_softmax(lm.model(ids[None]).logits[0, :-1].double(), -1)
            resp = labels[1:] != -100
            expected.append(float(-logp[resp].gather(1, labels[1:][resp][:, None]).mean()))
    assert mean_response_nll(lm.model, enc, batch_size=2) == pytest.approx(sum(expected) / 2, rel=1e-5)
    # per item, in the set's order although batches are formed by length (the bootstrap's items)
    assert response_nlls(lm.model, enc, batch_size=1) == pytest.approx(expected, rel=1e-5)
    assert response_nlls(lm.model, enc, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_seeded_sampling_is_reproducible_and_greedy_is_batch_invariant():
    lm = tiny("llama")
    recs = [Record(prompt=p, source_id=f"r:{i}") for i, p in enumerate(["hi", "tell me a longer story", "x y z"])]
    prompts, _ = attack_prompts(lm.tokenizer, recs, "chat", 0)
    sample = Sampling(max_new_tokens=12, do_sample=True, temperature=1.0, seed=3)
    a = generate(lm.model, lm.tokenizer, prompts, sample, batch_size=3)
    b = generate(lm.model, lm.tokenizer, prompts, sample, batch_size=3)
    c = generate(lm.model, lm.tokenizer, prompts, Sampling(max_new_tokens=12, do_sample=True, seed=4), batch_size=3)
    assert a == b and a != c
    greedy = Sampling(max_new_tokens=12)
    batched = generate(lm.model, lm.tokenizer, prompts, greedy, batch_size=3)
    assert batched == [generate(lm.model, lm.tokenizer, [p], greedy, batch_size=1)[0] for p in prompts]
    assert all(len(x) <= 12 for x in batched)


def test_vllm_backend_without_vllm_is_a_one_line_error():
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here")
    lm = tiny("llama")
    with pytest.raises(HarmsweepError, match="harmsweep\\[vllm\\]") as err:
        generate(lm.model, lm.tokenizer, [[1, 2, 3]], Sampling(max_new_tokens=2), 1, backend="vllm")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("harmful", ["advbench", "strongreject"])
def test_held_out_prompts_never_include_calibration_prompts(shared_data, harmful):
    from harmsweep.calibration.sets import held_out_splits

    data = DataConfig(root=str(shared_data), harmful=DatasetRef(harmful), benign=DatasetRef("alpaca"))
    cal = CalibrationConfig(n=200, harmful=HarmfulCalibration(responses="on_policy"))
    s = held_out_splits(cal, data, 100, 5)
    assert (len(s.harmful_cal), len(s.harmful_eval), len(s.benign_cal), len(s.benign_eval)) == (200, 100, 200, 100)
    assert not {r.prompt for r in s.harmful_cal} & {r.prompt for r in s.harmful_eval}
    assert not {r.prompt for r in s.benign_cal} & {r.prompt for r in s.benign_eval}
    assert held_out_splits(cal, data, 100, 5) == s  # deterministic in the seed
