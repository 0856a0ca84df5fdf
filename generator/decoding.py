"""Constrained decoding of the ranked, justified list, and a strict parser for the same format.

The model writes exactly K lines, then end-of-sequence::

    1. (C) Matches the trail shoes you bought last week.
    2. (F) A rain jacket for the same hikes.

`PicksController` is a state machine over the generated token ids, consulted by the backend before every token:

- ``"{i}. ("`` is forced, token by token (ids from tokenising the text in context, see `_line_prefix`);
- the label step allows only the labels of candidates that `allowed_fn(chosen)` permits: the injected look-ahead
  of `generator.constraints.allowed_next` (default: any candidate not chosen yet), so every label is a real
  candidate, none repeats, and category quotas hold BY CONSTRUCTION;
- ``")"`` is forced, then the reason: free text without special tokens (EOS, chat markers) or newlines, starting
  with a space-led token (how ``") Matches"`` tokenises naturally); the newline that ends it is allowed only once
  the reason has `min_reason_tokens` tokens and contains a letter, and is forced at `max_reason_tokens`;
- grounded reasons: with `reason_choices` (label index -> sentences), the reason of that label may only be one of
  its sentences, token by token (a trie walk), then the newline. The recommender passes the sentences that
  `generator.reasons.reason_options` proves true of this shopper and item, so the model chooses among true
  evidence and cannot invent any; labels without choices write free text under the rules below;
- three simple loop guards (documented, not clever): a reason must contain a letter within its first 3 tokens
  (no "1.1.1.1" reasons); no token may complete an immediate repetition of a span of 4 or more tokens (so a
  reason cannot cycle: any periodic loop repeats a span of length >= 4 within two periods of at least 4 tokens);
  and no reason may copy 6 consecutive tokens of an earlier line's reason (the 135M model otherwise writes the
  same sentence on every line).

The result is read back from the token ids (`PicksController.parse`), never by re-tokenising the text, because a
byte-level BPE may split the same text differently. `ReasonController` is the one-pass mode: the K labels are
already chosen (by label scoring) and forced; only the reasons are generated. The recommender gives it ONE label
per sequence (``first_number=i``), so the K reasons are written in parallel, one batch row each, instead of one
row writing K lines in turn (K times fewer sequential decoding steps); with ``prefilled=True`` the forced
``"{i}. ({label})"`` goes at the end of the prompt (`prompt_suffix`) and costs no decoding step at all. (Rows
written in parallel cannot see each other, so the copy guard only spans the lines of one row.) `parse_picks`
validates free text in the same format (e.g. from an unconstrained engine) and raises `PicksParseError`, which
keeps the raw text.
"""

from __future__ import annotations

import contextlib
import functools
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import numpy.typing as npt

from generator.backends.base import TokenizerInfo
from generator.constraints import allowed_next, cut_categories
from generator.spec import ForcedSpec, PicksSpec, ReasonSpec, TokenSetSpec

AllowedFn = Callable[[Sequence[int]], npt.NDArray[np.bool_]]
IntArray = npt.NDArray[np.int64]

LETTER_WITHIN = 3  # a reason must contain a letter within this many tokens
MIN_LOOP_SPAN = 4  # forbid completing an immediate repeat of a span at least this long
COPY_SPAN = 6  # forbid copying this many consecutive tokens from an earlier reason


class PicksParseError(ValueError):
    """The model's output is not a valid list of picks; `raw_text` keeps the evidence, `problems` says why."""

    def __init__(self, problems: Sequence[str], raw_text: str) -> None:
        self.problems = list(problems)
        self.raw_text = raw_text
        shown = raw_text if len(raw_text) <= 300 else raw_text[:300] + "..."
        super().__init__("; ".join(self.problems) + f" (raw text: {shown!r})")


@dataclass(frozen=True)
class ParsedPick:
    """One line of a decoded list."""

    label: str
    index: int  # position of the label in the controller's `labels`
    reason: str  # decoded from `reason_ids`, stripped
    reason_ids: tuple[int, ...]


