"""A long soak of `ladle serve`: many concurrent streams for minutes, a few cancelled.

    python benchmarks/bench_soak.py [--minutes 10] [--streams 64] [--cancel-rate 0.05]
                                    [--max-tokens 32] [--threads 2] [--model PATH]

The server runs as a subprocess on 127.0.0.1 (a free port) with SmolLM2 (or `--model`)
registered and loaded. `--streams` clients each send streaming chat requests back to back
until the time is up; the prompts share prefixes (eight system prompts, random questions), so
the prefix cache and the batch both work. A `--cancel-rate` share of the requests is cut off
by the client at a random moment. Printed: requests served, cancelled, errors by kind, lost
requests (a stream that ended without `[DONE]`, an error or our own cancel: must be 0), time
to first token (p50, p99), the server's RSS after `--warmup-secs` of full load (the batch's
buffers and the allocator's pools have grown by then) and at the end (growth must stay under
5%), and its KV blocks and sequences once the clients stop (must be 0). The CPU and the
kernel path are printed too; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from bench_serving import MODEL_ALIAS, descendants, ladle_server, running

from ladle.engine.kernels import isa
from ladle.store.catalog import DEFAULT_CHAT_MODEL, resolve

SYSTEMS = [
    "You are a careful assistant who answers questions about geography in detail.",
    "You are a cheerful pirate. Answer every question as a pirate would.",
    "You are a terse mathematician. Give only the essential facts.",
    "You are a friendly teacher explaining things to a ten-year-old child.",
    "You are a travel agent who recommends places to visit.",
    "You are a historian who relates everything to ancient Rome.",
    "You are a chef who answers with a recipe when you can.",
    "You are a poet who answers in rhyme.",
]
WORDS = [
    "river",
    "stone",
    "market",
    "engine",
    "garden",
    "letter",
    "window",
    "winter",
    "signal",
    "harbor",
    "forest",
    "music",
]


@dataclass
class Tally:
    served: int = 0
    cancelled: int = 0
    lost: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    ttft: list[float] = field(default_factory=list)


def body(rng: random.Random, max_tokens: int) -> dict[str, Any]:
    question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
    return {
        "model": MODEL_ALIAS,
        "messages": [
            {"role": "system", "content": rng.choice(SYSTEMS)},
            {"role": "user", "content": f"Tell me about {question}."},
        ],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": rng.randrange(1 << 30),
        "stream": True,
    }


async def one_request(
    client: httpx.AsyncClient, request: dict[str, Any], cut_after: float | None, tally: Tally
) -> None:
    """Stream one request; `cut_after` seconds, when given, is when this client hangs up."""
    started = time.perf_counter()
    done = first = False
    try:
        async with (
            asyncio.timeout(cut_after),
            client.stream("POST", "/v1/chat/completions", json=request) as response,
        ):
            if response.status_code != 200:
                tally.errors[f"HTTP {response.status_code}"] += 1
                return
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                    break
                if not line.startswith("data: "):
                    continue
                data = json.loads(line.removeprefix("data: "))
                if "error" in data:
                    tally.errors[f"stream error: {data['error'].get('code')}"] += 1
                    return
                if not first and any(c["delta"].get("content") for c in data["choices"]):
                    first = True
                    tally.ttft.append(time.perf_counter() - started)
    except TimeoutError:
        tally.cancelled += 1
        return
    except httpx.HTTPError as e:
        tally.errors[f"transport: {type(e).__name__}"] += 1
        return
    if done:
        tally.served += 1
    else:
        tally.lost += 1


async def client_loop(
    url: str,
    seed: int,
    until: float,
    args: argparse.Namespace,
    tally: Tally,
    *,
    warm_up: bool = False,
) -> None:
    """One client's requests, back to back until `until` (one request when warming up)."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        while warm_up or time.monotonic() < until:
            if warm_up:
                await one_request(client, body(rng, args.max_tokens), None, tally)
                return
            cut = rng.uniform(0.05, 3.0) if rng.random() < args.cancel_rate else None
            await one_request(client, body(rng, args.max_tokens), cut, tally)


