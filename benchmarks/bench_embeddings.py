"""Sentences per second embedding 1,000 sentences: ladle beside sentence-transformers.

    python benchmarks/bench_embeddings.py [--model PATH_OR_ALIAS] [--threads 2] [--count 1000]

Both run in this process on the same model folder (default: the catalog's all-MiniLM-L6-v2,
downloaded if need be) with the same thread count, each after one warm-up call; the table
also gives the lowest cosine similarity between the two sets of vectors.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from ladle import EmbeddingModelBuilder
from ladle.store.catalog import resolve

try:
    from sentence_transformers import SentenceTransformer
except ImportError:  # the table then has ladle's row only
    SentenceTransformer = None

WORDS = [
    "the",
    "a",
    "model",
    "local",
    "embedding",
    "search",
    "query",
    "document",
    "fast",
    "vector",
    "python",
    "laptop",
    "cpu",
    "city",
    "river",
    "music",
    "learning",
    "history",
    "science",
    "table",
    "window",
    "garden",
    "coffee",
    "morning",
    "network",
    "data",
    "language",
    "quickly",
    "slowly",
    "bright",
    "quiet",
    "ancient",
    "modern",
    "small",
    "large",
    "because",
    "although",
]


def sentences(count: int) -> list[str]:
    """Sentences of 3 to 60 words, so batches need padding as real traffic does."""
    rng = random.Random(0)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))).capitalize() + "."
        for _ in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve(args.model)
    texts = sentences(args.count)
    rows = []

    with EmbeddingModelBuilder(path).with_num_threads(args.threads).build() as model:
        model.generate_embeddings(texts[:32])
        started = time.perf_counter()
        ours = torch.tensor(model.generate_embeddings(texts))
        rows.append(("ladle", args.count / (time.perf_counter() - started)))

    theirs = None
    if SentenceTransformer is None:
        print("sentence-transformers is not installed: pip install sentence-transformers")
    else:
        reference = SentenceTransformer(str(path), device="cpu")
        reference.encode(texts[:32])
        started = time.perf_counter()
        theirs = torch.from_numpy(reference.encode(texts, batch_size=32))
        rows.append(("sentence-transformers", args.count / (time.perf_counter() - started)))

    print(f"{args.count} sentences, {args.threads} threads, {path.name}")
    print(f"{'engine':<24}{'sentences/s':>12}{'vs ladle':>10}")
    for name, rate in rows:
        print(f"{name:<24}{rate:>12.1f}{rate / rows[0][1]:>9.2f}x")
    if theirs is not None:
        cosine = F.cosine_similarity(ours, theirs, dim=-1).min()
        print(f"lowest cosine similarity ladle vs sentence-transformers: {cosine:.6f}")


if __name__ == "__main__":
    main()
