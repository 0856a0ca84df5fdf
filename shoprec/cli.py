"""The `shoprec` command line: ingest data, build indexes, get candidates, search, and run the demo.

Human-readable output by default, `--json` for machines. Bad input ends with a one-line error naming the file,
line, field or flag and the fix, and exit code 2 — never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from retrieval.store import StoreError
from retrieval.types import Filters
from shoprec.config import ConfigError, Settings, load_settings
from shoprec.errors import demo_hint
from shoprec.errors import first_error as _first_error

app = typer.Typer(
    help="shoprec: a prompt-driven generative recommender for e-commerce.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def _friendly_errors(fn: F) -> F:
    """Turn expected errors (bad data, bad flags, missing index) into one clear line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, ConfigError) as e:
            message = str(e)
            if isinstance(e, FileNotFoundError | StoreError):  # e.g. nothing in var/ right after `make demo`
                message = f"{message} {_demo_hint(message)}".rstrip()
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


_state: dict[str, Any] = {}


def _demo_hint(message: str) -> str:
    """Where the demo shop is, when the missing file is under this home and the demo's folder has an index."""
    try:
        settings = _settings()
    except ValueError:  # a bad config is reported by the command itself
        return ""
    if str(settings.home) not in message and str(settings.index_path) not in message:
        return ""
    return demo_hint(settings.home, settings.index_path)


@app.callback()
def main(
    config: Path | None = typer.Option(None, "--config", help="TOML config file (default ./shoprec.toml)."),
    home: Path | None = typer.Option(None, "--home", help="Folder for the store and indexes (default var/)."),
    store: str | None = typer.Option(None, "--store", help="SQLite path, sqlite:/// URL or postgresql:// URL."),
    index: Path | None = typer.Option(None, "--index", help="Index folder (default <home>/index)."),
) -> None:
    """Global options; precedence: flags > environment (SHOPREC_*) > config file > defaults."""
    _state.update(config=config, home=home, store=store, index_dir=index, adapter=None)  # nothing kept from a last run


def _settings() -> Settings:
    return load_settings(
        _state.get("config"),
        home=_state.get("home"),
        store=_state.get("store"),
        index_dir=_state.get("index_dir"),
        adapter=_state.get("adapter"),
    )


def _service(create_store: bool = True) -> Any:
    """The shop of these settings; `create_store=False` for commands that only read, so a mistyped --home is an
    error naming the missing store instead of a new, empty one."""
    from shoprec.service import Shoprec

    return Shoprec(_settings(), create_store=create_store)


