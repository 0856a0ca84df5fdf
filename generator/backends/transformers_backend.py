"""The transformers (PyTorch) backend: the only module of the generator that imports torch and transformers.

It turns the vendor-neutral protocol into transformers forward passes: prompts are left-padded into one batch (so
the last position is every row's next-token position), each reusing the keys and values of its longest prefix
shared with a recently scored prompt (`PrefixCache`, as vLLM's prefix caching does); generation is a plain greedy
loop in which `TokenController`s mask every token but the allowed ones and finished rows leave the batch.
Everything runs under `torch.inference_mode()`. bf16 is used where the CPU computes it natively (see
`generator.model.resolve_dtype`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from generator.backends.base import (
    FinishReason,
    GenerationOutput,
    TokenController,
    check_single_token_labels,
    neutralise_special_text,
    validate_generate_args,
    validate_label_args,
)
from generator.model import DType, ModelSpec, check_adapter, resolve_dtype, resolve_model_path

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


class _Constrainer:
    """Applies one `TokenController` per row: -inf on every token it does not allow; EOS only once it is done."""

    def __init__(self, eos: int) -> None:
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

    def apply(
        self, scores: torch.Tensor, controllers: Sequence[TokenController | None], generated: Sequence[list[int]]
    ) -> torch.Tensor:
        """`scores` [rows, vocab] masked in place for each row's controller, given the ids it generated so far."""
        for row, (controller, ids) in enumerate(zip(controllers, generated, strict=True)):
            if controller is None:
                continue
            allowed = [self.eos] if controller.done(ids) else controller.allowed(ids)
            if allowed is None:
                continue
            if len(allowed) == 0:
                raise RuntimeError(f"{type(controller).__name__} allowed no token after {len(ids)} tokens")
            idx = self._index(allowed, scores.device)
            keep = scores[row, idx]
            scores[row] = float("-inf")
            scores[row, idx] = keep
        return scores


# Decoding steps and short prefills (a reason row's few new tokens) read a long cached prefix with 1-16 queries.
# There torch's CPU SDPA is slow: in bf16 it took 4.5 ms per layer for 5 rows x 1,130 cached tokens (this box),
# and transformers first copies the 3 key/value heads out to the 9 query heads. Grouping the query heads over the
# shared key/value heads instead (two small matmuls, softmax in float32) took 1.1 ms: a decoding step fell from
# ~220 ms to ~40 ms. Long prefills keep SDPA's fused causal kernel.
GROUPED_ATTENTION = "shoprec_grouped"
MAX_GROUPED_QUERIES = 16


def _grouped_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for few queries over many keys, without repeating the key/value heads; else transformers' SDPA.

    Shapes as transformers passes them: query [b, heads, q, d], key/value [b, kv_heads, L, d], attention_mask a
    boolean [b, 1, q, L] (True = attend) or None; returns [b, q, heads, d]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q, d = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    special = any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux", "position_bias"))
    # No mask with several queries means "causal" (SDPA's is_causal): left to SDPA, as is anything unusual.
    implicit_causal = attention_mask is None and q > 1
    if q > MAX_GROUPED_QUERIES and not (implicit_causal or special or dropout or heads % kv_heads):
        starts = _left_padded_starts(attention_mask, q, length)
        if starts is not None:
            return _causal_per_row(query, key, value, starts, scaling), None
    if q > MAX_GROUPED_QUERIES or implicit_causal or special or dropout or heads % kv_heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    group = heads // kv_heads
    scale = scaling if scaling is not None else d**-0.5
    # head h = kv * group + j, the order of transformers' repeat_kv
    scores = torch.matmul(query.reshape(b, kv_heads, group * q, d), key.transpose(-1, -2)).float() * scale
    scores = scores.view(b, kv_heads, group, q, length)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[:, :, None, -q:, :], float("-inf"))
        else:
            scores = scores + attention_mask[:, :, None, -q:, :].float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(b, kv_heads, group * q, length)
    out = torch.matmul(probs, value).view(b, heads, q, d)
    return out.transpose(1, 2).contiguous(), None