# --- per-tokenizer facts, computed once (the vocabulary scan costs ~0.1-0.5 s) ------------------------------------


@dataclass(frozen=True)
class _VocabFacts:
    reason_ids: IntArray  # may appear inside a reason: not special, no newline, non-empty text
    reason_ids_nl: IntArray  # the same plus the plain newline (reason may end here)
    first_ids: IntArray  # may start a reason: reason_ids whose text is a space then a visible character
    letter_ids: IntArray  # reason_ids whose text contains a letter
    has_letter: npt.NDArray[np.bool_]  # indexed by id
    newline_id: int
    close_ids: tuple[int, ...]  # ")" — or ") " when no token starts with a space (some SentencePiece decoders)


_FACTS: weakref.WeakKeyDictionary[object, _VocabFacts] = weakref.WeakKeyDictionary()


def _vocab_facts(tok: TokenizerInfo) -> _VocabFacts:
    try:
        return _FACTS[tok]
    except (KeyError, TypeError):
        pass
    texts = tok.token_texts
    newline = tok.encode("\n")
    if len(newline) != 1:
        raise ValueError(f"the tokenizer splits '\\n' into {newline}; the line format needs a single newline token")
    banned = set(tok.special_token_ids) | set(tok.newline_token_ids) | {tok.eos_token_id}
    ok = np.array([bool(t) and i not in banned for i, t in enumerate(texts)], dtype=bool)
    has_letter = np.array([any(c.isalpha() for c in t) for t in texts], dtype=bool)
    first = np.array([len(t) > 1 and t[0] == " " and not t[1].isspace() for t in texts], dtype=bool) & ok
    reason_ids = np.flatnonzero(ok).astype(np.int64)
    first_ids = np.flatnonzero(first).astype(np.int64)
    close = tok.encode(")") if first_ids.size else tok.encode(") ")
    if not first_ids.size:
        first_ids = reason_ids[[not texts[int(i)][:1].isspace() for i in reason_ids]]
    facts = _VocabFacts(
        reason_ids=reason_ids,
        reason_ids_nl=np.append(reason_ids, newline[0]).astype(np.int64),
        first_ids=first_ids,
        letter_ids=np.flatnonzero(ok & has_letter).astype(np.int64),
        has_letter=has_letter,
        newline_id=newline[0],
        close_ids=tuple(close),
    )
    with contextlib.suppress(TypeError):  # not weak-referenceable: just recompute next time
        _FACTS[tok] = facts
    return facts


def repeat_bans(seq: Sequence[int], min_span: int = MIN_LOOP_SPAN) -> list[int]:
    """Tokens that, appended to `seq`, would make its last n tokens equal the n before them, for some n >= min_span.

    For each n at most one token does (the one n positions back), so this is a short list, usually empty.
    """
    m = len(seq)
    bans = []
    for n in range(min_span, (m + 1) // 2 + 1):
        if list(seq[m + 1 - n : m]) == list(seq[m + 1 - 2 * n : m - n]):
            bans.append(int(seq[m - n]))
    return bans


# --- the state machine ----------------------------------------------------------------------------------------------


class _Phase(Enum):
    PREFIX = "prefix"  # forcing "{i}. ("
    LABEL = "label"
    CLOSE = "close"  # forcing ")"
    REASON = "reason"
    DONE = "done"


@dataclass
class _State:
    phase: _Phase = _Phase.PREFIX
    line: int = 0  # 0-based index of the line being written
    pos: int = 0  # position inside the literal being forced
    reason: list[int] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)  # label indices, in order
    reasons: list[list[int]] = field(default_factory=list)  # finished reasons' token ids
    # (COPY_SPAN - 1)-gram of an earlier reason -> the tokens that followed it there (banned after it now)
    copied_next: dict[tuple[int, ...], set[int]] = field(default_factory=dict)


