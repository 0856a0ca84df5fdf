"""Prompt rendering: the Jinja templates in `prompts/` turned into (system, user) text, with untrusted text escaped.

A variant is one file `prompts/<name>.j2` (files starting with ``_`` hold shared macros and are not variants). Each
variant imports `_macros.j2` and defines two macros, ``system()`` and ``user()``; `PromptLibrary.render` calls both
and returns their text, which the backend then wraps in the model's own chat template. Text outside the two macros
is ignored, so a variant file reads top to bottom as "system part, then user part".

Two guarantees the templates rely on:

- Strict Jinja (`StrictUndefined`): a variable the data does not provide is an error, never an empty string.
- Untrusted text cannot be printed raw. Every string of the `PromptInput` (titles, categories, brands, evidence,
  history actions, query, cart) reaches the template wrapped in `Untrusted`, which refuses to become a string
  until it passes through the ``untrusted`` filter (`sanitize`). Autoescape stays off: there is no HTML here, and
  the filter is the escaping. Only the candidate labels, validated here, and numbers are handed over as they are.

The output contract (the constrained decoder enforces it, fine-tuning targets use it): exactly K lines
``1. (C) <one-sentence reason>`` in rank order. `assistant_prefix`, `format_answer` and `ANSWER_LINE` pin it in one
place. The system text shows it as ``1. (<label>) ...``, not with a real letter: an example letter right before the
answer would prime that label in one-pass scoring.

For the caller: the "per category" rules are stated in words only, so pass `CandidateView.category` cut to the
constraint's level (`generator.constraints.category_at_level`); that is also ~5 tokens a line cheaper than a full path.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from pydantic import BaseModel, ConfigDict, Field

from generator.types import PromptInput

DEFAULT_DIRECTORY = Path(__file__).resolve().parent.parent / "prompts"

# Character budgets for untrusted fields. Prompt length is prefill time and LoRA sequence length for a 135M model:
# 20 candidates and 10 history items should stay near 700-1000 tokens. LlamaRec cut titles to 32 tokens; 80
# characters is ~15-20 SmolLM2 tokens.
LIMITS: dict[str, int] = {
    "title": 80,
    "category": 60,
    "brand": 30,
    "evidence": 60,
    "query": 200,
    "action": 20,
    "reason": 160,
}

_LABEL_ALPHABET = string.ascii_uppercase + string.ascii_lowercase  # one token each in common BPE vocabularies
MAX_LABELS = len(_LABEL_ALPHABET)

# One answer line of the output contract: "1. (C) Matches the trail shoes bought last."
ANSWER_LINE = re.compile(r"^(?P<rank>[1-9][0-9]*)\. \((?P<label>[A-Za-z])\) (?P<reason>\S.*)$")


class RenderedPrompt(BaseModel):
    """A rendered prompt: the two chat parts plus what an experiment record needs to tell variants apart."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    system: str = Field(description="System text: stable across requests (role, task, output format, rules).")
    user: str = Field(description="User text: a stable heading, then history, request, constraint, candidates.")
    variant: str = Field(description="Template variant that produced it (file name without .j2).")
    template_hash: str = Field(description="sha256 of the variant's source and the shared `_*.j2` files.")


# --------------------------------------------------------------------------------------------------------------
# Escaping untrusted text
# --------------------------------------------------------------------------------------------------------------

