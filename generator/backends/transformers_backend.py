"""The transformers (PyTorch) backend: the only module of the generator that imports torch and transformers.

It turns the vendor-neutral protocol into transformers forward passes: prompts are left-padded into one batch (so
the last position is every row's next-token position), each reusing the keys and values of its longest prefix
shared with a recently scored prompt (`PrefixCache`, as vLLM's prefix caching does); generation is a plain greedy
loop in which `TokenController`s allow only some tokens and finished rows leave the batch. Three things make score
mode's reason rows cheap on a CPU, none changing a token: rows read their cached prompt in place (`SharedPrefix`),
a constrained row scores only its allowed tokens (`_Last.greedy`), and forced tokens cost no decoding step
(`_jump_forward`).
Everything runs under `torch.inference_mode()`. bf16 is used where the CPU computes it natively (see
`generator.model.resolve_dtype`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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

    def allowed(
        self, controllers: Sequence[TokenController | None], generated: Sequence[list[int]], device: torch.device
    ) -> list[torch.Tensor | None]:
        """Each row's allowed next token ids given the ids it generated so far (None: any token)."""
        out: list[torch.Tensor | None] = []
        for controller, ids in zip(controllers, generated, strict=True):
            allowed = None if controller is None else [self.eos] if controller.done(ids) else controller.allowed(ids)
            if allowed is not None and len(allowed) == 0:
                assert controller is not None
                raise RuntimeError(f"{type(controller).__name__} allowed no token after {len(ids)} tokens")
            out.append(None if allowed is None else self._index(allowed, device))
        return out


@dataclass
class _Last:
    """The last position's output of a forward pass, scored by the output head on demand.

    With the float32 head (`TransformersBackend._forward`), `hidden` is kept and `greedy` scores only the tokens the
    rows may choose: a constrained reason row allows a handful of the 49k tokens, and the whole head cost 21 ms a
    decoding step for 20 rows against ~1 ms for their allowed tokens (this 2-core box). Each token's logit is the
    same dot product either way; `logits` computes the whole vocabulary when it is needed (label scoring)."""

    hidden: torch.Tensor | None  # [rows, hidden] float32, with `head`
    head: torch.Tensor | None  # [vocab, hidden] float32
    full: torch.Tensor | None = None  # [rows, vocab] float32

    def logits(self) -> torch.Tensor:
        if self.full is None:
            assert self.hidden is not None and self.head is not None
            self.full = torch.nn.functional.linear(self.hidden, self.head)
        return self.full

    def greedy(self, allowed: Sequence[torch.Tensor | None]) -> list[int]:
        """Each row's highest-scoring token among its allowed ones (None: any); ties go to the lowest id."""
        subset = self.full is None and self.hidden is not None and self.head is not None
        if subset and all(a is not None for a in allowed):
            ids = torch.cat([a for a in allowed if a is not None])
            union, where = torch.unique(ids, return_inverse=True)  # sorted: ties still go to the lowest id
            assert self.hidden is not None and self.head is not None
            sub = torch.nn.functional.linear(self.hidden, self.head[union])  # [rows, |union|]
            scores = torch.full_like(sub, float("-inf"))
            start = 0
            for row, a in enumerate(allowed):
                assert a is not None
                cols = where[start : start + len(a)]
                scores[row, cols] = sub[row, cols]
                start += len(a)
            return union[scores.argmax(dim=-1)].tolist()  # type: ignore[no-any-return]
        scores = self.logits().clone()
        for row, a in enumerate(allowed):
            if a is not None:
                keep = scores[row, a]
                scores[row] = float("-inf")
                scores[row, a] = keep
        return scores.argmax(dim=-1).tolist()  # type: ignore[no-any-return]


