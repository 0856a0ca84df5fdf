"""Benchmarks: each module is runnable with `python -m eval.bench.<name>` and writes a JSON result."""

from __future__ import annotations

from generator.model import cpu_info

# The CPU features the LLM's speed turns on: the same 2-core box type came as an Intel Xeon with AMX and as an AMD
# EPYC without it, and vLLM's CPU score throughput differed 2x between them (eval/results/vllm-cpu-bf16*.json).
_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def cpu_facts() -> dict[str, object]:
    """The CPU's model name and its LLM-relevant flags, for a benchmark's JSON."""
    model, flags = cpu_info()
    return {"cpu": model, "cpu_flags": [f for f in _FLAGS if f in flags]}