def _left_padded_starts(mask: torch.Tensor | None, q: int, length: int) -> list[int] | None:
    """Where each row's tokens start, when the batch is a fresh prefill of left-padded rows (no cached prefix, every
    row causal over its own tokens); None for anything else (a cached prefix, a mask that is not plain padding)."""
    if mask is None or mask.dtype != torch.bool or q != length or mask.shape[-2] != q:
        return None
    last = mask[:, 0, -1, :]  # the last query of each row sees exactly the row's real tokens
    starts = (~last).sum(-1)
    positions = torch.arange(length, device=mask.device)
    if not torch.equal(last, positions[None, :] >= starts[:, None]):
        return None  # holes: not left padding
    return [int(x) for x in starts]


def _causal_per_row(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, starts: Sequence[int], scaling: float | None
) -> torch.Tensor:
    """Causal attention of each left-padded row over its own tokens, one SDPA call per row.

    Why: given a padding mask, torch's CPU SDPA computes every block of the [length x length] scores and masks them,
    where `is_causal` skips the upper half: a prefill of 2 score prompts of ~1,100 tokens took 4.4 s against 2 x
    1.5 s alone, the attention kernel 63% of it (this 2-core box, bf16, one thread). Per row with `is_causal`,
    each row costs what it costs alone (2 prompts of equal length: 2.9 s). The pad positions' outputs are zeros:
    nothing real attends to them."""
    b, heads, q, d = query.shape
    group = heads // key.shape[1]
    out = query.new_zeros((b, q, heads, d))
    for i, start in enumerate(starts):
        k = key[i : i + 1, :, start:].repeat_interleave(group, dim=1)  # head h reads kv head h // group
        v = value[i : i + 1, :, start:].repeat_interleave(group, dim=1)
        row = torch.nn.functional.scaled_dot_product_attention(
            query[i : i + 1, :, start:], k, v, is_causal=True, scale=scaling
        )
        out[i, start:] = row[0].transpose(0, 1)
    return out


