"""Structured outputs: an answer held to a JSON schema, to any JSON object, to a regular expression, to one of a list
of strings, or to an EBNF grammar, as OpenAI's `response_format` and vLLM's `structured_outputs` ask.

At each step, before the draw, every token the grammar cannot take next is ruled out (its score set to -inf, after
the sequence's own penalties, so a logit_bias cannot bring one back); after the draw, the grammar moves on by the
token drawn. When the grammar is complete, only the end tokens are left, and the answer ends ("stop"). The grammars,
their token masks and the matchers are xgrammar's (vLLM's and SGLang's default backend): a grammar is compiled once
per spec against the tokenizer and kept (KEPT_GRAMMARS), each answer has a matcher of its own, and the masks of a
batch's constrained rows are applied in one call.

Where: a spec is checked in the process that reads the request (`check_size` as it is read; `check`, a grammar
built without the tokenizer, in a worker thread), so that a wrong one is a 400 naming its field; compiled against
the tokenizer and walked by the engine (`Grammars`, in the request's thread, not the scheduler's); matched on the
scheduler's thread (`rule_out`, `Constraint`)."""

import functools
import json
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Collection
from typing import NamedTuple

import torch

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "structural_tag")
# characters of one spec (a schema as JSON text, a regular expression, an EBNF grammar, the choices as JSON): a
# grammar's compilation grows with it, and it runs before the request's answer can begin
MAX_SPEC_CHARS = 64_000
MAX_CHOICES = 1_024
# nesting of a schema's objects and arrays: xgrammar's conversion grows faster than the depth (64 levels took 31 ms,
# 300 levels of a 28 KB schema 4.5 s, and 8.9 s more to compile against a 32k vocabulary); generated schemas
# (pydantic's, with $defs) are a few levels deep
MAX_SCHEMA_DEPTH = 32
# Compiled grammars kept per engine, the least recently used let go past this. Not xgrammar's own cache: its byte
# limit counted 190 MB where the engine had grown by 1.7 GB, 2 MB per distinct schema a client sent.
KEPT_GRAMMARS = 32
# The mask of one token is computed on the scheduler's thread, where the whole batch waits for it: usually tens of
# microseconds, but nested bounded repetitions (a 21-character regex) took seconds per token and stalled every
# stream for minutes. A grammar is walked for PROBE_TOKENS tokens in the request's thread first and refused if one
# mask takes more than PROBE_BUDGET; an answer whose mask takes more than STEP_BUDGET later, or whose masks add up
# to more than ANSWER_BUDGET (2,000 tokens at 1 ms each, ten times a 150k vocabulary's usual), ends with an error;
# when a step's masks take more than STEP_BUDGET together (n choices of one spec, each under its own budget), the
# costliest answers end.
# (the thread's CPU time, not the clock's: a thread that waited for a core on a loaded machine spent nothing)
PROBE_TOKENS = 32
PROBE_BUDGET = 0.02
STEP_BUDGET = 0.05
ANSWER_BUDGET = 2.0


class Structure(NamedTuple):
    """What an answer is held to: `kind` one of KINDS; `spec` the schema as JSON text (json_schema), nothing
    (json_object: any JSON object), the regular expression (regex), the choices as a JSON list of strings
    (choice), the EBNF grammar, whose rule `root` is the answer (grammar), or a structural tag as JSON text
    (structural_tag: xgrammar's `{"type": "structural_tag", "format": ...}`, or vLLM's earlier `{"structures":
    [{"begin", "schema", "end"}], "triggers"}`, see `tag_format`). `any_whitespace`: JSON may have any whitespace
    between its tokens (vLLM's default); without, it is laid out as json.dumps lays it out."""
    kind: str
    spec: str = ""
    any_whitespace: bool = True


class StructureError(ValueError):
    """A spec that gives no grammar; the message says what is wrong with it."""


def _xgrammar():
    try:
        import xgrammar
    except ImportError as error:  # a platform without its wheel: everything else works
        raise StructureError(f"structured outputs need the xgrammar package, which is not installed here ({error})") from None
    return xgrammar


