"""What to evaluate: `EvalConfig` (one system, as a TOML/JSON file or a built-in name gives it), the built-in
configs and suites, and their loading and validation (errors name the file, the field and the fix).

The types every other eval module shares; it imports none of them, so `eval.curve` and `eval.harness` both build on
it without importing each other.
"""

from __future__ import annotations

import json
import tomllib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from retrieval.persist import parse_json, parse_toml

if TYPE_CHECKING:  # the generator is imported when a config is resolved, not when this module is
    from generator.recommender import GeneratorConfig

RETRIEVERS = ("popularity", "itemknn", "bm25", "dense", "sasrec")
SYSTEMS = (*RETRIEVERS, "fusion", "llm")
# What the eval config changes in the generator's defaults: a baseline is pure relevance unless a config says
# otherwise, and a list of 10 gives NDCG@10; a long time budget, because a loaded CPU must not turn into fallbacks.
GENERATOR_DEFAULTS: dict[str, Any] = {
    "k": 10,
    "n_candidates": 20,
    "diversity": 0.0,
    "diversity_method": "none",
    "constraint": {},
    "timeout_s": 600.0,
}


class ConfigError(ValueError):
    """A bad evaluation config: the message names the file, the field and the fix."""


class EvalConfig(BaseModel):
    """One system to evaluate, as a TOML/JSON file gives it. Unknown fields are errors.

    Example (TOML)::

        name = "llm-score-mmr"
        system = "llm"
        reasons = false
        [generator]            # any GeneratorConfig field; also the diversity step of the retrieval baselines
        mode = "score"
        variant = "rank"
        diversity = 0.3
        diversity_method = "mmr"
        constraint = { max_per_category = 2, level = 1 }
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(default="", description="Label in tables and in the JSON (default: the system name).")
    system: Literal["popularity", "itemknn", "bm25", "dense", "sasrec", "fusion", "llm"] = Field(
        description="What ranks: one retrieval signal, their fusion, or the LLM stage on top of the fusion."
    )
    signals: tuple[str, ...] = Field(
        default=RETRIEVERS, description="Signals the fusion (and so the LLM stage's retrieval) combines."
    )
    generator: dict[str, Any] = Field(
        default_factory=dict,
        description="GeneratorConfig fields (mode, variant, k, n_candidates, diversity, diversity_method, "
        "constraint, llm_weight, ...) over the eval defaults (k=10, n_candidates=20, no diversity, no constraint).",
    )
    reasons: bool = Field(default=True, description="LLM score mode: generate the reasons (slow) or rank only.")
    similarity: Literal["embedding", "category"] = Field(
        default="embedding",
        description="Item similarity of MMR/DPP: cosine of the dense embeddings, or 1 for the same category.",
    )
    backend: Literal["transformers", "fake"] = Field(default="transformers", description="LLM backend.")
    new_item_share: float = Field(
        default=0.0,
        ge=0,
        le=0.5,
        description="Fusion and LLM stage: share of the fused list reserved for new items (no interaction in "
        "training), best content match first (retrieval.fusion.FusionConfig.new_item_share).",
    )
    model: str | None = Field(default=None, description="LLM model (default: the embedded SmolLM2-135M).")
    adapter: str | None = Field(default=None, description="A LoRA adapter folder (the 'tuned' LLM stage).")
    batch_size: int = Field(default=8, ge=1, description="LLM requests per batch.")
    max_users: int | None = Field(
        default=None,
        ge=1,
        description="Evaluate this config on only the first N users of the run's sample (for slow settings such as "
        "generated reasons; its CIs are then wider).",
    )
    perturb: Literal["none", "reverse", "shuffle"] = Field(
        default="none",
        description="A deliberately broken variant, to check the harness: reverse or shuffle each final list "
        "of the top n_candidates (so a worse system must be detected as worse).",
    )

    @field_validator("signals")
    @classmethod
    def _known_signals(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [s for s in v if s not in RETRIEVERS]
        if bad or not v:
            raise ValueError(f"unknown signals {bad}; valid: {', '.join(RETRIEVERS)}")
        return v

    @property
    def label(self) -> str:
        return self.name or self.system

    def generator_config(self) -> GeneratorConfig:
        """The validated GeneratorConfig: eval defaults < the adapter's fitted blend and trained prompt settings
        (`generator.model.adapter_generator_settings`) < the config's [generator] table."""
        from generator.model import adapter_generator_settings
        from generator.recommender import GeneratorConfig

        return GeneratorConfig(**{**GENERATOR_DEFAULTS, **adapter_generator_settings(self.adapter), **self.generator})


