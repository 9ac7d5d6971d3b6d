"""Retrieval: passage indexes (BM25, dense, hybrid) and the Search-R1-protocol retrieval server."""

from agentrl.retrieval.index import Hit, Index, read_corpus

__all__ = ["Hit", "Index", "read_corpus"]
