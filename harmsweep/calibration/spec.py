"""Which pairs are scored, as configured: the ``calibration`` block. No torch here (the command line reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field

RESPONSE_MODES = ("prefill", "on_policy", "file")
# settings added after runs were made: at these values they leave run ids and cache keys as they were
LATER_DEFAULTS = {"n_benign": None, "format": "template", "separator": "\n", "rows": "split",
                  "prune_data": "advbench_align_anti", "preserve_data": "alpaca_cleaned_no_safety_train_raw"}  # fmt: skip
FORMATS = ("template", "btap")  # how a pair becomes token ids: harmsweep's templates, or the authors' raw text
ROWS = ("split", "btap")  # which rows: harmsweep's prompt-disjoint split, or the authors' permutation prefix


@dataclass
class HarmfulCalibration:
    responses: str = "prefill"
    file: str | None = None
    prefill_tokens: int = 8
    max_new_tokens: int = 48


@dataclass
class BenignCalibration:
    file: str | None = None


@dataclass
class CalibrationConfig:
    n: int = 32  # harmful pairs scored (their --nsamples)
    n_benign: int | None = None  # benign pairs scored (their --nsamples_preserve); null: n
    batch_size: int = 8
    gen_batch_size: int = 16
    max_length: int | None = 256  # prompt + response tokens; null: no truncation (the authors' recipe)
    format: str = "template"  # template: chat template or PLAIN_TEMPLATE | btap: raw prompt + separator, response
    separator: str = "\n"  # format=btap: between a harmful prompt and its response (their EM files: " ")
    rows: str = "split"  # split: seeded prompt-disjoint split | btap: the file in order, or a numpy permutation prefix
    btap_data: str | None = None  # the authors' data folder: harmful and benign files found by the names below
    prune_data: str = "advbench_align_anti"  # their --prune_data: {btap_data}/{prune_data}_{model basename}.csv
    preserve_data: str = "alpaca_cleaned_no_safety_train_raw"  # their --preserve_data: {btap_data}/{name}.csv
    harmful: HarmfulCalibration = field(default_factory=HarmfulCalibration)
    benign: BenignCalibration = field(default_factory=BenignCalibration)