# Chat-control sequences, any model family. A tokenizer turns these strings into special-token IDs (HF tokenizers do
# by default), so a title containing one could end the user turn and open a fake system turn. Each is replaced by a
# space, repeatedly, because deleting one can join its neighbours into another ("<|im_<|x|>start|>").
_CONTROL_SEQUENCES = (
    # ChatML (Qwen, SmolLM), Llama-3, Phi, GPT-OSS, DeepSeek (its fullwidth bars become "|" under NFKC): <|...|>
    re.compile(r"<\|[^<>|]{0,64}\|>"),
    # Llama-2 system markers, before the generic tag rule would leave "<>" behind.
    re.compile(r"<</?SYS>>", re.IGNORECASE),
    # Bare tags with no spaces: <s>, </s>, <unk>, <pad>, <bos>, <eos>, Gemma's <start_of_turn>, <think>, stray HTML.
    re.compile(r"</?[A-Za-z][\w.:-]{0,40}/?>"),
    # Mistral / Llama-2 bracket tokens: [INST], [/INST], [SYSTEM_PROMPT], [TOOL_CALLS], ... (also drops "[NEW]").
    re.compile(r"\[/?[A-Z][A-Z_]{1,31}\]"),
)
# "(A)": the label syntax of candidate lines and answers. Inside data it is unwrapped to "A", so the only "(X)" a
# model sees are the real labels, and one-pass scoring reads the logits after "(" with no decoys in the prompt.
_LABEL_LIKE = re.compile(r"\(\s*([A-Za-z])\s*\)")
# A leading enumerator "1." / "2)": with the label above it is how an answer line starts ("1. (A) fake").
_LEADING_ENUMERATOR = re.compile(r"^\d{1,3}\s*[.)]\s+")
_SPACES = re.compile(r" {2,}")
_ELLIPSIS = "…"


def sanitize(text: str, max_chars: int) -> str:
    """Make untrusted text safe to place inside one line of a prompt, at most `max_chars` characters long.

    The rules, in order, each with its reason:

    1. NFKC-normalise: fullwidth and compatibility look-alikes (``＜｜im_start｜＞``) become their plain forms, so the
       rules below see what a tokenizer will effectively see. "…" is kept (NFKC would make it "..."): it is our own
       truncation mark, and keeping it makes sanitising idempotent.
    2. Delete invisible format characters (Unicode Cf: zero-width spaces and joiners, bidi overrides and isolates,
       BOM, soft hyphen) plus private-use, surrogate and unassigned code points: they hide control sequences from
       pattern matching (``<|im_<ZWSP>start|>``) and can reorder what a human reviewer sees.
    3. Turn every newline, tab, other control character and Unicode line/paragraph separator into a space: a value
       can never start a new line, so it cannot fake an answer line ("1. (A) ...") or a "System:" line.
    4. Remove chat-control sequences of every common model family (see `_CONTROL_SEQUENCES`) until none is left.
    5. Unwrap label-like "(A)" to "A" and drop a leading enumerator "1.": data never looks like a label or an
       answer line.
    6. Replace "|" by "/": "|" separates the fields of a candidate line, so a title cannot add fake fields (this
       also breaks any leftover "<|" or "|>").
    7. Collapse runs of spaces, strip, and cut to `max_chars` (at a word boundary when one is near), ending in "…".
    """
    if max_chars < 1:
        raise ValueError(f"`max_chars` must be at least 1, got {max_chars}.")
    text = _ELLIPSIS.join(unicodedata.normalize("NFKC", part) for part in text.split(_ELLIPSIS))
    text = "".join(_clean_char(ch) for ch in text)
    previous = None
    while previous != text:
        previous = text
        for pattern in _CONTROL_SEQUENCES:
            text = pattern.sub(" ", text)
    text = _LABEL_LIKE.sub(r"\1", text)
    text = _SPACES.sub(" ", text).strip()
    text = _LEADING_ENUMERATOR.sub("", text)
    text = text.replace("|", "/")
    text = _SPACES.sub(" ", text).strip()
    return _truncate(text, max_chars)


def _clean_char(ch: str) -> str:
    category = unicodedata.category(ch)
    if category in ("Cf", "Co", "Cs", "Cn"):
        return ""
    if category in ("Cc", "Zl", "Zp") or ch.isspace():
        return " "
    return ch


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars - 1]
    space = cut.rfind(" ")
    if space >= max_chars // 2:  # a word boundary in the second half: cut there rather than mid-word
        cut = cut[:space]
    return cut.rstrip(" ,;:/-") + _ELLIPSIS


