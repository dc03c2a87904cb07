"""Decode speed with a JSON-schema constraint beside the same request unconstrained.

    python benchmarks/bench_structured.py [--model PATH] [--threads 2] [--tokens 128]

Both requests ask for a list of words and run to exactly `--tokens` new tokens: the schema
admits a long array, and the free request has its end tokens banned. Decode tokens/s counts
from the first streamed chunk to the last, so prefill and the grammar's compilation are not
in it. Prints a table; asserts nothing (the target is constrained >= 0.8x unconstrained).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from ladle import Model, TextModelBuilder

SCHEMA = {
    "type": "array",
    "items": {"type": "string", "maxLength": 24},
    "minItems": 200,  # longer than any run here: the constraint never ends it early
}
MESSAGES = [{"role": "user", "content": "List as many English words about the sea as you can."}]


def decode_tok_s(model: Model, request: dict[str, Any]) -> float:
    stream = model.stream_chat_request({**request, "stream_options": {"include_usage": True}})
    first = None
    tokens = 0
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        elif first is None and any(c.delta.content for c in chunk.choices):
            first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    return (tokens - 1) / (end - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with TextModelBuilder(args.model).build() as model:
        stop_ids = model._core.tokenizer.stop_token_ids
        free = {"logit_bias": {i: -100 for i in stop_ids}}
        constrained = {"grammar": {"type": "json_schema", "value": SCHEMA}}
        print(f"{args.tokens} tokens, {args.threads} threads")
        print("| sampling | unconstrained tok/s | JSON schema tok/s | ratio |")
        print("|---|---|---|---|")
        for name, sampling in (("greedy", {"temperature": 0}), ("T=0.8", {"temperature": 0.8})):
            base = {"messages": MESSAGES, "max_tokens": args.tokens, "seed": 1, **sampling}
            decode_tok_s(model, {**base, **constrained})  # warm-up: builds llguidance's vocab
            plain = decode_tok_s(model, {**base, **free})
            json_rate = decode_tok_s(model, {**base, **constrained})
            print(f"| {name} | {plain:.1f} | {json_rate:.1f} | {json_rate / plain:.2f} |")


if __name__ == "__main__":
    main()
