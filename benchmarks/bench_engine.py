"""Prefill and decode speed of ladle beside llama.cpp and mistral.rs, on one GGUF, one run.

    python benchmarks/bench_engine.py [--model PATH] [--threads 2] [--peer-python PY]

Each engine runs in its own subprocess (so peak RSS is its own) on the same file with the
same thread count: time to first token on a ~600-token prompt gives prefill tokens/s, and
128 greedy tokens after it give decode tokens/s. Peers are measured when their package
(`llama_cpp`, `mistralrs`) imports in `--peer-python`; otherwise their row says so.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

PROMPT_WORDS = (
    "The history of computing is a story of ideas that build on each other: from the abacus "
    "and mechanical calculators to stored programs, transistors, integrated circuits, and "
    "the networks that now connect billions of devices. "
)
DECODE_TOKENS = 128


COMPILE_TIMEOUT = 900  # seconds; compiling SmolLM2 takes one to three minutes here


def prompt_text() -> str:
    return PROMPT_WORDS * 18  # about 600 tokens with SmolLM2's tokenizer


def measure(stream: Iterator[object], prompt_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    first = None
    count = 0
    for _ in stream:
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    return {
        "prompt_tokens": prompt_tokens,
        "prefill_tok_s": prompt_tokens / (first - start),
        "decode_tok_s": (count - 1) / (end - first) if count > 1 else 0.0,
        "generated": count,
    }


def run_ladle(model: str, threads: int) -> dict[str, float]:
    import torch

    from ladle import TextModelBuilder

    torch.set_num_threads(threads)
    m = TextModelBuilder(model).build()
    m.wait_until_compiled(COMPILE_TIMEOUT)  # a model that compiles is measured compiled
    ids = m.tokenize(prompt_text())
    request = {"prompt": ids, "max_tokens": DECODE_TOKENS, "temperature": 0.0}
    # warm-up on the prompt reversed: the same shapes, but nothing for the prefix cache to reuse
    list(m.stream_completion_request({**request, "prompt": ids[::-1], "max_tokens": 4}))
    result = measure(m.stream_completion_request(request), len(ids))
    m.close()
    return result


def run_llama_cpp(model: str, threads: int) -> dict[str, float]:
    from llama_cpp import Llama

    llm = Llama(model, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = llm.tokenize(prompt_text().encode(), add_bos=False)
    llm.create_completion(ids, max_tokens=4, temperature=0.0)  # warm-up
    llm.reset()
    stream = llm.create_completion(ids, max_tokens=DECODE_TOKENS, temperature=0.0, stream=True)
    return measure(stream, len(ids))


def run_mistralrs(model: str, threads: int) -> dict[str, float]:
    from mistralrs import CompletionRequest, Runner, Which

    path = Path(model)
    runner = Runner(
        which=Which.GGUF(
            tok_model_id=None, quantized_model_id=str(path.parent), quantized_filename=path.name
        )
    )
    request = CompletionRequest(
        model="default", prompt=prompt_text(), max_tokens=DECODE_TOKENS, temperature=0.0
    )
    start = time.perf_counter()
    response = runner.send_completion_request(request)
    elapsed = time.perf_counter() - start
    usage = response.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "prefill_tok_s": usage.avg_prompt_tok_per_sec,
        "decode_tok_s": usage.avg_compl_tok_per_sec,
        "generated": usage.completion_tokens,
        "wall_s": elapsed,
    }


ENGINES = {"ladle": run_ladle, "llama.cpp": run_llama_cpp, "mistral.rs": run_mistralrs}


def child(engine: str, model: str, threads: int) -> None:
    result = ENGINES[engine](model, threads)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def spawn(python: str, engine: str, model: str, threads: int) -> dict[str, float] | str:
    cmd = [python, __file__, "--child", engine, "--model", model, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return f"not measured: {last[:80]}"
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M Q4_1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer-python", default=sys.executable)
    parser.add_argument("--child", choices=sorted(ENGINES))
    args = parser.parse_args()
    if args.model is None:
        from ladle.catalog import DEFAULT_CHAT_MODEL, resolve

        args.model = str(resolve(DEFAULT_CHAT_MODEL))
    if args.child:
        child(args.child, args.model, args.threads)
        return
    results = {
        name: spawn(
            sys.executable if name == "ladle" else args.peer_python, name, args.model, args.threads
        )
        for name in ENGINES
    }
    print(f"model: {args.model}\nthreads: {args.threads}\n")
    header = f"{'engine':<12}{'prefill tok/s':>15}{'decode tok/s':>15}{'peak RSS MB':>13}"
    print(header + f"{'decode vs ladle':>17}")
    ladle = results["ladle"]
    for name, r in results.items():
        if isinstance(r, str):
            print(f"{name:<12}{r}")
            continue
        ratio = ""
        if isinstance(ladle, dict) and name != "ladle" and r["decode_tok_s"]:
            ratio = f"{ladle['decode_tok_s'] / r['decode_tok_s']:.2f}x"
        print(
            f"{name:<12}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>15.1f}"
            f"{r['peak_rss_mb']:>13.0f}{ratio:>17}"
        )


if __name__ == "__main__":
    main()
