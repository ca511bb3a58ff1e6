"""The published StrongREJECT judge prompts, read as data: from the data root, or online from their source.

Scores only compare with published numbers when the judge reads the prompt it was trained on, byte for
byte, so the texts are never paraphrased or copied into the code. They live under
``<data.root>/strongreject/judge_templates/`` (MIT, Dillon Bowen's strong_reject); with
``data.download=true`` a missing one is read from the published ``judge_templates.json`` instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from harmsweep.errors import HarmsweepError

FOLDER = Path("strongreject") / "judge_templates"
FILES = {
    "strongreject_finetuned": "strongreject_finetuned.txt",
    "strongreject_rubric_system": "strongreject_rubric_system.txt",
    "strongreject_rubric_user": "strongreject_rubric_user.txt",
}
# Keys of the published judge_templates.json (strong_reject/eval_files/), as the files above are named after.
PUBLISHED_KEYS = {
    "strongreject_finetuned": "strongreject_finetuned",
    "strongreject_rubric_system": "strongreject_rubric_system",
    "strongreject_rubric_user": "strongreject_rubric",
}
PUBLISHED = "https://raw.githubusercontent.com/dsbowen/strong_reject/main/strong_reject/eval_files/judge_templates.json"
HOWTO = (
    f"get the published StrongREJECT judge templates (MIT) from {PUBLISHED} and save the entries as "
    f"<data.root>/{FOLDER}/{{{','.join(FILES.values())}}}, set the judge's template_file=PATH, "
    "or set data.download=true on a machine with internet"
)


def judge_template(name: str, data_root: str | Path | None, template_file: str | Path | None = None,
                   online: bool = False) -> str:  # fmt: skip
    """The exact text of template ``name`` (a key of FILES); one line saying how to get it when missing."""
    if name not in FILES:
        raise HarmsweepError(f"unknown judge template {name} (known: {', '.join(FILES)})")
    if template_file:
        return _read_file(Path(os.path.expanduser(str(template_file))), name)
    if data_root:
        path = Path(os.path.expanduser(str(data_root))) / FOLDER / FILES[name]
        if path.is_file():
            return path.read_text(encoding="utf-8")
    if online:
        return _published(name)
    where = f"under {Path(str(data_root)) / FOLDER}" if data_root else "(no data.root set)"
    raise HarmsweepError(f"judge template {FILES[name]} not found {where}: {HOWTO}")


def _read_file(file: Path, name: str) -> str:
    """A text file holds the template itself; a judge_templates.json holds it under its published key."""
    if not file.is_file():
        raise HarmsweepError(f"judge template file not found: {file}")
    text = file.read_text(encoding="utf-8")
    if file.suffix != ".json":
        return text
    data = json.loads(text)
    key = PUBLISHED_KEYS[name]
    if not isinstance(data, dict) or key not in data:
        raise HarmsweepError(f"{file} has no key {key!r}")
    return str(data[key])


def _published(name: str) -> str:
    import fsspec  # a dependency of datasets: the same HTTP stack the data layer uses

    try:
        with fsspec.open(PUBLISHED, "rt", encoding="utf-8") as handle:
            data = json.load(handle)
    except Exception as exc:  # no network, moved file: one line, with the offline way
        raise HarmsweepError(f"could not read {PUBLISHED} ({type(exc).__name__}): {HOWTO}") from None
    return str(data[PUBLISHED_KEYS[name]])