def _use_grouped_attention(model: Any) -> None:
    """Switch `model` to `_grouped_attention` where it runs SDPA (registered once, under GROUPED_ATTENTION)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return  # eager, flash or a model's own kernel: leave it
    AttentionInterface.register(GROUPED_ATTENTION, _grouped_attention)
    AttentionMaskInterface.register(GROUPED_ATTENTION, sdpa_mask)
    model.set_attn_implementation(GROUPED_ATTENTION)


KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values of ONE sequence, [1, heads, tokens, dim]


MIN_REUSED_SHARE = 0.5  # see PrefixCache.lookup


class PrefixCache:
    """The key/value states of recent scoring prompts, by token ids: vLLM's automatic prefix caching, in miniature.

    Score mode reads the ranking prompt once for the label scores, then writes each pick's reason in a row that
    starts with that same prompt. With this cache those rows compute only their few new tokens: the reasons of
    K picks cost K short decodes instead of K more prompt prefills. Any prompt gains from its longest shared
    prefix with a cached one (e.g. the system text every request starts with). Least recently used entries are
    evicted beyond `max_bytes`, but never the entries of the call that stored them (a batch keeps all its rows).
    Exact by construction: cached states are those of the same token ids at the same positions.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], tuple[npt.NDArray[np.int64], KV, int]] = OrderedDict()
        self._bytes = 0
        self.stats = {"lookups": 0, "hits": 0, "reused_tokens": 0, "computed_tokens": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def lookup(self, ids: Sequence[int]) -> tuple[KV | None, int]:
        """The cached entry sharing the longest prefix with `ids` and that length; at least one token of `ids` is
        left to compute (its logits are needed). (None, 0) when less than `MIN_REUSED_SHARE` of `ids` is shared.

        Why not any shared prefix: on this CPU attention is most of a 1,000-token prefill, and a cached prefix
        turns SDPA's fused causal kernel into a masked one (31 vs 25 ms a layer, measured), so reusing the
        ~130-token system text made scoring ~10% SLOWER. Reuse pays when most of the prompt is cached."""
        self.stats["lookups"] += 1
        row = np.asarray(ids, dtype=np.int64)
        limit = len(row) - 1
        best_key: tuple[int, ...] | None = None
        best = 0
        for key, (cached, _, _) in self._entries.items():
            n = min(limit, len(cached))
            if n <= best:
                continue
            diff = np.flatnonzero(cached[:n] != row[:n])
            common = int(diff[0]) if diff.size else n
            if common > best:
                best_key, best = key, common
        if best_key is None or best < MIN_REUSED_SHARE * len(row):
            self.stats["computed_tokens"] += len(row)
            return None, 0
        self._entries.move_to_end(best_key)
        self.stats["hits"] += 1
        self.stats["reused_tokens"] += best
        self.stats["computed_tokens"] += len(row) - best
        return self._entries[best_key][1], best

    def store(self, rows: Sequence[tuple[Sequence[int], KV]]) -> None:
        """Add one entry per (ids, states); then evict the oldest entries not added here while over budget."""
        fresh = set()
        for ids, kv in rows:
            key = tuple(ids)
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[2]
            size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
            self._entries[key] = (np.asarray(ids, dtype=np.int64), kv, size)
            self._bytes += size
            fresh.add(key)
        for key in list(self._entries):
            if self._bytes <= self.max_bytes:
                break
            if key not in fresh:
                self._bytes -= self._entries.pop(key)[2]


@dataclass
class _Batch:
    """A prefilled batch: the next-token logits and what decoding continues from (see `_prefill` for the layout)."""

    logits: torch.Tensor  # [rows, vocab] float32, the last position's
    cache: Any  # DynamicCache over [cached prefix | new tokens]
    mask: torch.Tensor  # [rows, cached + width]
    last_position: torch.Tensor  # [rows]
    cached: int  # T: the longest cached prefix used
    reused: list[int]  # c_i: cached tokens row i reused
    width: int  # W: the longest new part
    new: list[int]  # new tokens of row i

    def row_states(self, i: int) -> KV:
        """Row i's keys and values without its pads: what the prompt alone would have cached."""
        t, c, w, n = self.cached, self.reused[i], self.width, self.new[i]
        out = []
        for layer in self.cache.layers:
            k, v = layer.keys[i : i + 1], layer.values[i : i + 1]
            out.append(
                (
                    torch.cat([k[:, :, t - c : t], k[:, :, t + w - n :]], dim=2),
                    torch.cat([v[:, :, t - c : t], v[:, :, t + w - n :]], dim=2),
                )
            )
        return out


class TransformersBackend:
    """`Backend` on a transformers causal LM (default: the embedded SmolLM2-135M-Instruct, converted once).

    `dtype`: 'auto' (bf16 where the CPU has native bf16, else fp32), 'bfloat16' or 'float32'. `num_threads` sets
    torch's intra-op threads for the whole process (None leaves torch's default). `device`: 'cpu', 'cuda', or
    'auto' (cuda when available). A LoRA adapter named in the spec is loaded with peft and merged.
    `prefix_cache_mb`: budget of the `PrefixCache` of scored prompts (0: none). `max_batch_tokens`: most prompt
    tokens in one forward batch (a longer list of prompts runs as several batches; 16k tokens of SmolLM2 hold
    ~370 MB of keys and values).
    """

    def __init__(
        self,
        model_spec: ModelSpec | str | None = None,
        dtype: DType = "auto",
        num_threads: int | None = None,
        device: str = "auto",
        cache_dir: str | None = None,
        prefix_cache_mb: float = 256,
        max_batch_tokens: int = 16384,
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
        if spec.adapter is not None:  # a bad adapter folder: one error naming the file, before any weights load
            check_adapter(spec.adapter, base=path)
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
        if self.device.type == "cpu":
            _use_grouped_attention(self.model)
        self._hf_tok = tok
        self._tokenizer = HFTokenizer(tok)
        self._head: torch.Tensor | None = None  # float32 output head for label scoring (see _fp32_head)
        self._head_decided = False
        # 256 MB hold ~10 SmolLM2 prompts of 1,100 tokens (23 KB of bf16 keys and values per token); 0 turns it off.
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self.max_batch_tokens = max_batch_tokens
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
        self.prefix_cache = None  # the caller may change the weights (training): cached states would go stale
        self.max_batch_tokens = 16384
        self.load_s = 0.0
        return self

    @property
    def tokenizer(self) -> HFTokenizer:
        return self._tokenizer

    @property
    def prefix_caching(self) -> bool:
        """True while prompts that share a prefix with a recently scored prompt skip recomputing it."""
        return self.prefix_cache is not None

    def label_logprobs(self, prompts: Sequence[str], labels: Sequence[Sequence[str]]) -> list[npt.NDArray[np.float64]]:
        validate_label_args(prompts, labels)
        if not prompts:
            return []
        label_ids = [check_single_token_labels(self._tokenizer, ls) for ls in labels]
        rows = [self._tokenizer.encode(p) for p in prompts]
        out: list[npt.NDArray[np.float64]] = []
        # The states of EVERY prompt of this call, stored together at the end: the reason rows that follow start
        # with these prompts, and the cache never evicts the entries of the call that stores them. Stored chunk by
        # chunk, a later chunk evicted the earlier ones' and their reason rows re-read the whole prompt (a batch of
        # 16 prompts over two chunks: 25 of 96 lookups hit and it took 766 s; all cached, 80 hits and 115 s).
        states: list[tuple[Sequence[int], KV]] = []
        # On a CPU each prompt is its own forward pass: a prefill of ~1,100 tokens already keeps the cores busy, and
        # in a batch the shorter prompts' padding is computed too (2 score prompts: 1.43 s each alone, 1.59 s each
        # batched, 4: 1.70 s each; this 2-core box, bf16, one thread). A GPU gains from the batch.
        budget = 0 if self.device.type == "cpu" else self.max_batch_tokens
        for chunk in _chunks([len(r) for r in rows], budget):
            with torch.inference_mode():
                state = self._prefill([rows[i] for i in chunk])
                logp = torch.log_softmax(state.logits, dim=-1)
                if self.prefix_cache is not None and not all(type(x) is DynamicLayer for x in state.cache.layers):
                    self.prefix_cache = None  # sliding-window or hybrid layers: a prefix's states are not plain keys
                if self.prefix_cache is not None:
                    states += [(rows[i], state.row_states(j)) for j, i in enumerate(chunk)]
            out += [logp[j, label_ids[i]].double().cpu().numpy() for j, i in enumerate(chunk)]
        if self.prefix_cache is not None and states:
            self.prefix_cache.store(states)
        return out

    def _prefill(self, rows: Sequence[Sequence[int]]) -> _Batch:
        """One forward pass over the prompts `rows` (token ids), reusing each row's longest cached prefix.

        Layout of row i in the batch (T = the longest cached prefix used, W = the longest remaining part):
        [pad .. | cached prefix c_i][pad .. | new tokens]. Pads are masked out and positions count real tokens
        only, so each row computes exactly what it would alone; cached states carry their positions already.
        """
        hits = [self.prefix_cache.lookup(r) if self.prefix_cache is not None else (None, 0) for r in rows]
        n, dev = len(rows), self.device
        reused = [c for _, c in hits]
        t = max(reused)
        new = [list(r[c:]) for r, c in zip(rows, reused, strict=True)]
        w = max(len(x) for x in new)
        pad_id = self._hf_tok.pad_token_id
        input_ids = torch.full((n, w), pad_id, dtype=torch.long)
        mask = torch.zeros((n, t + w), dtype=torch.long)
        for i, (x, c) in enumerate(zip(new, reused, strict=True)):
            input_ids[i, w - len(x) :] = torch.tensor(x, dtype=torch.long)
            mask[i, t - c : t] = 1
            mask[i, t + w - len(x) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, t:]
        past = DynamicCache()
        if t > 0:
            ref = next(kv for kv, _ in hits if kv is not None)  # shapes and dtype of the cached states
            data = []
            for layer, (ref_k, ref_v) in enumerate(ref):
                k = ref_k.new_zeros((n, ref_k.shape[1], t, ref_k.shape[3]))
                v = ref_v.new_zeros((n, ref_v.shape[1], t, ref_v.shape[3]))
                for i, (kv, c) in enumerate(hits):
                    if kv is not None and c > 0:
                        k[i, :, t - c :] = kv[layer][0][0, :, :c]
                        v[i, :, t - c :] = kv[layer][1][0, :, :c]
                data.append((k, v))
            past = DynamicCache(ddp_cache_data=data)
        logits, cache = self._forward(input_ids.to(dev), mask.to(dev), positions.to(dev), past)
        lengths = [len(x) for x in new]
        return _Batch(
            logits=logits,
            cache=cache,
            mask=mask.to(dev),
            last_position=positions[:, -1].to(dev),
            cached=t,
            reused=reused,
            width=w,
            new=lengths,
        )

    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past: Any
    ) -> tuple[torch.Tensor, Any]:
        """float32 logits of the last position and the grown key/value cache.

        In bf16 the output head rounds logits of magnitude ~10-20 to steps of 0.06-0.125, which ties labels; so,
        for plain linear heads, the head runs in float32 on the last hidden state instead (a cached float32 copy
        of the head; the body stays bf16)."""
        kwargs = {"attention_mask": mask, "position_ids": positions, "past_key_values": past, "use_cache": True}
        head = self._fp32_head()
        if head is None:
            # logits_to_keep=1: only the last position's logits are computed.
            out = self.model(input_ids=input_ids, logits_to_keep=1, **kwargs)
            return out.logits[:, -1, :].float(), out.past_key_values
        out = self.model.base_model(input_ids=input_ids, **kwargs)
        return torch.nn.functional.linear(out.last_hidden_state[:, -1, :].float(), head), out.past_key_values

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
        """Greedy decoding in batches of at most `max_batch_tokens` prompt tokens (rows are independent, so the
        split changes memory, not results); rows that finish leave their batch."""
        slots = validate_generate_args(prompts, controllers, max_new_tokens, timeout_s)
        if not prompts:
            return []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        rows = [self._tokenizer.encode(p) for p in prompts]
        generated: list[list[int]] = [[] for _ in prompts]
        finish: list[FinishReason] = ["timeout"] * len(prompts)  # rows of batches the deadline never reached
        constrainer = _Constrainer(self._tokenizer.eos_token_id)
        for chunk in _chunks([len(r) for r in rows], self.max_batch_tokens):
            if chunk[0] > 0 and deadline is not None and time.monotonic() >= deadline:
                break
            got = self._decode(
                [rows[i] for i in chunk], [slots[i] for i in chunk], constrainer, max_new_tokens, deadline
            )
            for i, (ids, why) in zip(chunk, got, strict=True):
                generated[i], finish[i] = ids, why
        return [
            GenerationOutput(text=self._tokenizer.decode(ids), token_ids=tuple(ids), finish_reason=why)
            for ids, why in zip(generated, finish, strict=True)
        ]

    def _decode(
        self,
        rows: Sequence[Sequence[int]],
        slots: Sequence[TokenController | None],
        constrainer: _Constrainer,
        max_new_tokens: int,
        deadline: float | None,
    ) -> list[tuple[list[int], FinishReason]]:
        """Greedy continuation of one batch of prompts (token ids)."""
        eos = self._tokenizer.eos_token_id
        generated: list[list[int]] = [[] for _ in rows]
        finish: list[FinishReason] = ["length"] * len(rows)
        with torch.inference_mode():
            state = self._prefill(rows)
            logits, cache, mask, position = state.logits, state.cache, state.mask, state.last_position
            active = list(range(len(rows)))  # batch row j decodes prompt active[j]
            for step in range(max_new_tokens):
                scores = constrainer.apply(logits, [slots[r] for r in active], [generated[r] for r in active])
                chosen = scores.argmax(dim=-1).tolist()
                keep = []
                for j, (r, token) in enumerate(zip(active, chosen, strict=True)):
                    if token == eos:
                        finish[r] = "stop"
                    else:
                        generated[r].append(token)
                        keep.append(j)
                if not keep or step == max_new_tokens - 1:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    for j in keep:
                        finish[active[j]] = "timeout"
                    break
                if len(keep) < len(active):  # finished rows leave the batch
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    mask, position = mask[index], position[index]
                    active = [active[j] for j in keep]
                    chosen = [chosen[j] for j in keep]
                mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
                position = position + 1
                tokens = torch.tensor(chosen, dtype=torch.long, device=self.device)[:, None]
                logits, cache = self._forward(tokens, mask, position[:, None], cache)
        return list(zip(generated, finish, strict=True))


def _chunks(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive index groups whose lengths sum to at most `budget` (a longer single row is a group alone).

    Why: a batch row carries its whole prompt's keys and values (a shared prefix is copied into every row), so
    40 reason rows of a 1,100-token ranking prompt held ~2 GB of SmolLM2 states at once; bounded, they do not."""
    groups: list[list[int]] = []
    total = budget + 1
    for i, n in enumerate(lengths):
        if total + n > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups
