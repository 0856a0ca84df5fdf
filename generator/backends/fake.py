"""A deterministic stand-in backend for unit tests: no model, no torch, same protocol, same guarantees.

Its "model" gives every (prompt, generated prefix) a fixed pseudo-random logit vector (seeded by a hash), so label
scores and greedy outputs are reproducible and batch-independent. A script (text per prompt) can steer generation
to try something specific (a duplicate label, a loop); a controller still has the last word, as with a real model.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from generator.backends.base import (
    FinishReason,
    GenerationOutput,
    TokenController,
    check_single_token_labels,
    neutralise_special_text,
    validate_generate_args,
    validate_label_args,
)

_SPECIALS = ("<eos>", "<|im_start|>", "<|im_end|>")
_WORDS = (
    " Matches",
    " matches",
    " your",
    " recent",
    " the",
    " shoes",
    " great",
    " for",
    " you",
    " and",
    " bought",
    " because",
    " (",
    ".\n",  # multi-character tokens with a newline inside, as real BPE vocabularies have
    "\n\n",
)


class FakeTokenizer:
    """Greedy longest-match tokenizer over a small vocabulary: specials, printable ASCII, ' x' pairs, a few words."""

    def __init__(self) -> None:
        chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
        pairs = [" " + c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"]
        vocab = list(_SPECIALS) + chars + pairs + [w for w in _WORDS if w not in pairs]
        self._vocab: tuple[str, ...] = tuple(dict.fromkeys(vocab))
        self._index = {t: i for i, t in enumerate(self._vocab)}
        self._max_len = max(len(t) for t in self._vocab)
        self._specials = frozenset(self._index[s] for s in _SPECIALS)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def eos_token_id(self) -> int:
        return self._index["<eos>"]

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._specials

    @property
    def newline_token_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in enumerate(self._vocab) if "\n" in t)

    @property
    def token_texts(self) -> Sequence[str]:
        return self._vocab

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        while pos < len(text):
            for n in range(min(self._max_len, len(text) - pos), 0, -1):
                tid = self._index.get(text[pos : pos + n])
                if tid is not None:
                    ids.append(tid)
                    pos += n
                    break
            else:  # a character outside the vocabulary: '?' keeps positions aligned
                ids.append(self._index["?"])
                pos += 1
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._vocab[i] for i in ids)

    def chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        parts = [
            f"<|im_start|>{m['role']}\n{neutralise_special_text(m['content'], _SPECIALS)}<|im_end|>\n" for m in messages
        ]
        return "".join(parts) + "<|im_start|>assistant\n"


class FakeBackend:
    """Deterministic `Backend`: logits from a seeded hash of (prompt, generated ids); greedy over allowed ids.

    `scripts` maps a prompt to the text the fake "wants" to write: at step t it proposes the script's t-th token,
    taken when the controller allows it (else the best allowed token by the hash logits); an unconstrained prompt
    whose script ran out ends with EOS.
    """

    def __init__(self, seed: int = 0, scripts: Mapping[str, str] | None = None) -> None:
        self.seed = seed
        self._tokenizer = FakeTokenizer()
        self.scripts: dict[str, str] = dict(scripts or {})

    @property
    def tokenizer(self) -> FakeTokenizer:
        return self._tokenizer

    def _logits(self, prompt: str, generated: Sequence[int]) -> npt.NDArray[np.float64]:
        h = hashlib.blake2b(digest_size=8)
        h.update(str(self.seed).encode())
        h.update(b"\x00" + prompt.encode())
        h.update(b"\x00" + ",".join(map(str, generated)).encode())
        rng = np.random.default_rng(int.from_bytes(h.digest(), "little"))
        return rng.standard_normal(self._tokenizer.vocab_size) * 3.0

    def label_logprobs(self, prompts: Sequence[str], labels: Sequence[Sequence[str]]) -> list[npt.NDArray[np.float64]]:
        validate_label_args(prompts, labels)
        out = []
        for prompt, ls in zip(prompts, labels, strict=True):
            ids = check_single_token_labels(self._tokenizer, ls)
            logits = self._logits(prompt, ())
            logp = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
            out.append(logp[ids].astype(np.float64))
        return out

    def generate(
        self,
        prompts: Sequence[str],
        controllers: Sequence[TokenController | None] | None = None,
        max_new_tokens: int = 256,
        timeout_s: float | None = None,
    ) -> list[GenerationOutput]:
        slots = validate_generate_args(prompts, controllers, max_new_tokens, timeout_s)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        eos = self._tokenizer.eos_token_id
        outputs = []
        for prompt, controller in zip(prompts, slots, strict=True):
            script = self._tokenizer.encode(self.scripts[prompt]) if prompt in self.scripts else None
            gen: list[int] = []
            reason: FinishReason = "length"
            while len(gen) < max_new_tokens:
                if controller is not None and controller.done(gen):
                    reason = "stop"
                    break
                allowed = controller.allowed(gen) if controller is not None else None
                if allowed is None:
                    choices = np.arange(self._tokenizer.vocab_size)
                    if script is not None and len(gen) >= len(script):
                        reason = "stop"
                        break
                else:
                    choices = np.asarray(allowed, dtype=np.int64)
                    if choices.size == 0:
                        raise RuntimeError(f"controller {controller!r} allowed no token after {gen}")
                if script is not None and len(gen) < len(script) and script[len(gen)] in set(choices.tolist()):
                    tok = script[len(gen)]
                else:
                    logits = self._logits(prompt, gen)
                    tok = int(choices[np.argmax(logits[choices])])
                if tok == eos:
                    reason = "stop"
                    break
                gen.append(tok)
                if deadline is not None and time.monotonic() >= deadline:
                    reason = "timeout"
                    break
            outputs.append(
                GenerationOutput(text=self._tokenizer.decode(gen), token_ids=tuple(gen), finish_reason=reason)
            )
        return outputs
