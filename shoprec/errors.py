"""How the CLI words an error: the first problem of a validation error, and the hint that points at the demo shop."""

from __future__ import annotations

from pathlib import Path

# Where `shoprec demo` (and `make demo`) writes its shop by default, relative to the working folder. It is not the
# default home (var/) on purpose: the demo deletes its folder first, and must never delete a real shop.
DEMO_HOME = Path("var/demo")


def first_error(e: ValueError) -> str:
    """'field.sub: message' for a pydantic ValidationError (its first error), else the exception's text."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        err = errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        return f"{loc}: {err['msg']}" if loc else str(err["msg"])
    return str(e)


def demo_hint(home: Path, index_path: Path, demo_home: Path = DEMO_HOME) -> str:
    """A sentence pointing at the demo shop when `home` has no index but the demo's folder has one, else ''.

    After `make demo` the obvious next command (`shoprec candidates --user U0002`) reads the default home, var/,
    where there is nothing: the fix is the demo's folder, not `shoprec index` on an empty store.
    """
    if (index_path / "manifest.json").is_file() or not (demo_home / "index" / "manifest.json").is_file():
        return ""
    if home.resolve() == demo_home.resolve():
        return ""
    return (
        f"The demo shop is in {demo_home}: add `--home {demo_home}` before the command "
        f"(e.g. `shoprec --home {demo_home} candidates --user U0002`) or set SHOPREC_HOME={demo_home}."
    )