class Untrusted:
    """A string from outside (catalog, shopper) that a template may print only through the ``untrusted`` filter.

    Not a `str` on purpose: ``{{ c.title }}``, ``~`` concatenation and ``|join`` all call `str()`, which raises, so
    a template that forgets the filter fails in the first test instead of shipping an injectable prompt.
    """

    __slots__ = ("raw",)

    def __init__(self, raw: str) -> None:
        self.raw = raw

    def __bool__(self) -> bool:
        return bool(self.raw)

    def __str__(self) -> str:
        raise TypeError(
            f"untrusted text {self.raw[:40]!r} printed raw: pass it through the filter, e.g. "
            "`{{ value | untrusted(limits.title) }}`."
        )

    def __repr__(self) -> str:
        return f"Untrusted({self.raw!r})"


def _untrusted_filter(value: Untrusted | str, max_chars: int) -> str:
    if isinstance(value, Untrusted):
        return sanitize(value.raw, max_chars)
    if isinstance(value, str):
        return sanitize(value, max_chars)
    raise TypeError(f"the `untrusted` filter takes text, got {type(value).__name__} ({value!r}).")


def _wrap(value: Any) -> Any:
    """The template's view of the data: every string wrapped in `Untrusted`, containers as dicts and lists."""
    if isinstance(value, str):
        return Untrusted(value)
    if isinstance(value, dict):
        return {key: _wrap(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_wrap(item) for item in value]
    return value


# --------------------------------------------------------------------------------------------------------------
# Labels and the output contract
# --------------------------------------------------------------------------------------------------------------


def labels(n: int) -> list[str]:
    """The first `n` candidate labels: A..Z, then a..z (each a single token for common tokenizers; 52 at most)."""
    if n < 0:
        raise ValueError(f"the number of labels must be >= 0, got {n}.")
    if n > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} candidates can be labelled (A-Z, then a-z), got {n}.")
    return list(_LABEL_ALPHABET[:n])


def assistant_prefix(k: int) -> str:
    """The text the assistant turn starts with, "1. (": the next token is the label of the first pick.

    One-pass scoring appends it to the chat-templated prompt and reads the next-token logits of the labels; the
    generating path starts decoding after it. The same for every K (the first line is always "1."); K is taken so
    that callers state it and a bad K fails here.
    """
    if k < 1:
        raise ValueError(f"`k` must be at least 1, got {k}.")
    return "1. ("


def format_answer(picks: Sequence[tuple[str, str]]) -> str:
    """The answer text for ``(label, reason)`` pairs in rank order, e.g. a fine-tuning target.

    ``"1. (C) reason\\n2. (A) reason"``; reasons are sanitized to one line, so the result always parses with
    `ANSWER_LINE`, line by line.
    """
    lines = []
    for rank, (label, reason) in enumerate(picks, start=1):
        _check_label(label)
        text = sanitize(reason, LIMITS["reason"])
        if not text:
            raise ValueError(f"the reason for pick {rank} ({label}) is empty after sanitising: {reason!r}.")
        lines.append(f"{rank}. ({label}) {text}")
    return "\n".join(lines)


def _check_label(label: str) -> None:
    if len(label) != 1 or label not in _LABEL_ALPHABET:
        raise ValueError(f"a label must be one letter A-Z or a-z (see `labels`), got {label!r}.")


# --------------------------------------------------------------------------------------------------------------
# The library
# --------------------------------------------------------------------------------------------------------------


