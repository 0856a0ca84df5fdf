"""Writing a trained adapter: a standard PEFT folder plus `manifest.json`, swapped into place atomically.

Layout of an adapter folder (loadable by `peft.PeftModel.from_pretrained`, the transformers backend via
`ModelSpec.adapter`, and vLLM's `LoRARequest`):

    adapter_config.json, adapter_model.safetensors   PEFT's own files: LoRA weights only, no embeddings, no tokens
    manifest.json                                    base model, data, config, fitted fusion weight, validation
    validation_curve.json                            the periodic validation through the real pipeline
    merged/                                          optional: the base model with the adapter merged in

The folder is written next to its final place and renamed over it, so a crash never leaves half an adapter that
serving would load (the same pattern as `retrieval.index`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from generator.model import ADAPTER_MANIFEST
from retrieval.persist import atomic_directory

MANIFEST_VERSION = 1


def save_adapter(model: Any, directory: Path) -> None:
    """The LoRA weights and config of a PEFT `model`, without embedding layers (we never add tokens)."""
    model.save_pretrained(str(directory), save_embedding_layers=False, safe_serialization=True)
    (Path(directory) / "README.md").unlink(missing_ok=True)  # peft's empty model-card template: manifest.json says it


def export(
    model: Any,
    directory: Path,
    manifest: dict[str, Any],
    *,
    curve: list[dict[str, Any]] | None = None,
    merged: bool = False,
) -> Path:
    """Write the adapter folder atomically; with `merged`, also a full merged model under ``merged/`` (the model
    is merged in place, so call this last)."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        if manifest.get("base_model") and hasattr(model, "peft_config"):
            # the portable name, not this machine's cache path (serving passes the base model explicitly anyway)
            for peft_config in model.peft_config.values():
                peft_config.base_model_name_or_path = str(manifest["base_model"])
        save_adapter(model, tmp)
        body = {"format_version": MANIFEST_VERSION, **manifest}
        (tmp / ADAPTER_MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if curve is not None:
            (tmp / "validation_curve.json").write_text(json.dumps(curve, indent=2) + "\n", encoding="utf-8")
        if merged:
            model.merge_and_unload().save_pretrained(str(tmp / "merged"))
    return directory
