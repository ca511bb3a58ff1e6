"""The paper's model families as presets: the authors' recipe by default, offline plans sized from each preset's
architecture block (checked against an independent count), revisions and chat-template keywords reaching the
loader, and tiny olmo3/mistral/qwen3 models scored and pruned with exactly the expected per-matrix counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harmsweep.batches import iter_batches
from harmsweep.calibration.pairs import Pair, encode_pairs
from harmsweep.cli import _run_id_resolver
from harmsweep.config.schema import register, to_config
from harmsweep.errors import HarmsweepError
from harmsweep.models import loading
from harmsweep.models.parts import scored_parameters
from harmsweep.pruning.select import select
from harmsweep.scoring.snip import score_kind

CONF = ROOT / "conf"
OmegaConf.register_new_resolver("harmsweep_run_id", _run_id_resolver, replace=True)
register()

# preset -> the number of layers its architecture must have (a typo'd block fails here, not only in the count)
PRESETS = {
    "llama31_8b_instruct": 32, "qwen25_1_5b_instruct": 28, "qwen25_7b_instruct": 28, "qwen25_14b_instruct": 48,
    "qwen25_32b_instruct": 64, "mistral_7b_instruct": 32, "olmo3_7b_instruct": 32, "qwen3_32b": 64,
}  # fmt: skip
OWN_DEFAULTS = ("smollm2_135m", "llama3_8b", "qwen25_7b", "olmo2_7b", "tiny_llama")  # keep harmsweep's recipe
TINY_OLMO3 = {"model_type": "olmo3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2}  # fmt: skip
MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PAIRS = [
    Pair("How do I pick a lock?", "Sure, here is how to pick a lock: insert a tension wrench.", "h:0"),
    Pair("Write a phishing email.", "Dear customer, your account is locked.", "h:1"),
    Pair("Explain how to make a fake ID.", "Sure, you start with a template", "h:2"),
    Pair("Name a colour.", "Blue, the colour of a clear sky at noon.", "h:3"),
]


def plain(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config", overrides=list(overrides)), resolve=True)


def preset(name: str) -> dict:
    return yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())


def test_every_paper_preset_is_tested():
    paper = {p.stem for p in (CONF / "model").glob("*.yaml") if "orgad2026" in p.read_text()}
    assert paper == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_paper_preset_runs_the_authors_recipe_unless_the_command_line_says_otherwise(name):
    cfg = plain(f"model={name}")
    cal, p = cfg["calibration"], cfg["pruning"]
    assert (cal["format"], cal["rows"], cal["n"], cal["max_length"]) == ("btap", "btap", 412, None)
    assert (p["granularity"], p["benign_importance"], p["counts"], p["ties"], p["eligible"]) == (
        "matrix", "unsigned", "floor", "topk", "all")  # fmt: skip
    assert (p["protect"], p["harm_fraction"]) == (5e-5, 1e-5)
    assert cfg["model"]["dtype"] == "bfloat16" and cfg["model"]["chat_template_kwargs"] == {}
    own = plain(f"model={name}", "calibration=prefill", "pruning=signed_snip")
    assert own["calibration"]["format"] == "template" and own["calibration"]["max_length"] == 256
    assert own["pruning"]["granularity"] == "global" and own["pruning"]["benign_importance"] == "abs_signed"


def test_an_experiment_choosing_its_calibration_still_wins_over_the_preset():
    cfg = plain("model=qwen25_7b_instruct", "experiment=cross_harm")
    assert cfg["calibration"]["harmful"]["responses"] == "on_policy" and cfg["calibration"]["format"] == "template"
    assert cfg["pruning"]["benign_importance"] == "unsigned"  # the experiment leaves pruning to the preset


@pytest.mark.parametrize("name", OWN_DEFAULTS)
def test_the_other_presets_keep_harmsweeps_defaults(name):
    cfg = plain(f"model={name}")
    assert cfg["calibration"]["format"] == "template" and cfg["pruning"]["rule"] == "signed_snip"
    assert cfg["pruning"]["granularity"] == "global" and cfg["model"]["architecture"] is None


def independent_n_scored(arch: dict) -> int:
    """q, k, v, o, gate, up, down of every layer, from the config.json numbers alone."""
    h, heads, kv, inter = arch["hidden_size"], arch["num_attention_heads"], arch["num_key_value_heads"], arch[
        "intermediate_size"]  # fmt: skip
    hd = arch.get("head_dim") or h // heads
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter
    return arch["num_hidden_layers"] * per_layer


def build_plan(tmp_path: Path, monkeypatch, *args: str) -> tuple[dict, list[str]]:
    from harmsweep.sweep.plan import build

    monkeypatch.setenv("HARMSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, problems = build([*args, "--json", str(tmp_path / "plan.json")])
    return json.loads((tmp_path / "plan.json").read_text())["jobs"][0], problems


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_plan_sizes_each_preset_offline_from_its_architecture(name, tmp_path, monkeypatch):
    arch = preset(name)["architecture"]
    assert arch["num_hidden_layers"] == PRESETS[name]
    job, problems = build_plan(tmp_path, monkeypatch, f"model={name}", "hardware=gpu80")
    assert job["n_scored"] == independent_n_scored(arch)
    scoring = next(p for p in job["phases"] if p["name"] == "scoring")
    if preset(name)["device_map"] == "auto":  # one GPU is too small for scoring; a node of 8 is not
        assert scoring["gpu"] > 80 * 2**30 and len(problems) == 1 and "in scoring" in problems[0]
        node, problems = build_plan(tmp_path, monkeypatch, f"model={name}", "hardware=gpu_node",
                                    "hydra/launcher=slurm_gpu_node")  # fmt: skip
        assert not problems and node["gpus"] == 8 and node["n_scored"] == job["n_scored"]
    else:
        assert not problems and scoring["gpu"] <= 80 * 2**30


def test_a_local_config_json_wins_over_the_architecture_block(tmp_path, monkeypatch):
    arch = {**preset("mistral_7b_instruct")["architecture"], "num_hidden_layers": 2}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(arch))
    job, _ = build_plan(tmp_path, monkeypatch, "model=mistral_7b_instruct", f"model.path={tmp_path / 'm'}")
    assert job["n_scored"] == independent_n_scored(arch)


def test_a_hub_preset_without_architecture_still_needs_its_config(tmp_path, monkeypatch):
    from transformers import AutoConfig

    def offline(*args, **kwargs):
        raise OSError("no internet")

    monkeypatch.setattr(AutoConfig, "from_pretrained", offline)  # as on a machine without the hub
    with pytest.raises(HarmsweepError, match=r"not available offline.*architecture"):
        build_plan(tmp_path, monkeypatch, "model=llama3_8b")


def test_the_architecture_block_is_not_in_the_run_id():
    from harmsweep.config.identity import run_id

    cfg = plain("model=olmo3_7b_instruct")
    edited = {**cfg, "model": {**cfg["model"], "architecture": {"model_type": "olmo3"}}}
    assert run_id(edited) == run_id(cfg)


class Recorder:
    """Stands in for the hub: records what from_pretrained was asked, returns a tiny model and byte tokenizer."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def model(self, hub_id: str, **kwargs):
        self.calls.append((hub_id, kwargs))
        return loading.build_tiny(dict(TINY_OLMO3)).model

    def tokenizer(self, hub_id: str, **kwargs):
        self.calls.append((f"tokenizer:{hub_id}", kwargs))
        return loading.byte_tokenizer()


