"""The one protocol every LLM backend speaks: prompts in; label log-probabilities or generated text out.

Vendor-neutral on purpose (only str, int, Sequence and numpy in the signatures): each adapter alone turns these
into its engine's types (`transformers_backend.py` is the only file here that imports torch/transformers). The two
calls mirror the generator's two modes:

- `label_logprobs`: LlamaRec's verbalizer. The candidates are labelled (A, B, ...) in the prompt and ranked by the
  log-probability of each label as the next token, all prompts in ONE batched forward pass.
- `generate`: greedy decoding, optionally constrained token by token by a `TokenController` (pure Python: the list
  of token ids allowed next), which is how the generator guarantees valid, distinct, quota-respecting picks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length", "timeout"]


class GenerationOutput(BaseModel):
    """What one prompt produced."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str = Field(description="The generated text (the end-of-sequence token excluded, special tokens kept).")
    token_ids: tuple[int, ...] = Field(
        description="The generated token ids (EOS excluded): parse THESE, not a re-tokenisation of `text`."
    )
    finish_reason: FinishReason = Field(
        description="'stop': EOS was produced (or forced by a finished controller); 'length': max_new_tokens "
        "reached; 'timeout': the batch ran past timeout_s."
    )


@runtime_checkable
class TokenController(Protocol):
    """Says, step by step, which tokens may come next; pure Python, shared by every backend.

    Both methods receive ALL the token ids generated so far for this prompt (not the prompt). A controller may
    cache its state between calls, but must give the same answer for the same ids.
    """

    def allowed(self, generated: Sequence[int]) -> Sequence[int] | npt.NDArray[np.integer] | None:
        """The token ids allowed next (non-empty), or None for an unconstrained step.

        Large sets are best returned as a numpy int array (the same object each time when possible: backends may
        cache its conversion)."""
        ...

    def done(self, generated: Sequence[int]) -> bool:
        """True once the output is complete: the backend then forces end-of-sequence."""
        ...


@runtime_checkable
class TokenizerInfo(Protocol):
    """The tokenizer facts the generator needs, whatever the engine."""

    @property
    def eos_token_id(self) -> int:
        """The id that ends generation."""
        ...

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of every special/control token (EOS, chat markers, ...): never allowed in free text."""
        ...

    @property
    def newline_token_ids(self) -> frozenset[int]:
        """Ids whose text contains a newline."""
        ...

    @property
    def token_texts(self) -> Sequence[str]:
        """The decoded text of each token id on its own, indexed by id (cached; ids beyond it do not exist)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS/EOS added; special-token strings in `text` become special tokens."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (special tokens kept as text, no whitespace clean-up)."""
        ...

    def chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The model's chat template applied to `messages` ({'role', 'content'}), ending with the assistant's turn.

        Special-token strings inside message contents are neutralised, so untrusted text cannot open a turn."""
        ...


@runtime_checkable
class Backend(Protocol):
    """A loaded model that scores labels and generates text, batched."""

    @property
    def tokenizer(self) -> TokenizerInfo: ...

    def label_logprobs(self, prompts: Sequence[str], labels: Sequence[Sequence[str]]) -> list[npt.NDArray[np.float64]]:
        """For each prompt, log P(label | prompt) of each of its labels as the NEXT token, in one forward pass.

        Each label must be a single token in the model's vocabulary (write it as it follows the prompt: 'A' after
        '(' , ' A' after 'Answer:'); a label the tokenizer splits raises ValueError naming it. Returns one array
        per prompt, aligned with its labels, natural-log probabilities over the whole vocabulary.
        """
        ...

    def generate(
        self,
        prompts: Sequence[str],
        controllers: Sequence[TokenController | None] | None = None,
        max_new_tokens: int = 256,
        timeout_s: float | None = None,
    ) -> list[GenerationOutput]:
        """Greedy continuation of each prompt, batched; `controllers[i]` (or None) constrains prompt i.

        `timeout_s` bounds the whole batch's wall time; rows still running then end with finish_reason='timeout'.
        """
        ...


def neutralise_special_text(text: str, special_texts: Sequence[str]) -> str:
    """Break every special-token string in `text` (e.g. '<|im_start|>') so tokenising it yields plain tokens.

    A zero-width space goes after the first character: the text reads the same to a person, but no longer matches
    the special token. Used on untrusted message contents before the chat template is applied.
    """
    for special in sorted({s for s in special_texts if len(s) > 1}, key=len, reverse=True):
        if special in text:
            text = text.replace(special, special[0] + "\u200b" + special[1:])
    return text


def check_single_token_labels(tokenizer: TokenizerInfo, labels: Sequence[str]) -> list[int]:
    """The token id of each label; ValueError naming every label the tokenizer splits (or maps to nothing)."""
    ids: list[int] = []
    bad: list[str] = []
    for label in labels:
        enc = tokenizer.encode(label)
        if len(enc) != 1:
            bad.append(f"{label!r} -> {len(enc)} tokens {enc}")
        else:
            ids.append(enc[0])
    if bad:
        raise ValueError(
            "labels must be single tokens for one-pass scoring, but the tokenizer splits: "
            + "; ".join(bad)
            + ". Use single letters (A..Z, a..z) or check the label's leading space."
        )
    return ids


def validate_generate_args(
    prompts: Sequence[str],
    controllers: Sequence[TokenController | None] | None,
    max_new_tokens: int,
    timeout_s: float | None,
) -> list[TokenController | None]:
    """Shared argument checks for `Backend.generate`; returns one controller slot per prompt."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, got a single str")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if timeout_s is not None and timeout_s < 0:
        raise ValueError(f"timeout_s must be >= 0 or None, got {timeout_s}")
    if controllers is None:
        return [None] * len(prompts)
    if len(controllers) != len(prompts):
        raise ValueError(f"got {len(controllers)} controllers for {len(prompts)} prompts; pass one (or None) each")
    return list(controllers)


def validate_label_args(prompts: Sequence[str], labels: Sequence[Sequence[str]]) -> None:
    """Shared argument checks for `Backend.label_logprobs`."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, got a single str")
    if len(labels) != len(prompts):
        raise ValueError(f"got {len(labels)} label lists for {len(prompts)} prompts; pass one list per prompt")
    for i, ls in enumerate(labels):
        if isinstance(ls, str):
            raise TypeError(f"labels[{i}] must be a sequence of label strings, got the str {ls!r}")
