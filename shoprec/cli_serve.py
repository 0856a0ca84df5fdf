"""`shoprec serve` (the HTTP service under uvicorn) and `shoprec keys create/list/revoke` (its API keys).

Registered in shoprec/cli.py with one line; the global options (--config, --home, --store, --index) and the
settings layering are the CLI's.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

console = Console()


def register(app: typer.Typer, friendly_errors: Callable[[Any], Any]) -> None:
    # the CLI module that registers us (shoprec.cli, or __main__ under `python -m shoprec.cli`): its settings
    cli: Any = sys.modules[friendly_errors.__module__]

    @app.command()
    @friendly_errors
    def serve(
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every interface)."),
        port: int = typer.Option(8000, "--port", min=1, max=65535),
        workers: int = typer.Option(1, "--workers", min=1, max=64, help="Worker processes (each loads the index)."),
        dev: bool = typer.Option(
            False, "--dev", help="Local development: loopback clients need no API key (allow_anonymous_local)."
        ),
        llm_backend: str | None = typer.Option(None, "--llm-backend", help="transformers | fake | none (no model)."),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
    ) -> None:
        """Serve recommend, search, events and items over HTTP (OpenAPI at /docs)."""
        import uvicorn

        from shoprec.api import SETTINGS_ENV

        settings = cli._settings()
        update: dict[str, Any] = {}
        if dev:
            update["allow_anonymous_local"] = True
        if llm_backend is not None:
            update["llm_backend"] = llm_backend
        settings = settings.model_validate({**settings.model_dump(), **update})
        if settings.allow_anonymous_local and host not in ("127.0.0.1", "::1", "localhost"):
            console.print(
                f"[yellow]warning:[/] anonymous local access is on, listening on {host}: only loopback clients are "
                "served without a key",
                highlight=False,
            )
        # every worker process rebuilds the app from exactly these settings
        os.environ[SETTINGS_ENV] = settings.model_dump_json()
        options: dict[str, Any] = {
            "app": "shoprec.api:app_from_env",
            "factory": True,
            "log_level": log_level,
            "timeout_graceful_shutdown": 10,
            # keep-alive longer than a load balancer's typical idle timeout: a connection the server closes while
            # the client sends on it is a failed request (seen at 64 clients with uvicorn's 5 s default)
            "timeout_keep_alive": 75,
        }
        if workers == 1:
            uvicorn.run(host=host, port=port, **options)
            return
        from shoprec.workers import serve_workers

        try:
            status = serve_workers(host, port, workers, options)
        except OSError as e:
            raise ValueError(
                f"--host {host} --port {port}: {e.strerror or e}. Fix: pick a free port (--port) or stop what "
                "listens there"
            ) from None
        if status:
            raise typer.Exit(status)

    keys = typer.Typer(help="API keys of the HTTP service (stored hashed; the secret is shown once).")
    app.add_typer(keys, name="keys")

    @keys.command("create")
    @friendly_errors
    def create(
        name: str = typer.Argument(..., help="Who the key is for (e.g. 'shop-frontend')."),
        scope: list[str] = typer.Option(["read"], "--scope", help="read | write | admin (repeatable)."),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Create a key and print its secret (only now: the store keeps a hash)."""
        from shoprec.auth import validate_scopes

        scopes = validate_scopes(scope)
        key, secret = cli._service().store.create_key(name, scopes)
        if as_json:
            sys.stdout.write(json.dumps({"id": key.id, "name": key.name, "scopes": list(key.scopes), "secret": secret}))
            sys.stdout.write("\n")
            return
        console.print(f"key {key.id} ({key.name}, scopes: {', '.join(key.scopes)})", highlight=False)
        console.print(f"secret: {secret}", highlight=False)
        console.print("[dim]send it as 'Authorization: Bearer <secret>'; it is not shown again[/]")

    @keys.command("list")
    @friendly_errors
    def list_(as_json: bool = typer.Option(False, "--json")) -> None:
        """Every key: id, name, scopes, created, revoked (never the secrets)."""
        rows = [json.loads(k.model_dump_json()) for k in cli._service().store.list_keys()]
        if as_json:
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            return
        for r in rows:
            state = "revoked" if r.get("revoked_at") or r.get("revoked") else "active"
            console.print(f"{r['id']}  {r['name']}  {','.join(r['scopes'])}  {state}", highlight=False)

    @keys.command("revoke")
    @friendly_errors
    def revoke(key_id: str = typer.Argument(..., help="The key's id (from `shoprec keys list`).")) -> None:
        """Revoke a key: refused by every replica within a few seconds."""
        if not cli._service().store.revoke_key(key_id):
            raise ValueError(f"no active key {key_id!r}. Fix: pick an id from `shoprec keys list`")
        console.print(f"key {key_id} revoked", highlight=False)
