"""Synthetic shoppers with known preferences: they browse a shop, click, cart and buy with known probabilities.

Each shopper likes a few top-level categories (Dirichlet weights), a few brands, and a price band. Shown a list,
they examine position j with probability `decay^(j-1)` (position bias) and click an examined item with probability
`base_click · appeal(item)`, where appeal grows with the category weight, a liked brand and a fitting price (mean
appeal over the catalog ~1 for a typical shopper). A clicked item is carted with `cart_given_click · appeal`, a carted
one bought with `buy_given_cart`. So a variant that shows items closer to the shoppers' tastes has a true, knowable
lift: `expected_clicks(shopper, items)` is the exact expected number of clicks on a list, recorded with each
exposure.

Two ways to run it:
- `browse_http(...)`: the shoppers call the real service on loopback with httpx (`POST /v1/recommend`, then
  `POST /v1/events` with the `recommendation_id`), so assignment, exposure logging and attribution are the
  service's own;
- `simulate_ab(...)`: the same behaviour summarised per user (exposures per visit, a per-user click propensity with
  the spread the item-level model gives), vectorised with numpy for the thousands of repetitions of a simulation
  study (eval/bench/ab_sim.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from retrieval.types import Item


@dataclass(frozen=True)
class ShopperModel:
    """The click model's knobs; the defaults give a CTR of a few percent per shown list."""

    base_click: float = 0.02  # click probability of an examined item of appeal 1
    position_decay: float = 0.85  # examination probability falls by this factor per position
    n_liked_categories: int = 3
    n_liked_brands: int = 4
    category_concentration: float = 0.7  # Dirichlet α of the liked categories' weights (lower: more focused)
    cart_given_click: float = 0.25
    buy_given_cart: float = 0.4


@dataclass(frozen=True)
class Shopper:
    """One simulated shopper and their (hidden) tastes."""

    id: str
    categories: dict[str, float]  # top-level category -> weight (sums to 1)
    brands: frozenset[str]
    price_band: tuple[float, float]


def make_shoppers(
    items: Sequence[Item], n: int, *, seed: int = 0, model: ShopperModel = ShopperModel(), prefix: str = "S"
) -> list[Shopper]:
    """`n` shoppers whose tastes are drawn from the catalog's categories, brands and prices (seeded)."""
    rng = np.random.default_rng(seed)
    tops = sorted({it.category[0] for it in items if it.category})
    brands_by_top: dict[str, list[str]] = {}
    prices = np.array([it.price for it in items if it.price is not None], dtype=np.float64)
    for it in items:
        if it.category and it.brand:
            brands_by_top.setdefault(it.category[0], [])
            if it.brand not in brands_by_top[it.category[0]]:
                brands_by_top[it.category[0]].append(it.brand)
    out = []
    width = max(4, len(str(n)))
    for i in range(n):
        liked = rng.choice(len(tops), size=min(model.n_liked_categories, len(tops)), replace=False)
        w = rng.dirichlet(np.full(len(liked), model.category_concentration))
        cats = {tops[j]: float(x) for j, x in zip(liked, w, strict=True)}
        pool = [b for t in cats for b in brands_by_top.get(t, [])]
        chosen = rng.choice(len(pool), size=min(model.n_liked_brands, len(pool)), replace=False) if pool else ()
        centre = float(np.quantile(prices, rng.uniform(0.2, 0.8))) if prices.size else 0.0
        out.append(
            Shopper(
                id=f"{prefix}{i + 1:0{width}d}",
                categories=cats,
                brands=frozenset(pool[int(j)] for j in chosen),
                price_band=(centre / 2, centre * 2),
            )
        )
    return out


def appeal(shopper: Shopper, item: Item) -> float:
    """How much this shopper likes this item: 0.1 baseline, + 3 × category weight, + 0.8 for a liked brand, + 0.4
    in the price band (a shopper's favourite category item of a liked brand at a fitting price: ~3-4)."""
    a = 0.1
    if item.category:
        a += 3.0 * shopper.categories.get(item.category[0], 0.0)
    if item.brand in shopper.brands:
        a += 0.8
    lo, hi = shopper.price_band
    if item.price is not None and lo <= item.price <= hi:
        a += 0.4
    return a


def click_probabilities(shopper: Shopper, items: Sequence[Item], model: ShopperModel = ShopperModel()) -> np.ndarray:
    """P(click) of each shown item, in list order: examination (position bias) × attraction."""
    examine = model.position_decay ** np.arange(len(items))
    attract = np.array([min(1.0, model.base_click * appeal(shopper, it)) for it in items])
    return examine * attract


def expected_clicks(shopper: Shopper, items: Sequence[Item], model: ShopperModel = ShopperModel()) -> float:
    """The exact expected number of clicks on this list: the truth a variant's CTR estimates."""
    return float(click_probabilities(shopper, items, model).sum())