class _LinesController:
    """Shared machinery of `PicksController` and `ReasonController` (they differ only in the label step)."""

    def __init__(
        self,
        tokenizer: TokenizerInfo,
        labels: Sequence[str],
        k: int,
        *,
        min_reason_tokens: int = 2,
        max_reason_tokens: int = 32,
        first_number: int = 1,
        reason_choices: Mapping[int, Sequence[str]] | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if first_number < 1:
            raise ValueError(f"first_number must be >= 1, got {first_number}")
        if not 1 <= min_reason_tokens <= max_reason_tokens:
            raise ValueError(
                f"need 1 <= min_reason_tokens <= max_reason_tokens, got {min_reason_tokens}, {max_reason_tokens}"
            )
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be distinct, got {list(labels)}")
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.k = k
        self.min_reason_tokens = min_reason_tokens
        self.max_reason_tokens = max_reason_tokens
        self._facts = _vocab_facts(tokenizer)
        self.first_number = first_number
        self._prefixes = [self._line_prefix(first_number + i, starts_answer=i == 0) for i in range(k)]
        self.label_ids = self._label_token_ids()
        self._label_of_id = {tid: j for j, tid in enumerate(self.label_ids)}
        self._choices = self._tokenize_choices(reason_choices or {})
        self._state = self._initial_state()
        self._seen: list[int] = []

    # tokenisation of the literals, in context
    def _line_prefix(self, number: int, starts_answer: bool) -> tuple[int, ...]:
        """Token ids of "{number}. (" as they follow the previous line's newline (or start the answer)."""
        text = f"{number}. ("
        if starts_answer:
            return tuple(self.tokenizer.encode(text))
        context = self.tokenizer.encode("x\n")
        full = self.tokenizer.encode("x\n" + text)
        if full[: len(context)] == context:
            return tuple(full[len(context) :])
        return tuple(self.tokenizer.encode(text))  # the newline merged with the number: fall back to the text alone

    def _label_token_ids(self) -> list[int]:
        ids, bad = [], []
        before = list(self._prefixes[0])
        for label in self.labels:
            alone = self.tokenizer.encode(label)
            in_context = self.tokenizer.encode(f"{self.first_number}. ({label}")
            if len(alone) != 1 or in_context != before + alone:
                bad.append(f"{label!r} -> {alone} alone, {in_context[len(before) :]} after '{self.first_number}. ('")
            else:
                ids.append(alone[0])
        if bad:
            raise ValueError(
                "each label must be one token, also right after '(' — the tokenizer splits: " + "; ".join(bad)
            )
        return ids

    def _tokenize_choices(self, choices: Mapping[int, Sequence[str]]) -> dict[int, list[tuple[int, ...]]]:
        """Token ids of each label's allowed reason sentences, as they follow the closing ")".

        Sentences longer than `max_reason_tokens` are dropped; a label left with none writes a free reason (the
        caller always passes short ones, see generator.reasons)."""
        lead = " " if self.tokenizer.decode(list(self._facts.close_ids)) == ")" else ""
        out: dict[int, list[tuple[int, ...]]] = {}
        for j, sentences in choices.items():
            if not 0 <= j < len(self.labels):
                raise ValueError(f"reason_choices names label index {j}, but there are {len(self.labels)} labels")
            ids = [tuple(self.tokenizer.encode(lead + t.strip())) for t in sentences if t.strip()]
            # a sentence holding a special token (a chat marker that escaped retrieval/text.py's cleaning) could end
            # the model's turn: never a choice
            special = self.tokenizer.special_token_ids
            fits = (x for x in ids if 1 <= len(x) <= self.max_reason_tokens and special.isdisjoint(x))
            fitting = list(dict.fromkeys(fits))
            if fitting:
                out[j] = fitting
        return out

    @property
    def max_new_tokens(self) -> int:
        """Enough tokens for K complete lines and the EOS: pass it as the backend's max_new_tokens."""
        per_line = max(map(len, self._prefixes)) + 1 + len(self._facts.close_ids) + self.max_reason_tokens + 1
        return self.k * per_line + 1

    # what subclasses decide: the label step, and where generation starts
    def _label_choices(self, state: _State) -> list[int]:
        raise NotImplementedError

    def _initial_state(self) -> _State:
        return _State()

    # transitions
    def _allowed_in(self, s: _State) -> Sequence[int] | IntArray:
        f = self._facts
        if s.phase is _Phase.PREFIX:
            return [self._prefixes[s.line][s.pos]]
        if s.phase is _Phase.LABEL:
            return [self.label_ids[j] for j in self._label_choices(s)]
        if s.phase is _Phase.CLOSE:
            return [f.close_ids[s.pos]]
        if s.phase is _Phase.DONE:
            return [self.tokenizer.eos_token_id]
        n = len(s.reason)
        choices = self._choices.get(s.chosen[-1]) if s.chosen else None
        if choices:  # grounded: only continuations of this label's sentences, a newline once one is complete
            prefix = tuple(s.reason)
            live = [c for c in choices if c[:n] == prefix]
            allowed = sorted({c[n] for c in live if len(c) > n})
            if any(len(c) == n for c in live) or not allowed:
                allowed.append(f.newline_id)
            return allowed
        if n >= self.max_reason_tokens:
            return [f.newline_id]
        lettered = any(f.has_letter[t] for t in s.reason)
        if n == 0:
            base = f.first_ids
        elif not lettered and n >= LETTER_WITHIN - 1:
            base = f.letter_ids
        elif lettered and n >= self.min_reason_tokens:
            base = f.reason_ids_nl
        else:
            base = f.reason_ids
        bans = repeat_bans(s.reason)
        if n >= COPY_SPAN - 1:
            bans.extend(s.copied_next.get(tuple(s.reason[1 - COPY_SPAN :]), ()))
        if bans:
            base = base[~np.isin(base, bans)]
        return base

    def _feed(self, s: _State, token: int, strict: bool) -> None:
        if strict:
            allowed = self._allowed_in(s)
            ok = bool(np.isin(token, allowed)) if isinstance(allowed, np.ndarray) else token in allowed
            if not ok:
                where = f"line {s.line + 1}, {s.phase.value}"
                raise ValueError(f"token {token} ({self.tokenizer.decode([token])!r}) is not allowed at {where}")
        if s.phase is _Phase.PREFIX:
            s.pos += 1
            if s.pos == len(self._prefixes[s.line]):
                s.phase, s.pos = _Phase.LABEL, 0
        elif s.phase is _Phase.LABEL:
            s.chosen.append(self._label_of_id[token])
            s.phase = _Phase.CLOSE
        elif s.phase is _Phase.CLOSE:
            s.pos += 1
            if s.pos == len(self._facts.close_ids):
                s.phase, s.pos = _Phase.REASON, 0
        elif s.phase is _Phase.REASON:
            if token == self._facts.newline_id:
                s.reasons.append(s.reason)
                r = s.reason
                for i in range(len(r) - COPY_SPAN + 1):
                    s.copied_next.setdefault(tuple(r[i : i + COPY_SPAN - 1]), set()).add(r[i + COPY_SPAN - 1])
                s.reason = []
                s.line += 1
                s.phase = _Phase.DONE if s.line == self.k else _Phase.PREFIX
            else:
                s.reason.append(token)
        else:
            raise ValueError(f"token {token} after the list was complete")

    def _advance(self, generated: Sequence[int]) -> _State:
        """The state after `generated`, reusing the previous call's work when `generated` extends it."""
        seen = self._seen
        if len(generated) < len(seen) or list(generated[: len(seen)]) != seen:
            self._state, self._seen = self._initial_state(), []
            seen = self._seen
        for token in generated[len(seen) :]:
            self._feed(self._state, int(token), strict=False)
            seen.append(int(token))
        return self._state

    # the TokenController protocol
    def allowed(self, generated: Sequence[int]) -> Sequence[int] | IntArray:
        return self._allowed_in(self._advance(generated))

    def done(self, generated: Sequence[int]) -> bool:
        return self._advance(generated).phase is _Phase.DONE

    def parse(self, token_ids: Sequence[int], allow_partial: bool = False) -> list[ParsedPick]:
        """The picks in `token_ids` (a backend's `GenerationOutput.token_ids`), checked token by token.

        Raises PicksParseError (with the decoded text) if a token breaks the format, or if the list is incomplete
        and not `allow_partial` (then only the complete lines are returned, e.g. after a timeout).
        """
        s = self._initial_state()
        raw = self.tokenizer.decode(list(token_ids))
        for token in token_ids:
            try:
                self._feed(s, int(token), strict=True)
            except ValueError as e:
                raise PicksParseError([str(e)], raw) from None
        if s.phase is not _Phase.DONE and not allow_partial:
            raise PicksParseError([f"incomplete: {len(s.reasons)} of {self.k} lines finished"], raw)
        return [
            ParsedPick(label=self.labels[j], index=j, reason=self.tokenizer.decode(r).strip(), reason_ids=tuple(r))
            for j, r in zip(s.chosen, s.reasons, strict=False)
        ]


class PicksController(_LinesController):
    """Constrains generation to K lines ``"{i}. ({label}) {reason}"`` over `labels`, then EOS.

    `allowed_fn(chosen)` returns a boolean mask over `labels` of the candidates that may come next, given the
    label indices chosen so far; pass the category look-ahead, e.g.
    ``functools.partial(allowed_next, constraint, cut_categories(categories, constraint.level), k=k)``.
    Default: every candidate not chosen yet. Whatever it returns, chosen labels are never offered again.
    """

    def __init__(
        self,
        tokenizer: TokenizerInfo,
        labels: Sequence[str],
        k: int,
        allowed_fn: AllowedFn | None = None,
        *,
        min_reason_tokens: int = 2,
        max_reason_tokens: int = 32,
        reason_choices: Mapping[int, Sequence[str]] | None = None,
    ) -> None:
        if k > len(labels):
            raise ValueError(f"k={k} picks asked for but only {len(labels)} labels")
        super().__init__(
            tokenizer,
            labels,
            k,
            min_reason_tokens=min_reason_tokens,
            max_reason_tokens=max_reason_tokens,
            reason_choices=reason_choices,
        )
        self.allowed_fn = allowed_fn
        # The serialisable form (what an engine in another process rebuilds this from); an arbitrary allowed_fn
        # has none: build through `from_spec` to get both.
        self.spec: PicksSpec | None = (
            None
            if allowed_fn is not None
            else PicksSpec(
                labels=tuple(self.labels),
                label_token_ids=tuple(self.label_ids),
                k=k,
                min_reason_tokens=min_reason_tokens,
                max_reason_tokens=max_reason_tokens,
                reason_choices=_choices_of(reason_choices),
            )
        )

    @classmethod
    def from_spec(cls, tokenizer: TokenizerInfo, spec: PicksSpec) -> PicksController:
        """The controller `spec` describes: distinct picks, and `spec.constraint`'s category rule decided by the
        look-ahead `allowed_next` over `spec.categories` (cut at the constraint's level here)."""
        allowed_fn: AllowedFn | None = None
        if spec.constraint is not None and spec.categories is not None:
            allowed_fn = functools.partial(
                allowed_next, spec.constraint, cut_categories(spec.categories, spec.constraint.level), k=spec.k
            )
        ctrl = cls(
            tokenizer,
            spec.labels,
            spec.k,
            allowed_fn,
            min_reason_tokens=spec.min_reason_tokens,
            max_reason_tokens=spec.max_reason_tokens,
            reason_choices=spec.reason_choices,
        )
        _check_label_ids(ctrl, spec.label_token_ids)
        ctrl.spec = (
            spec
            if spec.label_token_ids is not None
            else spec.model_copy(update={"label_token_ids": tuple(ctrl.label_ids)})
        )
        return ctrl

    def _label_choices(self, state: _State) -> list[int]:
        if self.allowed_fn is None:
            mask = np.ones(len(self.labels), dtype=bool)
        else:
            mask = np.asarray(self.allowed_fn(list(state.chosen)), dtype=bool)
            if mask.shape != (len(self.labels),):
                raise ValueError(f"allowed_fn returned a mask of shape {mask.shape}, expected ({len(self.labels)},)")
        mask = mask.copy()
        mask[state.chosen] = False
        choices = np.flatnonzero(mask).tolist()
        if not choices:
            raise ValueError(f"allowed_fn left no candidate for pick {len(state.chosen) + 1} of {self.k}")
        return choices


class ReasonController(_LinesController):
    """One-pass mode: the K labels are already ranked; force them in order and generate only the reasons.

    The lines are numbered from `first_number` (one row per pick: ``ReasonController(tok, [label],
    first_number=i)`` writes just ``"{i}. ({label}) <reason>"``). With `prefilled`, the caller has already put the
    first line's ``"{i}. ({label})"`` at the end of the prompt (append `prompt_suffix`), so the generated ids start
    with that line's reason: the forced tokens then cost prefill, not one decoding step each.
    """

    def __init__(
        self,
        tokenizer: TokenizerInfo,
        labels: Sequence[str],
        *,
        min_reason_tokens: int = 2,
        max_reason_tokens: int = 32,
        first_number: int = 1,
        prefilled: bool = False,
        reason_choices: Mapping[int, Sequence[str]] | None = None,
    ) -> None:
        self.prefilled = prefilled
        super().__init__(
            tokenizer,
            labels,
            len(labels),
            min_reason_tokens=min_reason_tokens,
            max_reason_tokens=max_reason_tokens,
            first_number=first_number,
            reason_choices=reason_choices,
        )
        self.spec = ReasonSpec(
            labels=tuple(self.labels),
            label_token_ids=tuple(self.label_ids),
            min_reason_tokens=min_reason_tokens,
            max_reason_tokens=max_reason_tokens,
            first_number=first_number,
            prefilled=prefilled,
            reason_choices=_choices_of(reason_choices),
        )

    @classmethod
    def from_spec(cls, tokenizer: TokenizerInfo, spec: ReasonSpec) -> ReasonController:
        """The controller `spec` describes."""
        ctrl = cls(
            tokenizer,
            spec.labels,
            min_reason_tokens=spec.min_reason_tokens,
            max_reason_tokens=spec.max_reason_tokens,
            first_number=spec.first_number,
            prefilled=spec.prefilled,
            reason_choices=spec.reason_choices,
        )
        _check_label_ids(ctrl, spec.label_token_ids)
        return ctrl

    def _label_choices(self, state: _State) -> list[int]:
        return [state.line]

    def _initial_state(self) -> _State:
        if self.prefilled:  # "{i}. ({label})" is in the prompt: the first line's reason comes next
            return _State(phase=_Phase.REASON, chosen=[0])
        return _State()

    @property
    def prompt_suffix(self) -> str:
        """The text to append to the prompt when `prefilled`: the first line's ``"{i}. ({label})"``."""
        return self.tokenizer.decode([*self._prefixes[0], self.label_ids[0], *self._facts.close_ids])

    @property
    def max_new_tokens(self) -> int:
        n = super().max_new_tokens
        return n - (len(self._prefixes[0]) + 1 + len(self._facts.close_ids)) if self.prefilled else n


class ForcedController:
    """Forces `spec.token_ids` in order, then is done (end-of-sequence)."""

    def __init__(self, spec: ForcedSpec) -> None:
        self.spec = spec

    def allowed(self, generated: Sequence[int]) -> Sequence[int]:
        return [self.spec.token_ids[min(len(generated), len(self.spec.token_ids) - 1)]]

    def done(self, generated: Sequence[int]) -> bool:
        return len(generated) >= len(self.spec.token_ids)


class TokenSetController:
    """Allows only `spec.token_ids` for `spec.n` tokens, then is done."""

    def __init__(self, spec: TokenSetSpec) -> None:
        self.spec = spec
        self._ids = list(spec.token_ids)

    def allowed(self, generated: Sequence[int]) -> Sequence[int]:
        return self._ids

    def done(self, generated: Sequence[int]) -> bool:
        return len(generated) >= self.spec.n


SpecController = PicksController | ReasonController | ForcedController | TokenSetController


def build_controller(
    spec: PicksSpec | ReasonSpec | ForcedSpec | TokenSetSpec, tokenizer: TokenizerInfo
) -> SpecController:
    """The controller a spec describes, against `tokenizer`: the one place specs become controllers, in this
    process or inside an engine (generator/backends/vllm_logits.py)."""
    if isinstance(spec, PicksSpec):
        return PicksController.from_spec(tokenizer, spec)
    if isinstance(spec, ReasonSpec):
        return ReasonController.from_spec(tokenizer, spec)
    if isinstance(spec, ForcedSpec):
        return ForcedController(spec)
    if isinstance(spec, TokenSetSpec):
        return TokenSetController(spec)
    raise TypeError(f"not a controller spec: {type(spec).__name__}")


def _choices_of(choices: Mapping[int, Sequence[str]] | None) -> dict[int, tuple[str, ...]] | None:
    return None if choices is None else {int(j): tuple(v) for j, v in choices.items()}


def _check_label_ids(ctrl: _LinesController, sent: Sequence[int] | None) -> None:
    """Refuse a spec whose sender tokenised the labels differently (another tokenizer: the ids would not match)."""
    if sent is not None and list(sent) != list(ctrl.label_ids):
        raise ValueError(
            f"the spec's label_token_ids {list(sent)} differ from this tokenizer's {ctrl.label_ids} for labels "
            f"{ctrl.labels}: sender and engine use different tokenizers. Fix: serve the same model folder."
        )


# --- parsing free text ----------------------------------------------------------------------------------------------

_LINE = re.compile(r"^\s*(\d+)\.\s*\(([^()\s]+)\)\s*(.*?)\s*$")


def parse_picks(text: str, labels: Sequence[str], k: int | None = None) -> list[tuple[str, str]]:
    """(label, reason) per line of `text` in the picks format, validated strictly against `labels`.

    Checked: every non-empty line matches ``"{i}. ({label}) {reason}"``, lines are numbered 1, 2, ... in order,
    every label is one of `labels`, none repeats, every reason has a letter, and (if `k`) there are exactly k
    lines. Any problem raises PicksParseError listing all of them, with `text` kept as `raw_text`. Category
    quotas are not checked here (see `generator.constraints.check_picks`).
    """
    known = set(labels)
    problems: list[str] = []
    picks: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for n, line in enumerate(lines, start=1):
        m = _LINE.match(line)
        if m is None:
            problems.append(f"line {n} is not '{n}. (<label>) <reason>': {line!r}")
            continue
        number, label, reason = int(m.group(1)), m.group(2), m.group(3)
        if number != n:
            problems.append(f"line {n} is numbered {number}")
        if label not in known:
            problems.append(f"line {n}: label {label!r} is not one of the candidates")
        elif label in seen:
            problems.append(f"line {n}: label {label!r} repeats line {seen[label]}")
        else:
            seen[label] = n
        if not any(c.isalpha() for c in reason):
            problems.append(f"line {n}: reason {reason!r} has no words")
        picks.append((label, reason))
    if not lines:
        problems.append("no picks in the output")
    if k is not None and len(lines) != k:
        problems.append(f"expected {k} picks, got {len(lines)}")
    if problems:
        raise PicksParseError(problems, text)
    return picks
