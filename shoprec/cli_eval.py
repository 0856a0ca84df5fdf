"""`shoprec eval` and `shoprec ab offline`: the evaluation harness and offline A/B tests from the command line.

Kept out of `shoprec/cli.py` so the serving commands stay short; `register` adds these commands to the app with
the same error handling (a bad config field, dataset or flag -> one line naming it and the fix, exit code 2).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

ab_app = typer.Typer(
    help="Offline A/B tests. `shoprec ab offline --a CONFIG --b CONFIG --data DATASET [--users N] [--protocol P] "
    "[--metric M] [--out FILE] [--json]`: the same users under both configs, a paired CI, a paired test, a verdict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _threads(n: int) -> None:
    """Torch intra-op threads for the run (1 by default: on shared cores two threads collapse)."""
    import torch

    torch.set_num_threads(n)


def _log(quiet: bool) -> Callable[[str], None]:
    return (lambda _: None) if quiet else (lambda m: err_console.print(m, highlight=False, markup=False))


def eval_command(
    data: str = typer.Option(
        "demo",
        "--data",
        help="'demo', ml-100k, office (../shared/data) or a dataset folder; --protocol chat takes a comma list.",
    ),
    protocol: str = typer.Option(
        "full", "--protocol", help="Candidates: full | sampled | retrieved; or chat (eval/chat_protocol.py)."
    ),
    config: list[str] = typer.Option(
        ["baselines"],
        "--config",
        help="A TOML/JSON config file, a built-in (popularity, itemknn, bm25, dense, sasrec, fusion, llm-score, "
        "llm-score-reasons, llm-generate) or a suite (baselines, zeroshot). Repeatable.",
    ),
    users: int | None = typer.Option(None, "--users", min=1, help="Evaluate a seeded sample of N test users."),
    split: str = typer.Option(
        "loo",
        "--split",
        help="loo (leave-one-out) | temporal (global time cut-off) | cold-items (10% of items never seen in training).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the user sample, negatives, bootstrap."),
    curve: bool = typer.Option(False, "--curve", help="Also sweep diversity settings: the accuracy-diversity curve."),
    adapter: Path | None = typer.Option(
        None, "--adapter", help="A LoRA adapter folder: each LLM config also runs tuned ('<name>-tuned')."
    ),
    out: Path | None = typer.Option(None, "--out", help="Result JSON (default var/eval/<data>-<protocol>.json)."),
    threads: int = typer.Option(1, "--threads", min=1, help="Torch threads."),
    as_json: bool = typer.Option(False, "--json", help="Print the result JSON instead of the table."),
) -> None:
    """Evaluate systems under one protocol: JSON result (metrics with 95% CIs, per-user values) + Markdown and HTML
    reports."""
    if protocol == "chat":  # the conversational protocol: its own systems (raw text vs the chat turn) and metrics
        from eval.chat_protocol import print_conversations, run_conversations, write_result

        _threads(threads)
        names = [d.strip() for d in data.split(",") if d.strip()]  # "demo,ml-100k,office": one run after another
        if out is not None and len(names) > 1:
            raise ValueError("--out names one file; with several --data values the results go to "
                             "eval/results/chat-<data>.json. Fix: drop --out or pass one dataset")  # fmt: skip
        for name in names:
            conv = run_conversations(name, users or 200, seed, log=_log(as_json))
            write_result(out or Path("eval/results") / f"chat-{Path(name).name}.json", conv)
            print_conversations(conv)
        return
    from eval.harness import load_configs, run, write_json
    from eval.report_eval import html, markdown, plot_curve

    if adapter is not None and not adapter.is_dir():
        raise ValueError(f"--adapter {str(adapter)!r} is not a folder. Fix: pass a LoRA adapter directory.")
    specs = list(config)
    if adapter is not None:
        specs = [*specs, *_tuned_copies(load_configs(specs), adapter, out)]
    _threads(threads)
    result = run(data, specs, protocol=protocol, split=split, users=users, seed=seed, curve=curve, log=_log(as_json))
    stem = Path(data).name if data not in ("demo", "ml-100k", "office") else data
    out = out or Path("var/eval") / f"{stem}-{protocol}.json"
    plot = plot_curve(result, out.with_suffix(".png"))
    result["report"] = str(out.with_suffix(".md"))
    write_json(out, result)
    report = markdown(result, plot.name if plot else None)
    out.with_suffix(".md").write_text(report, encoding="utf-8")
    out.with_suffix(".html").write_text(html(result, plot), encoding="utf-8")
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        console.print(report, highlight=False, markup=False)
        written = [out, out.with_suffix(".md"), out.with_suffix(".html"), *([plot] if plot else [])]
        console.print("written: " + ", ".join(map(str, written)), highlight=False)


def _tuned_copies(configs: list[Any], adapter: Path, out: Path | None) -> list[str]:
    """Config files (written next to the result) for the tuned twin of every LLM config."""
    folder = (out.parent if out else Path("var/eval")) / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for c in configs:
        if c.system != "llm":
            continue
        tuned = c.model_copy(update={"name": f"{c.label}-tuned", "adapter": str(adapter.resolve())})
        path = folder / f"{tuned.label}.json"
        path.write_text(json.dumps(tuned.model_dump(mode="json"), indent=2), encoding="utf-8")
        specs.append(str(path))
    if not specs:
        raise ValueError("--adapter given but no LLM config to tune. Fix: add --config llm-score (or another LLM one).")
    return specs


def ab_offline(
    a: str = typer.Option(..., "--a", help="Config A (file or built-in name): the control."),
    b: str = typer.Option(..., "--b", help="Config B (file or built-in name): the variant."),
    data: str = typer.Option("demo", "--data", help="'demo', ml-100k, office or a dataset folder."),
    users: int | None = typer.Option(200, "--users", min=2, help="Seeded sample of N test users (both configs)."),
    protocol: str = typer.Option("full", "--protocol", help="full | sampled | retrieved."),
    split: str = typer.Option("loo", "--split", help="loo | temporal | cold-items."),
    metric: list[str] = typer.Option(
        ["ndcg@10", "recall@10", "coverage@5"], "--metric", help="Metrics to compare (the first gives the verdict)."
    ),
    seed: int = typer.Option(0, "--seed"),
    out: Path | None = typer.Option(None, "--out", help="Write the comparison JSON here."),
    threads: int = typer.Option(1, "--threads", min=1, help="Torch threads."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Run A and B on the same users; print the verdict, paired CI, p-value and minimum detectable effect."""
    from eval.ab import run_offline
    from eval.harness import write_json

    _threads(threads)
    res = run_offline(
        data, a, b, protocol=protocol, split=split, users=users, seed=seed, metrics=metric, log=_log(as_json)
    )
    if out is not None:
        write_json(out, res)
    if as_json:
        sys.stdout.write(json.dumps({k: v for k, v in res.items() if k != "user_ids"}, default=str) + "\n")
        return
    console.print(
        f"A = {a}, B = {b}; {res['dataset']}, {res['protocol']} protocol, {res['users']} users", highlight=False
    )
    for c in res["comparisons"]:
        console.print(f"  {c['metric']:12s} A {c['a']:.4f}  B {c['b']:.4f}  -> {c['verdict']}", highlight=False)
    console.print(f"verdict: {res['verdict']}", highlight=False)


def register(app: typer.Typer, friendly_errors: Callable[[Any], Any]) -> None:
    """Add `eval` and `ab offline` to the main app, wrapped in its error handling (eval's ConfigError is a
    ValueError, so a bad config field ends as one line and exit code 2 like every other bad input)."""
    app.command("eval")(friendly_errors(eval_command))
    ab_app.command("offline")(friendly_errors(ab_offline))
    app.add_typer(ab_app, name="ab")
