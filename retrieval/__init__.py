"""Retrieval stage: the catalog and event data layer, and the retrievers that narrow a catalog to candidates.

Data flows one way: loaders -> (Store) -> Catalog + histories -> retrievers -> fusion -> candidates.
Heavy libraries (torch, faiss, sentence-transformers, bm25s) are imported lazily inside the modules that use them.
"""
