"""Decoding constraints as data: serialisable specs from which the controllers of `generator.decoding` are built.

A `TokenController` is Python called at every decoding step: fine inside the transformers backend's own loop, but
impossible to hand to an engine running in another process (vLLM's engine core, a `vllm serve` deployment). So every
constraint the generator uses is first written as one of these frozen pydantic models, sent as JSON (vLLM:
`SamplingParams.extra_args` / the OpenAI server's `vllm_xargs`), and turned back into the SAME controller class by
`generator.decoding.build_controller` on the other side, against that side's tokenizer:

- `PicksSpec`: generate mode's K lines over the candidate labels, distinct, the category quota enforced while
  decoding (the candidates' categories and the `CategoryConstraint` travel with it), optional grounded reasons;
- `ReasonSpec`: score mode's reason rows (labels already chosen, only the reasons are written);
- `ForcedSpec` and `TokenSetSpec`: two plain token constraints (a fixed continuation; a token set for n steps),
  used by the backend test suite and handy for probes.

`label_token_ids`, when the sender fills it in, is the sender's tokenisation of the labels; the receiver checks it
against its own and refuses a mismatch (a server started on another tokenizer would otherwise decode nonsense).
This module imports no torch and no engine.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from generator.constraints import CategoryConstraint

SPEC_KEY = "shoprec_spec"  # the key of the JSON spec in SamplingParams.extra_args / vllm_xargs


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_json(self) -> str:
        """The spec as compact JSON (what travels in `extra_args`)."""
        return self.model_dump_json(exclude_defaults=False)


class _LinesSpec(_Spec):
    labels: tuple[str, ...] = Field(min_length=1, description="The candidates' labels, each ONE token after '('.")
    label_token_ids: tuple[int, ...] | None = Field(
        default=None,
        description="The sender's token id of each label; checked by the receiver (None: not checked).",
    )
    min_reason_tokens: int = Field(default=2, ge=1, description="Fewest tokens of a free reason before its newline.")
    max_reason_tokens: int = Field(default=32, ge=1, description="Most tokens of a reason; the newline is then forced.")
    reason_choices: dict[int, tuple[str, ...]] | None = Field(
        default=None,
        description="Grounded reasons: label index -> the sentences that label's reason must be one of (token by "
        "token); labels without an entry write free text under the loop guards.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> _LinesSpec:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {list(self.labels)}")
        if self.label_token_ids is not None and len(self.label_token_ids) != len(self.labels):
            raise ValueError(
                f"label_token_ids has {len(self.label_token_ids)} ids for {len(self.labels)} labels; give one each"
            )
        if self.min_reason_tokens > self.max_reason_tokens:
            raise ValueError(f"min_reason_tokens={self.min_reason_tokens} > max_reason_tokens={self.max_reason_tokens}")
        for j in self.reason_choices or {}:
            if not 0 <= j < len(self.labels):
                raise ValueError(f"reason_choices names label index {j}, but there are {len(self.labels)} labels")
        return self


class PicksSpec(_LinesSpec):
    """Generate mode: K lines ``"{i}. ({label}) {reason}"`` over `labels`, distinct, the category rule kept."""

    kind: Literal["picks"] = "picks"
    k: int = Field(ge=1, description="How many lines (picks) to write.")
    categories: tuple[str, ...] | None = Field(
        default=None,
        description="Each candidate's category path, aligned with `labels` (cut at `constraint.level` on arrival); "
        "None: no category rule, only distinct picks.",
    )
    constraint: CategoryConstraint | None = Field(
        default=None, description="The category quota enforced while decoding (needs `categories`)."
    )

    @model_validator(mode="after")
    def _picks_consistent(self) -> PicksSpec:
        if self.k > len(self.labels):
            raise ValueError(f"k={self.k} picks asked for but only {len(self.labels)} labels")
        if self.categories is not None and len(self.categories) != len(self.labels):
            raise ValueError(f"categories has {len(self.categories)} entries for {len(self.labels)} labels")
        if self.constraint is not None and self.categories is None:
            raise ValueError("a category constraint needs the candidates' categories")
        return self


class ReasonSpec(_LinesSpec):
    """Score mode: the labels are already ranked; force them in order and write only the reasons."""

    kind: Literal["reason"] = "reason"
    first_number: int = Field(default=1, ge=1, description="The number of the first line.")
    prefilled: bool = Field(
        default=False, description="The first line's '{i}. ({label})' is already at the end of the prompt."
    )


class ForcedSpec(_Spec):
    """Exactly these tokens, then end-of-sequence."""

    kind: Literal["forced"] = "forced"
    token_ids: tuple[int, ...] = Field(min_length=1, description="The continuation, token by token.")


class TokenSetSpec(_Spec):
    """Any of these tokens at each of `n` steps, then end-of-sequence."""

    kind: Literal["token_set"] = "token_set"
    token_ids: tuple[int, ...] = Field(min_length=1, description="The tokens allowed at every step.")
    n: int = Field(ge=1, description="How many tokens to generate.")


ControllerSpec = Annotated[PicksSpec | ReasonSpec | ForcedSpec | TokenSetSpec, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[PicksSpec | ReasonSpec | ForcedSpec | TokenSetSpec] = TypeAdapter(ControllerSpec)


def spec_from_json(text: str | bytes) -> PicksSpec | ReasonSpec | ForcedSpec | TokenSetSpec:
    """Parse a spec sent as JSON; pydantic's ValidationError (a ValueError) names the bad field."""
    return _ADAPTER.validate_json(text)


__all__ = [
    "SPEC_KEY",
    "ControllerSpec",
    "ForcedSpec",
    "PicksSpec",
    "ReasonSpec",
    "TokenSetSpec",
    "spec_from_json",
]