def react(
    shopper: Shopper, items: Sequence[Item], rng: np.random.Generator, model: ShopperModel = ShopperModel()
) -> list[tuple[str, str]]:
    """What the shopper does with one list: (item id, 'click' | 'cart' | 'purchase') events, in order."""
    events: list[tuple[str, str]] = []
    probs = click_probabilities(shopper, items, model)
    for it, p in zip(items, probs, strict=True):
        if rng.random() < p:
            events.append((it.id, "click"))
            if rng.random() < min(1.0, model.cart_given_click * appeal(shopper, it)):
                events.append((it.id, "cart"))
                if rng.random() < model.buy_given_cart:
                    events.append((it.id, "purchase"))
    return events


# ------------------------------------------------------------------------------------------------------------------
# Through the real service
# ------------------------------------------------------------------------------------------------------------------

# The service's event types: a click on a shown item is logged as a `view` carrying the recommendation_id.
_EVENT_TYPE = {"click": "view", "cart": "cart", "purchase": "purchase"}


@dataclass
class Visit:
    """One served list and what the shopper did with it."""

    shopper: str
    recommendation_id: str
    variant: str | None
    items: list[str]
    expected_clicks: float
    events: list[tuple[str, str]]


def browse_http(
    client: Any,
    shoppers: Sequence[Shopper],
    catalog: dict[str, Item],
    *,
    visits_per_shopper: int = 3,
    k: int = 5,
    seed: int = 0,
    request: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    model: ShopperModel = ShopperModel(),
    clock: Callable[[], float] = time.time,
    warmup: int = 0,
) -> list[Visit]:
    """Each shopper asks `POST /v1/recommend` `visits_per_shopper` times and sends what they did to `/v1/events`.

    `client` is an httpx.Client on the service's base URL. With `warmup` > 0 each shopper first views that many
    items drawn by their taste (appeal²), without a recommendation id: a history the service personalises with.
    Returns every visit with its true expected clicks."""
    rng = np.random.default_rng(seed)
    out: list[Visit] = []
    if warmup > 0:
        pool = list(catalog.values())
        for s in shoppers:
            w = np.array([appeal(s, it) ** 2 for it in pool])
            picked = rng.choice(len(pool), size=min(warmup, len(pool)), replace=False, p=w / w.sum())
            now = datetime.fromtimestamp(clock(), UTC).isoformat()
            views = [{"user_id": s.id, "item_id": pool[int(i)].id, "type": "view", "timestamp": now} for i in picked]
            client.post("/v1/events", json={"events": views}, headers=headers).raise_for_status()
    for _ in range(visits_per_shopper):
        for s in shoppers:
            body = {"user": s.id, "k": k, **(request or {})}
            r = client.post("/v1/recommend", json=body, headers=headers)
            r.raise_for_status()
            rec = r.json()
            ids = [p["item_id"] for p in rec["picks"]]
            shown = [catalog[i] for i in ids]
            events = react(s, shown, rng, model)
            arm = (rec.get("experiment") or {}).get("variant")
            if events:
                now = datetime.fromtimestamp(clock(), UTC).isoformat()
                batch = [
                    {
                        "user_id": s.id,
                        "item_id": item,
                        "type": _EVENT_TYPE[kind],
                        "timestamp": now,
                        "recommendation_id": rec["recommendation_id"],
                    }
                    for item, kind in events
                ]
                e = client.post("/v1/events", json={"events": batch}, headers=headers)
                e.raise_for_status()
            out.append(Visit(s.id, rec["recommendation_id"], arm, ids, expected_clicks(s, shown, model), events))
    return out


# ------------------------------------------------------------------------------------------------------------------
# The vectorised core, for many repetitions
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserLevel:
    """The shopper model summarised per user: how many lists a user sees and how their CTR varies.

    exposures per user = 1 + Poisson(extra_exposures); a user's clicks per list ~ Poisson(ctr · θ_u) with
    θ_u ~ Gamma(shape, 1/shape) (mean 1): users differ in how much they like what the shop shows them."""

    ctr: float = 0.05  # mean clicks per exposure in the control arm
    extra_exposures: float = 2.0
    shape: float = 2.0


def calibrate(
    shoppers: Sequence[Shopper],
    lists: Sequence[Sequence[Item]],
    model: ShopperModel = ShopperModel(),
    extra_exposures: float = 2.0,
) -> UserLevel:
    """The user-level summary of the item-level model on real lists: the mean expected clicks per list and the
    spread across shoppers (method of moments: Var(θ) = 1/shape)."""
    per_user = np.array([np.mean([expected_clicks(s, lst, model) for lst in lists]) for s in shoppers])
    mean = float(per_user.mean())
    cv2 = float(per_user.var() / mean**2) if mean > 0 else 0.0
    return UserLevel(ctr=mean, extra_exposures=extra_exposures, shape=1 / cv2 if cv2 > 0 else 1e6)