# Decoding steps and short prefills (a reason row's few new tokens) read a long cached prefix with 1-16 queries.
# There torch's CPU SDPA is slow: in bf16 it took 4.5 ms per layer for 5 rows x 1,130 cached tokens (this box),
# and transformers first copies the 3 key/value heads out to the 9 query heads. Grouping the query heads over the
# shared key/value heads instead (two small matmuls, softmax in float32) took 1.1 ms: a decoding step fell from
# ~220 ms to ~40 ms. Long prefills keep SDPA's fused causal kernel.
GROUPED_ATTENTION = "shoprec_grouped"
MAX_GROUPED_QUERIES = 16
# Rows whose new part (after their cached prefix) is longer than this are prefilled whole, with the prefix copied in:
# the shared-prefix attention scores a row's own tokens with an explicit [new x new] mask, meant for a few tokens.
MAX_SHARED_NEW_TOKENS = 64


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

    shared = kwargs.pop(SHARED_PREFIX_KWARG, None)
    if shared is not None:
        layer = int(module.layer_idx)  # type: ignore[arg-type]  # every transformers attention module has one
        return _shared_prefix_attention(query, key, value, attention_mask, shared, layer, scaling), None
    b, heads, q, d = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    special = any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux", "position_bias"))
    # No mask with several queries means "causal" (SDPA's is_causal): left to SDPA, as is anything unusual.
    implicit_causal = attention_mask is None and q > 1
    if q > MAX_GROUPED_QUERIES and not (special or dropout or heads % kv_heads):
        # a fresh prefill: causal with no mask at all (one unpadded row), or plain left padding
        if implicit_causal:
            starts = [0] * b if q == length else None
        else:
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


SHARED_PREFIX_KWARG = "shoprec_shared_prefix"  # the model's forward hands it to the attention function of every layer


@dataclass
class SharedPrefix:
    """Cached prompt prefixes that runs of consecutive batch rows continue, read in place by the attention.

    Row i of the batch continues `prefixes[group[i]]` (per layer: keys, values [1, kv_heads, length, d]); the
    batch's own key/value cache holds only the tokens after it. `group` never decreases, so a prefix's rows are
    one run: a decoding step reads each prefix once for all its rows, as one matrix product, instead of each row
    reading (and, in transformers' cache, re-copying at every step) its own copy (see `_shared_prefix_attention`).
    """

    prefixes: list[KV]
    group: list[int]
    runs: list[tuple[int, int, int]] = field(init=False)  # (first row, end row, prefix)

    def __post_init__(self) -> None:
        if any(b < a for a, b in zip(self.group, self.group[1:], strict=False)):
            raise ValueError("SharedPrefix.group must not decrease: rows of one prefix are consecutive")
        self.runs = []
        for row, g in enumerate(self.group):
            if self.runs and self.runs[-1][2] == g:
                self.runs[-1] = (self.runs[-1][0], row + 1, g)
            else:
                self.runs.append((row, row + 1, g))

    def select(self, rows: Sequence[int]) -> SharedPrefix:
        """The rows `rows` (increasing), as the batch keeps them when others finish."""
        return SharedPrefix(self.prefixes, [self.group[r] for r in rows])


