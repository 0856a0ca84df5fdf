"""Data types of the generator stage: what goes into a ranking prompt and what comes out of it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CandidateView(_Frozen):
    """One candidate as the prompt shows it: a short label plus the facts the model may use."""

    label: str = Field(description="Short label the model answers with (A, B, ..., Z, a, ..., z).")
    item_id: str = Field(description="Catalog id of the item behind the label.")
    title: str = Field(description="Product title (untrusted text: escaped when rendered).")
    category: str = Field(description="Category path joined with ' > '.")
    brand: str = Field(default="", description="Brand, may be empty.")
    price: float | None = Field(default=None, description="Price, None when unknown.")
    evidence: tuple[str, ...] = Field(
        default=(), description="Retrieval evidence in words, e.g. 'often bought after: Trail Runner 2'."
    )
    signals: str = Field(
        default="",
        description="Compact retrieval evidence the model can learn from: each signal's rank bucket and a category "
        "match with the recent history, e.g. 'co-bought #1, next #5, same dept'. Shown instead of `evidence` when set.",
    )


class HistoryView(_Frozen):
    """One past interaction as the prompt shows it (no user identifiers: privacy)."""

    title: str = Field(description="Product title (untrusted text).")
    category: str = Field(description="Category path joined with ' > '.")
    action: str = Field(default="viewed", description="viewed / carted / bought / rated N.")


class PromptInput(_Frozen):
    """Everything a ranking template renders: stable instructions first, variable text last."""

    history: tuple[HistoryView, ...] = Field(default=(), description="Oldest first; the last one is the most recent.")
    query: str | None = Field(default=None, description="What the shopper asked for, if anything (untrusted).")
    cart: tuple[str, ...] = Field(default=(), description="Titles of the items in the cart (untrusted).")
    candidates: tuple[CandidateView, ...] = Field(description="The labelled candidates to choose from.")
    k: int = Field(ge=1, description="How many picks to return.")
    max_per_category: int | None = Field(default=None, description="Category cap, stated in the prompt.")
    min_categories: int | None = Field(default=None, description="Distinct categories required, stated in the prompt.")


class Pick(_Frozen):
    """One recommended item."""

    item_id: str = Field(description="Catalog id; always one of the request's candidates.")
    rank: int = Field(ge=1, description="1-based position in the final list.")
    reason: str = Field(description="A short justification shown to the shopper.")
    category: str = Field(description="The item's category at the constraint's level.")
    score: float = Field(description="Final ranking score (higher is better) before the diversity step.")


class Recommendation(_Frozen):
    """The generator's answer: K valid, distinct, constraint-respecting picks, or a marked fallback."""

    picks: tuple[Pick, ...] = Field(description="The picks in rank order.")
    mode: Literal["score", "generate", "retrieval"] = Field(description="How the ranking was produced.")
    fallback: bool = Field(default=False, description="True when the LLM failed and retrieval order was used.")
    fallback_reason: str | None = Field(default=None, description="Why the fallback was taken.")
    raw_text: str | None = Field(default=None, description="The model's raw output, kept for debugging.")
    timings_ms: dict[str, float] = Field(default_factory=dict, description="Milliseconds per stage.")
