"""The config tree: every preset composes and is tested, the schema rejects typos, run ids are stable."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harmsweep.cli import _run_id_resolver
from harmsweep.config.compose import _one_line
from harmsweep.config.identity import run_id
from harmsweep.config.schema import register

CONF = Path(__file__).resolve().parents[1] / "conf"
OmegaConf.register_new_resolver("harmsweep_run_id", _run_id_resolver, replace=True)
register()

# What each experiment preset must sweep. A preset missing here fails test_every_preset_has_a_test.
LIKELIHOOD = ["harm_likelihood"]
EXPERIMENTS = {  # preset -> (what it sweeps, what it measures)
    "compression": ({"alignment", "pruning.rule", "pruning.sparsity"}, LIKELIHOOD),
    "local_sweep": ({"pruning.rule", "pruning.sparsity"}, LIKELIHOOD),
    "align": ({"alignment", "pruning.sparsity"}, ["harm_likelihood", "refusal", "perplexity"]),
    "cross_harm": ({"pruning.sparsity"}, LIKELIHOOD),
    "dissociation": ({"pruning.sparsity"}, ["harm_likelihood", "refusal", "recognition", "perplexity"]),
    "em": ({"pruning.sparsity"}, LIKELIHOOD),
    "demo": ({"alignment", "pruning.rule", "pruning.sparsity"}, ["harm_likelihood", "refusal", "perplexity"]),
    "align_real": ({"alignment", "pruning.rule", "pruning.sparsity"}, ["harm_likelihood", "refusal", "perplexity"]),
    "orgad2026_transfer": ({"transfer"}, ["refusal", "strongreject_finetuned", "perplexity"]),
    "orgad2026_harm": (
        {"eval.generation.attack"},
        ["refusal", "strongreject_finetuned", "perplexity", "lm_eval", "triviaqa"],
    ),
    "orgad2026_em": ({"pruning.protect", "pruning.harm_fraction"}, LIKELIHOOD),
    "orgad2026_capabilities": (
        {"capabilities"},
        ["strongreject_finetuned", "refusal", "explanation", "detection", "coherence"],
    ),
    "orgad2026_control": (
        {"calibration.prune_data"},
        ["refusal", "strongreject_finetuned", "triviaqa", "perplexity"],
    ),
}
SPARSITY_PRESETS = {"paper": 7, "coarse": 4}


def composed(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def plain(*overrides: str) -> dict:
    return OmegaConf.to_container(composed(*overrides), resolve=True, throw_on_missing=True)


def test_every_preset_has_a_test():
    assert {p.stem for p in (CONF / "experiment").glob("*.yaml")} == set(EXPERIMENTS)
    assert {p.stem for p in (CONF / "sparsity").glob("*.yaml")} == set(SPARSITY_PRESETS)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_presets_compose_and_sweep_what_they_say(name):
    cfg = composed(f"experiment={name}", hydra=True)
    assert cfg.experiment == name
    swept, metrics = EXPERIMENTS[name]
    assert set(cfg.hydra.sweeper.params) == swept
    assert list(cfg.eval.metrics) == metrics
    if name in ("cross_harm", "em", "dissociation"):  # each sets its own typed block
        assert cfg[name] is not None


@pytest.mark.parametrize("name,count", sorted(SPARSITY_PRESETS.items()))
def test_sparsity_presets_sweep_valid_fractions(name, count):
    values = composed(f"sparsity={name}", hydra=True).hydra.sweeper.params["pruning.sparsity"].split(",")
    assert len(values) == count and all(0 < float(v) < 1 for v in values)


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_names_checkpoints_for_its_variants(model):
    cfg = plain(f"model={model}")
    assert cfg["model"]["name"] == model and cfg["model"]["trust_remote_code"] is False
    if model == "own":  # a model by path alone (tests/test_own_model.py): no variants until given
        assert cfg["model"]["variants"] == {} and cfg["model"]["path"] is None
        return
    assert "aligned" in cfg["model"]["variants"]
    for spec in cfg["model"]["variants"].values():
        assert {"hub_id", "embedded", "tiny", "path"} & set(spec)
    for variant in cfg["model"]["variants"]:
        assert (CONF / "alignment" / f"{variant}.yaml").is_file(), f"alignment={variant} is not selectable"


@pytest.mark.parametrize(
    "override,message",
    [
        ("pruning.sparsty=1e-4", "sparsty"),
        ("pruning.sparsity=lots", "could not be converted to Float"),
        ("calibration.n=many", "could not be converted to Integer"),
        ("eval.generation.do_sample=perhaps", "not a valid bool"),
        ("data.harmful.categories=3", "ListConfig"),
    ],
)
def test_schema_rejects_typos_and_wrong_types(override, message):
    with pytest.raises(Exception) as err:
        composed(override)
    assert message in _one_line(err.value)  # what the CLI prints, in one line


def test_run_id_depends_on_what_changes_results_only():
    base = run_id(plain())
    assert base == run_id(plain())  # same config, same id
    for relevant in ("pruning.sparsity=1e-4", "seed=1", "model=tiny_llama", "calibration.n=16", "eval.n=8"):
        assert run_id(plain(relevant)) != base, relevant
    for irrelevant in ("paths.cache_dir=/elsewhere", "data.root=/other/data", "logger=wandb", "data.download=true"):
        assert run_id(plain(irrelevant)) == base, irrelevant


@pytest.mark.parametrize("data", sorted(p.stem for p in (CONF / "data").glob("*.yaml")))
def test_every_data_config_composes(data):
    overrides = [f"data={data}"] + (["data.harmful.file=/tmp/prompts.csv"] if data == "custom" else [])
    cfg = plain(*overrides)
    assert cfg["data"]["harmful"]["name"] and cfg["data"]["benign"]["name"]


def test_custom_data_requires_its_file():
    from harmsweep.config.checks import check_config
    from harmsweep.config.schema import to_config
    from harmsweep.errors import HarmsweepError

    with pytest.raises(HarmsweepError, match=r"data\.harmful\.file=PATH"):
        check_config(to_config(plain("data=custom", "data.root=/tmp")))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["experiment=em", "em.finetune.method=adam"], "finetune.method=adam"),
        (["experiment=dissociation", "dissociation.recovery_every=0"], "recovery_every >= 1"),
        (["alignment=safety_tuned", "alignment.derive.finetune.rnak=4"], "rnak"),
        (["alignment=safety_tuned", "alignment.derive.parent=safety_tuned"], "names the derived variant itself"),
        (["experiment=em", "em=null"], "needs its em: block"),
        (["experiment=em", "eval.generation.backend=vllm"], "use eval.generation.backend=hf"),
        (["experiment=dissociation", "eval.generation.backend=vllm"], "fine-tuned in memory"),
    ],
)
def test_experiment_settings_are_checked_before_any_work(overrides, message):
    """A one-line error while composing (typos) or from check_config (values), before any model loads."""
    from harmsweep.config.checks import check_config
    from harmsweep.config.schema import to_config

    with pytest.raises(Exception) as err:  # composition and check errors differ in type
        check_config(to_config(plain(*overrides, "data.root=/tmp")))
    assert message in _one_line(err.value)


def test_gpu_presets_size_evaluation_for_an_80gb_card():
    cfg = plain("eval=gpu")
    ev = cfg["eval"]
    assert ev["n"] is None  # the whole held-out set
    assert ev["generation"]["max_new_tokens"] == 512  # StrongREJECT's setting
    assert ev["generation"]["attack"] == "prefill"
    assert ev["lm_eval"] == {**ev["lm_eval"], "batch_size": "auto", "num_fewshot": None, "limit": None}
    assert "strongreject_finetuned" in ev["metrics"]
    # the compression experiment on a GPU profile uses them; on the default CPU profile it stays judge-free
    gpu = plain("experiment=compression", "hardware=gpu80")
    assert gpu["eval"] == ev and gpu["device"] == "cuda"
    assert plain("experiment=compression")["eval"]["metrics"] == LIKELIHOOD
    node = plain("hardware=gpu_node")
    assert node["model"]["device_map"] == "auto" and node["eval"]["generation"]["max_new_tokens"] == 512


def test_the_node_launcher_asks_for_every_gpu_of_a_node():
    launcher = composed("hydra/launcher=slurm_gpu_node", hydra=True).hydra.launcher
    assert launcher.gpus_per_node == 8 and launcher.additional_parameters.exclusive is True


def test_placement_and_scoring_memory_knobs_leave_the_run_id_alone():
    base = run_id(plain("model=tiny_llama"))
    for override in ("model.device_map=auto", "scoring.gradient_checkpointing=true", "scoring.offload=false"):
        assert run_id(plain("model=tiny_llama", override)) == base, override
    assert run_id(plain("model=tiny_llama", "device=cpu")) != base  # numerics differ between devices