class PromptLibrary:
    """The prompt variants of one folder, loaded once: ``render(variant, data)`` gives the system and user text.

    The folder is read when the library is built, so the text rendered and the `template_hash` recorded always
    belong together; edit a template, build a new library.
    """

    def __init__(self, directory: str | Path | None = None, *, currency: str = "$") -> None:
        self.directory = Path(directory) if directory is not None else DEFAULT_DIRECTORY
        if not self.directory.is_dir():
            raise ValueError(f"prompt directory {self.directory} does not exist.")
        sources = {path.name: path.read_text(encoding="utf-8") for path in sorted(self.directory.glob("*.j2"))}
        self._variants = sorted(name[: -len(".j2")] for name in sources if not name.startswith("_"))
        if not self._variants:
            raise ValueError(f"no prompt variants (*.j2 files not starting with '_') in {self.directory}.")
        shared = "".join(_framed(name, text) for name, text in sources.items() if name.startswith("_"))
        self._hashes = {
            variant: hashlib.sha256((_framed(f"{variant}.j2", sources[f"{variant}.j2"]) + shared).encode()).hexdigest()
            for variant in self._variants
        }
        self._env = jinja2.Environment(
            loader=jinja2.DictLoader(sources),
            undefined=jinja2.StrictUndefined,  # a missing variable is an error, never an empty string
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            autoescape=False,  # plain text, not HTML: the `untrusted` filter is the escaping
        )
        self._env.filters["untrusted"] = _untrusted_filter
        self._env.filters["price"] = self._price
        self._env.globals["limits"] = dict(LIMITS)
        self._currency = currency
        for variant in self._variants:
            self._check_variant(variant, sources[f"{variant}.j2"])

    def variants(self) -> list[str]:
        """The variant names, sorted (the ``*.j2`` files of the folder, minus those starting with ``_``)."""
        return list(self._variants)

    def template_hash(self, variant: str) -> str:
        """sha256 (hex) of the variant's source plus every shared ``_*.j2`` file: the key of an A/B record."""
        self._require(variant)
        return self._hashes[variant]

    def render(self, variant: str, data: PromptInput) -> RenderedPrompt:
        """Render `variant` for one request. Raises ValueError for an unknown variant or inconsistent data."""
        self._require(variant)
        _check_input(data)
        view = _wrap(data.model_dump())
        for candidate in view["candidates"]:
            candidate["label"] = candidate["label"].raw  # validated by `_check_input`: safe to print as it is
        module: Any = self._env.get_template(f"{variant}.j2").make_module(view)  # exports system(), user()
        return RenderedPrompt(
            system=str(module.system()).strip(),  # the chat template adds its own separators around each part
            user=str(module.user()).strip(),
            variant=variant,
            template_hash=self._hashes[variant],
        )

    def _require(self, variant: str) -> None:
        if variant not in self._hashes:
            raise ValueError(
                f"unknown prompt variant {variant!r}; available: {', '.join(self._variants)} "
                f"(the *.j2 files in {self.directory})."
            )

    def _check_variant(self, variant: str, source: str) -> None:
        tree = self._env.parse(source, name=f"{variant}.j2")
        defined = {node.name for node in tree.body if isinstance(node, nodes.Macro)}
        missing = {"system", "user"} - defined
        if missing:
            raise ValueError(
                f"prompt variant {variant}.j2 must define the macros system() and user(); missing: "
                f"{', '.join(sorted(missing))}."
            )

    def _price(self, value: float) -> str:
        # Every digit is one token for SmolLM2-style vocabularies: "$89.99" costs 6 tokens, "$90" 3, and cents do
        # not change a ranking. Below 10 the cents still matter to the shopper ("$4.99" vs "$5").
        if value >= 10:
            return f"{self._currency}{math.floor(value + 0.5):d}"  # half up: $24.50 -> $25, not banker's $24
        return f"{self._currency}{value:.2f}"


def _framed(name: str, text: str) -> str:
    return f"{name}\0{len(text)}\0{text}\0"


def _check_input(data: PromptInput) -> None:
    """What the templates assume and the types alone do not guarantee."""
    seen: set[str] = set()
    for candidate in data.candidates:
        _check_label(candidate.label)
        if candidate.label in seen:
            raise ValueError(f"label {candidate.label!r} is used twice; give each candidate its own (see `labels`).")
        seen.add(candidate.label)
        if candidate.price is not None and not (math.isfinite(candidate.price) and candidate.price >= 0):
            raise ValueError(f"candidate ({candidate.label}) has price {candidate.price}; use None when unknown.")
    if data.k > len(data.candidates):
        raise ValueError(f"k={data.k} picks asked from only {len(data.candidates)} candidates.")
