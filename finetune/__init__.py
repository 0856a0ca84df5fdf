"""LoRA fine-tuning from interaction logs, reusing the generator's own templates and candidate construction."""
