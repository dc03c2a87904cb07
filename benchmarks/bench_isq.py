"""What each ISQ type costs SmolLM2: perplexity, decode speed and memory, one run each.

    python benchmarks/bench_isq.py [--model PATH] [--threads 2] [--types Q4K Q8_0 ...]
                                   [--context 512]

The source is the model's Q4_1 weights dequantized to fp32; every ISQ type quantizes from
that source as it loads (`with_isq`). Each configuration runs in its own subprocess, so its
RSS is its own: "model MB" is the RSS the build added, "peak MB" the process's peak (which
includes quantizing). Perplexity is `ladle.perplexity` (transformers' strided window) on
chapter I of Alice in Wonderland (benchmarks/data); decode tokens/s is 128 greedy tokens
after a short prompt. "Q4K+calib" quantizes to Q4K, collects activation statistics while it
serves the start of chapter II (`begin_calibration`), re-quantizes with them
(`apply_calibration`) and is then measured like the others. A configuration that fails
prints "n/a" and the last line of its error. `--types` with no names measures only the
source and Q4K+calib.
Targets from issue 7: Q8_0 within 1% of the source's perplexity; Q4K+calib no worse than Q4K.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from ladle import TextModelBuilder
from ladle.cores.text import ModelCore
from ladle.engine.loader import LoadedModel
from ladle.engine.loading.config import ModelConfig
from ladle.engine.loading.gguf import read_gguf
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.engine.loading.weights import gguf_weights
from ladle.engine.models import ARCHITECTURES
from ladle.engine.quant.ggml import GGMLTensor
from ladle.model import Model
from ladle.perplexity import perplexity
from ladle.store.catalog import DEFAULT_CHAT_MODEL, resolve

DATA = Path(__file__).parent / "data"
EVAL_TEXT = DATA / "alice_chapter1.txt"
CALIBRATION_TEXT = DATA / "alice_chapter2_start.txt"
ISQ_TYPES = ["Q4_0", "Q4_1", "Q4K", "Q5K", "Q6K", "Q8_0", "HQQ4", "HQQ8", "F16", "BF16"]
SOURCE, CALIBRATED = "source", "Q4K+calib"
DECODE_TOKENS = 128
DECODE_PROMPT = "The White Rabbit looked at his watch and said"


def rss_mb() -> float:
    """The process's current resident set (not the peak), from /proc."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def load_source(path: Path) -> LoadedModel:
    """A `LoadedModel` whose linear layers hold the GGUF's weights dequantized to fp32."""
    gguf = read_gguf(path)
    config = ModelConfig.from_gguf(gguf)
    model = ARCHITECTURES[config.architecture](config)
    model.load_weights(
        (
            (n, w.dequantize() if isinstance(w, GGMLTensor) else w)
            for n, w in gguf_weights(gguf, config)
        ),
        torch.float32,
    )
    tokenizer = Tokenizer.from_gguf(gguf.metadata, path)
    return LoadedModel(model.eval(), tokenizer, config, path, torch.float32, "gguf")


def build(config: str, path: Path) -> Model:
    if config == SOURCE:
        return Model(ModelCore.start(lambda: load_source(path), SOURCE, 1, None))
    return TextModelBuilder(path).with_isq("Q4K" if config == CALIBRATED else config).build()


def calibrate(model: Model) -> None:
    """Serve the calibration text as a completion prompt, then re-quantize with its statistics."""
    model.begin_calibration()
    request = {"prompt": CALIBRATION_TEXT.read_text(), "max_tokens": 1, "temperature": 0.0}
    model.send_completion_request(request)
    if not any(model.calibration_status().values()):
        raise RuntimeError("calibration saw no tokens")
    model.apply_calibration()


def decode_tokens_per_second(model: Model) -> float:
    request = {"prompt": DECODE_PROMPT, "max_tokens": DECODE_TOKENS, "temperature": 0.0}
    list(model.stream_completion_request({**request, "max_tokens": 4}))  # warm-up
    first = None
    count = 0
    for _ in model.stream_completion_request(request):
        count += 1
        if first is None:
            first = time.perf_counter()
    assert first is not None
    return (count - 1) / (time.perf_counter() - first)


def child(config: str, path: Path, threads: int, context: int) -> None:
    torch.set_num_threads(threads)
    before = rss_mb()
    started = time.perf_counter()
    model = build(config, path)
    load_s = time.perf_counter() - started
    with model:
        if config == CALIBRATED:
            calibrate(model)
        model_mb = rss_mb() - before
        result = perplexity(model, EVAL_TEXT.read_text(), context_length=context)
        decode = decode_tokens_per_second(model)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "ppl": result.ppl,
                "tokens": result.num_tokens,
                "ppl_tok_s": result.tokens_per_second,
                "decode_tok_s": decode,
                "model_mb": model_mb,
                "peak_mb": peak_mb,
                "load_s": load_s,
            }
        )
    )


def spawn(config: str, args: argparse.Namespace) -> dict[str, float] | str:
    cmd = [sys.executable, __file__, "--child", config, "--model", str(args.model)]
    cmd += ["--threads", str(args.threads), "--context", str(args.context)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return f"n/a: {last[:90]}"
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def print_table(results: dict[str, dict[str, float] | str]) -> None:
    source = results.get(SOURCE)
    base = source["ppl"] if isinstance(source, dict) else None
    print(
        f"{'config':<11}{'perplexity':>11}{'vs source':>10}{'ppl tok/s':>10}"
        f"{'decode tok/s':>13}{'model MB':>9}{'peak MB':>8}{'load s':>7}"
    )
    for name, r in results.items():
        if isinstance(r, str):
            print(f"{name:<11}{r}")
            continue
        delta = f"{100 * (r['ppl'] / base - 1):+.2f}%" if base else ""
        print(
            f"{name:<11}{r['ppl']:>11.3f}{delta:>10}{r['ppl_tok_s']:>10.0f}"
            f"{r['decode_tok_s']:>13.1f}{r['model_mb']:>9.0f}{r['peak_mb']:>8.0f}"
            f"{r['load_s']:>7.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: SmolLM2 Q4_1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=512, help="perplexity window")
    parser.add_argument("--types", nargs="*", default=ISQ_TYPES, help="ISQ types to measure")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.model is None:
        args.model = resolve(DEFAULT_CHAT_MODEL)
    if args.child:
        child(args.child, args.model, args.threads, args.context)
        return
    results: dict[str, dict[str, float] | str] = {}
    for config in [SOURCE, *args.types, CALIBRATED]:
        results[config] = spawn(config, args)
        print(f"measured {config}", file=sys.stderr)
    tokens = next((r["tokens"] for r in results.values() if isinstance(r, dict)), "?")
    print(f"model: {args.model}\nthreads: {args.threads}")
    print(f"text: {EVAL_TEXT.name}, {tokens} tokens scored, context {args.context}\n")
    print_table(results)


if __name__ == "__main__":
    main()
