"""Where a run's judges come from: the ``judges`` block, the data root and the cache they read.

An evaluation receives a ``JudgeSource`` instead of the whole config: it builds a judge only when a metric
asks for it (a judge model is gigabytes), and every judge of a run is built the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harmsweep.evaluation.judges.base import Judge


@dataclass(frozen=True)
class JudgeSource:
    configs: Mapping[str, Any] = field(default_factory=dict)  # the judges block: name -> options
    data_root: str | None = None  # the published judge prompts are read under it
    online: bool = False  # data.download: fetch missing judge prompts from their published source
    cache_dir: str | None = None

    def build(self, name: str) -> Judge:
        from harmsweep.evaluation.judges import make_judge

        return make_judge(self.configs[name], data_root=self.data_root, online=self.online, cache_dir=self.cache_dir)