def simulate_ab(
    rng: np.random.Generator,
    runs: int,
    users: int,
    *,
    level: UserLevel = UserLevel(),
    lift: float = 0.0,
    share_b: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`runs` experiments of `users` users each, in arrival order: (is_b, clicks, exposures), each (runs, users).

    B's true CTR is A's × (1 + lift); `share_b` is the share of users the assignment really sends to B (0.48 for an
    injected 52/48 mismatch)."""
    is_b = rng.random((runs, users)) < share_b
    exposures = 1 + rng.poisson(level.extra_exposures, size=(runs, users))
    theta = rng.gamma(level.shape, 1 / level.shape, size=(runs, users))
    rate = level.ctr * theta * np.where(is_b, 1 + lift, 1.0)
    clicks = rng.poisson(rate * exposures)
    return is_b, clicks.astype(np.float64), exposures.astype(np.float64)


def per_user_variance(level: UserLevel, lift: float = 0.0) -> float:
    """Var(u) of the linearised ratio metric per user under this model (for planning): with x exposures and
    y | x, θ ~ Poisson(c θ x), u = (y − c x)/E[x], Var(u) = (c E[x] + c² Var(θ) E[x²]) / E[x]²."""
    c = level.ctr * (1 + lift)
    ex = 1 + level.extra_exposures
    ex2 = level.extra_exposures + ex**2
    return (c * ex + c**2 * (1 / level.shape) * ex2) / ex**2


def describe(level: UserLevel) -> dict[str, float]:
    return {
        "ctr": level.ctr,
        "exposures_per_user": 1 + level.extra_exposures,
        "theta_shape": level.shape,
        "theta_cv": 1 / math.sqrt(level.shape),
        "per_user_variance": per_user_variance(level),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m eval.shoppers --url http://127.0.0.1:8000 --home var/ab --shoppers 200 --visits 3`: simulated
    shoppers browse a running `shoprec serve`; prints each arm's visits, the true expected CTR and the events sent."""
    import argparse
    from pathlib import Path

    import httpx

    from retrieval.store import open_store

    ap = argparse.ArgumentParser(description="Simulated shoppers browse a running shoprec service.")
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="The service's base URL.")
    ap.add_argument("--home", type=Path, default=Path("var"), help="The service's home (its store holds the items).")
    ap.add_argument("--store", default=None, help="Store path or URL (default <home>/shoprec.db).")
    ap.add_argument("--shoppers", type=int, default=200)
    ap.add_argument("--visits", type=int, default=3, help="Lists each shopper asks for.")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--mode", default="score", help="retrieval | score | generate")
    ap.add_argument("--base-click", type=float, default=ShopperModel.base_click)
    ap.add_argument("--key", default=None, help="API key (none: the service runs with --dev).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefix", default="S", help="Shopper ids are <prefix>0001, ...")
    ap.add_argument("--warmup", type=int, default=3, help="Items each shopper views first (their history).")
    args = ap.parse_args(argv)
    if args.shoppers < 1 or args.visits < 1:
        ap.error("--shoppers and --visits must be at least 1")
    store = open_store(args.store or f"sqlite:///{args.home / 'shoprec.db'}", create=False)
    items = store.items()
    store.close()
    if not items:
        ap.error(f"no items in the store of {args.home}; pass the service's --home (or --store)")
    model = ShopperModel(base_click=args.base_click)
    shoppers = make_shoppers(items, args.shoppers, seed=args.seed, model=model, prefix=args.prefix)
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else None
    t0 = time.perf_counter()
    with httpx.Client(base_url=args.url, timeout=120) as client:
        visits = browse_http(
            client,
            shoppers,
            {it.id: it for it in items},
            visits_per_shopper=args.visits,
            k=args.k,
            seed=args.seed,
            request={"mode": args.mode},
            headers=headers,
            model=model,
            warmup=args.warmup,
        )
    arms = sorted({str(v.variant) for v in visits})
    print(f"{len(visits)} visits by {len(shoppers)} shoppers in {time.perf_counter() - t0:.0f} s")
    for arm in arms:
        vs = [v for v in visits if str(v.variant) == arm]
        clicks = sum(kind == "click" for v in vs for _, kind in v.events)
        true_ctr = sum(v.expected_clicks for v in vs) / len(vs)
        rate = clicks / len(vs)
        print(f"  {arm}: {len(vs)} visits, true expected CTR {true_ctr:.2%}, {clicks} clicks sent ({rate:.2%})")


if __name__ == "__main__":
    main()