def _shared_prefix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    shared: SharedPrefix,
    layer: int,
    scaling: float | None,
) -> torch.Tensor:
    """Attention of each row over its shared prefix and then its own tokens, merged exactly by log-sum-exp.

    query [b, heads, q, d]; key/value [b, kv_heads, S, d]: the rows' own tokens; mask a boolean [b, 1, q, S] (True =
    attend), an additive float one, or None (causal when q > 1). Returns [b, q, heads, d]. Each part is a softmax
    over its own keys (float32 scores, max-subtracted), combined as flash-attention combines blocks: the result is
    the softmax over [prefix | own] keys. A query that sees none of its own keys (a left pad) sees the prefix only.
    """
    b, heads, q, d = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    gq = group * q
    scale = scaling if scaling is not None else d**-0.5
    qs = query.reshape(b, kv_heads, gq, d)  # head h = kv * group + j, the order of transformers' repeat_kv
    own = torch.matmul(qs, key.transpose(-1, -2)).float() * scale  # [b, kv, gq, S]
    own = own.view(b, kv_heads, group, q, length)
    if mask is not None:
        visible = mask[:, :, None, -q:, :]
        own = own.masked_fill(~visible, float("-inf")) if mask.dtype == torch.bool else own + visible.float()
    elif q > 1:  # transformers' "no mask" with several queries: causal over the own tokens
        causal = torch.ones((q, length), dtype=torch.bool, device=query.device).tril(length - q)
        own = own.masked_fill(~causal, float("-inf"))
    own = own.view(b, kv_heads, gq, length)
    # a fully masked query (a pad) gets weight 0 here instead of NaN, and so reads its prefix only
    own_max = own.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    own_p = torch.exp(own - own_max)
    own_sum = own_p.sum(-1, keepdim=True)
    own_out = torch.matmul(own_p.to(value.dtype), value).float()  # unnormalised, [b, kv, gq, d]
    out = torch.empty((b, kv_heads, gq, d), dtype=torch.float32, device=query.device)
    for start, end, g in shared.runs:
        pk, pv = shared.prefixes[g][layer]
        n = end - start
        # all rows of the run as one matrix: [kv, n * gq, d] against the prefix's [kv, L, d]
        rows_q = qs[start:end].transpose(0, 1).reshape(kv_heads, n * gq, d)
        scores = torch.matmul(rows_q, pk[0].transpose(-1, -2)).float() * scale
        top = scores.amax(-1, keepdim=True)
        p = torch.exp(scores - top)
        total = p.sum(-1, keepdim=True).view(kv_heads, n, gq, 1).transpose(0, 1)
        part = torch.matmul(p.to(pv.dtype), pv[0]).float().view(kv_heads, n, gq, d).transpose(0, 1)
        top = top.view(kv_heads, n, gq, 1).transpose(0, 1)
        both = torch.maximum(top, own_max[start:end])
        a, a_own = torch.exp(top - both), torch.exp(own_max[start:end] - both)
        out[start:end] = (part * a + own_out[start:end] * a_own) / (total * a + own_sum[start:end] * a_own)
    return out.to(query.dtype).view(b, heads, q, d).transpose(1, 2).contiguous()


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
    """Causal attention of each left-padded row over its own tokens, one row at a time.

    Why: given a padding mask, torch's CPU SDPA computes every block of the [length x length] scores and masks them,
    where `is_causal` skips the upper half: a prefill of 2 score prompts of ~1,100 tokens took 4.4 s against 2 x
    1.5 s alone, the attention kernel 63% of it (this 2-core box, bf16, one thread). Per row, each row costs what it
    costs alone. In bf16 a row runs `_blocked_causal` (2.4x faster than SDPA's causal kernel here); in float32,
    SDPA's causal kernel. The pad positions' outputs are zeros: nothing real attends to them."""
    b, heads, q, d = query.shape
    group = heads // key.shape[1]
    scale = scaling if scaling is not None else d**-0.5
    out = query.new_zeros((b, q, heads, d))
    for i, start in enumerate(starts):
        if query.dtype == torch.bfloat16:
            out[i, start:] = _blocked_causal(query[i, :, start:], key[i, :, start:], value[i, :, start:], scale)
            continue
        k = key[i : i + 1, :, start:].repeat_interleave(group, dim=1)  # head h reads kv head h // group
        v = value[i : i + 1, :, start:].repeat_interleave(group, dim=1)
        row = torch.nn.functional.scaled_dot_product_attention(
            query[i : i + 1, :, start:], k, v, is_causal=True, scale=scale
        )
        out[i, start:] = row[0].transpose(0, 1)
    return out


CAUSAL_BLOCK = 64  # queries per block of `_blocked_causal` (64: 14 ms a layer, 128: 16, SDPA 23; 1,134 tokens)