# Built-in configs, usable by name wherever a config file is expected (`--config fusion`).
BUILTIN: dict[str, dict[str, Any]] = {
    **{name: {"system": name} for name in (*RETRIEVERS, "fusion")},
    "llm-score": {"name": "llm-score", "system": "llm", "reasons": False, "generator": {"mode": "score"}},
    "llm-score-reasons": {"name": "llm-score-reasons", "system": "llm", "generator": {"mode": "score"}},
    "llm-generate": {"name": "llm-generate", "system": "llm", "generator": {"mode": "generate"}},
}
# Named groups of configs: `--config baselines` runs every baseline.
SUITES: dict[str, tuple[str, ...]] = {
    "baselines": (*RETRIEVERS, "fusion", "llm-score"),
    # the "new shop on day one" case: nothing trained on the catalog but cheap statistics; no SASRec training
    "zeroshot": ("popularity", "bm25", "zeroshot-fusion", "zeroshot-llm"),
}
BUILTIN["zeroshot-fusion"] = {
    "name": "fusion",
    "system": "fusion",
    "signals": ["popularity", "itemknn", "bm25", "dense"],
}
# The sequential signal's rows, named apart from the 4-signal zero-shot ones when both are in one README table.
BUILTIN["fusion-5"] = {"name": "fusion (5 signals)", "system": "fusion"}
BUILTIN["llm-score-5"] = {"name": "llm-score (5 signals)", "system": "llm", "reasons": False}
BUILTIN["zeroshot-llm"] = {
    "name": "llm-score",
    "system": "llm",
    "reasons": False,
    "signals": ["popularity", "itemknn", "bm25", "dense"],
}


def load_configs(specs: Sequence[str]) -> list[EvalConfig]:
    """Configs from files (TOML or JSON), built-in names or suite names; errors name the file, field and fix."""
    out: list[EvalConfig] = []
    for spec in specs:
        if spec in SUITES:
            out.extend(load_configs(SUITES[spec]))
            continue
        if spec in BUILTIN:
            out.append(EvalConfig(**BUILTIN[spec]))
            continue
        out.append(read_config(Path(spec)))
    labels = Counter(c.label for c in out)
    dup = [name for name, n in labels.items() if n > 1]
    if dup:
        raise ConfigError(f"two configs are both named {dup[0]!r}. Fix: give each a distinct `name` field.")
    return out


def read_config(path: Path) -> EvalConfig:
    if not path.is_file():
        raise ConfigError(
            f"config {str(path)!r} not found. Fix: pass a TOML/JSON file or one of: {', '.join([*BUILTIN, *SUITES])}."
        )
    text = path.read_text(encoding="utf-8")
    try:
        raw = parse_json(text) if path.suffix == ".json" else parse_toml(text)  # absurd nesting: a decode error
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config {path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: expected an object of fields, got a JSON {type(raw).__name__}.")
    raw.setdefault("name", path.stem)
    return validate_config(raw, str(path))


def validate_config(raw: Mapping[str, Any], where: str = "config") -> EvalConfig:
    """An EvalConfig whose generator table is checked too, or a ConfigError naming the first bad field."""
    try:
        cfg = EvalConfig(**raw)
        cfg.generator_config()
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        prefix = "generator." if e.title == "GeneratorConfig" else ""
        hint = "remove it or fix its spelling" if err["type"] == "extra_forbidden" else "fix its value"
        raise ConfigError(f"{where}: field `{prefix}{loc}`: {err['msg']}. Fix: {hint}.") from None
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    if cfg.perturb != "none" and cfg.system == "llm" and cfg.generator_config().mode == "generate":
        raise ConfigError(f"{where}: field `perturb` applies to ranked lists; use it with score mode.")
    if not cfg.reasons and cfg.system == "llm" and cfg.generator_config().mode == "generate":
        raise ConfigError(f"{where}: field `reasons`: generate mode always writes reasons. Fix: drop reasons=false.")
    return cfg
