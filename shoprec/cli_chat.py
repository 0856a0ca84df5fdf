"""`shoprec chat`: the shopping assistant in the terminal (a rich REPL over the same turn as POST /v1/chat).

Each line is one shopper message; the cards come first in retrieval order, then in the LLM's order with reasons.
Commands: /state (the conversation state as JSON), /reset (a new conversation), /quit. One message can also be
passed with --message (repeatable) for scripts: the turns run in order and the REPL is skipped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()


def _show(answer: Any) -> None:
    console.print(f"[bold cyan]assistant:[/] {escape(answer.text)}", highlight=False)
    if answer.suggestions:
        console.print("  try: " + " | ".join(escape(s) for s in answer.suggestions), highlight=False)
    if not answer.cards:
        return
    table = Table(show_header=True, header_style="bold", box=None, padding=(0, 1))
    for col in ("#", "item", "title", "category", "price", "why"):
        table.add_column(col, overflow="fold")
    for c in answer.cards:
        price = f"${c.price:,.2f}" if c.price is not None else "-"
        table.add_row(str(c.rank), c.item_id, escape(c.title), escape(c.category), price, escape(c.reason))
    console.print(table)
    timing = ", ".join(f"{k} {v:.0f} ms" for k, v in answer.timings_ms.items())
    note = f"; fallback: {answer.fallback_reason}" if answer.fallback_reason else ""
    console.print(f"  [dim]{timing}{note}[/]", highlight=False)


def register(app: typer.Typer, friendly_errors: Callable[[Any], Any]) -> None:
    from shoprec import cli

    @app.command()
    @friendly_errors
    def chat(
        user: str | None = typer.Option(None, "--user", help="A known user id: answers use their history."),
        message: list[str] = typer.Option(  # noqa: B008 (typer's way of declaring a repeatable option)
            [], "--message", "-m", help="Run these messages in order and exit (no prompt)."
        ),
        no_llm: bool = typer.Option(False, "--no-llm", help="Retrieval order only, no model (fast)."),
        k: int = typer.Option(5, "--k", min=1, max=20, help="Cards per answer."),
    ) -> None:
        """Talk to the shopping assistant: 'wireless headphones under $80', then 'cheaper', 'not that brand'."""
        from shoprec.chat.state import ChatState
        from shoprec.chat.turn import ChatConfig, ChatEngine
        from shoprec.service import Shoprec

        svc = Shoprec(cli._settings())
        with console.status("loading the index and the model..."):
            rec = svc.recommender(use_llm=not no_llm)
            engine = ChatEngine(
                svc.catalog,
                rec,
                history=lambda u: [e.item_id for e in svc.store.history(u)],
                config=ChatConfig(k=k, use_llm=not no_llm),
            )
        state = ChatState()
        scripted = list(message)
        if not scripted:
            console.print("[dim]Type a request (/state, /reset, /quit).[/]")
        while True:
            if scripted:
                text = scripted.pop(0)
                console.print(f"[bold]you:[/] {escape(text)}", highlight=False)
            elif message:
                return
            else:
                try:
                    text = console.input("[bold]you:[/] ").strip()
                except (EOFError, KeyboardInterrupt):
                    console.print()
                    return
            if not text:
                continue
            if text in ("/quit", "/exit"):
                return
            if text == "/reset":
                state = ChatState()
                console.print("[dim]new conversation[/]")
                continue
            if text == "/state":
                console.print_json(json.dumps(state.model_dump(mode="json")))
                continue
            last = None
            for answer in engine.run(text[:500], state, user):
                if answer.stage == "retrieval" and not no_llm:
                    ids = ", ".join(c.item_id for c in answer.cards)
                    console.print(f"  [dim]first cards: {ids} (ranking...)[/]", highlight=False)
                last = answer
            assert last is not None
            state = last.state
            _show(last)
