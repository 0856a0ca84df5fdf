"""Strict, frozen data types shared by every layer: items, interactions, retrieval requests and candidates."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from retrieval.text import clean_field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Item(_Frozen):
    """One product of the catalog."""

    id: str = Field(min_length=1, description="Stable, unique item id (a string, even when numeric).")
    title: str = Field(min_length=1, description="Human-readable product title, HTML entities already unescaped.")
    category: tuple[str, ...] = Field(
        default=(), description="Category path from root to leaf, e.g. ('Electronics', 'Phones', 'Cases')."
    )
    brand: str = Field(default="", description="Brand or maker; empty when unknown.")
    price: float | None = Field(default=None, ge=0, description="Price in the shop's currency; None when unknown.")
    description: str = Field(default="", description="Free-text product description; may be empty.")
    attributes: dict[str, str] = Field(
        default_factory=dict, description="Extra key/value facts (colour, size, genres, ...)."
    )
    created_at: datetime | None = Field(default=None, description="When the item entered the catalog (cold start).")
    in_stock: bool = Field(default=True, description="Whether the item can be sold now.")

    # Catalog text is untrusted data: every text field is cleaned here, so every loader and endpoint gets it
    # (controls stripped, chat-template markers neutralised, length-capped with a warning; retrieval/text.py).
    @field_validator("title")
    @classmethod
    def _title_not_blank(cls, v: str) -> str:
        v = clean_field(v, "title")
        if not v:
            raise ValueError("title is blank; every item needs a non-empty title")
        return v

    @field_validator("category")
    @classmethod
    def _category_parts_not_blank(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        parts = tuple(clean_field(p, "category") for p in v)
        if any(not p for p in parts):
            raise ValueError(f"category path {v!r} has an empty level")
        return parts

    @field_validator("brand")
    @classmethod
    def _clean_brand(cls, v: str) -> str:
        return clean_field(v, "brand")

    @field_validator("description")
    @classmethod
    def _clean_description(cls, v: str) -> str:
        return clean_field(v, "description")

    @field_validator("attributes")
    @classmethod
    def _clean_attributes(cls, v: dict[str, str]) -> dict[str, str]:
        return {clean_field(k, "attribute key"): clean_field(x, "attribute value") for k, x in v.items()}

    def category_at(self, level: int) -> str:
        """The category path cut to `level` levels (1 = top level), joined with ' > '; '' if uncategorised."""
        if level < 1:
            raise ValueError(f"category level must be >= 1, got {level}")
        return " > ".join(self.category[:level])

    def text(self) -> str:
        """The text that content retrievers (dense, BM25) index: title, category, brand and description."""
        parts = [self.title]
        if self.category:
            parts.append(" > ".join(self.category))
        if self.brand:
            parts.append(self.brand)
        if self.description:
            parts.append(self.description)
        return ". ".join(parts)


class InteractionType(StrEnum):
    VIEW = "view"
    CART = "cart"
    PURCHASE = "purchase"
    RATING = "rating"


class Interaction(_Frozen):
    """One event: a user viewed, carted, bought or rated an item."""

    user_id: str = Field(min_length=1, description="User id (pseudonymous; never a name or e-mail).")
    item_id: str = Field(min_length=1, description="Id of an item of the catalog.")
    type: InteractionType = Field(default=InteractionType.VIEW, description="What the user did.")
    value: float | None = Field(default=None, description="Rating value or quantity; None when not applicable.")
    timestamp: datetime | None = Field(default=None, description="When it happened (timezone-aware, UTC).")
    position: int | None = Field(
        default=None, ge=0, description="Order within the user's history when there is no timestamp."
    )
    event_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="The source's own id for this event; the store keeps one event per id (re-sends are no-ops).",
    )
    recommendation_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Id of the served recommendation this click/cart/purchase came from (attribution, A/B).",
    )

    @model_validator(mode="after")
    def _needs_order(self) -> Interaction:
        if self.timestamp is None and self.position is None:
            raise ValueError("an interaction needs a timestamp or a position to be ordered")
        return self


class SignalEvidence(_Frozen):
    """How one retrieval signal ranked a candidate."""

    rank: int = Field(ge=1, description="1-based rank of the candidate in this signal's own list.")
    score: float = Field(description="The signal's raw score (higher is better; scales differ between signals).")


class Candidate(_Frozen):
    """One retrieved item with its fused score and the signals that produced it."""

    item_id: str = Field(description="Id of the candidate item.")
    score: float = Field(description="Final retrieval score (higher is better).")
    sources: dict[str, SignalEvidence] = Field(
        default_factory=dict, description="Per retriever name: the candidate's rank and score in that retriever."
    )


class Filters(_Frozen):
    """Hard filters applied to every retriever's output."""

    categories: tuple[str, ...] = Field(
        default=(), description="Keep items whose category path starts with one of these (' > '-joined prefixes)."
    )
    min_price: float | None = Field(default=None, ge=0, description="Keep items priced at least this.")
    max_price: float | None = Field(default=None, ge=0, description="Keep items priced at most this.")
    in_stock_only: bool = Field(default=False, description="Drop items that are out of stock.")
    exclude_history: bool = Field(default=True, description="Drop items already in the user's history.")
    exclude: tuple[str, ...] = Field(default=(), description="Item ids never to return.")

    @model_validator(mode="after")
    def _price_range(self) -> Filters:
        if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
            raise ValueError(f"min_price {self.min_price} is above max_price {self.max_price}")
        return self


class RetrievalRequest(_Frozen):
    """What to retrieve for: a user's history, an optional query and/or cart, and filters.

    The mode follows from the fields: a cart -> complements; a query -> (personalised) search;
    neither -> recommendations from the history (popularity when the history is empty).
    """

    user_id: str | None = Field(default=None, description="User id, for logging and per-user state only.")
    history: tuple[str, ...] = Field(default=(), description="The user's item ids, oldest first.")
    query: str | None = Field(default=None, description="Free-text search query.")
    cart: tuple[str, ...] = Field(default=(), description="Item ids currently in the cart.")
    filters: Filters = Field(default_factory=Filters, description="Hard filters.")

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            return None
        return v

    @property
    def mode(self) -> str:
        if self.cart:
            return "cart"
        if self.query:
            return "query"
        return "user"
