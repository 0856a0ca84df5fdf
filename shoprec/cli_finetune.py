"""`shoprec finetune`: train a LoRA adapter from interaction logs and export it with its fitted fusion weight.

Registered on the main app by `shoprec.cli` (one line there); the work is `finetune.run.run`. Serve the result with
`shoprec recommend --adapter DIR` (the fusion weight in DIR/manifest.json is used automatically).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from shoprec.errors import first_error as _first_error

REPO_ROOT = Path(__file__).resolve().parents[1]


def _check_out_of_repo(dataset: str, out: Path) -> None:
    """Research data (../shared/data) is licensed for research only: nothing trained on it may enter the repo."""
    from eval.datasets import SHARED, shared_data_dir

    research = dataset in SHARED
    if not research and dataset != "demo":
        try:
            Path(dataset).resolve().relative_to(shared_data_dir().resolve())
            research = True
        except ValueError:
            research = False
    if research and out.resolve().is_relative_to(REPO_ROOT):
        raise ValueError(
            f"--out {out} is inside the repository, but {dataset!r} is research-licensed data: nothing trained on "
            f"it may be committed. Fix: write the adapter outside the repository, e.g. --out /work/var/adapters/x."
        )


def register(app: typer.Typer, friendly: Callable[[Any], Any]) -> None:
    """Add the `finetune` command to `app`; `friendly` turns expected errors into one line (shoprec.cli)."""

    @app.command()
    @friendly
    def finetune(
        data: str = typer.Option(..., "--data", help="'demo', 'ml-100k', 'office', or a dataset folder."),
        out: Path = typer.Option(..., "--out", help="Adapter folder to write (replaced atomically)."),
        base_model: str = typer.Option("embedded:SmolLM2-135M-Instruct", "--base-model", help="Model to tune."),
        rank: int = typer.Option(8, "--rank", help="LoRA rank r."),
        alpha: int = typer.Option(16, "--alpha", help="LoRA alpha (scale = alpha / rank)."),
        dropout: float = typer.Option(0.05, "--dropout", help="LoRA dropout (0 is ~20% faster on CPU)."),
        target_modules: str = typer.Option("all-linear", "--target-modules", help="'all-linear' or 'q_proj,v_proj'."),
        lr: float = typer.Option(3e-4, "--lr", help="Peak learning rate."),
        epochs: float = typer.Option(1.0, "--epochs", help="Passes over the examples."),
        max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many optimiser steps."),
        max_length: int = typer.Option(1536, "--max-length", help="Tokens per sequence."),
        batch: int = typer.Option(1, "--batch", help="Sequences per forward pass (1 is fastest on a CPU)."),
        grad_accum: int = typer.Option(8, "--grad-accum", help="Forward passes per optimiser step."),
        threads: int = typer.Option(1, "--threads", help="torch CPU threads."),
        device: str = typer.Option("auto", "--device", help="cpu | cuda | auto."),
        eval_every: int = typer.Option(25, "--eval-every", help="Optimiser steps between validations."),
        patience: int = typer.Option(3, "--patience", help="Validations without improvement before stopping."),
        select_by: str = typer.Option(
            "llm",
            "--select-by",
            help="Best checkpoint by validation NDCG@10 of: llm (the model alone) | fused (the served blend).",
        ),
        valid_cases: int = typer.Option(200, "--valid-cases", help="Validation requests (curve, fusion weight)."),
        fusion_min_gain_se: float = typer.Option(
            2.0,  # finetune.fusion.MIN_GAIN_SE, written out: the CLI imports no model code until it runs
            "--fusion-min-gain-se",
            help="Keep a fitted LLM weight only if its validation gain is at least this many standard errors.",
        ),
        train_cases: int | None = typer.Option(None, "--train-cases", help="At most this many training cases."),
        positions: int = typer.Option(1, "--positions", help="Training targets per user."),
        reasons_per_case: int = typer.Option(2, "--reasons-per-case", help="Reason examples per case."),
        rank_examples: int | None = typer.Option(None, "--rank-examples", help="At most this many ranking examples."),
        rank_loss: str = typer.Option(
            "answer",
            "--rank-loss",
            help="answer: ranking examples train the full answer (generate mode); labels: the first pick's label "
            "only, softmax over the candidates' labels (LlamaRec's listwise loss; score mode).",
        ),
        signals: str = typer.Option(
            "popularity,itemknn,bm25,dense,sasrec", "--signals", help="Retrieval signals for the candidates."
        ),
        sasrec_epochs: int = typer.Option(30, "--sasrec-epochs", help="SASRec epoch cap."),
        max_per_category: int = typer.Option(
            2, "--max-per-category", help="Category cap of the ranked answers (0: none, for shops with few categories)."
        ),
        category_level: int = typer.Option(1, "--category-level", help="Category path level of the cap."),
        reason_check: int = typer.Option(20, "--reason-check", help="Validation requests whose reasons are checked."),
        checkpoint_dir: Path | None = typer.Option(
            None, "--checkpoint-dir", help="Default var/checkpoints/<out name>-<hash of the out path>."
        ),
        resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint of an interrupted run."),
        merged: bool = typer.Option(False, "--merged", help="Also write the merged model under OUT/merged."),
        seed: int = typer.Option(0, "--seed"),
        as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    ) -> None:
        """Fine-tune the generator's LLM with LoRA on a dataset's logs; write a PEFT adapter + manifest.json."""
        from finetune.run import DataOptions, run
        from finetune.train import TrainConfig
        from generator.constraints import CategoryConstraint
        from generator.recommender import GeneratorConfig

        _check_out_of_repo(data, out)
        try:
            opts = DataOptions(
                dataset=data,
                seed=seed,
                positions=positions,
                train_cases=train_cases,
                valid_cases=valid_cases,
                reasons_per_case=reasons_per_case,
                rank_examples=rank_examples,
                rank_loss=rank_loss,  # type: ignore[arg-type]  # validated by pydantic
                signals=tuple(s.strip() for s in signals.split(",") if s.strip()),
                sasrec_epochs=sasrec_epochs,
                reason_check_cases=reason_check,
            )
            cfg = TrainConfig(
                rank=rank,
                alpha=alpha,
                dropout=dropout,
                target_modules=target_modules,
                lr=lr,
                epochs=epochs,
                max_steps=max_steps,
                max_length=max_length,
                batch_size=batch,
                grad_accum=grad_accum,
                num_threads=threads,
                device=device,
                eval_every=eval_every,
                checkpoint_every=eval_every,
                patience=patience,
                select_by=select_by,  # type: ignore[arg-type]  # validated by pydantic
                fusion_min_gain_se=fusion_min_gain_se,
                seed=seed,
                progress=not as_json,
            )
            # the one-pick reason rows: see finetune.run (training cost); serving renders what the manifest records
            generator = GeneratorConfig(
                reason_prompt="pick",
                constraint=CategoryConstraint(max_per_category=max_per_category or None, level=category_level),
            )
        except ValueError as e:
            raise ValueError(f"bad finetune flags: {_first_error(e)}") from None
        log: Callable[[str], None] = (lambda m: print(m, file=sys.stderr)) if as_json else print
        manifest = run(
            opts,
            cfg,
            out,
            generator=generator,
            base_model=base_model,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            merged=merged,
            log=log,
        )
        if as_json:
            sys.stdout.write(json.dumps(manifest, indent=2) + "\n")