def test_a_revision_override_reaches_from_pretrained(tmp_path, monkeypatch):
    hub = Recorder()
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", hub.model)
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", hub.tokenizer)
    cfg = to_config(
        plain("model=olmo3_7b_instruct", "alignment=base", "+model.variants.base.revision=stage1-step10000")
    )
    lm = loading.load_model(cfg.model, cfg.alignment.name, tmp_path)
    assert lm.source == "hub:allenai/Olmo-3-1025-7B"
    assert hub.calls[0] == (  # the local cache is asked first (it answers here: the recorder has everything)
        "tokenizer:allenai/Olmo-3-1025-7B",
        {"trust_remote_code": False, "revision": "stage1-step10000", "local_files_only": True},
    )
    assert hub.calls[1][0] == "allenai/Olmo-3-1025-7B" and hub.calls[1][1]["revision"] == "stage1-step10000"
    assert hub.calls[1][1]["local_files_only"] is True and hub.calls[1][1]["adapter_kwargs"]["local_files_only"]
    assert hub.calls[1][1]["dtype"] == torch.bfloat16
    hub.calls.clear()
    loading.load_model(to_config(plain("model=olmo3_7b_instruct", "alignment=dpo")).model, "dpo", tmp_path)
    assert hub.calls[1][0] == "allenai/Olmo-3-7B-Instruct-DPO" and "revision" not in hub.calls[1][1]


