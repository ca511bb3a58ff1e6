"""``harmsweep mask-from-checkpoint`` on tiny sharded checkpoints with known zeros, ``harmsweep compare-masks``
against a hand computation, and both commands' one-line errors."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
from pathlib import Path

import prewarmed
import pytest
import torch
from conftest import tiny, tiny_spec
from safetensors.torch import load_file, save_file

from harmsweep.masks.checkpoint import layer_tensors, open_checkpoint, zeroed_indices
from harmsweep.masks.cli import main
from harmsweep.models.loading import build_tiny
from harmsweep.models.parts import scored_parameters
from harmsweep.pruning.masks import save_mask

Q0 = "model.layers.0.self_attn.q_proj.weight"
DOWN0 = "model.layers.0.mlp.down_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"


def harmsweep(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return prewarmed.run("harmsweep.cli", args, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The command in this process (harmsweep.cli dispatches to it; test_compare_masks_counts_as_by_hand goes
    through the real command): exit status, stdout, stderr."""
    capsys.readouterr()
    try:
        main(list(args))
        rc = 0
    except SystemExit as exc:
        rc = int(exc.code or 0)
    out = capsys.readouterr()
    return rc, out.out, out.err


def zero(model: torch.nn.Module, name: str, flat: list[int]) -> None:
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[torch.tensor(flat)] = 0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path, Path, dict[str, list[int]]]:
    """BASE (zeros of its own at Q0 [0, 5]) in shards; PRUNED with known zeros, those base zeros, an embedding
    zero and a norm zero (neither in a decoder matrix), saved in other shards and as one file; the exact mask."""
    root = tmp_path_factory.mktemp("ckpt")
    model = tiny("llama").model
    zero(model, Q0, [0, 5])
    model.save_pretrained(root / "base", max_shard_size="60KB")
    expected = {Q0: [1, 64, 4095], DOWN0: [0, 130, 8191], UP1: [77], V1: [2047]}
    for name, flat in expected.items():
        zero(model, name, flat)
    zero(model, Q0, [0, 5])  # zero in BASE too: not pruned by the run that made PRUNED
    zero(model, "model.embed_tokens.weight", [3])
    zero(model, "model.layers.0.input_layernorm.weight", [1])
    model.save_pretrained(root / "pruned", max_shard_size="100KB")
    model.save_pretrained(root / "pruned_single")
    return root / "base", root / "pruned", root / "pruned_single", expected


def test_the_checkpoints_are_sharded_as_meant(checkpoints):
    base, pruned, single, _ = checkpoints
    assert len(list(base.glob("*.safetensors"))) > 3 and (base / "model.safetensors.index.json").is_file()
    assert len(list(pruned.glob("*.safetensors"))) > 1
    assert [p.name for p in single.glob("*.safetensors")] == ["model.safetensors"]


@pytest.mark.parametrize("which", [1, 2])
def test_mask_from_checkpoint_is_exactly_the_new_zeros(tmp_path, capsys, checkpoints, which):
    base, expected = checkpoints[0], checkpoints[3]
    out = tmp_path / "recovered" / "mask.safetensors"
    rc, stdout, err = cli(capsys, "mask-from-checkpoint", str(checkpoints[which]), str(base), "--out", str(out),
                          "--block", "100")  # fmt: skip
    assert rc == 0, err
    mask = load_file(str(out))
    params = scored_parameters(tiny("llama").model)
    assert set(mask) == set(params)  # every 2-D decoder weight, nothing else
    for name in params:
        assert mask[name].tolist() == expected.get(name, []), name
    summary = json.loads((out.parent / "mask_summary.json").read_text())
    assert summary["total"] == 8 and summary["matrices"] == 14 and summary["matrices_with_zeros"] == 4
    assert summary["per_layer"] == {"0": 6, "1": 2}
    assert summary["per_module_type"] == {"down_proj": 3, "gate_proj": 0, "k_proj": 0, "o_proj": 0, "q_proj": 3,
                                          "up_proj": 1, "v_proj": 1}  # fmt: skip
    q = summary["fraction_per_matrix"]["q_proj"]
    assert (q["min"], q["median"], q["max"]) == (0.0, statistics.median([3 / 4096, 0.0]), 3 / 4096)
    assert summary["weights"] == sum(p.numel() for n, p in tiny("llama").model.named_parameters() if n in params)
    assert "8 weights zero in PRUNED and non-zero in BASE" in stdout and "per layer: 0: 6, 1: 2" in stdout
    assert "q_proj       0 / 0.000366 / 0.000732" in stdout


def test_row_blocks_cover_every_row_whatever_their_size():
    torch.manual_seed(0)
    base = torch.randn(7, 5)
    base[2, 3] = 0  # flat 13: zero in both, not pruned
    pruned = base.clone()
    pruned.view(-1)[[0, 13, 17, 34]] = 0
    expected = [0, 17, 34]
    for block in (1, 4, 5, 9, 35, 1000):
        assert zeroed_indices(pruned, base, 7, 5, block=block).tolist() == expected, block


