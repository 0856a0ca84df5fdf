"""The conversation state: everything a chat knows about what the shopper wants, typed and visible.

Every answer returns it and a client may send back an edited copy (drop a brand, widen the budget): the state, not
the chat transcript, is what a turn is computed from. Frozen: a turn returns a new state, never mutates one.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ShownItem(BaseModel):
    """One card of the last answer: what ordinals ("the second one") and "cheaper" refer to."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    item_id: str = Field(description="Catalog id of the item shown.")
    price: float | None = Field(default=None, description="Its price when shown; None when unknown.")
    brand: str = Field(default="", description="Its brand, so 'not that brand' can name it.")
    category: str = Field(default="", description="Its category path joined with ' > '.")


class ChatState(BaseModel):
    """What the shopper wants, as hard constraints (filters) and soft wishes (the query)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    wanted: str = Field(default="", description="Free-text wish, the soft part of the request (a search query).")
    category: str | None = Field(
        default=None, description="A catalog category path prefix (' > '-joined) every pick must be under."
    )
    min_price: float | None = Field(default=None, ge=0, description="Lowest price allowed (inclusive).")
    max_price: float | None = Field(default=None, ge=0, description="Highest price allowed (inclusive).")
    brands: tuple[str, ...] = Field(default=(), description="Brands asked for: a soft preference (added to the query).")
    excluded_brands: tuple[str, ...] = Field(default=(), description="Brands never to show (a hard filter).")
    attributes: dict[str, str] = Field(
        default_factory=dict, description="Wished attributes, e.g. {'color': 'red'} (soft: added to the query)."
    )
    reference_items: tuple[str, ...] = Field(
        default=(), description="Item ids the shopper pointed at ('more like the second one'): used as context."
    )
    rejected: tuple[str, ...] = Field(default=(), description="Item ids the shopper turned down: never shown again.")
    cart: tuple[str, ...] = Field(default=(), description="Item ids added to the cart in this conversation.")
    shown: tuple[ShownItem, ...] = Field(default=(), description="The last answer's cards, in the order shown.")
    turns: int = Field(default=0, ge=0, description="How many shopper messages this state has absorbed.")
    asked: bool = Field(
        default=False, description="A clarifying question was already asked in this conversation: never ask twice."
    )

    @model_validator(mode="after")
    def _price_range(self) -> ChatState:
        if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
            raise ValueError(
                f"min_price {self.min_price} is above max_price {self.max_price}; lower min_price or raise max_price"
            )
        return self

    def query(self) -> str:
        """The soft part as one search query: the wish, wanted brands and attribute values."""
        parts = [self.wanted, *self.brands, *self.attributes.values()]
        return " ".join(p for p in parts if p).strip()

    def shown_prices(self) -> list[float]:
        return [s.price for s in self.shown if s.price is not None]
