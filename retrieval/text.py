"""Catalog text is data: the one place where untrusted product text is made safe to store, prompt and show.

Every `Item` runs its text fields through `clean_field` (retrieval/types.py validators), so every loader, the store
and any future HTTP endpoint get the same treatment. What it does, and why:

- **Control characters** go: C0/C1 controls, lone surrogates, bidi overrides and zero-width characters (they hide
  or reorder text a person reads, and a newline inside a title would break the prompt's one-line-per-item layout
  or end a reason early); tabs and line breaks become spaces, except that descriptions keep their line breaks.
- **Chat-template markers** (``<|im_end|>``, ``<|endoftext|>``, ``[INST]``, ``<<SYS>>``, SmolLM2's StarCoder-era
  ``<filename>``/``<file_sep>``/... and the like) are rewritten with look-alike brackets (``‹|im_end|›``,
  ``(INST)``): they read the same to a person but can no longer tokenise to a special token. This matters beyond
  the chat template (which also neutralises message contents): reason sentences quote titles and categories and
  are tokenised with ``tokenizer.encode``, which turns a special-token string IN THE TEXT into the special token
  even with ``add_special_tokens=False`` (checked with the real SmolLM2 tokenizer, tests/test_text_safety.py).
- **Tags stay text.** ``<img src=x onerror=...>`` is kept as the characters it is: shoprec's outputs are plain
  text (JSON strings, terminal lines printed without markup); whatever renders them as HTML must escape them
  (the evaluation report does; a web page must use text nodes or an auto-escaping template).
- **Length caps** per field (`CAPS`): a longer value is cut at a word boundary and RECORDED, never silently: the
  loaders report the cuts in their warnings (`collect_cuts`), and without a collector each cut is logged.

`clean_field` is idempotent (cleaning clean text changes nothing), so items read back from the store are
unchanged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Longest value kept per field, in characters. Set above what real catalogs use (Amazon Office 2014: longest
# title 427, brand 29, category level 39; description 99th percentile 7,416), so only outliers are cut.
CAPS: dict[str, int] = {
    "title": 500,
    "brand": 100,
    "category": 100,  # each level of the path
    "description": 10_000,
    "attribute key": 100,
    "attribute value": 1_000,
}

# Markers that chat templates and tokenizers treat as special. The generic `<|...|>` form covers ChatML
# (<|im_start|>, <|im_end|>), <|endoftext|>, Llama 3 (<|eot_id|>, <|start_header_id|>) and Phi; the named ones
# cover Llama 2/Mistral ([INST], <<SYS>>), sentencepiece (<s>, </s>), Gemma (<start_of_turn>) and the
# StarCoder-era tokens SmolLM2's tokenizer keeps (<filename>, <file_sep>, <jupyter_code>, ...).
_ANGLE_NAMES = (
    "s|/s|unk|pad|mask|bos|eos|sep|cls|start_of_turn|end_of_turn|think|/think|repo_name|reponame|file_sep|filename"
    "|gh_stars|issue_start|issue_comment|issue_closed|jupyter_start|jupyter_text|jupyter_code|jupyter_output"
    "|jupyter_script|empty_output|fim_prefix|fim_middle|fim_suffix|fim_pad"
)
_MARKER = re.compile(
    r"<\|[^|<>\n]{0,64}\|>"  # <|anything|>
    r"|<</?SYS>>"
    rf"|<(?:{_ANGLE_NAMES})>"
    r"|\[/?(?:INST|SYS|TOOL_CALLS|AVAILABLE_TOOLS|TOOL_RESULTS|SYSTEM_PROMPT)\]",
    re.IGNORECASE,
)
_LOOKALIKE = str.maketrans({"<": "‹", ">": "›", "[": "(", "]": ")"})

# Removed outright: lone surrogates (they cannot even be written as UTF-8), and characters that hide or reorder what
# a person reads: bidi embeddings/overrides/isolates, zero-width spaces and joiners, the word joiner, the BOM.
_INVISIBLE = re.compile(r"[\ud800-\udfff\u200b-\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff]")
# Become a space: C0/C1 control characters (tab included) other than the line break, and the Unicode line and
# paragraph separators (line breaks where they are kept).
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")
_LINE_BREAK = re.compile(r"\r\n|[\r\u2028\u2029\x0b\x0c\x85]")


def neutralise_markers(text: str) -> str:
    """'<|im_end|>' -> '‹|im_end|›', '[INST]' -> '(INST)': plain text that no tokenizer reads as a special token."""
    return _MARKER.sub(lambda m: m.group(0).translate(_LOOKALIKE), text)


def strip_controls(text: str, *, keep_newlines: bool = False) -> str:
    """Surrogates and invisible characters removed, every other control character a space, ends stripped; line
    breaks (any convention) become "\\n" with `keep_newlines`, else a space. Ordinary spaces are left as they are
    (collapsing them would change real titles for no safety gain)."""
    text = _INVISIBLE.sub("", text)
    text = _LINE_BREAK.sub("\n" if keep_newlines else " ", text)
    if not keep_newlines:
        text = text.replace("\n", " ")
    return _CONTROL.sub(" ", text).strip()


@dataclass
class Cuts:
    """Fields cut to their cap while a collector was active: per field, how many and the longest original."""

    count: dict[str, int] = field(default_factory=dict)
    longest: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, length: int) -> None:
        self.count[name] = self.count.get(name, 0) + 1
        self.longest[name] = max(self.longest.get(name, 0), length)

    def warnings(self, where: str) -> list[str]:
        """One warning line per cut field, e.g. "items.jsonl: 3 titles cut to 500 characters (longest 812)"."""
        return [
            f"{where}: {n} {name} value{'s' if n != 1 else ''} cut to {CAPS[name]:,} characters "
            f"(longest was {self.longest[name]:,}); shorten them in the source to keep the full text"
            for name, n in sorted(self.count.items())
        ]


_collector: ContextVar[Cuts | None] = ContextVar("shoprec_text_cuts", default=None)


@contextmanager
def collect_cuts() -> Iterator[Cuts]:
    """Record every cap applied inside the block (instead of logging each), for a loader's warnings list."""
    cuts = Cuts()
    token = _collector.set(cuts)
    try:
        yield cuts
    finally:
        _collector.reset(token)


def cap(text: str, name: str) -> str:
    """`text` cut to `CAPS[name]` characters, at a word boundary when one is near; the cut is recorded or logged."""
    limit = CAPS[name]
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    if space >= limit * 0.8:
        cut = cut[:space]
    cuts = _collector.get()
    if cuts is not None:
        cuts.add(name, len(text))
    else:
        log.warning("%s cut from %d to %d characters (limit %d)", name, len(text), len(cut), limit)
    return cut.rstrip()


def clean_field(text: str, name: str) -> str:
    """The safe form of one catalog text field (`name` is a key of `CAPS`): controls stripped, chat-template
    markers neutralised, capped. Descriptions keep their line breaks; every other field is one line."""
    text = strip_controls(text, keep_newlines=name == "description")
    return cap(neutralise_markers(text), name)
