"""One measured run of one engine on one model, in its own process: `bench_engine.py`'s child.

    python benchmarks/engine_runs.py ladle|llama.cpp|mistral.rs < job.json

The job (JSON on stdin) names the model file, thread count, prompt ids, the 16 ids of the
load prompt and the decode token count; the result (JSON, the last line of stdout) holds
prefill and decode tok/s, tokens generated, load-to-first-token seconds, the kernel path and
peak RSS. Each engine's package is imported only in its own run: ladle's interpreter has no
llama_cpp, and `--peer-python`'s has no ladle.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CONTEXT = 2048  # ladle's max_seq_len and llama.cpp's n_ctx
COMPILE_TIMEOUT = 900  # seconds

Result = dict[str, Any]


def run_ladle(job: dict[str, Any]) -> Result:
    from ladle import TextModelBuilder
    from ladle.engine.kernels import native

    start = time.perf_counter()
    builder = TextModelBuilder(job["model"]).with_num_threads(job["threads"])
    m = builder.with_max_seq_len(CONTEXT).build()
    m.wait_until_compiled(COMPILE_TIMEOUT)  # returns at once when nothing compiles
    next(iter(m.stream_completion_request(ladle_request(job["load_ids"], 1))))
    load_s = time.perf_counter() - start
    ids = job["prompt_ids"]
    list(m.stream_completion_request(ladle_request(ids[::-1], 4)))  # warm-up
    result = ladle_timed(m.stream_completion_request(ladle_request(ids, job["decode_tokens"])))
    m.close()
    return {**result, "load_s": load_s, "isa": native.loaded_isa() or "torch"}


def ladle_request(ids: list[int], max_tokens: int) -> dict[str, Any]:
    return {
        "prompt": ids,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},  # the token count: chunks skip empty text
    }


def ladle_timed(stream: Iterable[Any]) -> Result:
    start = time.perf_counter()
    first = last = 0.0
    for chunk in stream:
        if chunk.choices and not first:
            first = time.perf_counter()
        if chunk.choices and chunk.choices[0].finish_reason:
            last = time.perf_counter()
        if chunk.usage:
            usage = chunk.usage
    return rates(usage.prompt_tokens, usage.completion_tokens, first - start, last - first)


def rates(prompt_tokens: int, generated: int, prefill_s: float, decode_s: float) -> Result:
    """Prefill tok/s: the prompt over the time to the first token; decode tok/s: the tokens
    after the first over the time from the first to the last."""
    return {
        "prompt_tokens": prompt_tokens,
        "generated": generated,
        "prefill_tok_s": prompt_tokens / prefill_s,
        "decode_tok_s": (generated - 1) / decode_s if generated > 1 else 0.0,
    }


def run_llama_cpp(job: dict[str, Any]) -> Result:
    from llama_cpp import Llama, llama_print_system_info

    threads = job["threads"]
    start = time.perf_counter()
    llm = Llama(
        job["model"], n_ctx=CONTEXT, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    next(iter(llm.create_completion(job["load_ids"], max_tokens=1, temperature=0.0, stream=True)))
    load_s = time.perf_counter() - start
    ids = job["prompt_ids"]
    llm.create_completion(ids[::-1], max_tokens=4, temperature=0.0)  # warm-up
    llm.reset()  # nothing for its prefix match to reuse
    stream = llm.create_completion(
        ids, max_tokens=job["decode_tokens"], temperature=0.0, stream=True
    )
    start = time.perf_counter()
    first = 0.0
    for _ in stream:
        first = first or time.perf_counter()
    last = time.perf_counter()
    generated = llm.n_tokens - len(ids) + 1  # the last token sampled is never evaluated
    result = rates(len(ids), generated, first - start, last - first)
    return {**result, "load_s": load_s, "isa": ggml_isa(llama_print_system_info().decode())}


def ggml_isa(system_info: str) -> str:
    """The widest SIMD set llama.cpp's build uses, from its `system_info` line."""
    for name in ("AVX512_VNNI", "AVX512", "AVX_VNNI", "AVX2", "NEON"):
        if f" {name} = 1" in f" {system_info}":
            return name.lower()
    return "scalar"


def run_mistralrs(job: dict[str, Any]) -> Result:
    from mistralrs import CompletionRequest, Runner, Which

    def complete(prompt: str, max_tokens: int) -> Any:
        request = CompletionRequest(
            model="default",
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
        )
        return runner.send_completion_request(request)

    path = Path(job["model"])
    start = time.perf_counter()
    which = Which.GGUF(
        tok_model_id=None, quantized_model_id=str(path.parent), quantized_filename=path.name
    )
    runner = Runner(which=which)
    complete(runner.detokenize_text(job["load_ids"], False), 1)
    load_s = time.perf_counter() - start
    ids = job["prompt_ids"]
    complete(runner.detokenize_text(ids[::-1], False), 4)  # warm-up
    usage = complete(runner.detokenize_text(ids, False), job["decode_tokens"]).usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "generated": usage.completion_tokens,
        "prefill_tok_s": usage.avg_prompt_tok_per_sec,
        "decode_tok_s": usage.avg_compl_tok_per_sec,
        "load_s": load_s,
        "isa": "its own",
    }


ENGINES = {"ladle": run_ladle, "llama.cpp": run_llama_cpp, "mistral.rs": run_mistralrs}


def peak_rss_mb() -> float:
    """This process's own peak: `VmHWM`, as `ru_maxrss` keeps the peak of the parent's image
    that was forked before `exec` (Linux); `ru_maxrss` where there is no /proc."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes there, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def main() -> None:
    result = ENGINES[sys.argv[1]](json.loads(sys.stdin.read()))
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
