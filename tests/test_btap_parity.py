"""Parity of `calibration=btap pruning=orgad2026` with an independent reimplementation of the authors' code.

tests/btap_reference.py scores and selects the way btap_reference.md (sections 2.3, 2.4, 3, 4) says their code
does; here harmsweep runs end to end on the same tiny model and files in their layout (with decoy columns that
must not be read), and its mask must hold exactly the reference's indices in every matrix. Scores are compared
too: harmsweep's signed S is the mean over examples where theirs is the sum (so S_ref / n), its unsigned benign
U is their sum.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import btap_reference as ref
import pytest
import torch
from conftest import tiny
from safetensors.torch import load_file
from test_cli import harmsweep

from harmsweep.artifacts import write_jsonl
from harmsweep.pruning.spec import PruneSpec, count
from harmsweep.scoring.store import open_scores

HARM_ROWS, BENIGN_ROWS = 10, 14
Q, P = 0.01, 0.02  # pruning.harm_fraction, pruning.protect: a few dozen weights per tiny matrix


def write_btap_files(folder: Path, basename: str, benign_clean: bool = False) -> tuple[Path, Path]:
    """Their two files: harmful {prune_data}_{model}.csv (clean_* read; prompt/response/text are decoys: a chat
    rendering in their files) and the benign Alpaca raw file (prompt/response read; text a decoy, and with
    ``benign_clean`` clean_* decoys too, which their Alpaca branch never reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    harmful = folder / f"advbench_align_anti_{basename}.csv"
    benign = folder / "alpaca_cleaned_no_safety_train_raw.csv"
    _write(harmful, ["prompt", "response", "text", "clean_prompt", "clean_response"],
           [[f"<chat>USER: decoy {i}</chat>", f"ASSISTANT: decoy answer {i}", f"decoy text {i}",
             f"How would someone do harmful thing number {i}?", f"Sure, here is harmful thing {i}: first, " + "x" * i]
            for i in range(HARM_ROWS)])  # fmt: skip
    rows = [[f"decoy clean prompt {i}", f"Give me a fact about fruit {i}.", f"decoy text {i}",
             f"Fruit {i} is sweet" + ", very sweet" * (i % 4) + ".", f"decoy clean response {i}"]
            for i in range(BENIGN_ROWS)]  # fmt: skip
    keep = slice(None) if benign_clean else slice(1, 4)
    _write(benign, ["clean_prompt", "prompt", "text", "response", "clean_response"][keep], [r[keep] for r in rows])
    return harmful, benign


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def run_harmsweep(tmp_path: Path, data: Path, name: str, *extra: str) -> dict:
    """A full run from their files; evaluation prompts from a small file (a harmful file used whole leaves none)."""
    run_dir = tmp_path / name
    prompts = tmp_path / "eval_prompts.jsonl"
    write_jsonl([{"prompt": f"Held-out harmful request {i}?"} for i in range(4)], prompts)
    args = ["model=tiny_llama", "calibration=btap", f"calibration.btap_data={data}", "pruning=orgad2026",
            f"pruning.protect={P}", f"pruning.harm_fraction={Q}", "scores.store=dense", "eval.n=2",
            "calibration.harmful.responses=file", "eval.benign_references=dataset", "data.root=null",
            "data.harmful.name=custom", f"data.harmful.file={prompts}", f"hydra.run.dir={run_dir}", *extra]  # fmt: skip
    proc = harmsweep(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "result.json").read_text())


