"""Who may call the HTTP service: API keys with scopes, a per-key rate limit, and the local-development principal.

Keys live in the store, hashed (`store.create_key / verify_key / revoke_key`; `shoprec keys ...`). A request sends
its key as `Authorization: Bearer <secret>` (or `X-API-Key: <secret>`). Scopes: `read` (recommend, search),
`write` (events), `admin` (items, keys); `admin` implies the others, `write` implies `read`.
Without a key: 401. With a key lacking the scope: 403. Over the key's rate: 429 with Retry-After.
Loopback clients without a key are served only when `allow_anonymous_local` is set (`shoprec serve --dev`).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fastapi import HTTPException, Request

if TYPE_CHECKING:
    from shoprec.api import AppState

Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "write", "admin")
# What each scope grants: a key made for the shop's admin can also read and write.
_IMPLIES: dict[str, frozenset[str]] = {
    "read": frozenset({"read"}),
    "write": frozenset({"read", "write"}),
    "admin": frozenset({"read", "write", "admin"}),
}
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
# A verified key is trusted this long before the store is asked again: a hash lookup per request would put the
# store on every request's path; a revocation takes effect within this time.
_VERIFY_TTL_S = 5.0


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id and name and what it may do (`local` = the anonymous loopback developer)."""

    id: str
    name: str
    scopes: frozenset[str]
    local: bool = False

    def allows(self, scope: str) -> bool:
        return any(scope in _IMPLIES.get(s, frozenset()) for s in self.scopes)


LOCAL_DEV = Principal(id="local-dev", name="local development (no key)", scopes=frozenset(SCOPES), local=True)


def validate_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Scopes as given, checked: an unknown one is a ValueError naming the valid ones."""
    out = tuple(dict.fromkeys(s.strip() for s in scopes if s.strip()))
    bad = [s for s in out if s not in SCOPES]
    if bad or not out:
        raise ValueError(f"unknown scope(s) {', '.join(bad) or '(none given)'}; valid scopes: {', '.join(SCOPES)}")
    return out


class TokenBucket:
    """Per-key rate limit: `rate` requests per second with bursts of `burst`; thread-safe, per process."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, last refill time)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Take one token; returns 0.0 when allowed, else the seconds until a token is available."""
        with self._lock:
            now = self._clock()
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


class KeyVerifier:
    """Looks a secret up in the store, caching the answer briefly (by the secret's SHA-256, never the secret)."""

    def __init__(self, store: Any, ttl_s: float = _VERIFY_TTL_S) -> None:
        self.store, self.ttl_s = store, ttl_s
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

    def verify(self, secret: str) -> Principal | None:
        digest = hashlib.sha256(secret.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None and now - hit[0] < self.ttl_s:
                return hit[1]
        key = self.store.verify_key(secret)
        principal = None if key is None else Principal(id=str(key.id), name=key.name, scopes=frozenset(key.scopes))
        with self._lock:
            if len(self._cache) > 10_000:  # bounded: a flood of wrong secrets must not grow memory
                self._cache.clear()
            self._cache[digest] = (now, principal)
        return principal


def _secret(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


def authenticate(state: AppState, request: Request, scope: str) -> Principal:
    """The caller of `request`, checked for `scope` and the rate limit; raises 401 / 403 / 429."""
    secret = _secret(request)
    if secret is None:
        host = request.client.host if request.client else ""
        if state.settings.allow_anonymous_local and host in _LOOPBACK:
            return LOCAL_DEV
        raise HTTPException(
            401,
            "missing API key: send 'Authorization: Bearer <key>' (create one with `shoprec keys create NAME "
            "--scope read`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = state.verifier.verify(secret)
    if principal is None:
        raise HTTPException(
            401,
            "invalid or revoked API key; create a new one with `shoprec keys create`",
            {"WWW-Authenticate": "Bearer"},
        )
    if not principal.allows(scope):
        raise HTTPException(
            403,
            f"API key {principal.name!r} has scopes {sorted(principal.scopes)}; this endpoint needs {scope!r}. "
            f"Fix: use a key created with --scope {scope}",
        )
    wait = state.limiter.take(principal.id)
    if wait > 0:
        state.metrics.rate_limited.labels(endpoint=request.url.path).inc()
        raise HTTPException(
            429,
            f"rate limit of {state.settings.rate_limit_per_s:g} requests/s for key {principal.name!r} exceeded; "
            f"retry in {wait:.2f} s",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    return principal


def require_scope(scope: Scope) -> Callable[[Request], Principal]:
    """A FastAPI dependency: `principal: Principal = Depends(require_scope("read"))`."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid scopes: {', '.join(SCOPES)}")

    def dependency(request: Request) -> Principal:
        from shoprec.api import get_state

        return authenticate(get_state(request), request, scope)

    dependency.__name__ = f"require_{scope}"
    return dependency
