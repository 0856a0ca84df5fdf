"""The chat shopping assistant: a typed conversation state, its parsers, one turn of retrieval + ranking, and faces.

state.py (what the conversation knows) <- parse.py (deterministic slots) + understand.py (the LLM, constrained to
the catalog's own choices) -> turn.py (filters + query -> retrieval -> LLM ranking -> diverse picks, or one
clarifying question) -> api.py (POST /v1/chat, SSE) / shoprec/cli_chat.py (the terminal REPL) / web/ (the page).
"""
