"""Which data, as configured: the ``data`` block. No torch here (the command line reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from harmsweep.errors import HarmsweepError

# The B-TAP authors' HEx-PHI subset (§5.1 of their prefilling eval): 5 of the 11 categories, 150 of 330 prompts.
CHOSEN_FIVE = ("hate_harass_violence", "malware", "adult_content", "physical_harm", "privacy_violation")


@dataclass
class DatasetRef:
    name: str = "advbench"
    file: str | None = None
    categories: list[str] | None = None
    category: str | None = None  # one category: the same as categories=[C] (the authors' --category)
    # HEx-PHI only, with one category C: keep C's prompts listed in hex-phi_{C}_not_{M}.txt (the authors' files)
    minus_category: str | None = None

    def __post_init__(self) -> None:
        """``category`` is read as ``categories=[category]`` from here on (the one place both meet)."""
        if self.category is None:
            return
        if self.categories and list(self.categories) != [self.category]:
            raise HarmsweepError(
                f"category={self.category} and categories={list(self.categories)} disagree (data.<side>): set one of them"
            )
        self.categories = [self.category]

    def validate(self, side: str = "harmful") -> None:
        """minus_category needs HEx-PHI and exactly one category; checked before any data is read."""
        if self.minus_category is None:
            return
        where = f"data.{side}.minus_category={self.minus_category}"
        if self.name != "hexphi":
            raise HarmsweepError(f"{where} applies to data.{side}.name=hexphi only, not {self.name!r}")
        cats = [self.categories] if isinstance(self.categories, str) else list(self.categories or [])
        if len(cats) != 1 or str(cats[0]).strip().casefold() == "chosen_five":
            raise HarmsweepError(
                f"{where} needs exactly one category in data.{side}.categories (now {cats or 'none'}), "
                f"e.g. data.{side}.categories=[malware]"
            )


@dataclass
class DataConfig:
    root: str | None = None
    download: bool = False
    harmful: DatasetRef = field(default_factory=DatasetRef)
    benign: DatasetRef = field(default_factory=lambda: DatasetRef(name="alpaca"))
