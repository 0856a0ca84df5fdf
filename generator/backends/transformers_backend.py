"""The transformers (PyTorch) backend: the only module of the generator that imports torch and transformers.

It turns the vendor-neutral protocol into transformers calls: prompts are left-padded into one batch (so the last
position is every row's next-token position), `TokenController`s become one `LogitsProcessor` that masks every
token but the allowed ones, and `timeout_s` becomes a `StoppingCriteria`. Everything runs under
`torch.inference_mode()`. bf16 is used where the CPU computes it natively (see `generator.model.resolve_dtype`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from generator.backends.base import (
    FinishReason,
    GenerationOutput,
    TokenController,
    check_single_token_labels,
    neutralise_special_text,
    validate_generate_args,
    validate_label_args,
)
from generator.model import DType, ModelSpec, resolve_dtype, resolve_model_path

MAX_FP32_HEAD_BYTES = 512 * 2**20


class HFTokenizer:
    """`TokenizerInfo` over a transformers tokenizer."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        specials = set(tok.all_special_ids)
        specials |= {i for i, t in tok.added_tokens_decoder.items() if t.special}
        self._special_ids = frozenset(specials)
        self._special_texts = tuple(tok.convert_ids_to_tokens(sorted(specials)))
        self._texts: tuple[str, ...] | None = None
        eos = tok.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id; generation could never stop")
        self._eos = int(eos)

    @property
    def eos_token_id(self) -> int:
        return self._eos

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def token_texts(self) -> Sequence[str]:
        if self._texts is None:  # ~0.5 s for a 49k vocabulary, once per tokenizer
            self._texts = tuple(
                self._tok.batch_decode([[i] for i in range(len(self._tok))], clean_up_tokenization_spaces=False)
            )
        return self._texts

    @property
    def newline_token_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in enumerate(self.token_texts) if "\n" in t)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False))

    def chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        safe = [{**m, "content": neutralise_special_text(m["content"], self._special_texts)} for m in messages]
        return str(self._tok.apply_chat_template(safe, tokenize=False, add_generation_prompt=True))