def _emit(data: Any, as_json: bool, render: Callable[[], None]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    else:
        render()


@app.command()
@_friendly_errors
def ingest(
    path: Path = typer.Argument(..., help="Dataset folder: generic JSONL/CSV, MovieLens 100K or LC-Rec JSON."),
    fmt: str = typer.Option("auto", "--format", help="auto | generic | movielens | lcrec"),
    lenient: bool = typer.Option(False, "--lenient", help="Load good rows, write rejected ones to --report."),
    report: Path | None = typer.Option(None, "--report", help="Where lenient mode writes rejected rows (JSONL)."),
    replace: bool = typer.Option(
        False, "--replace", help="Replace whole items (fields a row leaves out are reset), instead of merging."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Load a dataset into the store: items merged into stored ones (or --replace'd), events added once.

    The input is read and written in chunks of 10,000 rows, each its own transaction: memory stays flat whatever
    the file's size, and a server using the same store waits for one chunk at most. Running it again is safe:
    items merge and events already in the store are skipped (docs/store.md).
    """
    from retrieval.loaders import LoadError, stream_dataset
    from retrieval.text import collect_cuts

    svc = _service()
    if lenient and report is None:
        report = svc.settings.home / "rejected.jsonl"
    stream = stream_dataset(path, strict=not lenient, report_path=report, fmt=fmt)
    store = svc.store
    with collect_cuts() as cuts:
        try:
            result = store.ingest(stream.items(), stream.events(), replace=replace, chunk_size=_INGEST_CHUNK)
        except LoadError as e:
            if not (stream.items_done or stream.summary()["items"] > _INGEST_CHUNK):
                raise  # failed inside the first chunk: nothing was written
            raise ValueError(
                f"{e} (rows before it were stored in chunks of {_INGEST_CHUNK:,}; after the fix run the same "
                "command again: what is already stored is skipped, not doubled)"
            ) from None
    stream.warnings.extend(cuts.warnings(str(path)))
    read = stream.summary()
    summary = {
        **read,
        "new_items": result.items.new,
        "updated_items": result.items.updated,
        "unchanged_items": result.items.unchanged,
        "new_events": result.events.new,
        "duplicate_events": result.events.duplicates,
        "rejected": len(stream.rejected),
        "report": str(report) if stream.rejected else None,
        "warnings": stream.warnings,
        "store": store.url,
        "store_counts": store.counts(),
    }

    def render() -> None:
        i, e = result.items, result.events
        console.print(
            f"loaded {read['items']} items ({i.new} new, {i.updated} updated, {i.unchanged} unchanged) and "
            f"{read['interactions']} events ({e.new} new, {e.duplicates} already in the store) from "
            f"{read['users']} users into {escape(store.url)}",
            highlight=False,
            soft_wrap=True,  # one line, whatever the terminal's width: scripts grep it
        )
        for w in stream.warnings:
            console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
        if stream.rejected:
            console.print(f"[yellow]{len(stream.rejected)} rows rejected[/]; reasons in {report}")

    _emit(summary, as_json, render)


# Rows per ingest transaction: large enough that per-commit costs vanish, small enough to bound memory and the time
# another writer (a server taking events) waits for the store.
_INGEST_CHUNK = 10_000


@app.command()
@_friendly_errors
def index(as_json: bool = typer.Option(False, "--json", help="Print the index manifest as JSON.")) -> None:
    """Train every retrieval signal on the store's events and write the index folder."""
    from retrieval.index import read_manifest

    svc = _service(create_store=False)
    svc.build_index(log=(lambda m: None) if as_json else (lambda m: console.print(m, highlight=False)))
    manifest = read_manifest(svc.settings.index_path)
    _emit(manifest, as_json, lambda: console.print(f"index written to {svc.settings.index_path}"))


def _filters(
    category: list[str] | None, min_price: float | None, max_price: float | None, in_stock: bool, include_seen: bool
) -> Filters:
    try:
        return Filters(
            categories=tuple(category or ()),
            min_price=min_price,
            max_price=max_price,
            in_stock_only=in_stock,
            exclude_history=not include_seen,
        )
    except ValueError as e:
        raise ValueError(f"bad filter flags: {e}") from None


def _warn_request(user: str | None, request: Any) -> list[str]:
    """What a request silently assumed, said on stderr (and returned for the --json output's `warnings`)."""
    warnings = []
    if user is not None and not request.history:
        warnings.append(
            f"user {user!r} has no history in the store (an unknown id, or none of their events is on a catalog "
            "item): answering as for a new shopper (cold start). Fix: check the id if the shopper should be known."
        )
    for w in warnings:
        err_console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    return warnings


def _show(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title, title_justify="left")
    for col in ("#", "item", "title", "category", "price", "signals"):
        table.add_column(col, overflow="fold")
    for r in rows:
        signals = ", ".join(f"{n}#{e['rank']}" for n, e in r["signals"].items())
        price = "" if r["price"] is None else f"{r['price']:.2f}"
        # catalog text is data: printed as the characters it is, never read as rich markup ("[/]" in a title)
        table.add_row(*(escape(str(v)) for v in (r["rank"], r["item_id"], r["title"], r["category"], price, signals)))
    console.print(table)


@app.command()
@_friendly_errors
def candidates(
    user: str | None = typer.Option(None, "--user", help="User id; its history comes from the store."),
    query: str | None = typer.Option(None, "--query", help="Free-text query (personalised search with --user)."),
    cart: str | None = typer.Option(None, "--cart", help="Comma-separated item ids in the cart -> complements."),
    k: int = typer.Option(20, "--k", min=1, max=1000, help="How many candidates."),
    category: list[str] | None = typer.Option(None, "--category", help="Keep this category prefix (repeatable)."),
    min_price: float | None = typer.Option(None, "--min-price", min=0),
    max_price: float | None = typer.Option(None, "--max-price", min=0),
    in_stock: bool = typer.Option(False, "--in-stock", help="Only items in stock."),
    include_seen: bool = typer.Option(False, "--include-seen", help="Do not exclude the user's history."),
    as_json: bool = typer.Option(False, "--json", help="Print candidates as JSON."),
) -> None:
    """Retrieve fused candidates for a user, a query and/or a cart, with the signals that produced each."""
    svc = _service(create_store=False)
    cart_ids = [c.strip() for c in cart.split(",") if c.strip()] if cart else []
    request = svc.request(
        user=user,
        query=query,
        cart=cart_ids,
        filters=_filters(category, min_price, max_price, in_stock, include_seen),
    )
    rows = svc.describe(svc.candidates(request, k))
    title = f"candidates ({request.mode} mode, user={user or '-'}, {len(request.history)} events in history)"
    warnings = _warn_request(user, request)
    data = {"mode": request.mode, "user": user, "warnings": warnings, "candidates": rows}
    _emit(data, as_json, lambda: _show(rows, escape(title)))


@app.command()
@_friendly_errors
def search(
    query: str = typer.Argument(..., help="What the shopper typed."),
    user: str | None = typer.Option(None, "--user", help="Personalise with this user's history."),
    k: int = typer.Option(10, "--k", min=1, max=1000),
    category: list[str] | None = typer.Option(None, "--category", help="Keep this category prefix (repeatable)."),
    min_price: float | None = typer.Option(None, "--min-price", min=0),
    max_price: float | None = typer.Option(None, "--max-price", min=0),
    in_stock: bool = typer.Option(False, "--in-stock"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Product search: BM25 + dense retrieval fused, optionally personalised."""
    if not query.strip():
        raise typer.BadParameter("the query is empty; type what to search for", param_hint="QUERY")
    svc = _service(create_store=False)
    request = svc.request(
        user=user, query=query, filters=_filters(category, min_price, max_price, in_stock, include_seen=False)
    )
    rows = svc.describe(svc.candidates(request, k))
    data = {"query": query, "user": user, "warnings": _warn_request(user, request), "results": rows}
    _emit(data, as_json, lambda: _show(rows, escape(f"search: {query!r}")))


@app.command()
@_friendly_errors
def recommend(
    user: str | None = typer.Option(None, "--user", help="User id; its history comes from the store."),
    query: str | None = typer.Option(None, "--query", help="What the shopper asked for."),
    cart: str | None = typer.Option(None, "--cart", help="Comma-separated item ids in the cart."),
    k: int = typer.Option(5, "--k", min=1, max=20, help="How many picks."),
    diversity: float = typer.Option(0.3, "--diversity", min=0.0, max=1.0, help="0 = pure relevance, 1 = most diverse."),
    method: str = typer.Option("mmr", "--method", help="Diversity re-ranking: none | mmr | dpp."),
    max_per_category: int | None = typer.Option(2, "--max-per-category", min=1, help="Category cap (a guarantee)."),
    min_categories: int | None = typer.Option(None, "--min-categories", min=1, help="Distinct categories required."),
    category_level: int = typer.Option(1, "--category-level", min=1, help="Category path depth the caps count at."),
    mode: str = typer.Option("score", "--mode", help="score (one pass + reasons) | generate (full list)."),
    variant: str = typer.Option("rank", "--prompt", help="Prompt variant: rank | rank_terse | chat."),
    adapter: Path | None = typer.Option(None, "--adapter", help="LoRA adapter folder on top of the model."),
    no_llm: bool = typer.Option(False, "--no-llm", help="Retrieval + diversity only (no model)."),
    category: list[str] | None = typer.Option(None, "--category", help="Keep this category prefix (repeatable)."),
    min_price: float | None = typer.Option(None, "--min-price", min=0),
    max_price: float | None = typer.Option(None, "--max-price", min=0),
    in_stock: bool = typer.Option(False, "--in-stock", help="Only items in stock."),
    as_json: bool = typer.Option(False, "--json", help="Print the recommendation as JSON."),
) -> None:
    """Ranked, justified, diverse picks: retrieval -> prompt -> LLM -> constraints -> validation."""
    from generator.constraints import CategoryConstraint
    from generator.prompts import PromptLibrary
    from generator.recommender import GeneratorConfig

    valid_variants = PromptLibrary().variants()
    if variant not in valid_variants:  # checked with --no-llm too: a flag that cannot work is an error
        raise ValueError(f"--prompt {variant!r} is not a prompt variant. Fix: use one of: {', '.join(valid_variants)}.")
    if adapter is not None:
        _state["adapter"] = str(adapter)
    svc = _service(create_store=False)
    recommender = svc.recommender(use_llm=not no_llm)
    try:
        cfg = GeneratorConfig(
            # the service's config: the adapter's fitted blend and trained prompt settings, when there is one
            **recommender.config.model_dump(
                exclude={"mode", "variant", "k", "diversity", "diversity_method", "constraint"}
            ),
            mode=mode,  # type: ignore[arg-type]
            variant=variant,
            k=k,
            diversity=diversity,
            diversity_method=method,  # type: ignore[arg-type]
            constraint=CategoryConstraint(
                max_per_category=max_per_category, min_categories=min_categories, level=category_level
            ),
        )
    except ValueError as e:
        raise ValueError(f"bad recommend flags: {_first_error(e)}") from None
    cart_ids = [c.strip() for c in cart.split(",") if c.strip()] if cart else []
    request = svc.request(
        user=user, query=query, cart=cart_ids, filters=_filters(category, min_price, max_price, in_stock, False)
    )
    warnings = _warn_request(user, request)
    rec = recommender.recommend(request, cfg)
    data = {
        "warnings": warnings,
        "mode": rec.mode,
        "fallback": rec.fallback,
        "fallback_reason": rec.fallback_reason,
        "timings_ms": rec.timings_ms,
        "picks": [
            {**p.model_dump(), "title": svc.catalog[p.item_id].title, "price": svc.catalog[p.item_id].price}
            for p in rec.picks
        ],
    }

    def render() -> None:
        head = f"{len(rec.picks)} picks ({rec.mode} mode"
        head += f", FALLBACK: {escape(str(rec.fallback_reason))})" if rec.fallback else ")"
        console.print(head, highlight=False)
        for p in rec.picks:
            title, item_id, category = (escape(x) for x in (svc.catalog[p.item_id].title, p.item_id, p.category))
            console.print(f"  {p.rank}. [bold]{title}[/] ({item_id}) [dim]{category}[/]", highlight=False)
            console.print(f"     {escape(p.reason)}", highlight=False)

    _emit(data, as_json, render)


@app.command()
@_friendly_errors
def demo(
    home: Path = typer.Option(Path("var/demo"), "--home", help="Where the demo writes its data, store and index."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Generate the synthetic demo shop, ingest it, build every index, and show candidates."""
    from shoprec.demo import run_demo

    # the model stage runs on the configured LLM backend ($SHOPREC_LLM_BACKEND=vllm: vLLM)
    run_demo(home, seed=seed, console=console, llm=_settings())


# `eval` and `ab offline` live in their own module; registered here with this module's error handling.
from shoprec import cli_eval  # noqa: E402

cli_eval.register(app, _friendly_errors)

# Commands kept in their own modules, registered here in one visible place.
from shoprec.cli_finetune import register as _register_finetune  # noqa: E402 (needs _friendly_errors above)

_register_finetune(app, _friendly_errors)
from shoprec.cli_ab import register as _register_ab  # noqa: E402 (`ab list|report|ramp|stop`, next to `ab offline`)

_register_ab(app, _friendly_errors)
from shoprec.cli_serve import register as _register_serve  # noqa: E402

_register_serve(app, _friendly_errors)
from shoprec.cli_chat import register as _register_chat  # noqa: E402

_register_chat(app, _friendly_errors)
from shoprec.cli_llm import register as _register_llm  # noqa: E402 (`serve-llm`: the vLLM server, docs/vllm.md)

_register_llm(app, _friendly_errors)


if __name__ == "__main__":
    app()