def test_a_missing_folder_or_a_hub_id_offline_stops_in_one_line(tmp_path, capsys, checkpoints):
    base = checkpoints[0]
    rc, _, err = cli(capsys, "mask-from-checkpoint", str(tmp_path / "nowhere"), str(base))
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"harmsweep mask-from-checkpoint: error: PRUNED not found: {tmp_path / 'nowhere'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = cli(capsys, "mask-from-checkpoint", str(empty), str(base))
    assert rc == 2 and "holds no .safetensors weights" in err
    proc = harmsweep("mask-from-checkpoint", "nobody-here/no-such-model@main", str(base), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "PRUNED nobody-here/no-such-model@main: cannot download model.safetensors.index.json" in proc.stderr
    assert not (tmp_path / "mask.safetensors").exists()


def test_a_hub_checkpoint_in_the_local_cache_is_read_from_it_offline(tmp_path, monkeypatch):
    """A single-file hub checkpoint already cached: read from its snapshot, no index asked of the hub."""
    from test_models import cached_hub_checkpoint, offline_hub

    original = cached_hub_checkpoint(tmp_path)
    offline_hub(monkeypatch, tmp_path / "hub")
    ckpt = open_checkpoint("example-org/tiny-chat@main")
    assert ckpt.label == "example-org/tiny-chat@main" and set(ckpt.shards.values()) == {"model.safetensors"}
    assert set(ckpt.shards) <= set(original.model.state_dict()) and len(layer_tensors(ckpt)) == 2 * 9
    assert ckpt.fetch("model.safetensors").parent.name == "0123456789abcdef0123456789abcdef01234567"


def test_checkpoints_of_different_models_stop_in_one_line(tmp_path, capsys, checkpoints):
    base = checkpoints[0]
    wider = build_tiny({**tiny_spec("llama"), "intermediate_size": 96}).model
    wider.save_pretrained(tmp_path / "wider", max_shard_size="60KB")
    rc, _, err = cli(capsys, "mask-from-checkpoint", str(tmp_path / "wider"), str(base))
    assert rc == 2 and err.count("\n") == 1
    assert "model.layers.0.mlp.down_proj.weight has shape (64, 96) in" in err and "(64, 128)" in err
    deeper = build_tiny({**tiny_spec("llama"), "num_hidden_layers": 3}).model
    deeper.save_pretrained(tmp_path / "deeper")
    rc, _, err = cli(capsys, "mask-from-checkpoint", str(tmp_path / "deeper"), str(base))
    assert rc == 2 and err.count("\n") == 1
    assert "are not the same model: decoder-layer tensors only in PRUNED: model.layers.2." in err
    assert not (tmp_path / "mask.safetensors").exists()


# ---------------------------------------------------------------- compare-masks

A = {Q0: [1, 2, 3, 4], UP1: [7], DOWN0: []}
B = {Q0: [3, 4, 5], UP1: [7], "model.layers.1.mlp.gate_proj.weight": [0, 9]}


def write_masks(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "a" / "mask.safetensors", folder / "b" / "mask.safetensors"
    for mask, path in zip((A, B), paths, strict=True):
        path.parent.mkdir()
        save_mask({n: torch.tensor(v, dtype=torch.long) for n, v in mask.items()}, path)
    return paths


def test_compare_masks_counts_as_by_hand(tmp_path):
    a, b = write_masks(tmp_path)
    proc = harmsweep("compare-masks", str(a), str(b), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # by hand: A 5, B 6, both {3, 4} in q and {7} in up = 3, union 8
    assert "both 3   only A 2   only B 3   Jaccard 0.3750" in proc.stdout
    assert "     0          4          3          2" in proc.stdout  # layer 0: A 4 (q), B 3, both 2
    assert "     1          1          3          1" in proc.stdout  # layer 1: up 1/1/1, gate 0/2/0
    assert "2 of 4 matrices differ" in proc.stdout
    with (a.parent / "mask_comparison.csv").open() as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert set(rows) == {Q0, UP1, DOWN0, "model.layers.1.mlp.gate_proj.weight"}
    q = rows[Q0]
    assert (q["layer"], q["module"], q["a"], q["b"], q["both"], q["only_a"], q["only_b"], q["differs"]) == (
        "0", "self_attn.q_proj", "4", "3", "2", "2", "1", "1")  # fmt: skip
    assert float(q["jaccard"]) == pytest.approx(2 / 5)
    assert rows[UP1]["differs"] == "0" and rows[DOWN0]["differs"] == "0" and float(rows[DOWN0]["jaccard"]) == 1.0
    png = a.parent / "mask_comparison_layers.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_compare_masks_writes_where_asked_and_refuses_what_is_no_mask(tmp_path, capsys):
    a, b = write_masks(tmp_path)
    rc, out, _ = cli(capsys, "compare-masks", str(a), str(a), "--out", str(tmp_path / "cmp"))
    assert rc == 0 and "Jaccard 1.0000" in out and "0 of 3 matrices differ" in out
    assert (tmp_path / "cmp" / "mask_comparison.csv").is_file()
    save_file({"x": torch.zeros(2, 3)}, str(tmp_path / "scores.safetensors"))
    (tmp_path / "m.pkl").write_bytes(b"\x80\x04K\x01.")
    for args, message in (
        ((str(tmp_path / "none.safetensors"), str(b)), "mask A not found"),
        ((str(a), str(tmp_path / "m.pkl")), "mask B"),
        ((str(a), str(tmp_path / "scores.safetensors")), "is not a harmsweep mask (flat indices per parameter)"),
    ):
        rc, _, err = cli(capsys, "compare-masks", *args)
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith("harmsweep compare-masks: error: ") and message in err
