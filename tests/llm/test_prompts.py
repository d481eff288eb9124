"""Replies read in the shapes models write: our JSON alone, fenced or in prose; LLaVA's "Question:/Answer:"
blocks; "User:/Assistant:" transcripts. Anything else is a recorded rejection, not a guess."""

from __future__ import annotations

import json

import pytest

from dataengine.llm.prompts import TURNS_SCHEMA, parse_reply
from dataengine.llm.validate import InvalidConversation
from dataengine.testbed.synthweb.llm_responder import STYLES, styled

REPLY = {"turns": [{"question": "What is in the picture?", "answer": "A red circle next to a blue square."},
                   {"question": "How many objects are there?", "answer": "Two."}]}
EXPECTED = [{"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "A red circle next to a blue square."},
            {"from": "human", "value": "How many objects are there?"}, {"from": "gpt", "value": "Two."}]


@pytest.mark.parametrize("style", STYLES)
def test_every_style_the_fake_model_writes_gives_the_same_turns(style):
    assert parse_reply(styled(REPLY, style)) == EXPECTED


@pytest.mark.parametrize("text", [
    f"Sure, here it is: {json.dumps(REPLY)} Let me know if you need more.",
    f"```\n{json.dumps(REPLY)}\n```",
    "**Question 1:** What is in the picture?\n**Answer 1:** A red circle next to a blue square.\n"
    "**Question 2:** How many objects are there?\n**Answer 2:** Two.",
    "Q: What is in the picture?\nA: A red circle next to a blue square.\n\nQ: How many objects are there?\nA: Two.",
    "Human: What is in the picture?\nGPT: A red circle next to a blue\nsquare.\nHuman: How many objects are there?\nGPT: Two.",
])
def test_the_shapes_models_write_unasked(text):
    turns = parse_reply(text)
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    assert turns[0]["value"] == "<image>\nWhat is in the picture?" and turns[3]["value"] == "Two."
    assert " ".join(turns[1]["value"].split()) == "A red circle next to a blue square."


@pytest.mark.parametrize(("text", "reason"), [
    ("Sure! Here is a conversation about the image.", "not_json"),
    ("PWNED", "not_json"),
    ("Answer: I cannot see any image.", "not_json"),  # an answer without a question is no turn
    ('{"turns": []}', "format"),
    ('{"questions": ["what?"]}', "format"),  # JSON, but not the turns asked for
    ("   ", "empty"),
])
def test_what_is_not_a_conversation_is_rejected_with_a_reason(text, reason):
    with pytest.raises(InvalidConversation) as raised:
        parse_reply(text)
    assert raised.value.reason == reason


def test_a_truncated_reply_is_rejected_even_when_it_parses():
    with pytest.raises(InvalidConversation) as raised:
        parse_reply(json.dumps(REPLY), finish_reason="length")
    assert raised.value.reason == "truncated"


def test_the_schema_describes_the_reply_format():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(REPLY, TURNS_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"turns": [{"question": "q"}]}, TURNS_SCHEMA)
