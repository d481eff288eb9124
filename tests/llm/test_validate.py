"""Conversation validation: every way a generated conversation can be wrong has its own reason."""

import pytest

from dataengine.llm.validate import InvalidConversation, Limits, validate_conversation


def _conv(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def test_valid_conversation_is_normalised():
    out = validate_conversation(_conv("  How many circles are there?\n<image> ", "There are two red circles.",
                                      "Where is the star?", "It is at the top left."))
    assert out[0] == {"from": "human", "value": "<image>\nHow many circles are there?"}
    assert [t["from"] for t in out] == ["human", "gpt", "human", "gpt"]
    assert out[1]["value"] == "There are two red circles."


@pytest.mark.parametrize("turns,reason", [
    ([], "empty"),
    (_conv("<image> hi"), "roles"),
    ([{"from": "gpt", "value": "<image> hi"}, {"from": "human", "value": "x"}], "roles"),
    (_conv("<image> What?", "   "), "empty_turn"),
    (_conv("<image>", "A circle."), "empty_turn"),
    (_conv("What is it?", "A circle."), "image_token"),
    (_conv("<image> What is <image> it?", "A circle."), "image_token"),
    (_conv("<image> What?", "A circle.", "<image> And?", "A star."), "image_token"),
    (_conv("<image> What?", "x" * 2001), "too_long"),
    (_conv("<image> Describe it.", "According to the caption, a red circle."), "leak_caption"),
    (_conv("<image> Where is it?", "Its bounding box is on the left."), "leak_box"),
    (_conv("<image> Where is it?", "The circle is at [0.12, 0.30, 0.45, 0.66]."), "leak_coordinates"),
    ([{"from": "human", "value": "<image> x", "extra": 1}, {"from": "gpt", "value": "y"}], "format"),
])
def test_each_failure_has_its_reason(turns, reason):
    with pytest.raises(InvalidConversation) as e:
        validate_conversation(turns)
    assert e.value.reason == reason and e.value.reject_reason == f"llm_invalid:{reason}"


def test_limits_are_configurable():
    long = _conv("<image> Q?", "A" * 50, "Q2?", "B" * 50)
    assert validate_conversation(long, Limits(max_turn_chars=60))
    with pytest.raises(InvalidConversation, match="too_long"):
        validate_conversation(long, Limits(max_total_chars=80))
    with pytest.raises(InvalidConversation, match="too_many_turns"):
        validate_conversation(long, Limits(max_turns=2))


def test_words_that_only_look_like_leaks_pass():
    out = validate_conversation(_conv("<image> What shape is on the box?", "A small box-shaped square, 0.5 m wide."))
    assert out[1]["value"].startswith("A small box")
