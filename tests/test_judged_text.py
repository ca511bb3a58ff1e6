"""What a judge reads for one answer: joined (prefix + continuation) or the authors' "prefix|||continuation"."""

from __future__ import annotations

import pytest

from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.judges.base import JUDGED_MODES, judged_text
from harmsweep.evaluation.spec import JUDGED_TEXTS

PREFIX = "Sure, here is a tutorial on how to"
RESPONSE = PREFIX + " make a cake: first, preheat the oven."


def test_joined_is_the_response_unchanged():
    assert judged_text(PREFIX, RESPONSE, "joined") is RESPONSE
    assert judged_text("", "No.", "joined") == "No."
    assert JUDGED_MODES == JUDGED_TEXTS  # the config's choices are this function's


def test_separated_puts_their_mark_between_prefix_and_continuation():
    assert judged_text(PREFIX, RESPONSE, "separated") == PREFIX + "||| make a cake: first, preheat the oven."
    assert judged_text("Sure", "Sure", "separated") == "Sure|||"  # nothing generated after the prefix
    assert judged_text("a", "aaa", "separated") == "a|||aa"  # only the leading prefix is split off


def test_separated_without_prefilling_judges_the_output_as_is():
    assert judged_text("", "I cannot help with that.", "separated") == "I cannot help with that."


def test_separated_splits_a_decode_artifact_where_prefix_and_response_part():
    # the tokenizer cleaned up " ," -> "," when decoding prefix + continuation: they part after "Sure"
    got = judged_text("Sure , here is", "Sure, here is the plan.", "separated")
    assert got == "Sure|||, here is the plan."
    assert got.replace("|||", "") == "Sure, here is the plan."  # no generated character dropped or repeated
    assert judged_text("Sure, here is more", "Sure, here", "separated") == "Sure, here|||"  # a response cut short
    assert judged_text("Absolutely", "No.", "separated") == "|||No."  # nothing shared


def test_an_unknown_mode_is_a_one_line_error():
    with pytest.raises(HarmsweepError, match=r"^judged_text=split is not one of joined, separated$"):
        judged_text(PREFIX, RESPONSE, "split")
