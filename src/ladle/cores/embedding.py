"""What `Model` and `AsyncModel` share for an embedding model: every rule that does no waiting.

How any accepted request shape becomes token id lists that fit the model (checked, or cut
when the request asks), and how the worker's vectors become an OpenAI embedding response
(`dimensions` keeps the first n components and normalizes again, as OpenAI's shortened
embeddings are; `base64` packs little-endian float32, as OpenAI's clients decode it).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ladle.cores.text import ModelInfo, start_on_own_thread
from ladle.engine.embedding_engine import EmbeddingEngine
from ladle.engine.embedding_loader import LoadedEmbedder
from ladle.errors import ContextLengthError, InvalidRequestError
from ladle.messages import EmbeddingRequestBuilder
from ladle.protocol.openai import (
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    parse_request,
)

EmbeddingInput = str | list[str] | EmbeddingRequestBuilder | EmbeddingRequest | dict[str, Any]


class EmbeddingCore:
    """Request and response rules of an embedding model (no waiting here)."""

    def __init__(
        self, loaded: LoadedEmbedder, model_id: str, max_num_seqs: int, max_seq_len: int | None
    ) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_id = model_id
        self.max_seq_len = min(max_seq_len or loaded.max_seq_len, loaded.max_seq_len)
        loaded.embedder.max_num_seqs = max_num_seqs
        self.engine = EmbeddingEngine(loaded.embedder)

    @classmethod
    def start(
        cls,
        load: Callable[[], LoadedEmbedder],
        model_id: str,
        max_num_seqs: int,
        max_seq_len: int | None,
    ) -> EmbeddingCore:
        """Load the model on a new thread, which then runs its worker; wait until loaded."""
        return start_on_own_thread(
            lambda: cls(load(), model_id, max_num_seqs, max_seq_len),
            lambda core: core.engine.serve(),
            f"ladle-embed[{model_id}]",
        )

    # ---- requests

    def request(self, request: EmbeddingInput) -> EmbeddingRequest:
        if isinstance(request, EmbeddingRequest):
            return request
        if isinstance(request, EmbeddingRequestBuilder):
            return request.to_request()
        if isinstance(request, (str, list)):
            return parse_request(EmbeddingRequest, {"input": request})
        if isinstance(request, dict):
            return parse_request(EmbeddingRequest, request)
        raise InvalidRequestError(f"cannot embed a {type(request).__name__}", param="input")

    def prepare(self, req: EmbeddingRequest) -> list[list[int]]:
        """Token ids of every input, each within `max_seq_len` (or an error naming it)."""
        dim, vocab, limit = self.loaded.embedder.dim, self.tokenizer.vocab_size, self.max_seq_len
        if req.dimensions is not None and req.dimensions > dim:
            raise InvalidRequestError(
                f"{req.dimensions} is more than the model's {dim} dimensions", param="dimensions"
            )
        prepared = []
        for i, item in enumerate(req.inputs()):
            if isinstance(item, str):
                ids = self.tokenizer.encode(item)
                if len(ids) > limit and req.truncate_sequence:
                    ids = self.tokenizer.encode_truncated(item, limit)
            else:
                if any(not 0 <= t < vocab for t in item):
                    raise InvalidRequestError(f"token ids must be in [0, {vocab})", f"input[{i}]")
                ids = item[:limit] if req.truncate_sequence else item
            if not ids:
                raise InvalidRequestError("the input has no tokens", param=f"input[{i}]")
            if len(ids) > limit:
                raise ContextLengthError(
                    f"input {i} has {len(ids)} tokens but the model embeds at most {limit}; "
                    "shorten it or set truncate_sequence",
                    param=f"input[{i}]",
                )
            prepared.append(ids)
        return prepared

    # ---- responses

    def response(
        self, req: EmbeddingRequest, inputs: list[list[int]], vectors: torch.Tensor
    ) -> EmbeddingResponse:
        if req.dimensions is not None:
            vectors = F.normalize(vectors[:, : req.dimensions], p=2.0, dim=-1)
        if req.encoding_format == "base64":
            rows = np.ascontiguousarray(vectors.numpy(), dtype="<f4")
            data = [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
        else:
            data = vectors.tolist()
        num_tokens = sum(len(ids) for ids in inputs)
        return EmbeddingResponse(
            data=[Embedding(index=i, embedding=v) for i, v in enumerate(data)],
            model=self.model_id,
            usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens),
        )

    # ---- tokens and facts

    def info(self) -> ModelInfo:
        return ModelInfo(
            model_id=self.model_id,
            architecture=self.loaded.architecture,
            modalities={"input": ["text"], "output": ["embeddings"]},
            device="cpu",
            dtype=str(self.loaded.embedder.dtype).removeprefix("torch."),
            max_seq_len=self.max_seq_len,
            file_format=self.loaded.file_format,
            path=str(self.loaded.path),
        )