def _reason(error: RuntimeError) -> str:
    """xgrammar's message without the C++ file and time it starts with ("[21:05:40] /project/cpp/x.cc:94: ...")."""
    text = str(error).strip()
    head, _, rest = text.partition(": ")
    text = rest.strip() if head.startswith("[") and ".cc:" in head else text
    return text if len(text) <= 300 else text[:300] + " ..."  # some end by quoting the whole spec


def _choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar whose answers are exactly the choices: each a sequence of string literals, quotes and
    backslashes escaped, a control character a literal of its own (xgrammar's \\x reads every hex digit that follows:
    "1\\x0a2" was the text "1¢")."""
    def literal(text: str) -> str:
        parts, run = [], ""
        for char in text:
            if ord(char) < 0x20 or char == "\x7f":
                parts += [f'"{run}"'] if run else []
                parts.append(f'"\\x{ord(char):02x}"')
                run = ""
            else:
                run += "\\" + char if char in '"\\' else char
        parts += [f'"{run}"'] if run or not parts else []
        return "(" + " ".join(parts) + ")"
    return "root ::= " + " | ".join(literal(choice) for choice in choices)


def _schema(structure: Structure):
    """The JSON schema of a json_schema or json_object structure, and whether it is strict (xgrammar's strict mode:
    no properties or items beyond those a schema names, as OpenAI's strict schemas; any object takes any)."""
    if structure.kind == "json_object":
        return {"type": "object"}, False
    return structure.spec, True


def check_size(structure: Structure):
    """StructureError if the spec is too large or too deep to compile at a bounded cost (a millisecond at most, so
    on the event loop, as the request is read)."""
    if structure.kind not in KINDS:
        raise StructureError(f"unknown structure {structure.kind!r}; one of {', '.join(KINDS)}")
    if len(structure.spec) > MAX_SPEC_CHARS:
        raise StructureError(f"the {structure.kind.replace('_', ' ')} is {len(structure.spec):,} characters; at most {MAX_SPEC_CHARS:,}")
    if structure.kind == "structural_tag":
        for schema in _tag_schemas(tag_format(structure.spec)):
            _check_schema(schema)
    if structure.kind == "json_schema":
        try:
            schema = json.loads(structure.spec)
        except ValueError:
            return  # xgrammar says what is wrong with it (check)
        except RecursionError:
            schema = None  # deeper than Python's parser goes
        _check_schema(schema)


def _check_schema(schema):
    if schema is None or _depth(schema) > MAX_SCHEMA_DEPTH:
        raise StructureError(f"the json schema nests objects and arrays more than {MAX_SCHEMA_DEPTH} deep")
    if found := _unheld(schema):
        raise StructureError(f"the json schema {found}, which its grammar cannot hold (an answer could break it and "
                             "still end as complete); leave it out")


def tag_format(spec: str) -> dict:
    """A structural tag's spec in xgrammar's form: as given, or vLLM's earlier form (`structures`, each a `begin`,
    `schema` and `end`, and `triggers`: free text until a trigger, then one of the structures that begins with it)
    in the form xgrammar gives the same meaning (triggered tags); StructureError for neither."""
    try:
        given = json.loads(spec)
    except (ValueError, RecursionError):
        raise StructureError("the structural tag is not a JSON object") from None
    if not isinstance(given, dict):
        raise StructureError("the structural tag is not a JSON object")
    if "format" in given:
        if _depth(given["format"]) > MAX_SCHEMA_DEPTH * 2:  # tags nest, and each may hold a schema
            raise StructureError(f"the structural tag nests more than {MAX_SCHEMA_DEPTH * 2} deep")
        return {"type": "structural_tag", "format": given["format"]}
    structures, triggers = given.get("structures"), given.get("triggers")
    if not isinstance(structures, list) or not isinstance(triggers, list) or not all(isinstance(item, dict) for item in structures):
        raise StructureError('the structural tag has neither a "format" nor "structures" (each {"begin", "schema", '
                             '"end"}) and "triggers"')
    tags = [{"type": "tag", "begin": item.get("begin"), "end": item.get("end"),
             "content": {"type": "json_schema", "json_schema": item.get("schema", {})}} for item in structures]
    return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": triggers, "tags": tags}}


def _tag_schemas(value) -> list:
    """The JSON schemas a structural tag's format holds (each checked as a json_schema is)."""
    found, level = [], [value]
    while level:
        item = level.pop()
        if isinstance(item, dict):
            if item.get("type") == "json_schema" and "json_schema" in item:
                found.append(item["json_schema"])
            level += [inner for key, inner in item.items() if key != "json_schema"]
        elif isinstance(item, list):
            level += item
    return found


# What xgrammar's grammar of a schema leaves out, so that an answer breaking it still ends with "stop" (each tried:
# `uniqueItems` let [0, 0] through, `if`/`then` and `not` were ignored, an allOf of a string and an integer took null).
# Refused, as vLLM refuses what its xgrammar backend cannot hold.
UNHELD_KEYWORDS = ("if", "then", "else", "not", "uniqueItems", "contains", "minContains", "maxContains", "dependentRequired",
                   "dependentSchemas", "dependencies", "unevaluatedProperties", "unevaluatedItems")
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames", "additionalItems")


def _unheld(schema, where: str = "") -> str | None:
    """What in `schema` its grammar would not hold, and where ("uses uniqueItems at properties.tags"), or None.
    Only schema positions are looked at: a property named "not" is a name, an enum's values are data."""
    if not isinstance(schema, dict):
        return None
    at = f" at {where}" if where else ""
    for keyword in UNHELD_KEYWORDS:
        if keyword in schema:
            return f"uses {keyword}{at}"
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        return f"uses allOf of {len(schema['allOf'])} schemas{at}"
    if isinstance(ref := schema.get("$ref"), str) and not ref.startswith("#"):
        return f"refers to another document ({ref[:80]}){at}"
    named = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    if isinstance(required := schema.get("required"), list) and (missing := [name for name in required if name not in named]):
        return f"requires {str(missing[0])[:80]!r}, which its properties do not name{at}"
    inner = [(f"{key}.{name}", value) for key in SUBSCHEMA_MAPS if isinstance(schema.get(key), dict)
             for name, value in schema[key].items()]
    inner += [(f"{key}.{index}", value) for key in SUBSCHEMA_LISTS if isinstance(schema.get(key), list)
              for index, value in enumerate(schema[key])]
    inner += [(key, schema[key]) for key in SUBSCHEMAS if isinstance(schema.get(key), dict)]
    for path, value in inner:
        if found := _unheld(value, f"{where}.{path}" if where else path):
            return found
    return None


def _depth(value) -> int:
    """How deep `value`'s objects and arrays nest (a scalar: 0)."""
    deepest, level = 0, [(value, 1)]
    while level:
        item, depth = level.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            level += [(inner, depth + 1) for inner in (item.values() if isinstance(item, dict) else item)]
    return deepest


def check(structure: Structure):
    """StructureError if the spec gives no grammar (too large, a schema xgrammar cannot follow, a regular expression
    or a grammar that does not parse, no choices). No tokenizer is involved: usually well under a millisecond, but
    a few of the largest specs allowed take a second or more, so not on an event loop. A spec that passed is kept
    (the same spec again costs nothing)."""
    check_size(structure)
    _parses(structure)


@functools.lru_cache(maxsize=128)
def _parses(structure: Structure):
    grammar = _xgrammar().Grammar
    _built(structure, grammar.from_json_schema, grammar.from_regex, grammar.from_ebnf, grammar.from_structural_tag)


def _built(structure: Structure, from_schema, from_regex, from_ebnf, from_tag):
    """The structure's grammar, made by the makers of its kind (xgrammar's Grammar without a tokenizer, or a
    compiler's against one); StructureError if the spec gives none."""
    try:
        if structure.kind in ("json_schema", "json_object"):
            schema, strict = _schema(structure)
            return from_schema(schema, any_whitespace=structure.any_whitespace, strict_mode=strict)
        if structure.kind == "regex":
            return from_regex(structure.spec)
        if structure.kind == "structural_tag":
            return from_tag(json.dumps(tag_format(structure.spec)))
        return from_ebnf(_choice_ebnf(choices(structure)) if structure.kind == "choice" else structure.spec)
    except RuntimeError as error:
        raise StructureError(f"the {structure.kind.replace('_', ' ')} gives no grammar: {_reason(error)}") from None


def choices(structure: Structure) -> list[str]:
    found = json.loads(structure.spec)
    if not isinstance(found, list) or not found or not all(isinstance(choice, str) for choice in found):
        raise StructureError("the choices are a list of at least one string")
    if len(found) > MAX_CHOICES:
        raise StructureError(f"{len(found):,} choices; at most {MAX_CHOICES:,}")
    if "" in found:
        raise StructureError("a choice is an empty string (an answer of no tokens)")
    return found


class Constraint:
    """One answer's place in its grammar (an xgrammar GrammarMatcher), used on the scheduler's thread only."""

    def __init__(self, matcher, on_slow=None):
        self._matcher, self._on_slow = matcher, on_slow  # on_slow(why): its grammars refuse its spec from then on
        self.spent = 0.0  # seconds in its masks so far
        self.slow: str | None = None  # why its masks cost too much: the answer ends (Sequence.emit)

    def fill(self, bitmask: torch.Tensor, row: int) -> float:
        """Writes the tokens it may take next into row `row` of a batch's bitmask; the CPU seconds that took."""
        start = time.thread_time()
        self._matcher.fill_next_token_bitmask(bitmask, row)
        spent = time.thread_time() - start
        self.spent += spent
        if spent > STEP_BUDGET:
            self.stop(f"took {spent * 1e3:.0f} ms for one token's allowed tokens; at most {STEP_BUDGET * 1e3:.0f} ms")
        elif self.spent > ANSWER_BUDGET:
            self.stop(f"took {self.spent:.1f} s for this answer's allowed tokens; at most {ANSWER_BUDGET:g} s")
        return spent

    def stop(self, why: str):
        """Ends its answer (at its next draw) for `why`; its spec is refused from then on."""
        if self.slow is None:
            self.slow = why
            if self._on_slow is not None:
                self._on_slow(why)
                self._on_slow = None

    def accept(self, token: int) -> bool:
        """Moves on by `token`; False if the grammar cannot take it (its mask ruled it out: never, but for a bug)."""
        return self._matcher.accept_token(token)

    @property
    def complete(self) -> bool:
        """Whether it has taken an end token: nothing may follow."""
        return self._matcher.is_terminated()


def rule_out(logits: torch.Tensor, constraints: list[Constraint | None]):
    """Sets to -inf, in each row of `logits` (B, V) that has a Constraint, every token it may not take next. (A row
    may be left with no token at all, if its grammar's were ruled out before: suppressed, or blocked; its caller
    finds that row by its argmax's -inf, which costs less than looking at the whole row.)"""
    rows = [row for row, constraint in enumerate(constraints) if constraint is not None]
    if not rows:
        return
    xgrammar = _xgrammar()
    bitmask = xgrammar.allocate_token_bitmask(logits.shape[0], logits.shape[-1])
    spent = {row: constraints[row].fill(bitmask, row) for row in rows}
    # the step's masks together: n choices of one spec under each answer's budget still made the batch wait for all
    if (total := sum(spent.values())) > STEP_BUDGET:
        for row in sorted(rows, key=spent.get, reverse=True):  # the costliest end, until the rest are well within it
            constraints[row].stop(f"took {spent[row] * 1e3:.1f} ms of a step whose masks took {total * 1e3:.0f} ms together; "
                                  f"at most {STEP_BUDGET * 1e3:.0f} ms a step")
            if (total := total - spent[row]) <= STEP_BUDGET / 2:
                break
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=logits.shape[-1], indices=rows)