def _blocked_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of one sequence, query [heads, n, d] over key/value [kv_heads, n, d] -> [n, heads, d].

    Blocks of `CAUSAL_BLOCK` queries, each against the keys up to its end only (the causal half, as SDPA's
    `is_causal`), the query heads of one key/value head stacked into one matrix product. Scores are float32 products
    of float32 copies of the queries and keys (bf16 products round scores of ~10-30 to steps of 0.06-0.125, which
    moved outputs 6x more than SDPA's rounding, measured); the softmax is float32 and the weights meet the values in
    bf16. Why not SDPA: its CPU kernel took 23 ms a layer for a 1,134-token score prompt on this 2-core box without
    AMX (bf16, one thread), this 14 ms, with outputs as close to a float32 reference (max error 0.018 vs 0.014)."""
    heads, n, d = query.shape
    kv_heads = key.shape[0]
    group = heads // kv_heads
    qg = query.float().reshape(kv_heads, group, n, d)  # head h = kv * group + j, the order of transformers' repeat_kv
    kt = key.float().transpose(-1, -2)
    out = torch.empty((kv_heads, group, n, d), dtype=query.dtype, device=query.device)
    upper = torch.ones((CAUSAL_BLOCK, CAUSAL_BLOCK), dtype=torch.bool, device=query.device).triu(1)
    for s in range(0, n, CAUSAL_BLOCK):
        e = min(n, s + CAUSAL_BLOCK)
        width = e - s
        scores = torch.matmul(qg[:, :, s:e].reshape(kv_heads, group * width, d), kt[:, :, :e])
        scores = scores.view(kv_heads, group, width, e)
        scores[..., s:e].masked_fill_(upper[:width, :width], float("-inf"))  # the block's own future keys
        p = torch.softmax(scores.mul_(scale), dim=-1).to(value.dtype).view(kv_heads, group * width, e)
        out[:, :, s:e] = torch.matmul(p, value[:, :e]).view(kv_heads, group, width, d)
    return out.view(heads, n, d).transpose(0, 1)


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
        # read_in_place: decoded rows that read their cached prefix in place (`SharedPrefix`), not a copy of it
        self.stats = {"lookups": 0, "hits": 0, "reused_tokens": 0, "computed_tokens": 0, "read_in_place": 0}

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

    last: _Last  # the last position's output (next-token logits)
    cache: Any  # DynamicCache over [cached prefix | new tokens]
    mask: torch.Tensor  # [rows, cached + width]
    last_position: torch.Tensor  # [rows]
    cached: int  # T: the longest cached prefix used
    reused: list[int]  # c_i: cached tokens row i reused
    width: int  # W: the longest new part
    new: list[int]  # new tokens of row i
    shared: SharedPrefix | None = None  # set: `cache` holds only the new tokens, the prefixes are read in place

    def row_states(self, i: int) -> KV:
        """Row i's keys and values without its pads: what the prompt alone would have cached."""
        if self.shared is not None:
            raise ValueError("row_states needs a batch whose cache holds the whole prompts (not a shared-prefix one)")
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
    ~370 MB of keys and values). `jump_forward`: tokens a controller forces are appended without a decoding step
    each (`_jump_forward`; False decodes them one by one, with the same result).
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
        jump_forward: bool = True,
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
        self.jump_forward = jump_forward
        self.load_s = time.perf_counter() - t0

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any) -> TransformersBackend:
        """A backend over a model and tokenizer already in memory, e.g. a PEFT model being trained.

        Fine-tuning validates through the real pipeline with it (finetune/train.py), so the numbers it reports
        are those of the code that serves, within bf16 rounding: the model keeps its own attention (serving's CPU
        kernels, `_use_grouped_attention`, are not put on a model being trained). The caller keeps ownership: call
        `model.eval()` before using it.
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
        self.jump_forward = True
        self.load_s = 0.0
        return self

    @property
    def tokenizer(self) -> HFTokenizer:
        return self._tokenizer

    @property
    def _shares_prefixes(self) -> bool:
        """True where decoding reads cached prefixes in place: a prefix cache and our attention function."""
        attn = getattr(self.model.config, "_attn_implementation", None)
        return self.prefix_cache is not None and attn == GROUPED_ATTENTION

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
                logp = torch.log_softmax(state.last.logits(), dim=-1)
                if self.prefix_cache is not None and not all(type(x) is DynamicLayer for x in state.cache.layers):
                    self.prefix_cache = None  # sliding-window or hybrid layers: a prefix's states are not plain keys
                if self.prefix_cache is not None:
                    states += [(rows[i], state.row_states(j)) for j, i in enumerate(chunk)]
            out += [logp[j, label_ids[i]].double().cpu().numpy() for j, i in enumerate(chunk)]
        if self.prefix_cache is not None and states:
            self.prefix_cache.store(states)
        return out

    def _lookup(self, rows: Sequence[Sequence[int]]) -> list[tuple[KV | None, int]]:
        """Each row's longest cached prefix (states, length); (None, 0) for every row without a prefix cache."""
        return [self.prefix_cache.lookup(r) if self.prefix_cache is not None else (None, 0) for r in rows]

    def _prefill(self, rows: Sequence[Sequence[int]], hits: Sequence[tuple[KV | None, int]] | None = None) -> _Batch:
        """One forward pass over the prompts `rows` (token ids), reusing each row's longest cached prefix (`hits`,
        looked up here when not given).

        Layout of row i in the batch (T = the longest cached prefix used, W = the longest remaining part):
        [pad .. | cached prefix c_i][pad .. | new tokens]. Pads are masked out and positions count real tokens
        only, so each row computes exactly what it would alone; cached states carry their positions already.
        """
        hits = list(hits) if hits is not None else self._lookup(rows)
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
        last, cache = self._forward(input_ids.to(dev), mask.to(dev), positions.to(dev), past)
        lengths = [len(x) for x in new]
        return _Batch(
            last=last,
            cache=cache,
            mask=mask.to(dev),
            last_position=positions[:, -1].to(dev),
            cached=t,
            reused=reused,
            width=w,
            new=lengths,
        )

    def _prefill_shared(self, rows: Sequence[Sequence[int]], hits: Sequence[tuple[KV | None, int]]) -> _Batch:
        """A forward pass over the new tokens of `rows` only, each row continuing its cached prefix in place.

        Every row has a hit, and rows of one prefix are consecutive (see `SharedPrefix`). Layout of row i:
        [pad .. | new tokens], positions counting on from its prefix; the batch's cache holds the new tokens."""
        prefixes: list[KV] = []
        group: list[int] = []
        seen: tuple[int, int] | None = None
        for kv, c in hits:
            assert kv is not None and c > 0, "_prefill_shared needs a cached prefix for every row"
            if (id(kv), c) != seen:
                full = kv[0][0].shape[2] == c
                # a part of an entry is copied out once: a strided view was copied by every matrix product
                prefixes.append(kv if full else [(k[:, :, :c].contiguous(), v[:, :, :c].contiguous()) for k, v in kv])
                seen = (id(kv), c)
            group.append(len(prefixes) - 1)
        reused = [c for _, c in hits]
        new = [list(r[c:]) for r, c in zip(rows, reused, strict=True)]
        n, w = len(rows), max(len(x) for x in new)
        input_ids = torch.full((n, w), self._hf_tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, w), dtype=torch.long)
        for i, x in enumerate(new):
            input_ids[i, w - len(x) :] = torch.tensor(x, dtype=torch.long)
            mask[i, w - len(x) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + torch.tensor(reused)[:, None]
        shared = SharedPrefix(prefixes, group)
        dev = self.device
        last, cache = self._forward(input_ids.to(dev), mask.to(dev), positions.to(dev), DynamicCache(), shared)
        return _Batch(
            last=last,
            cache=cache,
            mask=mask.to(dev),
            last_position=positions[:, -1].to(dev),
            cached=0,
            reused=reused,
            width=w,
            new=[len(x) for x in new],
            shared=shared,
        )

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        past: Any,
        shared: SharedPrefix | None = None,
    ) -> tuple[_Last, Any]:
        """The last position's output (float32 logits on demand) and the grown key/value cache (`shared`: the
        prefixes the rows continue, read by `_shared_prefix_attention`; `mask` and `past` then cover the rows' own
        tokens).

        In bf16 the output head rounds logits of magnitude ~10-20 to steps of 0.06-0.125, which ties labels; so,
        for plain linear heads, the head runs in float32 on the last hidden state instead (a cached float32 copy
        of the head; the body stays bf16)."""
        kwargs = {"attention_mask": mask, "position_ids": positions, "past_key_values": past, "use_cache": True}
        if shared is not None:
            kwargs[SHARED_PREFIX_KWARG] = shared
        head = self._fp32_head()
        if head is None:
            # logits_to_keep=1: only the last position's logits are computed.
            out = self.model(input_ids=input_ids, logits_to_keep=1, **kwargs)
            return _Last(None, None, out.logits[:, -1, :].float()), out.past_key_values
        out = self.model.base_model(input_ids=input_ids, **kwargs)
        return _Last(out.last_hidden_state[:, -1, :].float(), head), out.past_key_values

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
        split changes memory, not results); rows that finish leave their batch. When every row continues a cached
        prompt (score mode's reason rows) and our attention runs, the rows read it in place (`SharedPrefix`) and
        weigh only their new tokens."""
        slots = validate_generate_args(prompts, controllers, max_new_tokens, timeout_s)
        if not prompts:
            return []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        rows = [self._tokenizer.encode(p) for p in prompts]
        generated: list[list[int]] = [[] for _ in prompts]
        finish: list[FinishReason] = ["timeout"] * len(prompts)  # rows of batches the deadline never reached
        constrainer = _Constrainer(self._tokenizer.eos_token_id)
        hits = self._lookup(rows)
        order = list(range(len(rows)))
        shared = self._shares_prefixes and all(kv is not None for kv, _ in hits)
        if shared:
            # Rows of one cached prompt share its first min(c_i) tokens (a pick's first new token may merge with the
            # prompt's last ones) and sit side by side; a row then weighs only its new tokens.
            common: dict[int, int] = {}
            for kv, c in hits:
                common[id(kv)] = min(c, common.get(id(kv), c))
            hits = [(kv, common[id(kv)]) for kv, _ in hits]
            shared = all(len(r) - c <= MAX_SHARED_NEW_TOKENS for r, (_, c) in zip(rows, hits, strict=True))
        if shared:
            order.sort(key=lambda i: id(hits[i][0]))
            assert self.prefix_cache is not None
            self.prefix_cache.stats["read_in_place"] += len(rows)
        weights = [len(rows[i]) - hits[i][1] if shared else len(rows[i]) for i in order]
        for part in _chunks(weights, self.max_batch_tokens):
            chunk = [order[j] for j in part]
            if part[0] > 0 and deadline is not None and time.monotonic() >= deadline:
                break
            got = self._decode(
                [rows[i] for i in chunk],
                [slots[i] for i in chunk],
                constrainer,
                max_new_tokens,
                deadline,
                [hits[i] for i in chunk],
                shared,
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
        hits: Sequence[tuple[KV | None, int]],
        shared: bool,
    ) -> list[tuple[list[int], FinishReason]]:
        """Greedy continuation of one batch of prompts (token ids) with their cached prefixes `hits`; `shared`: read
        the prefixes in place (every row has one, and rows of one prefix are consecutive)."""
        eos = self._tokenizer.eos_token_id
        generated: list[list[int]] = [[] for _ in rows]
        finish: list[FinishReason] = ["length"] * len(rows)
        with torch.inference_mode():
            state = self._prefill_shared(rows, hits) if shared else self._prefill(rows, hits)
            last, cache, mask, position = state.last, state.cache, state.mask, state.last_position
            prefixes = state.shared
            active = list(range(len(rows)))  # batch row j decodes prompt active[j]
            for _ in range(max_new_tokens):  # every pass adds at least one token to every row it keeps
                allowed = constrainer.allowed([slots[r] for r in active], [generated[r] for r in active], self.device)
                chosen = last.greedy(allowed)
                keep, feed = [], []  # the rows that go on, and the tokens each feeds the model next
                for j, (r, token) in enumerate(zip(active, chosen, strict=True)):
                    if token == eos:
                        finish[r] = "stop"
                        continue
                    fed = len(generated[r])
                    generated[r].append(token)
                    ended = _jump_forward(slots[r], generated[r], eos, max_new_tokens) if self.jump_forward else None
                    if ended is None and len(generated[r]) >= max_new_tokens:
                        ended = "length"
                    if ended is not None:
                        finish[r] = ended
                        continue
                    keep.append(j)
                    feed.append(generated[r][fed:])
                if not keep:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    for j in keep:
                        finish[active[j]] = "timeout"
                    break
                if len(keep) < len(active):  # finished rows leave the batch
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    mask, position = mask[index], position[index]
                    prefixes = prefixes.select(keep) if prefixes is not None else None
                    active = [active[j] for j in keep]
                # Each row feeds its new tokens (the chosen one and any forced after it), left-padded to the widest.
                w = max(len(f) for f in feed)
                tokens = torch.full((len(feed), w), self._hf_tok.pad_token_id, dtype=torch.long)
                fresh = torch.zeros((len(feed), w), dtype=mask.dtype)
                steps = torch.zeros((len(feed), w), dtype=torch.long)
                for i, f in enumerate(feed):
                    tokens[i, w - len(f) :] = torch.tensor(f, dtype=torch.long)
                    fresh[i, w - len(f) :] = 1
                    steps[i, w - len(f) :] = torch.arange(1, len(f) + 1)
                steps = steps.to(self.device)
                mask = torch.cat([mask, fresh.to(self.device)], dim=1)
                last, cache = self._forward(tokens.to(self.device), mask, position[:, None] + steps, cache, prefixes)
                position = position + steps[:, -1]
        return list(zip(generated, finish, strict=True))


def _jump_forward(controller: TokenController | None, ids: list[int], eos: int, limit: int) -> FinishReason | None:
    """Append to `ids` the tokens `controller` forces next (one allowed token each), without the model; the finish
    reason when the row ends that way, None when a real choice is left for the model.

    Greedy decoding picks a forced token whatever the logits, so skipping its model call changes nothing but the
    cost (SGLang's jump-forward decoding). A grounded reason is one of a few known sentences: its first token picks
    the sentence and every later one is forced (221 of 238 decoding steps for 20 reason rows, measured)."""
    if controller is None:
        return None
    while len(ids) < limit:
        allowed = [eos] if controller.done(ids) else controller.allowed(ids)
        if allowed is None or len(allowed) != 1:
            return None
        token = int(allowed[0])
        if token == eos:
            return "stop"
        ids.append(token)
    return "length"


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
