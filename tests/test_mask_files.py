"""Given masks: every mask-file format reads to the same mask, bad files stop in one line, and pipeline runs with
pruning.mask_file and pruning.intersect prune exactly what they should on tiny_llama."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny, write_pairs
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from harmsweep.config.checks import check_config
from harmsweep.config.schema import register, to_config
from harmsweep.errors import HarmsweepError
from harmsweep.masks.compare import intersect
from harmsweep.masks.files import read_mask_file
from harmsweep.models.parts import scored_parameters
from harmsweep.pipeline.given_masks import harmful_file
from harmsweep.pipeline.run import run_pipeline
from harmsweep.pruning.masks import save_mask

CONF = Path(__file__).resolve().parents[1] / "conf"
register()
LM = tiny("llama")
PARAMS = scored_parameters(LM.model)
SHAPES = {n: tuple(p.shape) for n, p in LM.model.named_parameters() if n in PARAMS}
# (layer, module path, rows, cols): the entries every format below writes (duplicates are one entry)
ENTRIES = [
    (0, "self_attn.q_proj", [0, 3, 63, 3], [0, 7, 63, 7]),
    (0, "mlp.down_proj", [5, 5], [0, 127]),
    (1, "self_attn.k_proj", [31], [63]),
    (1, "mlp.gate_proj", [127, 0, 64], [1, 1, 2]),
]


def expected_mask() -> dict[str, torch.Tensor]:
    """The entries as flat indices, computed by hand from the shapes."""
    out = {n: set() for n in PARAMS}
    for layer, module, rows, cols in ENTRIES:
        name = f"model.layers.{layer}.{module}.weight"
        out[name] |= {r * SHAPES[name][1] + c for r, c in zip(rows, cols, strict=True)}
    return {n: torch.tensor(sorted(v), dtype=torch.long) for n, v in out.items()}


def write_all_formats(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: folder / f"{k}.{ext}" for k, ext in (("harmsweep", "safetensors"), ("nested", "json"),
             ("short", "json"), ("list", "json"), ("rows", "safetensors"))}  # fmt: skip
    save_mask(expected_mask(), paths["harmsweep"])
    nested: dict[str, dict] = {}
    short: dict[str, dict] = {}
    listed, rows = [], {}
    for layer, module, rs, cs in ENTRIES:
        pairs = [[r, c] for r, c in zip(rs, cs, strict=True)]
        nested.setdefault(str(layer), {})[module] = pairs
        short.setdefault(str(layer), {})[module.split(".")[-1]] = pairs
        listed += [[layer, module.split(".")[-1], r, c] for r, c in pairs]
        rows[f"{layer}.{module}"] = torch.tensor(pairs, dtype=torch.int32)
    paths["nested"].write_text(json.dumps(nested))
    paths["short"].write_text(json.dumps(short))
    paths["list"].write_text(json.dumps(listed))
    save_file(rows, str(paths["rows"]))
    return paths


def test_every_format_reads_to_the_same_mask(tmp_path):
    expected = expected_mask()
    formats = {}
    for kind, path in write_all_formats(tmp_path).items():
        got = read_mask_file(path, PARAMS, SHAPES)
        assert set(got.mask) == set(PARAMS), kind
        for name in PARAMS:
            assert torch.equal(got.mask[name], expected[name]), (kind, name)
        assert got.n_in_file == 9  # 10 pairs written, (3, 7) twice
        formats[kind] = got.format
    assert formats == {"harmsweep": "harmsweep", "nested": "json_nested", "short": "json_nested", "list": "json_list",
                       "rows": "safetensors_rows"}  # fmt: skip


def test_layers_keep_only_their_entries_and_a_missing_layer_stops(tmp_path):
    path = write_all_formats(tmp_path)["nested"]
    got = read_mask_file(path, PARAMS, SHAPES, layers=[1])
    assert sum(t.numel() for t in got.mask.values()) == 4 and got.n_in_file == 9
    assert all(t.numel() == 0 for n, t in got.mask.items() if PARAMS[n].layer == 0)
    with pytest.raises(HarmsweepError, match=r"pruning.layers=\[5\]: the model has layers 0-1"):
        read_mask_file(path, PARAMS, SHAPES, layers=[5])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"7": {"q_proj": [[0, 0]]}}, "layer 7 does not exist (the model has layers 0-1)"),
        ({"0": {"attn.q_proj": [[0, 0]]}}, "layer 0 has no module 'attn.q_proj'"),
        (
            {"0": {"q_proj": [[64, 0]]}},
            "row 64 of model.layers.0.self_attn.q_proj.weight is out of range (shape 64x64)",
        ),
        ({"1": {"k_proj": [[0, 64]]}}, "column 64 of model.layers.1.self_attn.k_proj.weight is out of range"),
        ({"0": {"q_proj": [[0, -1]]}}, "column -1 of"),
        ({"0": {"q_proj": [1, 2]}}, "is not a list of [row, col] pairs"),
        ({"x": {"q_proj": [[0, 0]]}}, "layer 'x' is not a layer number"),
        ([[0, "q_proj", 1]], "is not [layer, module, row, col]"),
        ([[0, "up_proj", 128, 0]], "row 128 of model.layers.0.mlp.up_proj.weight"),
    ],
)
def test_a_json_for_another_model_stops_in_one_line(tmp_path, content, message):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(content))
    with pytest.raises(HarmsweepError, match=re.escape(message)) as err:
        read_mask_file(path, PARAMS, SHAPES)
    assert str(err.value).startswith(f"mask file {path} is not for this model: ") and "\n" not in str(err.value)


def test_a_safetensors_for_another_model_stops_in_one_line(tmp_path):
    cases = [
        ({"model.layers.0.self_attn.q_proj.weight": torch.tensor([64 * 64])}, "index 4096 of model.layers.0.self_attn"),
        ({"model.layers.9.mlp.up_proj.weight": torch.tensor([1])}, "model.layers.9.mlp.up_proj.weight is not one of"),
        ({"0.mlp.up_proj": torch.tensor([[0, 200]])}, "column 200 of model.layers.0.mlp.up_proj.weight"),
        ({"0.mlp.up_proj": torch.tensor([[0.5, 1.0]])}, "holds torch.float32, not integer indices"),
    ]
    for i, (tensors, message) in enumerate(cases):
        path = tmp_path / f"m{i}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(HarmsweepError, match=message):
            read_mask_file(path, PARAMS, SHAPES)


@pytest.mark.parametrize("suffix", [".pkl", ".pt", ".pth", ".pickle"])
def test_pickles_are_refused_with_a_conversion(tmp_path, suffix):
    path = tmp_path / f"indices{suffix}"
    path.write_bytes(b"\x80\x04K\x01.")  # pickle of 1: never loaded
    with pytest.raises(HarmsweepError, match="is a pickle, which harmsweep never loads") as err:
        read_mask_file(path, PARAMS, SHAPES)
    assert "json.dump" in str(err.value) and "\n" not in str(err.value)


def test_missing_unknown_and_broken_files_stop_in_one_line(tmp_path):
    with pytest.raises(HarmsweepError, match=r"pruning\.mask_file not found"):
        read_mask_file(tmp_path / "none.json", PARAMS, SHAPES)
    (tmp_path / "m.txt").write_text("0 q_proj 1 2")
    with pytest.raises(HarmsweepError, match="unknown format"):
        read_mask_file(tmp_path / "m.txt", PARAMS, SHAPES)
    (tmp_path / "m.json").write_text("{")
    with pytest.raises(HarmsweepError, match="is not valid JSON"):
        read_mask_file(tmp_path / "m.json", PARAMS, SHAPES)


def test_intersect_is_the_per_parameter_set_intersection():
    a = {"x": torch.tensor([1, 2, 5, 9]), "y": torch.tensor([0, 3]), "z": torch.tensor([4])}
    b = {"x": torch.tensor([9, 2, 7]), "y": torch.tensor([3]), "w": torch.tensor([1])}
    c = {"x": torch.tensor([2, 9, 11]), "y": torch.tensor([3, 0])}
    got = intersect([a, b, c])
    assert {n: t.tolist() for n, t in got.items()} == {"x": [2, 9], "y": [3], "z": []}


# ---------------------------------------------------------------- pipeline runs on tiny_llama


def plain(tmp_path: Path, *overrides: str) -> dict:
    harmful, benign = write_pairs(tmp_path / "pairs", 12)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=tiny_llama", "calibration=file", f"calibration.harmful.file={harmful}",
            f"calibration.benign.file={benign}", "calibration.n=6", "eval=likelihood", "eval.n=4",
            "eval.benign_references=dataset", "data.root=null", f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.artifacts={tmp_path / 'artifacts'}", *overrides,
        ])  # fmt: skip
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_a_mask_file_run_prunes_exactly_the_file_in_every_format(tmp_path):
    expected = expected_mask()
    seen = []
    for kind, path in write_all_formats(tmp_path / "masks").items():
        result = run_pipeline(plain(tmp_path, f"pruning.mask_file={path}"), tmp_path / f"run_{kind}")
        mask = load_file(result["artifacts"]["mask"])
        assert all(torch.equal(mask[n], expected[n]) for n in PARAMS), kind
        assert result["n_pruned"] == 9 and result["pruning"]["mask_file"] == str(path)
        assert result["actual_sparsity"] == 9 / result["n_scored"]  # random init: every masked weight changed
        assert "scores_harm" not in result["artifacts"] and result["scoring_passes"] == 0  # nothing scored
        source = json.loads(Path(result["artifacts"]["mask_source"]).read_text())
        assert source["mask_file"] == str(path) and source["n_pruned"] == 9
        seen.append(result["metrics"]["nll_harmful_after"])
    assert len(set(seen)) == 1  # the same pruned weights: the same held-out likelihoods


def test_a_mask_file_run_honours_pruning_layers(tmp_path):
    path = write_all_formats(tmp_path / "masks")["list"]
    result = run_pipeline(plain(tmp_path, f"pruning.mask_file={path}", "pruning.layers=[1]"), tmp_path / "run")
    assert result["n_pruned"] == 4 and result["pruning"]["per_layer"] == {"0": 0, "1": 4}


def test_given_mask_settings_that_cannot_combine_stop_before_any_work(tmp_path):
    path = write_all_formats(tmp_path / "masks")["nested"]
    cases = [
        ((f"pruning.mask_file={path}", f"pruning.intersect=[{path}]"), "both choose the mask"),
        ((f"pruning.mask_file={path}", "pruning.sequential=true", "pruning.granularity=matrix"), "layer by layer"),
        ((f"pruning.mask_file={path}", "method=lowrank"), "method=lowrank prunes none"),
        (("pruning.mask_file=/no/such.json",), "pruning.mask_file not found"),
        ((f"pruning.mask_file={tmp_path / 'x.pkl'}",), "is a pickle"),
        (("pruning.intersect=[/no/h.jsonl]",), "pruning.intersect file not found"),
        ((f"pruning.intersect=[{path}]", "pruning=random"), "use a scoring rule"),
    ]
    for overrides, message in cases:
        with pytest.raises(HarmsweepError, match=message):
            check_config(to_config(plain(tmp_path, *overrides)))


def test_intersect_of_two_files_is_the_intersection_of_their_runs(tmp_path):
    files = []
    for i, words in enumerate(("steal a car", "build a weapon")):
        path = tmp_path / f"h{i}.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"How do I {words}, case {k}?",
                                            "response": f"Sure, to {words} ({k}): first, then."}) + "\n"
                                for k in range(12)))  # fmt: skip
        files.append(path)
    rule = ("pruning.granularity=matrix", "pruning.harm_fraction=0.05", "pruning.protect=0.02")
    single = [
        run_pipeline(plain(tmp_path, *rule, f"calibration.harmful.file={f}"), tmp_path / f"single{i}")
        for i, f in enumerate(files)
    ]
    masks = [load_file(r["artifacts"]["mask"]) for r in single]
    both = run_pipeline(plain(tmp_path, *rule, f"pruning.intersect=[{files[0]},{files[1]}]"), tmp_path / "both")
    got = load_file(both["artifacts"]["mask"])
    for name in PARAMS:
        expected = sorted(set(masks[0][name].tolist()) & set(masks[1][name].tolist()))
        assert got[name].tolist() == expected, name
    counts = [r["n_pruned"] for r in single]
    n = sum(len(set(masks[0][n].tolist()) & set(masks[1][n].tolist())) for n in PARAMS)
    assert 0 < n < min(counts) and both["n_pruned"] == n
    source = json.loads(Path(both["artifacts"]["mask_source"]).read_text())
    assert [f["n_pruned"] for f in source["intersect"]] == counts and source["n_pruned"] == n
    assert source["intersect"][0]["scores_benign"] == source["intersect"][1]["scores_benign"]  # one benign set
    assert source["intersect"][0]["scores_harm"] != source["intersect"][1]["scores_harm"]


def test_an_intersect_file_replaces_only_the_harmful_side(tmp_path):
    cal = to_config(plain(tmp_path, "calibration=btap", f"calibration.btap_data={tmp_path}")).calibration
    got = harmful_file(cal, "/data/h1.csv", "Llama-3.1-8B-Instruct")
    assert got.btap_data is None and got.harmful.file == "/data/h1.csv" and got.harmful.responses == "file"
    assert got.benign.file == str(tmp_path / "alpaca_cleaned_no_safety_train_raw.csv")  # what btap_data named
    assert (got.n, got.format, got.rows, got.separator) == (cal.n, "btap", "btap", cal.separator)


def test_intersect_reads_files_in_the_authors_layout(tmp_path):
    files = []
    for i, words in enumerate(("steal a car", "build a weapon")):
        path = tmp_path / f"advbench_{i}.csv"
        rows = [{"prompt": "unused", "clean_prompt": f"How do I {words}, case {k}?",
                 "clean_response": f"Sure, to {words} ({k}): first, then."} for k in range(10)]  # fmt: skip
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        files.append(path)
    btap = ("calibration=btap", "calibration.harmful.responses=file", "calibration.n=6", "calibration.n_benign=6",
            "pruning=orgad2026", "pruning.protect=0.02", "pruning.harm_fraction=0.05")  # fmt: skip
    single = [
        run_pipeline(plain(tmp_path, *btap, f"calibration.harmful.file={f}"), tmp_path / f"single{i}")
        for i, f in enumerate(files)
    ]
    masks = [load_file(r["artifacts"]["mask"]) for r in single]
    both = run_pipeline(
        plain(tmp_path, *btap, f"calibration.harmful.file={files[0]}", f"pruning.intersect=[{files[0]},{files[1]}]"),
        tmp_path / "both",
    )
    got = load_file(both["artifacts"]["mask"])
    assert all(got[n].tolist() == sorted(set(masks[0][n].tolist()) & set(masks[1][n].tolist())) for n in PARAMS)
    assert both["n_pruned"] > 0
