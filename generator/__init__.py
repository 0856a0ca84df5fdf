"""Generator stage: prompts + an LLM that turns retrieved candidates into ranked, justified, diverse picks."""
