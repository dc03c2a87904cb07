"""The agent runtime's two figures: a long session's 10th turn, and an MCP tool call's cost.

    python benchmarks/bench_agents.py [--model smollm2-135m-instruct] [--threads 2] [--calls 20]

- Time to first token of a session's 10th turn (only the new user message sent; the engine's
  prefix cache holds the history) against the same 10-turn conversation sent whole to a
  fresh model (warmed up on an unrelated prompt) with no cache to reuse. Each earlier turn's
  reply is 48 tokens long, so the history is several hundred tokens. Target: <= 0.3x.
- One MCP round trip over stdio (tests/mcp_servers/stdio_server.py's `add`), in ms: the
  median over `--calls` calls made as the agent loop makes them (the toolbox's loop thread,
  a blocking wait), without the model.
Prints the CPU and the kernel path; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ladle import McpClientConfig, McpServerConfig, Model, TextModelBuilder
from ladle.engine.kernels import isa
from ladle.protocol.openai import FunctionCall, ToolCall
from ladle.tools.runtime import Toolbox

STDIO_SERVER = Path(__file__).parents[1] / "tests" / "mcp_servers" / "stdio_server.py"
TURNS = 10
REPLY_TOKENS = 48
QUESTIONS = [
    "Tell me about the ocean.",
    "What lives in it?",
    "How deep does it go?",
    "What about the tides?",
    "Why is it salty?",
    "Which is the largest ocean?",
    "How do waves form?",
    "What are coral reefs?",
    "How do whales breathe?",
    "Summarise what we said.",
]


def ttft(model: Model, request: dict[str, Any], session_id: str | None = None) -> float:
    started = time.perf_counter()
    for chunk in model.stream_chat_request(request, session_id=session_id):
        if chunk.choices and chunk.choices[0].delta.content:
            return time.perf_counter() - started
    raise RuntimeError("no token came")


def session_figures(path: str, threads: int) -> tuple[float, float, int]:
    with TextModelBuilder(path).with_num_threads(threads).build() as model:
        stop_ids = model._core.tokenizer.stop_token_ids
        sampling = {"temperature": 0, "logit_bias": {i: -100 for i in stop_ids}}
        for question in QUESTIONS[:-1]:
            model.send_chat_request(
                {"messages": [{"role": "user", "content": question}],
                 "max_tokens": REPLY_TOKENS, **sampling},
                session_id="bench",
            )  # fmt: skip
        last = {"messages": [{"role": "user", "content": QUESTIONS[-1]}], "max_tokens": 1}
        continued = ttft(model, last, session_id="bench")
        history = json.loads(model.export_session("bench"))["messages"]
    whole = {"messages": [*history, last["messages"][0]], "max_tokens": 1}
    with TextModelBuilder(path).with_num_threads(threads).build() as fresh:
        prompt_tokens = len(fresh.tokenize(whole["messages"]))
        fresh.send_completion_request({"prompt": "Warm up.", "max_tokens": 1})  # no shared prefix
        uncached = ttft(fresh, whole)
    return continued, uncached, prompt_tokens


def mcp_round_trip_ms(calls: int) -> float:
    server = McpServerConfig("bench", sys.executable, (str(STDIO_SERVER),))
    toolbox = Toolbox(mcp=McpClientConfig([server]))
    toolbox.start()
    try:
        add = toolbox.tools()["add"]
        call = ToolCall(id="call_1", function=FunctionCall(name="add", arguments='{"a":2,"b":3}'))
        toolbox.run_calls([(add, call)]).result()  # warm-up
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            output = toolbox.run_calls([(add, call)]).result()[0]
            times.append(time.perf_counter() - started)
            assert output.text == "5", output
        return statistics.median(times) * 1000
    finally:
        toolbox.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    print(f"CPU: {isa.cpu_name()}; kernels: {isa.selected_isa()}; {args.threads} threads")
    continued, uncached, tokens = session_figures(args.model, args.threads)
    print(f"\n10th turn of a session ({tokens} prompt tokens, {REPLY_TOKENS}-token replies)")
    print("| history | time to first token (ms) | ratio |")
    print("|---|---|---|")
    print(f"| sent whole, no cache | {uncached * 1000:.0f} | 1.00 |")
    print(f"| session, prefix cached | {continued * 1000:.0f} | {continued / uncached:.2f} |")
    print(f"\nMCP round trip over stdio (median of {args.calls}): "
          f"{mcp_round_trip_ms(args.calls):.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
