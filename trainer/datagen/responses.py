"""Drafter responses -> question/answer turns, with the checks that decide whether a response is usable."""

import re

SOURCE_WORDS = re.compile(r"\b(captions?|bounding box(es)?|coordinates?|annotations?)\b", re.IGNORECASE)
SEPARATOR = re.compile(r"^\s*===+\s*$", re.MULTILINE)


class ResponseError(ValueError):
    """A response that cannot be used; the message is the reason written to the rejects file."""


def parse_turns(text: str) -> list[tuple[str, str]]:
    """'Question:\\n...\\n===\\nAnswer:\\n...' blocks -> [(question, answer), ...]."""
    blocks = [block.strip() for block in SEPARATOR.split(text or "") if block.strip()]
    if not blocks:
        raise ResponseError("empty response")
    turns, question = [], None
    for block in blocks:
        head, _, body = block.partition(":")
        role, body = head.strip().lower(), body.strip()
        if role not in ("question", "answer") or not body:
            raise ResponseError(f"block does not start with 'Question:' or 'Answer:' and text: {block[:80]!r}")
        if (role == "question") != (question is None):
            raise ResponseError(f"questions and answers do not alternate at {block[:80]!r}")
        if role == "question":
            question = body
        else:
            turns.append((question, body))
            question = None
    if question is not None:
        raise ResponseError(f"the last question has no answer: {question[:80]!r}")
    return turns


def check_answers(answers: list[str]) -> None:
    for answer in answers:
        if match := SOURCE_WORDS.search(answer):
            raise ResponseError(f"an answer cites its source ({match.group(0)!r}): {answer[:80]!r}")


def parse_response(kind: str, text: str) -> list[tuple[str | None, str]]:
    """The turns of one record. `detail` has one turn whose question the caller draws (None here)."""
    if kind == "detail":
        description = (text or "").strip()
        if len(description.split()) < 5:
            raise ResponseError(f"description too short: {description!r}")
        turns = [(None, description)]
    else:
        turns = parse_turns(text)
        if kind == "complex" and len(turns) != 1:
            raise ResponseError(f"complex reasoning needs exactly one question and answer, got {len(turns)}")
    check_answers([answer for _, answer in turns])
    return turns