def reference(harmful: Path, benign: Path, n: int, separator: str, dtype: torch.dtype = torch.float32):
    """The reference's S (harmful), U (benign) and mask on the same tiny model as harmsweep's tiny_llama."""
    lm = tiny("llama", dtype)
    harm = ref.harmful_examples(harmful, lm.tokenizer, n, seed=0, separator=separator)
    good = ref.benign_examples(benign, lm.tokenizer, n, seed=0)
    s, _ = ref.scores(lm.model, harm)
    _, u = ref.scores(lm.model, good)
    return s, u, ref.select(s, u, Q, P), len(harm)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def parity(tmp_path: Path, separator: str, n: int, *extra: str, benign_clean: bool = False) -> dict:
    """Run harmsweep and the reference on the same files; the masks and the scores side by side."""
    harmful, benign = write_btap_files(tmp_path / "data", "tiny_llama", benign_clean)
    spacer = [] if separator == "\n" else [f"calibration.separator='{separator}'"]  # the preset's is a newline
    result = run_harmsweep(tmp_path, tmp_path / "data", "run", f"calibration.n={n}", *spacer, *extra)
    assert result["calibration_source"]["separator"] == separator
    s_ref, u_ref, mask_ref, n_harm = reference(harmful, benign, n, separator)
    mask = load_file(result["artifacts"]["mask"])
    empty = torch.zeros(0, dtype=torch.long)
    s = open_scores(result["artifacts"]["scores_harm"])
    u = open_scores(result["artifacts"]["scores_benign_unsigned"])
    return {
        "result": result,
        "n_harm": n_harm,
        "extra": sorted(set(mask) - set(mask_ref)),
        "identical": sum(torch.equal(torch.sort(mask.get(k, empty)).values, v) for k, v in mask_ref.items()),
        "matrices": len(mask_ref),
        "jaccard": {k: jaccard(mask.get(k, empty), v) for k, v in mask_ref.items()},
        "n_ref": sum(v.numel() for v in mask_ref.values()),
        "s_diff": max(float((s[k] - s_ref[k] / n_harm).abs().max() / (s_ref[k] / n_harm).abs().max()) for k in s_ref),
        "u_diff": max(float((u[k] - u_ref[k]).abs().max() / u_ref[k].abs().max()) for k in u_ref),
    }


CASES = [  # separator, calibration.n, calibration.batch_size: n < rows shuffles both files, n >= rows keeps order
    pytest.param("\n", 6, 8, id="newline-n6-batch8"),
    pytest.param(" ", 6, 1, id="space-n6-batch1"),
    pytest.param("\n", 12, 8, id="newline-n12-whole-harmful-file"),
]


@pytest.mark.parametrize(("separator", "n", "batch"), CASES)
def test_btap_mask_and_scores_match_the_reference(tmp_path, separator, n, batch):
    """Identical indices in every matrix; scores equal up to float rounding (harmsweep's S is the mean: S_ref / n;
    the largest difference is relative to each matrix's largest score)."""
    got = parity(tmp_path, separator, n, f"calibration.batch_size={batch}")
    print({k: v for k, v in got.items() if k not in ("result", "jaccard")}, min(got["jaccard"].values()))
    assert got["n_harm"] == min(n, HARM_ROWS) and not got["extra"]
    assert got["identical"] == got["matrices"] == 14, got["jaccard"]
    assert got["result"]["n_pruned"] == got["n_ref"] > 0
    assert got["s_diff"] < 1e-5 and got["u_diff"] < 1e-5


def test_btap_benign_file_is_read_from_prompt_and_response_beside_clean_columns(tmp_path):
    """Their Alpaca branch reads prompt/response whatever else the file holds (§2.3): clean_* there are decoys."""
    got = parity(tmp_path, "\n", 6, benign_clean=True)
    assert got["u_diff"] < 1e-5
    assert got["identical"] == got["matrices"], got["jaccard"]


def test_llama31_8b_counts_are_the_spec_worked_numbers():
    """§4: per layer k_q = 167 (q, o), 41 (k, v), 587 (gate, up, down) at q = 1e-5; 69,664 over 32 layers; k_p
    348,864 at p = 5e-5. harmsweep's floored per-matrix count gives the same, and follows int(f * cols * rows)
    where that falls one short of int(f * numel)."""
    d, kv, inter = 4096, 1024, 14336
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (inter, d), (inter, d), (d, inter)]  # q k v o gate up down
    spec = PruneSpec(counts="floor", granularity="matrix")
    for f, per_matrix, total in ((1e-5, [167, 41, 41, 167, 587, 587, 587], 69_664),
                                 (5e-5, [838, 209, 209, 838, 2936, 2936, 2936], 348_864)):  # fmt: skip
        assert [ref.count(f, r, c) for r, c in shapes] == per_matrix
        assert [count(spec, f, (r, c)) for r, c in shapes] == per_matrix
        assert 32 * sum(per_matrix) == total
    assert ref.count(0.3, 5, 18) == count(spec, 0.3, (5, 18)) == 26 != int(0.3 * 90)  # 0.3 * 18 * 5 = 26.999...


