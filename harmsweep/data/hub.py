"""Load a dataset from its pinned Hugging Face hub source with `datasets`, online or from a filled cache offline.

Nothing here runs unless the dataset is missing locally and the user allowed the hub (`data.download=true`), or
offline mode is on (HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1), in which case only the local HF caches are read.
Offline, `datasets` serves a hub id from the newest cached copy whatever revision was asked for, so the cache is
checked first for the pinned revision: an old cached copy never silently replaces the pinned one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
from datasets.naming import camelcase_to_snakecase

from harmsweep.data.files import quiet_datasets
from harmsweep.data.sources import HEXPHI_HOWTO, HUB_SOURCES, HubSource, data_error

log = logging.getLogger(__name__)


def offline() -> bool:
    """Whether datasets runs in offline mode (set from HF_DATASETS_OFFLINE or HF_HUB_OFFLINE at import)."""
    return bool(datasets.config.HF_HUB_OFFLINE)


def _is_sha(revision: str) -> bool:
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def _hint(name: str, source: HubSource) -> str:
    """What to do instead, for any failure of the hub path."""
    if source.gated:
        return HEXPHI_HOWTO
    return "without internet, put the file under data.root or set the dataset's file (e.g. data.harmful.file=PATH)"


def cache_dirs(source: HubSource, config: str | None) -> list[Path]:
    """The prepared copies of `source` in the HF datasets cache: <cache>/<ns>___<name>/<config>/<version>/<sha>."""
    namespace, _, repo_name = source.repo.rpartition("/")
    parts = [namespace, camelcase_to_snakecase(repo_name)] if namespace else [camelcase_to_snakecase(repo_name)]
    root = Path(datasets.config.HF_DATASETS_CACHE) / "___".join(parts)
    return sorted(p for p in root.glob(f"{config or '*'}/*/*") if p.is_dir())


def _check_cached(name: str, source: HubSource, config: str | None) -> None:
    """Offline: the pinned revision must be in the cache (datasets itself would take any cached revision)."""
    cached = cache_dirs(source, config)
    where = f"{source.ref}" + (f" config {config}" if config else "")
    if not cached:
        raise data_error(
            where,
            f"{name} is not in the HF datasets cache ({datasets.config.HF_DATASETS_CACHE}) and offline mode is on; "
            f"load it once with internet (data.download=true) or {_hint(name, source)}",
        )
    if _is_sha(source.revision) and source.revision not in {p.name for p in cached}:
        found = ", ".join(sorted({p.name for p in cached}))
        raise data_error(where, f"the cached copy of {name} is at revision {found}, not the pinned {source.revision}")


def load_hub(name: str) -> datasets.Dataset | Path:
    """Dataset `name` from its hub source: a Dataset (kind "repo"), or the local path of the fetched files."""
    source = HUB_SOURCES[name]
    if not _is_sha(source.revision):
        log.warning("%s: loading %s, which is not pinned to a commit; results may change upstream", name, source.ref)
    if source.note:
        log.warning("%s: %s", name, source.note)
    if source.kind == "files":
        return _fetch_files(name, source)
    parts = []
    for config in source.configs:
        if offline():
            _check_cached(name, source, config)
        try:
            with quiet_datasets():
                part = datasets.load_dataset(source.repo, config, revision=source.revision, split=source.split)
        except Exception as exc:  # gated, missing, offline, auth, HTTP: all mean the same to the user
            reason = str(exc).splitlines()[0] if str(exc) else ""
            message = f"could not load {name} from the hub ({type(exc).__name__}: {reason}); {_hint(name, source)}"
            raise data_error(source.ref, message) from exc
        renames = {k: v for k, v in source.columns.items() if k in part.column_names and k != v}
        part = part.rename_columns(renames)
        if len(source.configs) > 1:
            part = part.add_column("hub_config", [str(config)] * len(part))
        parts.append(part)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _fetch_files(name: str, source: HubSource) -> Path:
    """Fetch the named repo files at the pinned revision into the HF hub cache (offline: from it only).

    Returns the file, or for several files the snapshot folder that holds them (HEx-PHI's category_N.csv).
    Files missing upstream are skipped: HEx-PHI's category_2 was removed.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    fetched: list[Path] = []
    for filename in source.files:
        try:
            path = hf_hub_download(
                source.repo, filename, repo_type="dataset", revision=source.revision, local_files_only=offline()
            )
        except EntryNotFoundError:
            continue
        except Exception as exc:  # gated, offline and not cached, auth, HTTP
            message = f"could not fetch {name} file {filename} ({type(exc).__name__}); {_hint(name, source)}"
            raise data_error(source.ref, message) from exc
        fetched.append(Path(path))
    if not fetched:
        raise data_error(source.ref, f"none of {', '.join(source.files)} found; {_hint(name, source)}")
    return fetched[0] if len(source.files) == 1 else fetched[0].parent


def load_url_json(url: str) -> datasets.Dataset:
    """A JSON file published outside the hub (Alpaca's safety filter) through datasets' json builder."""
    try:
        with quiet_datasets():
            return datasets.load_dataset("json", data_files=url, split="train")
    except Exception as exc:
        raise data_error(url, f"could not load ({type(exc).__name__}); fetch the file by hand into data.root") from exc
