"""`shoprec demo`: the whole retrieval stage on the synthetic demo shop, end to end, from nothing.

generate catalog + events -> write them in the generic format -> load them back through the real loaders ->
SQLite store -> train/build every signal -> show candidates for recommendation, search, cart and cold start.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Literal

from rich.console import Console

from retrieval.types import Filters
from shoprec.config import Settings
from shoprec.service import Shoprec

# The small adapter trained on this demo shop only (`make finetune-demo` reproduces it): it teaches SmolLM2-135M to
# write short reasons grounded in the shopper's history instead of echoing candidate lines.
DEMO_ADAPTER = Path(__file__).resolve().parents[1] / "generator" / "adapters" / "demo"


def demo_adapter() -> Path | None:
    """The shipped demo adapter folder, or None when it is absent (the demo then runs the base model)."""
    return DEMO_ADAPTER if (DEMO_ADAPTER / "adapter_config.json").is_file() else None


def run_demo(
    home: Path,
    *,
    seed: int = 0,
    sasrec_epochs: int = 30,
    console: Console | None = None,
    llm: Settings | None = None,
) -> Shoprec:
    """Runs the demo into `home` (emptied first). `llm`: settings whose LLM backend and model the demo's model
    stage uses (`SHOPREC_LLM_BACKEND=vllm shoprec demo`); the embedded model on transformers when None."""
    from retrieval.loaders import load_dataset, write_generic
    from retrieval.synthetic import SyntheticConfig, generate

    con = console or Console()
    t0 = time.perf_counter()
    home = Path(home)
    if home.exists():
        shutil.rmtree(home)  # the demo always starts from nothing, so its output is reproducible
    data_dir = home / "data"

    con.rule("[bold]1. Generate the demo shop")
    data = generate(SyntheticConfig(seed=seed))
    write_generic(data.items, data.interactions, data_dir)
    con.print(
        f"{len(data.items)} items, {len(data.interactions)} events, {len(data.cold_item_ids)} new items with no "
        f"events -> {data_dir}/items.jsonl, events.jsonl",
        highlight=False,
    )

    con.rule("[bold]2. Ingest into the SQLite store")
    ds = load_dataset(data_dir)
    adapter = demo_adapter()
    settings = Settings(home=home, sasrec_epochs=sasrec_epochs, adapter=str(adapter) if adapter else None)
    if llm is not None:
        settings = settings.model_copy(update={"llm_backend": llm.llm_backend, "llm_model": llm.llm_model})
    svc = Shoprec(settings)
    svc.store.ingest(ds.items, ds.interactions)  # items and events in one transaction
    con.print(f"store {svc.settings.store_url}: {svc.store.counts()}", highlight=False)

    con.rule("[bold]3. Build the retrieval index (popularity, item-kNN, BM25, dense MiniLM+FAISS, SASRec)")
    svc.build_index(log=lambda m: con.print("  " + m, highlight=False))

    def show(title: str, request_kwargs: dict, k: int = 5) -> None:
        request = svc.request(**request_kwargs)
        rows = svc.describe(svc.candidates(request, k))
        con.print(f"\n[bold]{title}[/]  ({request.mode} mode)", highlight=False)
        for r in rows:
            signals = ", ".join(f"{n}#{e['rank']}" for n, e in r["signals"].items())
            con.print(
                f"  {r['rank']}. {r['item_id']} {r['title']}  [dim]{r['category']} | {signals}[/]", highlight=False
            )

    con.rule("[bold]4. Candidates")
    users = sorted({ev.user_id for ev in ds.interactions})
    by_user = Counter(ev.user_id for ev in ds.interactions)
    shown = [u for u in users if by_user[u] >= 15][:2]
    for user in shown:
        recent = [svc.catalog[ev.item_id].title for ev in svc.store.history(user)[-3:]]
        con.print(f"\n[bold]{user}[/] recently: " + " | ".join(recent), highlight=False)
        show(f"Recommendations for {user}", {"user": user})
    show("Search 'wireless headphones'", {"query": "wireless headphones"})
    show(f"Personalised search 'gift' for {shown[0]}", {"user": shown[0], "query": "gift"})
    phone = next((it for it in ds.items if "Phone" in " ".join(it.category) and "Smartphones" in it.category[-1]), None)
    cart_item = phone or ds.items[0]
    show(f"Cart with {cart_item.id} {cart_item.title}", {"cart": [cart_item.id]})
    show("A new user with no history (cold start)", {"user": "NEW-USER"})
    if data.cold_item_ids:
        cold = svc.catalog[data.cold_item_ids[0]]
        show(f"A brand-new item ({cold.id}, no events) found by its content", {"query": cold.title}, k=3)
    show(
        "Filtered: in stock, under 50, Electronics",
        {"user": shown[0], "filters": Filters(categories=("Electronics",), max_price=50.0, in_stock_only=True)},
    )
    tuned = "+ demo LoRA adapter" if adapter else "untuned"
    con.rule(f"[bold]5. Ranked, justified, diverse picks (SmolLM2-135M {tuned}, at most 2 per category)")
    if svc.settings.llm_backend != "transformers":
        con.print(f"LLM backend: {svc.settings.llm_backend}", highlight=False)
    recommender = svc.recommender()  # with the adapter's fitted LLM/retrieval blend when it has one
    modes: tuple[tuple[str, Literal["score", "generate"]], ...] = ((shown[0], "score"), (shown[1], "generate"))
    for user, mode in modes:
        rec = recommender.recommend(
            svc.request(user=user), recommender.config.model_copy(update={"mode": mode, "k": 5})
        )
        status = f"FALLBACK ({rec.fallback_reason})" if rec.fallback else f"{rec.mode} mode"
        timing = ", ".join(f"{k} {v:.0f} ms" for k, v in rec.timings_ms.items())
        con.print(f"\n[bold]{user}[/]: {status}; {timing}", highlight=False)
        for p in rec.picks:
            con.print(f"  {p.rank}. {svc.catalog[p.item_id].title} [dim]({p.category})[/]", highlight=False)
            con.print(f"     [italic]{p.reason}[/]", highlight=False)
    con.print(f"\n[green]demo finished in {time.perf_counter() - t0:.0f}s[/] (data, store and index in {home})")
    con.print(next_commands(home, shown[0]), highlight=False)
    return svc


def next_commands(home: Path, user: str) -> str:
    """The commands to try next on the demo shop: they name its folder, because the default home is var/, not it."""
    flag = f"--home {home}"
    return "\n".join(
        [
            f"Next, on the demo shop (every command needs `{flag}`, or SHOPREC_HOME={home}):",
            f"  shoprec {flag} candidates --user {user}",
            f"  shoprec {flag} recommend --user {user}",
            f'  shoprec {flag} search "wireless headphones"',
        ]
    )
