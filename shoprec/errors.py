"""How the CLI words a validation error: the first problem, with the field it is about."""

from __future__ import annotations


def first_error(e: ValueError) -> str:
    """'field.sub: message' for a pydantic ValidationError (its first error), else the exception's text."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        err = errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        return f"{loc}: {err['msg']}" if loc else str(err["msg"])
    return str(e)
