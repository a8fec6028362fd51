"""What the judge is asked, and how its answer is read.

Two wordings: this project's own, and the original's, read at run time from the user's copy of its `rule.json`
(`--rules`), composed as the original's review scripts compose it: `[Context]`, `[Question]`, `[{role} 1]` ...
`[End of {role} 1]`, `[{role} 2]` ... `[End of {role} 2]`, `[System]` and the rule's prompt. No text of the original
is kept here. Which rule: the original reviews COCO questions (captions and boxes) with the rules keyed by the bare
category (`conv`, `detail`, `complex`) and the in-the-wild set with `llava_bench_<category>`; each context kind tries
its own key first, then the other."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .bench_files import CAPS_BOXES, CATEGORIES

JUDGE_SYSTEM = "You are a careful and impartial judge of answers to questions about images."
JUDGE_INSTRUCTIONS = (
    "Two AI assistants answered the question above, which a user asked while looking at an image. You cannot see the "
    "image; the context above describes it. Rate how helpful, relevant, accurate and detailed each answer is, as one "
    "overall score from 1 to 10 per assistant, higher being better.\n"
    "On the first line write only the two scores, Assistant 1's and then Assistant 2's, separated by a space. From the "
    "second line on, explain your rating. Judge the content alone: the order in which the answers appear must not "
    "matter.")
SCORE_LINE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[,;/ ]\s*(\d+(?:\.\d+)?)\s*$")


class JudgeParseError(ValueError):
    pass


def parse_scores(text: str) -> tuple[float, float]:
    """The two scores on the judgement's first non-empty line, each within 1-10."""
    first = next((line for line in (text or "").splitlines() if line.strip()), "")
    match = SCORE_LINE.match(first.replace("**", ""))
    if not match:
        raise JudgeParseError(f"the first line is not two scores: {first[:80]!r}")
    scores = float(match.group(1)), float(match.group(2))
    if not all(1 <= score <= 10 for score in scores):
        raise JudgeParseError(f"scores outside 1-10: {scores}")
    return scores


@dataclass(frozen=True)
class Rule:
    key: str
    role: str
    prompt: str


def load_rules(path: Path) -> dict[str, Rule]:
    """The original's rule.json: {key: {"role", "prompt"}}; every LLaVA-Bench category must have a rule."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the rules file ({error})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object of rules keyed by category")
    rules = {}
    for key, rule in raw.items():
        if not (isinstance(rule, dict) and isinstance(rule.get("role"), str) and isinstance(rule.get("prompt"), str)):
            raise ValueError(f"{path}: rule {key!r} must be {{'role': str, 'prompt': str}}")
        rules[key] = Rule(key, rule["role"], rule["prompt"])
    missing = [category for category in CATEGORIES if f"llava_bench_{category}" not in rules and category not in rules]
    if missing:
        raise ValueError(f"{path}: no rule for {', '.join('llava_bench_' + c for c in missing)} (keys: {', '.join(rules)})")
    return rules


def rule_for(rules: dict[str, Rule], category: str, context_kind: str) -> Rule:
    keys = (category, f"llava_bench_{category}") if context_kind == CAPS_BOXES else (f"llava_bench_{category}", category)
    return next(rules[key] for key in keys if key in rules)


class Wording:
    """Builds the judge's messages for one comparison; `rules` None: this project's own wording."""

    def __init__(self, rules: dict[str, Rule] | None = None, system: str | None = None):
        self.rules, self.system = rules, system or JUDGE_SYSTEM

    def messages(self, category: str, context_kind: str, context: str, question: str, first: str, second: str) -> list[dict]:
        if self.rules is None:
            content = (f"[Context]\n{context}\n\n[Question]\n{question}\n\n[Assistant 1]\n{first}\n[End of Assistant 1]\n\n"
                       f"[Assistant 2]\n{second}\n[End of Assistant 2]\n\n[Instructions]\n{JUDGE_INSTRUCTIONS}")
        else:
            rule = rule_for(self.rules, category, context_kind)
            role = rule.role
            content = (f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
                       f"[{role} 1]\n{first}\n\n[End of {role} 1]\n\n[{role} 2]\n{second}\n\n[End of {role} 2]\n\n"
                       f"[System]\n{rule.prompt}\n\n")
        return [{"role": "system", "content": self.system}, {"role": "user", "content": content}]

    def describe(self) -> str:
        return "the rules file's prompts, composed as the original's review script" if self.rules else "this project's own wording"
