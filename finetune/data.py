"""Training examples from interaction logs, rendered exactly as the generator renders them at serving time.

Train/serve parity is the point of this module: it does not build prompts itself. A `Recommender` (the serving
pipeline object) prepares each request — same retriever call, same candidate widening for the category
constraint, same labels, same evidence (`CandidateView.signals`), same template, same chat template — and this
module only adds the answer the constrained decoder would have had to produce:

- a **rank example** per case: the ranking prompt, then K lines ``"1. (L) reason"``; the held-out next item first,
  then the other candidates in retrieval order as far as the category constraint allows (what the generate mode
  decodes, and whose first label is what score mode reads from one forward pass);
- or, with ``rank_loss="labels"``, a **label example** per case instead (LlamaRec's listwise loss): the ranking
  prompt with the assistant prefix ``"1. ("`` score mode appends, and the target's label as the only answer
  token; its loss is a softmax over the request's labels, exactly the normalised score score mode reads. The
  full answer spends ~98% of its loss on reason text the constrained decoder mostly fixes anyway, so the ranking
  signal (one label token of ~75) is diluted;
- **reason examples**: the one-candidate reason prompt of score mode ending in the prefilled ``"1. (L)"``, then
  the reason (what `ReasonController` decodes), for the target and the next picks.

Reasons are grounded (`generator.reasons`): each cites evidence the catalog confirms. Every answer is tokenised and
read back through the generator's own controllers (`PicksController.parse` / `ReasonController.parse`); an answer
the decoder could not have produced is a bug, and raises.

Splits (leave-one-out, no leakage): per user, the last event is the test target and the second-to-last the
validation target; training targets are the `positions` events before those. The retriever that builds the
candidates is trained only on the events BEFORE the earliest training target (`retriever_histories`), so neither
the candidates' evidence nor the prompts ever contain a training, validation or test target of that user.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from eval.splits import Case
from generator.constraints import allowed_next
from generator.decoding import COPY_SPAN, PicksController, PicksParseError
from generator.prompts import assistant_prefix, format_answer
from generator.reasons import ReasonContext, write_reason
from generator.recommender import Prepared, Recommender
from retrieval.types import Interaction, RetrievalRequest


@dataclass(frozen=True)
class Example:
    """One training example: the prompt as served and the exact answer text the constrained decoder allows."""

    kind: Literal["rank", "label", "reason"]
    prompt: str = field(repr=False)  # chat-formatted, ending where the model's output starts
    answer: str  # the output text before end-of-sequence (which the tokenizer step appends as a token)
    user_id: str
    target: str  # the held-out item this example was built from
    position: int  # its index in the user's time-ordered history (= how many events the prompt could draw on)
    evidence: tuple[str, ...] = ()  # the evidence kind of each reason in `answer`
    choices: tuple[str, ...] = ()  # a "label" example: the request's labels, over which its loss is normalised


@dataclass(frozen=True)
class FinetuneSplit:
    """Leave-one-out cases for fine-tuning, and the histories the candidate retriever may be trained on."""

    retriever_histories: dict[str, list[Interaction]]
    train: list[Case]
    valid: list[Case]
    test: list[Case]


def answer_token_ids(encode: Callable[[str], list[int]], answer: str) -> list[int]:
    """The ids the decoder emits for `answer`: each line's text, then the newline as its own token.

    Not `encode(answer)`: a BPE may merge "." and "\n" into one token, which the decoder never emits (a reason
    ends with the plain newline token), so the model would be trained on ids it can never produce when served.
    """
    ids: list[int] = []
    for line in answer.split("\n")[:-1] if answer.endswith("\n") else answer.split("\n"):
        ids.extend(encode(line))
        ids.extend(encode("\n"))
    if not answer.endswith("\n"):
        del ids[-len(encode("\n")) :]
    return ids


def split_cases(
    histories: Mapping[str, Sequence[Interaction]], positions: int = 1, min_events: int = 3
) -> FinetuneSplit:
    """Per user (sorted ids, so every run is identical): test = last event, valid = second-to-last, train = the
    `positions` events before those (each with the history before it); the retriever sees only the events before
    the earliest training target. Users with fewer than `min_events` events only feed the retriever."""
    if positions < 1:
        raise ValueError(f"`positions` (training targets per user) must be >= 1, got {positions}.")
    retr: dict[str, list[Interaction]] = {}
    train: list[Case] = []
    valid: list[Case] = []
    test: list[Case] = []
    for user in sorted(histories):
        evs = list(histories[user])
        if len(evs) < min_events:
            retr[user] = evs
            continue
        ids = [e.item_id for e in evs]
        first = max(1, len(evs) - 2 - positions)  # a training target needs at least one event of history
        retr[user] = evs[:first]
        train.extend(Case(user, tuple(ids[:t]), ids[t]) for t in range(first, len(evs) - 2))
        valid.append(Case(user, tuple(ids[:-2]), ids[-2]))
        test.append(Case(user, tuple(ids[:-1]), ids[-1]))
    return FinetuneSplit(retriever_histories=retr, train=train, valid=valid, test=test)


@dataclass(frozen=True)
class ExampleStats:
    """What happened to the cases: how many became examples, and why the others did not."""

    cases: int
    used: int
    not_retrieved: int  # the target was not among the candidates: nothing to learn from re-ranking
    rejected: int  # no answer within the decoder's limits (e.g. every wording over max_reason_tokens)
    rank_examples: int
    reason_examples: int


def build_examples(
    recommender: Recommender,
    cases: Sequence[Case],
    *,
    reasons_per_case: int = 2,
    rank_examples: int | None = None,
    complements: Mapping[str, frozenset[str]] | None = None,
    rank_loss: Literal["answer", "labels"] = "answer",
) -> tuple[list[Example], ExampleStats]:
    """Rank and reason examples for `cases`, through `recommender` (its retriever, prompts, config, tokenizer).

    `rank_examples`: at most this many rank examples (None = one per usable case, 0 = none). A ranking prompt is
    ~4x the tokens of a reason prompt, so on a CPU budget the reasons can get more cases than the ranking.
    `rank_loss`: "answer" = rank examples with the full answer (generate mode's output); "labels" = label
    examples (score mode's one-pass ranking, LlamaRec's listwise loss).

    The recommender needs a backend for its tokenizer and chat template (no forward pass is made).
    """
    if recommender.backend is None:
        raise ValueError("build_examples needs a Recommender with a backend: prompts use its chat template.")
    cfg = recommender.config
    comp = recommender.complements if complements is None else complements
    if dict(comp) != dict(recommender.complements):
        # the reason rows are read back through the serving decoder, which offers only the sentences the
        # recommender can prove: training on complements it does not know would teach sentences it never allows
        raise ValueError("pass the complements to the Recommender (Recommender(..., complements=...)), not only here")
    out: list[Example] = []
    skipped = rejected = n_rank = n_reason = 0
    for case in cases:
        request = RetrievalRequest(history=case.history)  # no user id in prompts (privacy), as served
        p = recommender.prepare(request, cfg)
        ids = [c.item_id for c in p.candidates]
        if case.target not in ids:
            skipped += 1
            continue
        order = _ranked_answer_order(p, ids.index(case.target))
        try:
            made = []
            if rank_examples is None or n_rank < rank_examples:
                if rank_loss == "labels":
                    made.append(_label_example(p, order[0], case))
                else:
                    made.append(_rank_example(recommender, p, order, case, comp))
            made += [
                _reason_example(recommender, p, index, line, case, comp)
                for line, index in enumerate(order[:reasons_per_case], start=1)
            ]
        except PicksParseError:  # no grounded wording fits the decoder's limits (tiny budgets): counted, skipped
            rejected += 1
            continue
        out.extend(made)
        n_rank += sum(e.kind != "reason" for e in made)
        n_reason += sum(e.kind == "reason" for e in made)
    used = len(cases) - skipped - rejected
    stats = ExampleStats(len(cases), used, skipped, rejected, n_rank, n_reason)
    return out, stats


def _ranked_answer_order(p: Prepared, target: int) -> list[int]:
    """The target first, then candidates in retrieval order, each only if the category constraint still allows it."""
    cfg = p.config
    k = min(cfg.k, len(p.views))
    chosen: list[int] = []
    for i in [target, *range(len(p.views))]:
        if len(chosen) == k:
            break
        if i not in chosen and allowed_next(cfg.constraint, p.categories, chosen, k)[i]:
            chosen.append(i)
    if not chosen or chosen[0] != target:
        raise ValueError(f"the category constraint {cfg.constraint} forbids the target as the first pick")
    return chosen


def _context(
    p: Prepared,
    history_shown: int,
    complements: Mapping[str, frozenset[str]],
    catalog: object,
    popular: Mapping[str, int] | None = None,  # the catalog's best sellers, as serving knows them
) -> ReasonContext:
    shown = p.request.history[-history_shown:] if history_shown else ()
    return ReasonContext(
        catalog=catalog,  # type: ignore[arg-type]
        history=tuple(shown),
        cart=p.request.cart,
        query=p.request.query,
        complements=complements,
        popular=popular or {},
    )


def _fits(recommender: Recommender, budget: int) -> functools.partial[bool]:
    return functools.partial(_within_budget, recommender, budget)


def _within_budget(recommender: Recommender, budget: int, sentence: str) -> bool:
    assert recommender.backend is not None
    return len(recommender.backend.tokenizer.encode(" " + sentence)) <= budget


def _grams(ids: Sequence[int]) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + COPY_SPAN]) for i in range(len(ids) - COPY_SPAN + 1)]


def _rank_example(
    recommender: Recommender, p: Prepared, order: Sequence[int], case: Case, comp: Mapping[str, frozenset[str]]
) -> Example:
    assert recommender.backend is not None
    ctx = _context(p, p.config.max_history, comp, recommender.catalog, recommender.popular_items())
    tok = recommender.backend.tokenizer
    budget = p.config.max_reason_tokens
    spans: set[tuple[int, ...]] = set()  # COPY_SPAN-grams of the earlier lines' reasons: the decoder bans copies

    def fits(sentence: str) -> bool:
        ids = tok.encode(" " + sentence)
        return len(ids) <= budget and not spans & set(_grams(ids))

    picks: list[tuple[str, str]] = []
    kinds: list[str] = []
    for i in order:
        item = recommender.catalog[p.candidates[i].item_id]
        kind, reason = write_reason(item, ctx, p.candidates[i], fits=fits)
        picks.append((p.views[i].label, reason))
        kinds.append(kind)
        spans.update(_grams(tok.encode(" " + reason)))
    answer = format_answer(picks) + "\n"
    # Read the answer back through the decoder the generate mode uses: parity, checked on every example.
    k = len(order)
    allowed = functools.partial(allowed_next, p.config.constraint, p.categories, k=k)
    ctrl = PicksController(
        recommender.backend.tokenizer,
        [v.label for v in p.views],
        k,
        lambda chosen: allowed(chosen),
        max_reason_tokens=p.config.max_reason_tokens,
    )
    parsed = ctrl.parse(answer_token_ids(tok.encode, answer))
    if [pp.index for pp in parsed] != list(order):
        raise AssertionError(f"rank answer reads back as {[pp.label for pp in parsed]}: {answer!r}")
    return Example("rank", p.prompt, answer, case.user_id, case.target, len(case.history), tuple(kinds))


def _label_example(p: Prepared, target: int, case: Case) -> Example:
    """The scoring prompt exactly as `Recommender._llm_scores` builds it (one pass, retrieval order), and the
    target's label: the token whose normalised log-probability score mode reads."""
    views = [v.label for v in p.views]
    prompt = p.prompt + assistant_prefix(p.config.k)
    return Example("label", prompt, views[target], case.user_id, case.target, len(case.history), choices=tuple(views))


def _reason_example(
    recommender: Recommender,
    p: Prepared,
    index: int,
    line: int,
    case: Case,
    comp: Mapping[str, frozenset[str]],
) -> Example:
    assert recommender.backend is not None
    prompt, ctrl = recommender.reason_prompt(p, index, line)
    ctx = _context(p, p.config.reason_history_shown, comp, recommender.catalog, recommender.popular_items())
    item = recommender.catalog[p.candidates[index].item_id]
    kind, reason = write_reason(item, ctx, p.candidates[index], fits=_fits(recommender, p.config.max_reason_tokens))
    answer = " " + format_answer([(p.views[index].label, reason)]).split(") ", 1)[1] + "\n"
    (parsed,) = ctrl.parse(
        answer_token_ids(recommender.backend.tokenizer.encode, answer)
    )  # raises if the decoder could not write it
    if parsed.reason != reason:
        raise AssertionError(f"reason reads back as {parsed.reason!r}, not {reason!r}")
    return Example("reason", prompt, answer, case.user_id, case.target, len(case.history), (kind,))


def sample_cases(cases: Sequence[Case], n: int | None, seed: int) -> list[Case]:
    """At most `n` cases, drawn without replacement by a seeded generator (all of them, in order, when n is None)."""
    if n is None or n >= len(cases):
        return list(cases)
    rng = random.Random(seed)
    return sorted(rng.sample(list(cases), n), key=lambda c: (c.user_id, len(c.history)))


def leaked(examples: Iterable[Example], split: FinetuneSplit) -> list[str]:
    """Every way `examples` could have seen a held-out event (should be []): an example whose target position is
    not before its user's validation position, or a retriever history that reaches a training target."""
    valid_pos = {c.user_id: len(c.history) for c in split.valid}
    first_train: dict[str, int] = {}
    for c in split.train:
        first_train[c.user_id] = min(first_train.get(c.user_id, len(c.history)), len(c.history))
    hits = [
        f"{ex.user_id}: example at position {ex.position} >= validation position {valid_pos[ex.user_id]}"
        for ex in examples
        if ex.user_id in valid_pos and ex.position >= valid_pos[ex.user_id]
    ]
    hits += [
        f"{user}: the retriever saw {len(split.retriever_histories[user])} events, a training target is at {pos}"
        for user, pos in first_train.items()
        if len(split.retriever_histories.get(user, ())) > pos
    ]
    return hits
