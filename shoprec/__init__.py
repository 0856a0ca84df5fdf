"""shoprec application layer: configuration, CLI and (later) the HTTP API, on top of retrieval/generator."""

__version__ = "0.1.0"
