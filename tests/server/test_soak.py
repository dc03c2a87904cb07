"""A bounded soak through the real server: 64 concurrent streams, some cancelled, none lost.

The requests share prompt prefixes (four system prompts, four questions each), so the prefix
cache, batching and preemption all take part; a tenth of the clients hang up after a few
chunks and a tenth are cancelled at a random moment. Every stream that completes must equal
the same request run alone afterwards (greedy decoding is bit-for-bit the same in a batch,
tests/engine/test_batching.py), which catches a lost, cut or mixed-up stream; and once all
have ended, the model holds no sequence and no KV block.

The longer soak, with its figures, is benchmarks/bench_soak.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.real_model

MODEL = "smol-local:1"
STREAMS = 64
MAX_TOKENS = 12
SYSTEMS = [
    "You are a careful assistant who answers in one short sentence about geography.",
    "You are a cheerful pirate. Answer every question as a pirate would, briefly.",
    "You are a terse mathematician. Give only the essential facts, nothing more.",
    "You are a friendly teacher explaining things to a ten-year-old child, briefly.",
]
QUESTIONS = ["What is a river?", "Why is the sky blue?", "What is seven times six?", "Hello!"]
PROMPTS = [(s, q) for s in SYSTEMS for q in QUESTIONS]


def request(prompt: tuple[str, str], *, stream: bool) -> dict[str, Any]:
    system, question = prompt
    return {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
    }


@dataclass
class Outcome:
    prompt: int
    plan: str  # "complete", "hang_up" or "cancel"
    text: str = ""
    finish_reason: str | None = None
    done: bool = False  # saw `data: [DONE]`
    errors: list[str] = field(default_factory=list)


async def one_stream(client: httpx.AsyncClient, outcome: Outcome, hang_up_after: int) -> None:
    body = request(PROMPTS[outcome.prompt], stream=True)
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            outcome.errors.append(f"HTTP {response.status_code}: {await response.aread()!r}")
            return
        chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                outcome.done = True
                break
            data = json.loads(line.removeprefix("data: "))
            if "error" in data:
                outcome.errors.append(str(data["error"]))
                continue
            for choice in data["choices"]:
                outcome.text += choice["delta"].get("content") or ""
                outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
            chunks += 1
            if outcome.plan == "hang_up" and chunks >= hang_up_after:
                return  # leaving the block closes the connection mid-stream


async def soak(url: str, rng: random.Random) -> list[Outcome]:
    limits = httpx.Limits(max_connections=STREAMS + 8)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        outcomes, tasks = [], []
        for i in range(STREAMS):
            roll = rng.random()
            plan = "hang_up" if roll < 0.1 else "cancel" if roll < 0.2 else "complete"
            outcome = Outcome(i % len(PROMPTS), plan)
            outcomes.append(outcome)
            tasks.append(asyncio.create_task(one_stream(client, outcome, rng.randint(1, 3))))
        for i, outcome in enumerate(outcomes):
            if outcome.plan == "cancel":
                asyncio.get_running_loop().call_later(rng.uniform(0.0, 3.0), tasks[i].cancel)
        await asyncio.gather(*tasks, return_exceptions=True)
        return outcomes


def metric(text: str, name: str) -> float:
    found = re.search(rf'^{name}{{model="{re.escape(MODEL)}"}} (\S+)$', text, re.MULTILINE)
    assert found, f"{name} for {MODEL} not in /metrics"
    return float(found.group(1))


def test_64_streams_with_cancels_lose_nothing_and_free_every_block(serve: Any) -> None:
    settings = serve(max_num_seqs=16, max_queue=STREAMS)
    with httpx.Client(base_url=settings.url, timeout=300) as client:
        assert client.get(f"/openai/load/{MODEL}").status_code == 200
        outcomes = asyncio.run(soak(settings.url, random.Random(21)))

        assert {o.plan for o in outcomes} == {"complete", "hang_up", "cancel"}
        completed = [o for o in outcomes if o.plan == "complete"]
        assert len(completed) >= STREAMS // 2
        for outcome in completed:
            assert outcome.errors == [] and outcome.done, outcome
            assert outcome.finish_reason in ("stop", "length"), outcome
        assert all(o.errors == [] for o in outcomes)  # a hang-up or cancel is not an error

        alone = {}
        for i in sorted({o.prompt for o in completed}):
            reply = client.post("/v1/chat/completions", json=request(PROMPTS[i], stream=False))
            assert reply.status_code == 200, reply.text
            alone[i] = reply.json()["choices"][0]["message"]["content"]
        assert len(set(alone.values())) > 1  # distinct prompts answer differently: mix-ups show
        for outcome in completed:
            assert outcome.text == alone[outcome.prompt], outcome

        deadline = time.monotonic() + 60  # cancelled requests end between engine steps
        while True:
            text = client.get("/metrics").text
            idle = [
                metric(text, name)
                for name in (
                    "ladle_kv_cache_blocks_used",
                    "ladle_sequences_running",
                    "ladle_sequences_waiting",
                    "ladle_requests_in_flight",
                )
            ]
            if idle == [0, 0, 0, 0] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert idle == [0, 0, 0, 0]
        assert client.get("/health").json()["status"] == "ok"