def test_chat_template_kwargs_reach_every_apply_chat_template_call(tmp_path):
    template = (
        "{% if enable_thinking is defined and not enable_thinking %}NOTHINK {% endif %}{{ messages[0]['content'] }}"
    )
    messages = [{"role": "user", "content": "hi"}]
    cfg = to_config(plain("model=tiny_qwen3", "+model.chat_template_kwargs.enable_thinking=false"))
    lm = loading.load_model(cfg.model, "aligned", tmp_path, weights=False)
    lm.tokenizer.chat_template = template
    assert lm.tokenizer.apply_chat_template(messages, tokenize=False) == "NOTHINK hi"
    assert lm.tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=True) == "hi"  # caller wins
    default = loading.load_model(to_config(plain("model=tiny_qwen3")).model, "aligned", tmp_path, weights=False)
    default.tokenizer.chat_template = template
    assert default.tokenizer.apply_chat_template(messages, tokenize=False) == "hi"
    assert lm.fingerprint != default.fingerprint  # calibration sets made with the other template are not reused


@pytest.mark.parametrize("arch", ["olmo3", "mistral", "qwen3"])
def test_tiny_family_scores_and_prunes_the_expected_count_of_every_matrix(arch, tmp_path):
    cfg = to_config(plain(f"model=tiny_{arch}", "pruning=orgad2026", "pruning.protect=0.02",
                          "pruning.harm_fraction=0.01"))  # fmt: skip
    lm = loading.load_model(cfg.model, "aligned", tmp_path)
    params = scored_parameters(lm.model)
    layers = lm.model.config.num_hidden_layers
    assert sorted((p.layer, p.module_type) for p in params.values()) == sorted(
        (layer, m) for layer in range(layers) for m in MATRICES
    )
    spec = cfg.prune_spec()
    assert spec.needed_scores() == {"harm", "benign_unsigned"}
    tensors = encode_pairs(lm.tokenizer, PAIRS, "chat", 96)
    scores = {kind: score_kind(lm.model, kind, list(iter_batches(tensors, 2)), len(PAIRS))
              for kind in ("harm", "benign_unsigned")}  # fmt: skip
    weights = {n: p.detach() for n, p in lm.model.named_parameters() if n in params}
    masks = select(spec, params, weights, scores)
    for name in params:  # theirs: per matrix TopK_q(H = -S) minus TopK_p(U), counts int(f * rows * cols)
        n = weights[name].numel()
        harm = set(torch.topk(-scores["harm"][name].flatten(), int(0.01 * n)).indices.tolist())
        kept = set(torch.topk(scores["benign_unsigned"][name].flatten(), int(0.02 * n)).indices.tolist())
        assert masks[name].tolist() == sorted(harm - kept), name
    assert sum(m.numel() for m in masks.values()) > 0


@pytest.mark.parametrize(
    "fields,message",
    [({"architecture": {"hidden_size": 4}}, "model_type"), ({"chat_template_kwargs": [1]}, "chat_template_kwargs")],
)
def test_a_bad_architecture_or_chat_keyword_block_fails_in_one_line(fields, message):
    from harmsweep.models.spec import ModelConfig

    with pytest.raises(HarmsweepError, match=message) as caught:
        ModelConfig(name="x", **fields).validate()
    assert len(str(caught.value).splitlines()) == 1