class _ControllerProcessor(LogitsProcessor):
    """Applies one `TokenController` per row: -inf on every token it does not allow; EOS only once it is done."""

    def __init__(self, controllers: Sequence[TokenController | None], prompt_len: int, eos: int) -> None:
        self.controllers = controllers
        self.prompt_len = prompt_len
        self.eos = eos
        self._tensors: dict[int, tuple[object, torch.Tensor]] = {}  # id(array) -> (array, tensor): reuse big sets

    def _index(self, allowed: Sequence[int] | npt.NDArray[np.integer], device: torch.device) -> torch.Tensor:
        if isinstance(allowed, np.ndarray):
            hit = self._tensors.get(id(allowed))
            if hit is not None and hit[0] is allowed:
                return hit[1]
            t = torch.as_tensor(allowed.astype(np.int64, copy=False), device=device)
            if allowed.size > 64:
                self._tensors[id(allowed)] = (allowed, t)
            return t
        return torch.tensor(list(allowed), dtype=torch.long, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, controller in enumerate(self.controllers):
            if controller is None:
                continue
            generated = input_ids[row, self.prompt_len :].tolist()
            if self.eos in generated:  # finished row: generate() pads it from here on, nothing to constrain
                continue
            allowed = [self.eos] if controller.done(generated) else controller.allowed(generated)
            if allowed is None:
                continue
            if len(allowed) == 0:
                raise RuntimeError(f"{type(controller).__name__} allowed no token after {len(generated)} tokens")
            idx = self._index(allowed, scores.device)
            keep = scores[row, idx]
            scores[row] = float("-inf")
            scores[row, idx] = keep
        return scores


class _Deadline(StoppingCriteria):
    """Stops the whole batch once `timeout_s` has passed (checked after every generated token)."""

    def __init__(self, timeout_s: float) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.fired = False

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.fired = self.fired or time.monotonic() >= self.deadline
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class TransformersBackend:
    """`Backend` on a transformers causal LM (default: the embedded SmolLM2-135M-Instruct, converted once).

    `dtype`: 'auto' (bf16 where the CPU has native bf16, else fp32), 'bfloat16' or 'float32'. `num_threads` sets
    torch's intra-op threads for the whole process (None leaves torch's default). `device`: 'cpu', 'cuda', or
    'auto' (cuda when available). A LoRA adapter named in the spec is loaded with peft and merged.
    """

    def __init__(
        self,
        model_spec: ModelSpec | str | None = None,
        dtype: DType = "auto",
        num_threads: int | None = None,
        device: str = "auto",
        cache_dir: str | None = None,
    ) -> None:
        spec = ModelSpec(model=model_spec) if isinstance(model_spec, str) else (model_spec or ModelSpec())
        self.spec = spec
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.dtype = torch.bfloat16 if dtype == "auto" else getattr(torch, resolve_dtype(dtype))
        else:
            self.dtype = getattr(torch, resolve_dtype(dtype))
        t0 = time.perf_counter()
        path = resolve_model_path(spec, cache_dir=cache_dir, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "left"  # every row's next-token position is the last one
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        if spec.adapter is not None:
            try:
                from peft import PeftModel
            except ImportError as e:  # optional dependency
                raise ImportError(f"ModelSpec.adapter={spec.adapter!r} needs peft: `pip install peft`") from e
            model = PeftModel.from_pretrained(model, spec.adapter)
            if spec.merge_adapter:
                model = model.merge_and_unload()
        self.model: Any = model.to(self.device).eval()
        self._hf_tok = tok
        self._tokenizer = HFTokenizer(tok)
        self._head: torch.Tensor | None = None  # float32 output head for label scoring (see _fp32_head)
        self._head_decided = False
        self.load_s = time.perf_counter() - t0

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any) -> TransformersBackend:
        """A backend over a model and tokenizer already in memory, e.g. a PEFT model being trained.

        Fine-tuning validates through the real pipeline with it (finetune/train.py), so the numbers it reports
        are those of the code that serves. The caller keeps ownership: call `model.eval()` before using it.
        """
        self = cls.__new__(cls)
        self.spec = ModelSpec()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model
        self._hf_tok = tokenizer
        self._tokenizer = HFTokenizer(tokenizer)
        self._head = None
        self._head_decided = False
        self.load_s = 0.0
        return self

    @property
    def tokenizer(self) -> HFTokenizer:
        return self._tokenizer

    def _batch(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self._hf_tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def label_logprobs(self, prompts: Sequence[str], labels: Sequence[Sequence[str]]) -> list[npt.NDArray[np.float64]]:
        validate_label_args(prompts, labels)
        if not prompts:
            return []
        label_ids = [check_single_token_labels(self._tokenizer, ls) for ls in labels]
        batch = self._batch(prompts)
        mask = batch["attention_mask"]
        # Positions count real tokens only, as generate() does, so a left-padded row equals the same prompt alone.
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self._last_logits(batch, position_ids)
            logp = torch.log_softmax(logits, dim=-1)
        return [logp[i, ids].double().cpu().numpy() for i, ids in enumerate(label_ids)]

    def _last_logits(self, batch: dict[str, torch.Tensor], position_ids: torch.Tensor) -> torch.Tensor:
        """float32 logits of the last position. In bf16 the output head rounds logits of magnitude ~10-20 to steps
        of 0.06-0.125, which ties labels; so, for plain linear heads, the head runs in float32 on the last hidden
        state instead (a cached float32 copy of the head; the body stays bf16)."""
        head = self._fp32_head()
        if head is None:
            # logits_to_keep=1: only the last position's logits are computed.
            out = self.model(**batch, position_ids=position_ids, use_cache=False, logits_to_keep=1)
            return out.logits[:, -1, :].float()
        hidden = self.model.base_model(**batch, position_ids=position_ids, use_cache=False).last_hidden_state
        return torch.nn.functional.linear(hidden[:, -1, :].float(), head)

    def _fp32_head(self) -> torch.Tensor | None:
        if not self._head_decided:
            self._head_decided = True
            cfg = self.model.config
            plain = (
                self.dtype != torch.float32
                and self.model.base_model is not self.model
                and not hasattr(self.model, "peft_config")  # an unmerged adapter: its base_model is not the body
                and getattr(cfg, "final_logit_softcapping", None) is None
                and getattr(cfg, "logit_scale", None) in (None, 1, 1.0)
                and isinstance(self.model.get_output_embeddings(), torch.nn.Linear)
                and self.model.get_output_embeddings().bias is None
            )
            w = self.model.get_output_embeddings().weight if plain else None
            # Only when the copy is small (SmolLM2: 113 MB); a 128k x 4096 head would cost 2 GB.
            self._head = w.detach().float() if w is not None and w.numel() * 4 <= MAX_FP32_HEAD_BYTES else None
        return self._head

    def generate(
        self,
        prompts: Sequence[str],
        controllers: Sequence[TokenController | None] | None = None,
        max_new_tokens: int = 256,
        timeout_s: float | None = None,
    ) -> list[GenerationOutput]:
        slots = validate_generate_args(prompts, controllers, max_new_tokens, timeout_s)
        if not prompts:
            return []
        eos = self._tokenizer.eos_token_id
        batch = self._batch(prompts)
        prompt_len = batch["input_ids"].shape[1]
        processors = LogitsProcessorList()
        if any(c is not None for c in slots):
            processors.append(_ControllerProcessor(slots, prompt_len, eos))
        deadline = _Deadline(timeout_s) if timeout_s is not None else None
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=self._hf_tok.pad_token_id,
        )
        with torch.inference_mode():
            seqs = self.model.generate(
                **batch,
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([deadline] if deadline else []),
            )
        outputs = []
        for row in seqs[:, prompt_len:].tolist():
            ids = row[: row.index(eos)] if eos in row else row
            finish: FinishReason
            if eos in row:
                finish = "stop"
            elif deadline is not None and deadline.fired and len(ids) < max_new_tokens:
                finish = "timeout"
            else:
                finish = "length"
            outputs.append(
                GenerationOutput(text=self._tokenizer.decode(ids), token_ids=tuple(ids), finish_reason=finish)
            )
        return outputs