def test_reference_reads_rows_and_tokens_as_the_spec_says(tmp_path):
    """The reference itself: clean_* columns, a numpy permutation prefix (or file order), separately tokenised parts
    with the prompt unlabelled, and per-layer sums equal to one full backward per example summed."""
    import numpy as np

    harmful, benign = write_btap_files(tmp_path, "tiny_llama")
    lm = tiny("llama")
    harm = ref.harmful_examples(harmful, lm.tokenizer, 4, seed=3, separator=" ")
    order = np.random.default_rng(3).permutation(HARM_ROWS)[:4].tolist()
    texts = [lm.tokenizer.decode(ex.input_ids[0]) for ex in harm]
    assert texts == [f"How would someone do harmful thing number {i}? Sure, here is harmful thing {i}: first, " + "x" * i
                     for i in order]  # fmt: skip
    answers = [lm.tokenizer.decode(ex.labels[0][ex.labels[0] != ref.IGNORE]) for ex in harm]
    assert answers == [f"Sure, here is harmful thing {i}: first, " + "x" * i for i in order]
    good = ref.benign_examples(benign, lm.tokenizer, BENIGN_ROWS, seed=3)  # n >= rows: file order
    assert [lm.tokenizer.decode(ex.labels[0][ex.labels[0] != ref.IGNORE]) for ex in good][:2] == [
        "\nFruit 0 is sweet.", "\nFruit 1 is sweet, very sweet."]  # fmt: skip

    s, u = ref.scores(lm.model, harm)
    weights = ref.layer_weights(lm.model)
    assert len(s) == 7 * 2 and all(w.requires_grad for w in lm.model.parameters())
    grads = {n: torch.zeros_like(w) for n, w in weights.items()}
    sums = {n: torch.zeros_like(w) for n, w in weights.items()}
    for ex in harm:
        lm.model.zero_grad()
        lm.model(input_ids=ex.input_ids, labels=ex.labels).loss.backward()
        for n, w in weights.items():
            grads[n] += w.grad
            sums[n] += w.grad.abs()
    for n, w in weights.items():
        torch.testing.assert_close(s[n], w.detach() * grads[n])
        torch.testing.assert_close(u[n], w.detach().abs() * sums[n])


def test_bf16_accumulation_equals_the_references_bf16_scores(tmp_path):
    """scoring.accumulate=bf16 on a bf16 model: their bf16 gradients, bf16 running sums and bf16 products, bit for
    bit (harmsweep stores them as fp32, which holds bf16 values exactly), and so the same mask. The sums depend on
    the order of the examples: both take the permutation's order."""
    harmful, benign = write_btap_files(tmp_path / "data", "tiny_llama")
    result = run_harmsweep(
        tmp_path, tmp_path / "data", "run", "calibration.n=6", "model.dtype=bfloat16", "scoring.accumulate=bf16"
    )  # the preset's batch_size=8: bf16 scores one at a time, in order
    s_ref, u_ref, mask_ref, _ = reference(harmful, benign, 6, "\n", torch.bfloat16)
    s = open_scores(result["artifacts"]["scores_harm"])
    u = open_scores(result["artifacts"]["scores_benign_unsigned"])
    s_same = [k for k in s_ref if torch.equal(s[k], s_ref[k].float())]
    u_same = [k for k in u_ref if torch.equal(u[k], u_ref[k].float())]
    worst = max(float((s[k] - s_ref[k].float()).abs().max()) for k in s_ref)
    assert len(s_same) == len(u_same) == len(s_ref) == 14, (len(s_same), len(u_same), worst)
    mask = load_file(result["artifacts"]["mask"])
    assert all(torch.equal(torch.sort(mask[k]).values, v) for k, v in mask_ref.items() if v.numel())
    assert result["n_pruned"] == sum(v.numel() for v in mask_ref.values())
