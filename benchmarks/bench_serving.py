"""Serving figures of issue 4: `ladle serve` beside llama-cpp-python's server, one GGUF, one run.

    python benchmarks/bench_serving.py [--model PATH] [--threads 2] [--peer-python PY] [--quick]

Each server runs as a subprocess on 127.0.0.1 (a free port), alone, on the same file with the
same thread count, and is stopped before the next one starts. Through `/v1/chat/completions`
(streaming, greedy, end-of-turn tokens banned by `logit_bias` so every stream generates
`max_tokens`) it measures:
- aggregate decode tokens/s of 1, 4 and 8 concurrent streams: all completion tokens over the
  wall time from the first request sent to the last stream ended (short prompts), the median
  of 3 rounds of the three counts (a run of 8 streams lasts 2 s here, and a shared VM has
  slow spells of that length);
- time to first token of a ~600-token prompt (a ~500-token system prompt, a ~100-token user
  message): cold, then after a request with the same system prompt (the median of 3 pairs);
- the server's peak RSS (`VmHWM` of it and its children) over the whole run, with a
  4096-token KV budget (`ladle serve --kv-cache-tokens`, llama.cpp's `--n_ctx`).
llama-cpp-python is measured when `llama_cpp.server` imports in `--peer-python` (it needs the
`[server]` extras); otherwise its column says n/a. Timing needs a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from ladle.engine.kernels import isa
from ladle.engine.loading.gguf import read_gguf
from ladle.store.catalog import DEFAULT_CHAT_MODEL, resolve

KV_BUDGET_TOKENS = 4096
COMPILE_TIMEOUT = 900  # seconds
LADLE_KV_BUDGET_FLAG = "--kv-cache-tokens"  # `ladle serve`'s KV budget, in tokens

MODEL_ALIAS = "bench"
DECODE_TOKENS = 128
QUICK_DECODE_TOKENS = 16
STREAM_COUNTS = (1, 4, 8)
DECODE_ROUNDS = 3  # of every stream count; each decode figure is the median
TTFT_PAIRS = 3
SYSTEM_WORDS = 483  # about 500 tokens with SmolLM2's tokenizer
USER_WORDS = 101  # about 100
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")
READY_TIMEOUT = 180.0
QUIET_WARNING = "Timing needs a quiet machine: another busy process slows both servers 1.5-3.5x."
WORDS = (  # random sequences of these make prompts that share no prefix beyond the template
    "river stone market engine garden letter window winter signal harbor question silver "
    "family bridge forest number system paper orange history music travel village doctor "
    "science summer animal mountain island language picture student teacher morning kitchen "
    "energy planet ocean road train city country money office story people water light"
)
TOPICS = (
    "a lighthouse keeper",
    "a robot learning to paint",
    "a city under the sea",
    "the first journey to Mars",
    "a dragon who collects books",
    "a detective in ancient Rome",
    "a forest that walks",
    "a clockmaker's secret",
)


@dataclass(frozen=True, slots=True)
class Server:
    """How to start one server, and the path that answers 200 once it is ready."""

    name: str
    port: int
    cmd: list[str]
    env: dict[str, str]
    ready_path: str
    settings: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def words(seed: int, count: int) -> str:
    rng = random.Random(seed)
    vocabulary = WORDS.split()
    return " ".join(rng.choice(vocabulary) for _ in range(count)) + "."


def banned_tokens(model: str) -> dict[str, float]:
    """`logit_bias` that keeps the model from ending its turn, so streams run to max_tokens."""
    metadata = read_gguf(model).metadata
    ids = {metadata.get(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")}
    tokens = metadata.get("tokenizer.ggml.tokens", [])
    ids.update(i for i, token in enumerate(tokens) if token in END_TOKENS)
    return {str(i): -100.0 for i in sorted(i for i in ids if i is not None)}


def chat(messages: list[dict[str, str]], max_tokens: int, bias: dict[str, float]) -> dict[str, Any]:
    return {
        "model": MODEL_ALIAS,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": bias,
    }


@dataclass(slots=True)
class StreamResult:
    start: float
    first_token: float
    end: float
    completion_tokens: int
    prompt_tokens: int | None


def stream(base_url: str, body: dict[str, Any]) -> StreamResult:
    """One streamed chat completion; tokens from `usage` when sent, else content chunks.

    The client is the standard library's `http.client`: on two cores the client shares the CPU
    with the server it measures, and httpx's streaming spent about 0.35 ms of it a token
    (17% of a core at 8 streams), `http.client` about a third of that. The clock starts
    before the connection opens, so connecting counts as part of the server's answer.
    """
    first = None
    chunks = 0
    usage: dict[str, int] | None = None
    url = urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=600)
    try:
        start = time.perf_counter()
        headers = {"Content-Type": "application/json"}
        connection.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        response = connection.getresponse()
        if response.status != 200:
            text = response.read().decode(errors="replace")
            raise RuntimeError(f"HTTP {response.status}: {text[:200]}")
        for line in response:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line.removeprefix(b"data: "))
            usage = chunk.get("usage") or usage
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                chunks += 1
                first = first or time.perf_counter()
        end = time.perf_counter()
    finally:
        connection.close()
    return StreamResult(
        start,
        first or end,  # a token that decodes to no text yet still ended the prefill
        end,
        usage["completion_tokens"] if usage else chunks,
        usage["prompt_tokens"] if usage else None,
    )


def decode_rate(base_url: str, num_streams: int, max_tokens: int, bias: dict[str, float]) -> float:
    """Aggregate completion tokens/s of `num_streams` concurrent streams."""
    barrier = threading.Barrier(num_streams, timeout=60.0)

    def one(i: int) -> StreamResult:
        topic = TOPICS[i % len(TOPICS)]
        body = chat(
            [{"role": "user", "content": f"Tell a long story about {topic}."}], max_tokens, bias
        )
        barrier.wait()
        return stream(base_url, body)

    with ThreadPoolExecutor(num_streams) as pool:
        results = list(pool.map(one, range(num_streams)))
    short = [r.completion_tokens for r in results if r.completion_tokens < max_tokens]
    if short:
        print(f"  note: {len(short)} stream(s) ended early ({short} tokens)", file=sys.stderr)
    elapsed = max(r.end for r in results) - min(r.start for r in results)
    return sum(r.completion_tokens for r in results) / elapsed


def ttft_pair(base_url: str, seed: int, bias: dict[str, float]) -> dict[str, float]:
    """Cold and prefix-cached time to first token, in ms, for prompts of the same shape."""

    def prompt(system_seed: int, user_seed: int) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": words(system_seed, SYSTEM_WORDS)},
            {"role": "user", "content": words(user_seed, USER_WORDS)},
        ]

    cold = stream(base_url, chat(prompt(seed, seed + 1), 1, bias))
    shared_system = prompt(seed + 2, seed + 3)[0]
    prefix = stream(base_url, chat([shared_system, {"role": "user", "content": "Hello."}], 1, bias))
    cached = stream(base_url, chat(prompt(seed + 2, seed + 3), 1, bias))
    return {
        "cold_ms": (cold.first_token - cold.start) * 1000,
        "cached_ms": (cached.first_token - cached.start) * 1000,
        "prompt_tokens": float(cached.prompt_tokens or 0),
        "prefix_tokens": float(prefix.prompt_tokens or 0),
    }


def descendants(pid: int) -> list[int]:
    """A process and its live descendants."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(FileNotFoundError):  # a child that has just exited
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(c) for c in (task / "children").read_text().split())
            found.append(current)
    return found


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (`VmHWM`) of a process plus that of its live descendants."""
    total_kb = 0
    for p in descendants(pid):
        with contextlib.suppress(FileNotFoundError):
            status = Path(f"/proc/{p}/status").read_text().splitlines()
            total_kb += next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return total_kb / 1024


def cpu_ticks(pid: int) -> tuple[int, int]:
    """Busy CPU ticks of the machine, and of the server (`pid`, descendants) and this process."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    machine = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    ours = 0
    for p in [*descendants(pid), os.getpid()]:
        with contextlib.suppress(FileNotFoundError):
            stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ours += int(stat[11]) + int(stat[12])  # utime, stime
    return machine, ours


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def thread_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LADLE_")}
    return {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def ladle_server(model: str, threads: int, home: Path) -> Server:
    """`ladle serve` with its own LADLE_HOME, where the GGUF is registered as MODEL_ALIAS."""
    env = {**thread_env(threads), "LADLE_HOME": str(home)}
    register = [sys.executable, "-m", "ladle", "model", "register", MODEL_ALIAS, model]
    done = subprocess.run(register, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ladle model register failed: {done.stderr.strip()[-200:]}")
    port = free_port()
    cmd = [sys.executable, "-m", "ladle", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--cache-dir", str(home / "cache"), LADLE_KV_BUDGET_FLAG, str(KV_BUDGET_TOKENS)]
    settings = f"ladle serve {LADLE_KV_BUDGET_FLAG} {KV_BUDGET_TOKENS}, OMP_NUM_THREADS={threads}"
    return Server("ladle", port, cmd, env, "/health", settings)


def llama_cpp_server(python: str, model: str, threads: int) -> Server:
    port = free_port()
    flags = {
        "--model": model,
        "--model_alias": MODEL_ALIAS,
        "--host": "127.0.0.1",
        "--port": str(port),
        "--n_ctx": str(KV_BUDGET_TOKENS),
        "--n_threads": str(threads),
        "--n_threads_batch": str(threads),
        "--interrupt_requests": "False",  # by default a new request cuts the running stream off
        "--logits_all": "False",  # the server's default True computes logits for every prompt token
        "--verbose": "False",
    }
    cmd = [python, "-m", "llama_cpp.server", *(part for item in flags.items() for part in item)]
    settings = "python -m llama_cpp.server " + " ".join(
        f"{k} {v}" for k, v in flags.items() if k not in ("--model", "--host", "--port")
    )
    return Server("llama.cpp", port, cmd, thread_env(threads), "/v1/models", settings)


@contextlib.contextmanager
def running(server: Server, log: Path) -> Iterator[int]:
    """Start the server, wait until `ready_path` answers, yield its pid, stop it."""
    with log.open("w") as out:
        proc = subprocess.Popen(server.cmd, env=server.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not is_ready(server.base_url + server.ready_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text().strip().splitlines()[-3:]
                raise RuntimeError(f"{server.name} did not start: {' | '.join(tail)}")
            time.sleep(0.2)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until_compiled(base_url: str) -> None:
    """A model that ladle compiles (one the native layer kernels cannot run, or with
    LADLE_COMPILE=1) is measured once its compiled step serves (a minute or three; /metrics
    says when); one that runs on the kernels never compiles."""
    deadline = time.monotonic() + COMPILE_TIMEOUT
    while time.monotonic() < deadline:
        text = httpx.get(base_url + "/metrics", timeout=5.0).text
        if re.search(r"^ladle_model_compiling\{.*\} 0$", text, re.MULTILINE):
            return
        time.sleep(1.0)
    raise RuntimeError(f"ladle did not finish compiling in {COMPILE_TIMEOUT} s")


def is_ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


def measure(server: Server, log: Path, args: argparse.Namespace) -> dict[str, float]:
    """Every figure of one server, which runs only while it is measured."""
    max_tokens = QUICK_DECODE_TOKENS if args.quick else DECODE_TOKENS
    bias = banned_tokens(args.model)
    base_url = server.base_url
    figures: dict[str, float] = {}
    with running(server, log) as pid:
        print(f"measuring {server.name} ...", file=sys.stderr)
        stream(base_url, chat([{"role": "user", "content": "Hello."}], 8, bias))  # load, warm up
        if server.name == "ladle":
            wait_until_compiled(base_url)
        start, (machine, ours) = time.perf_counter(), cpu_ticks(pid)
        rates: dict[int, list[float]] = {n: [] for n in STREAM_COUNTS}
        for _ in range(1 if args.quick else DECODE_ROUNDS):  # in turn: a slow spell hits each
            for n in STREAM_COUNTS:
                rates[n].append(decode_rate(base_url, n, max_tokens, bias))
        for n, runs in rates.items():
            figures[f"decode_{n}"] = statistics.median(runs)
        pairs = [ttft_pair(base_url, 100 * i, bias) for i in range(1 if args.quick else TTFT_PAIRS)]
        for key in pairs[0]:
            figures[key] = statistics.median(p[key] for p in pairs)
        figures["peak_rss_mb"] = peak_rss_mb(pid)
        machine_end, ours_end = cpu_ticks(pid)
        elapsed_ticks = (time.perf_counter() - start) * os.sysconf("SC_CLK_TCK")
        figures["other_cores"] = max(0, machine_end - machine - ours_end + ours) / elapsed_ticks
    figures["scaling"] = figures[f"decode_{max(STREAM_COUNTS)}"] / figures["decode_1"]
    figures["cached_over_cold"] = figures["cached_ms"] / figures["cold_ms"]
    return figures


def peer_missing(python: str) -> str | None:
    probe = subprocess.run(
        [python, "-c", "import llama_cpp.server.app"], capture_output=True, check=False
    )
    if probe.returncode == 0:
        return None
    return f"llama_cpp.server does not import in {python}: pip install 'llama-cpp-python[server]'"


def print_table(ladle: dict[str, float] | str, peer: dict[str, float] | str) -> None:
    top = max(STREAM_COUNTS)
    sample = ladle if isinstance(ladle, dict) else peer if isinstance(peer, dict) else {}
    rows = [
        *((f"decode tok/s, {n} stream(s)", f"decode_{n}", "") for n in STREAM_COUNTS[:-1]),
        (f"decode tok/s, {top} streams", f"decode_{top}", ">= 3x llama.cpp"),
        (f"{top} streams / 1 stream", "scaling", ">= 3x (ladle)"),
        (f"TTFT ms, cold, {sample.get('prompt_tokens', 600):.0f}-token prompt", "cold_ms", ""),
        (f"TTFT ms, ~{sample.get('prefix_tokens', 500):.0f} tokens cached", "cached_ms", ""),
        ("TTFT cached / cold", "cached_over_cold", "<= 0.25x (ladle)"),
        ("peak RSS MB", "peak_rss_mb", "<= 500 MB"),
        ("CPU cores busy with other processes", "other_cores", "~0: a quiet machine"),
    ]
    print(f"{'figure':<38}{'ladle':>10}{'llama.cpp':>12}{'ratio':>10}   issue 4 target")
    for label, key, target in rows:
        a, b = (r.get(key) if isinstance(r, dict) else None for r in (ladle, peer))
        is_ratio = key in ("scaling", "cached_over_cold")
        fmt = "{:.2f}x" if is_ratio else "{:.2f}" if key == "other_cores" else "{:.1f}"
        shown = ["n/a" if v is None else fmt.format(v) for v in (a, b)]
        compared = not is_ratio and key != "other_cores"
        ratio = f"{a / b:.2f}x" if compared and a is not None and b else ""
        print(f"{label:<38}{shown[0]:>10}{shown[1]:>12}{ratio:>10}   {target}")
    print("ratio: ladle / llama.cpp (higher is better for tok/s, lower for ms and MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M Q4_1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer-python", default=sys.executable, help="python with llama_cpp")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 16 tokens a stream, 1 round, 1 TTFT pair"
    )
    args = parser.parse_args()
    args.model = str(Path(args.model or resolve(DEFAULT_CHAT_MODEL)).resolve())
    print(QUIET_WARNING, f"Load average now: {os.getloadavg()[0]:.2f}.", file=sys.stderr)
    results: dict[str, dict[str, float] | str] = {}
    settings: dict[str, str] = {}
    missing = peer_missing(args.peer_python)
    with tempfile.TemporaryDirectory(prefix="ladle-bench-") as tmp:
        home = Path(tmp)
        for name in ("ladle", "llama.cpp"):
            if name == "llama.cpp" and missing:
                results[name] = missing
                continue
            try:
                server = (
                    ladle_server(args.model, args.threads, home)
                    if name == "ladle"
                    else llama_cpp_server(args.peer_python, args.model, args.threads)
                )
                settings[name] = server.settings
                results[name] = measure(server, home / f"{name}.log", args)
            except (
                RuntimeError,
                OSError,
                http.client.HTTPException,
                httpx.HTTPError,
                threading.BrokenBarrierError,
            ) as e:
                results[name] = f"not measured: {e}"
    print(f"model: {args.model}\nthreads: {args.threads}")
    print(f"cpu: {isa.cpu_name()} | ladle's kernels: {isa.selected_isa()} (LADLE_CPU_ISA forces)")
    for name, text in settings.items():
        print(f"{name}: {text}")
    max_tokens = QUICK_DECODE_TOKENS if args.quick else DECODE_TOKENS
    rounds = 1 if args.quick else DECODE_ROUNDS
    print(
        f"decode: {max_tokens} greedy tokens a stream, end-of-turn tokens banned, "
        f"median of {rounds} round(s)\n"
    )
    for name, result in results.items():
        if isinstance(result, str):
            print(f"{name}: {result}")
    print_table(results["ladle"], results["llama.cpp"])
    print(f"\n{QUIET_WARNING}")


if __name__ == "__main__":
    main()