class Grammars:
    """The grammars of one model's tokenizer: `constraint` compiles a Structure (kept: the same spec again costs
    nothing) and starts a matcher over it. Its tokens are the model's `vocabulary` (the width of its scores, which
    may be more than the tokenizer's), its end tokens `stop_ids`."""

    def __init__(self, tokenizer, vocabulary: int, stop_ids: Collection[int]):
        self._tokenizer, self._vocabulary, self._stop_ids = tokenizer, vocabulary, sorted(stop_ids)
        self._compiler = None
        self._kept: OrderedDict[Structure, object] = OrderedDict()  # compiled grammars that passed the probe
        self._refused: OrderedDict[Structure, str] = OrderedDict()  # specs an answer found too slow, and why
        self._lock = threading.Lock()  # over the compiler's making and what is kept

    def _token_info(self, xgrammar):
        """The vocabulary as xgrammar sees it: each token's bytes, and none for the special tokens, which are never
        text (xgrammar reads a token of no bytes as special). Its own reading of a tokenizer missed them for
        transformers 5's tokenizers: `<s>` and `</s>` matched the text "<s>" in a grammar, and the reader saw nothing
        (or the end token ended a string)."""
        info = xgrammar.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocabulary, stop_token_ids=self._stop_ids)
        special = set(self._tokenizer.all_special_ids) | {token for token, added in self._tokenizer.added_tokens_decoder.items()
                                                          if added.special} | set(self._stop_ids)
        vocabulary = [b"" if token in special else text for token, text in enumerate(info.decoded_vocab)]
        return xgrammar.TokenizerInfo(vocabulary, xgrammar.VocabType.RAW, vocab_size=self._vocabulary, stop_token_ids=self._stop_ids,
                                      add_prefix_space=info.add_prefix_space)

    def _compiled(self, structure: Structure):
        xgrammar = _xgrammar()
        with self._lock:
            if self._compiler is None:
                self._compiler = xgrammar.GrammarCompiler(self._token_info(xgrammar), max_threads=1, cache_enabled=False)
        compiler = self._compiler
        return _built(structure, compiler.compile_json_schema, compiler.compile_regex, compiler.compile_grammar,
                      compiler.compile_structural_tag)

    def constraint(self, structure: Structure) -> Constraint:
        """A matcher at the start of the structure's grammar; StructureError if the spec gives none, or one that
        allows no answer or costs too much per token (see PROBE_BUDGET)."""
        with self._lock:
            compiled, refused = self._kept.get(structure), self._refused.get(structure)
            if compiled is not None:
                self._kept.move_to_end(structure)
        if refused is not None:  # the same spec again: its grammar is known to stall the batch
            raise StructureError(f"the {structure.kind.replace('_', ' ')}'s grammar {refused}")
        if compiled is None:
            check_size(structure)  # the compiler's parse is `check`'s, against the tokenizer: no parse of its own first
            compiled = self._compiled(structure)
            self._probe(compiled, structure)
            with self._lock:
                self._kept[structure] = compiled
                while len(self._kept) > KEPT_GRAMMARS:
                    self._kept.popitem(last=False)
        return Constraint(_xgrammar().GrammarMatcher(compiled), on_slow=lambda why: self._refuse(structure, why))

    def _refuse(self, structure: Structure, why: str):
        with self._lock:
            self._kept.pop(structure, None)
            self._refused[structure] = why
            while len(self._refused) > KEPT_GRAMMARS:
                self._refused.popitem(last=False)

    def _probe(self, compiled, structure: Structure):
        """Walks the grammar twice for up to PROBE_TOKENS tokens, each of those it allows but the end tokens: the
        lowest id (a byte tokenizer's single characters: the walk that found nested repetitions' slow states, whose
        masks grew to 7-48 s by the 31st token, which a random walk never reached), then one drawn at random (a
        fixed seed). StructureError if it allows no token at the start, or if a mask takes over PROBE_BUDGET (the
        growth is gradual: the walk stops at the first mask over it)."""
        xgrammar = _xgrammar()
        bitmask = xgrammar.allocate_token_bitmask(1, self._vocabulary)
        bits, stops = torch.arange(32, dtype=torch.int32), set(self._stop_ids)
        name = structure.kind.replace("_", " ")
        grammar = "grammar" if structure.kind == "grammar" else f"{name}'s grammar"
        for pick in (min, random.Random(0).choice):
            matcher = xgrammar.GrammarMatcher(compiled)
            for step in range(PROBE_TOKENS):
                start = time.thread_time()
                matcher.fill_next_token_bitmask(bitmask)
                if (spent := time.thread_time() - start) > PROBE_BUDGET:
                    raise StructureError(f"the {grammar} took {spent * 1e3:.0f} ms to find the tokens allowed after {step} "
                                         f"tokens; at most {PROBE_BUDGET * 1e3:.0f} ms per token (nested repetitions cost the most)")
                allowed = ((bitmask[0][:, None] >> bits) & 1).flatten()[: self._vocabulary].nonzero()[:, 0].tolist()
                if not allowed and step == 0:
                    raise StructureError(f"the {name} allows no answer (its grammar matches no finite text)")
                if not (going := [token for token in allowed if token not in stops]):
                    break  # complete (or only the end left)
                matcher.accept_token(pick(going))