def rss_mb(pid: int) -> float:
    """Resident memory (`VmRSS`) of the server and its children now."""
    total_kb = 0
    for p in descendants(pid):
        status = Path(f"/proc/{p}/status").read_text().splitlines()
        total_kb += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return total_kb / 1024


def idle_state(url: str) -> dict[str, float]:
    """Sequences and KV blocks the model still holds, from `/metrics`."""
    text = httpx.get(url + "/metrics", timeout=10).text
    names = ("ladle_kv_cache_blocks_used", "ladle_sequences_running", "ladle_sequences_waiting")
    found = {}
    for name in names:
        match = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.MULTILINE)
        found[name] = float(match.group(1)) if match else float("nan")
    return found


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--cancel-rate", type=float, default=0.05)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--warmup-secs", type=float, default=60.0, help="load before the RSS growth baseline"
    )
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M Q4_1)")
    args = parser.parse_args()
    model = str(Path(args.model or resolve(DEFAULT_CHAT_MODEL)).resolve())
    with tempfile.TemporaryDirectory(prefix="ladle-soak-") as tmp:
        home = Path(tmp)
        server = ladle_server(model, args.threads, home)
        server = dataclasses.replace(server, cmd=[*server.cmd, "--max-queue", str(args.streams)])
        with running(server, home / "server.log") as pid:
            url = server.base_url
            asyncio.run(client_loop(url, -1, time.monotonic(), args, Tally(), warm_up=True))
            rss_loaded = rss_mb(pid)
            tally = Tally()
            started = time.monotonic()
            until = started + 60 * args.minutes
            samples: list[tuple[float, float]] = []

            async def sample_rss() -> None:
                while time.monotonic() < until:
                    samples.append((time.monotonic() - started, rss_mb(pid)))
                    await asyncio.sleep(5.0)

            async def clients() -> None:
                await asyncio.gather(
                    sample_rss(),
                    *(client_loop(url, i, until, args, tally) for i in range(args.streams)),
                )

            asyncio.run(clients())
            elapsed = time.monotonic() - started
            rss_start = next((r for t, r in samples if t >= args.warmup_secs), samples[-1][1])
            time.sleep(1.0)  # cancelled requests end between engine steps
            rss_end, idle = rss_mb(pid), idle_state(url)
    print(f"model: {model}\nthreads: {args.threads}\nserver: {server.settings}")
    print(f"cpu: {isa.cpu_name()} | ladle's kernels: {isa.selected_isa()} (LADLE_CPU_ISA forces)")
    print(
        f"soak: {elapsed / 60:.1f} min, {args.streams} concurrent streams, "
        f"{args.cancel_rate:.0%} cut off by the client, {args.max_tokens} tokens a reply, "
        f"load average at the end {os.getloadavg()[0]:.2f}\n"
    )
    rows = [
        ("requests served", f"{tally.served}"),
        ("requests cancelled by the client", f"{tally.cancelled}"),
        ("errors", ", ".join(f"{k}: {n}" for k, n in tally.errors.items()) or "0"),
        ("lost requests (must be 0)", f"{tally.lost}"),
        ("time to first token p50", f"{1000 * percentile(tally.ttft, 50):.0f} ms"),
        ("time to first token p99", f"{1000 * percentile(tally.ttft, 99):.0f} ms"),
        ("server RSS with the model loaded", f"{rss_loaded:.0f} MB"),
        (f"server RSS after {args.warmup_secs:.0f} s of load", f"{rss_start:.0f} MB"),
        ("server RSS at the end", f"{rss_end:.0f} MB ({100 * (rss_end / rss_start - 1):+.1f}%)"),
        ("KV blocks / sequences held after", " / ".join(f"{v:.0f}" for v in idle.values())),
    ]
    for label, value in rows:
        print(f"{label:<36}{value}")


if __name__ == "__main__":
    sys.exit(main())
