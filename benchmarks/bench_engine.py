"""Prefill, decode and load speed of ladle on every kernel path this CPU runs, beside llama.cpp
(llama-cpp-python) and mistral.rs, on the same GGUF files and thread count, in the same run.

    python benchmarks/bench_engine.py [--model PATH]... [--models smollm2,gemma3-270m,qwen3-0.6b]
        [--rounds 3] [--busy] [--threads 2] [--peer-python PY] [--peers llama.cpp,mistral.rs]
        [--timeout 900] [--isas avx2,portable] [--quick]

Engines. ladle runs once per instruction set the CPU runs (`isa.runnable_isas()`, the portable
path included; `--isas` picks some), forced by `LADLE_CPU_ISA=<isa>` in its child's
environment; llama.cpp and mistral.rs (when they import in `--peer-python`; otherwise their
rows say why) run once each; `--peers llama.cpp` leaves mistral.rs out (here it prefills ~15
tok/s, so its runs take minutes). Every run is a fresh subprocess (`engine_runs.py`), so its
peak RSS is its own; one that gives no result within `--timeout` seconds is killed, and its row
says so. ladle and llama.cpp get the same thread count and a 2048-token context; mistral.rs
takes no thread count in Python, so its child gets `RAYON_NUM_THREADS`. Each set's kernel
library is built (if missing) before the first run, so no timed load waits for a compiler.

Prompt. The same token ids go to ladle (`stream_completion_request` with a list of ids) and
llama.cpp (`create_completion` with ids): a ~600-token English text tokenized by the file's own
tokenizer (as llama.cpp tokenizes a GGUF), so the synthetic models' borrowed tokenizer does
not matter. mistral.rs takes only text: it gets those ids detokenized by its own tokenizer,
and its figures are its own usage statistics (`avg_prompt_tok_per_sec`,
`avg_compl_tok_per_sec`).

A run, in its child: load the model and generate one token from a 16-token prompt: the
load-to-first-token time, from `TextModelBuilder(...).build()` (default settings) or
`Llama(...)` to that token, after any background compile has finished, so that the token comes
at full speed; one warm-up on the prompt reversed (the same shapes, nothing for a prefix cache
to reuse); then the prompt with 128 greedy tokens, streamed. Prefill tok/s is the prompt
length over the time to the first streamed token; decode tok/s is the tokens after the first
over the time from the first token to the last.

Rounds. The machine is noisy (figures move 30% minutes apart), so each of `--rounds` rounds
runs every engine once, in an order rotated each round, and the tables give medians over
rounds: of each figure, and of each round's paired ratio ladle / llama.cpp. With `--busy`,
every run is followed at once by the same run with one other process busy (a Python loop
spinning on one core, started before the child and killed after it); that table gives each
engine's slowdown, busy / quiet time per token (the median of the paired rounds), llama.cpp's
row being the reference.

Models. `--model PATH` (repeatable) measures a GGUF file; `--models` names the catalog's
SmolLM2-135M-Instruct Q4_1 (`smollm2`) and two synthetic real-size models with random weights
(`gemma3-270m`, `qwen3-0.6b`), built once into ~/.cache/ladle-bench/ by `synthetic_models.py`
(whose docstring says how, and why Gemma 3 takes a detour through an F16 GGUF). Default:
smollm2. `--quick` is a smoke run: one round, a ~80-token prompt, 16 decode tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthetic_models import SYNTHETIC, synthetic_gguf

from ladle.engine.kernels import isa, native
from ladle.engine.loading.gguf import read_gguf
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.store.catalog import DEFAULT_CHAT_MODEL, resolve

PROMPT_WORDS = (
    "The history of computing is a story of ideas that build on each other: from the abacus "
    "and mechanical calculators to stored programs, transistors, integrated circuits, and "
    "the networks that now connect billions of devices. "
)
PROMPT_REPEATS = 18  # about 600 tokens with SmolLM2's tokenizer
QUICK_PROMPT_REPEATS = 2
DECODE_TOKENS = 128
QUICK_DECODE_TOKENS = 16
LOAD_PROMPT_TOKENS = 16
TARGET_PREFILL, TARGET_DECODE = 2.0, 1.3  # the ladle / llama.cpp targets
MODEL_NAMES = ("smollm2", *SYNTHETIC)
PEERS = ("llama.cpp", "mistral.rs")
CHILD = Path(__file__).with_name("engine_runs.py")

Result = dict[str, Any]


@dataclass(frozen=True)
class Entry:
    """One row: an engine, and for ladle the instruction set forced on it."""

    engine: str
    isa: str | None = None


Runs = dict[tuple[Entry, bool], list[Result | str]]  # (entry, busy) -> one per round


def main() -> None:
    args = parse_args()
    entries = [Entry("ladle", name) for name in args.isas]
    entries += [Entry(peer) for peer in args.peers]
    for name in args.isas:
        native.open_library(name)  # build any missing set now, not inside a timed load
    for model in model_paths(args):
        ids = prompt_ids(model, QUICK_PROMPT_REPEATS if args.quick else PROMPT_REPEATS)
        job = {
            "model": str(model),
            "threads": args.threads,
            "prompt_ids": ids,
            "load_ids": ids[::-1][:LOAD_PROMPT_TOKENS],  # no prefix of the measured prompt
            "decode_tokens": QUICK_DECODE_TOKENS if args.quick else DECODE_TOKENS,
        }
        print(f"{model.name}: {args.rounds} round(s)", file=sys.stderr)
        load_average = os.getloadavg()[0]
        runs = run_rounds(entries, job, args)
        print_quiet_table(entries, runs, job, header(model, job, args, load_average))
        if args.busy:
            print_busy_table(entries, runs, header(model, job, args, load_average))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="a GGUF file (repeatable)")
    parser.add_argument("--models", type=model_names, default=[], help=", ".join(MODEL_NAMES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="also with one other busy process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer-python", default=sys.executable, help="python with the peers")
    parser.add_argument("--peers", type=peer_names, default=list(PEERS), help=", ".join(PEERS))
    parser.add_argument("--timeout", type=float, default=900, help="seconds a run may take")
    parser.add_argument(
        "--isas", type=isa_names, default=isa.runnable_isas(), help="ladle's rows (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="1 round, short prompt, 16 tokens")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    if not args.model and not args.models:
        args.models = ["smollm2"]
    return args


def names_in(known: tuple[str, ...], text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown} (known: {', '.join(known)})")
    return names


def model_names(text: str) -> list[str]:
    return names_in(MODEL_NAMES, text)


def isa_names(text: str) -> list[str]:
    return names_in(tuple(isa.runnable_isas()), text)


def peer_names(text: str) -> list[str]:
    names = names_in(PEERS, text)
    if "llama.cpp" not in names:
        raise argparse.ArgumentTypeError("llama.cpp is the reference every ratio needs")
    return names


def model_paths(args: argparse.Namespace) -> list[Path]:
    """The files to measure: `--model` paths, then `--models` names (synthetic ones built)."""
    paths = [Path(p).expanduser().resolve() for p in args.model]
    for name in args.models:
        if name == "smollm2":
            paths.append(resolve(DEFAULT_CHAT_MODEL))
        else:
            paths.append(synthetic_gguf(name, args.peer_python))
    return paths


def prompt_ids(model: Path, repeats: int) -> list[int]:
    """The English prompt as the file's own tokenizer splits it, without special tokens."""
    tokenizer = Tokenizer.from_gguf(read_gguf(model).metadata, model)
    return tokenizer.encode(PROMPT_WORDS * repeats, False)


# ---- rounds of runs


def run_rounds(entries: list[Entry], job: dict[str, Any], args: argparse.Namespace) -> Runs:
    modes = (False, True) if args.busy else (False,)
    runs: Runs = {(entry, busy): [] for entry in entries for busy in modes}
    for r in range(args.rounds):
        order = entries[r % len(entries) :] + entries[: r % len(entries)]
        for entry in order:
            python = sys.executable if entry.engine == "ladle" else args.peer_python
            for busy in modes:
                started = time.perf_counter()
                with busy_process(busy):
                    result = spawn(entry, job, python, args.timeout)
                runs[entry, busy].append(result)
                took = time.perf_counter() - started
                mode = "busy" if busy else "quiet"
                print(f"  round {r + 1}: {label(entry)} ({mode}) {took:.0f} s", file=sys.stderr)
    return runs


def spawn(entry: Entry, job: dict[str, Any], python: str, timeout: float) -> Result | str:
    """One run in a fresh subprocess: its result, or why there is none."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(job["threads"]))
    if entry.isa:
        env["LADLE_CPU_ISA"] = entry.isa
    try:
        proc = subprocess.run(
            [python, str(CHILD), entry.engine],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:  # subprocess.run kills the child
        return f"not measured: no result within {timeout:.0f} s"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return f"not measured: {last[:120]}"
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


@contextlib.contextmanager
def busy_process(is_busy: bool) -> Iterator[None]:
    """One other process spinning on one core for the duration, when `is_busy`."""
    if not is_busy:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


# ---- tables


def header(model: Path, job: dict[str, Any], args: argparse.Namespace, load: float) -> str:
    size_mb = model.stat().st_size / 1e6
    return (
        f"model: {model.name} ({size_mb:.0f} MB, {model})\n"
        f"cpu: {isa.cpu_name()} | runnable ISAs: {', '.join(isa.runnable_isas())} | "
        f"threads: {args.threads} | load average before: {load:.2f}\n"
        f"prompt: {len(job['prompt_ids'])} token ids | decode: {job['decode_tokens']} greedy "
        f"tokens | median of {args.rounds} round(s)"
    )


def print_quiet_table(entries: list[Entry], runs: Runs, job: dict[str, Any], head: str) -> None:
    llama = runs[Entry("llama.cpp"), False]
    columns = ["engine", "isa", "prefill tok/s", "decode tok/s", "prefill vs llama.cpp"]
    columns += ["decode vs llama.cpp", "meets 2x/1.3x", "load to 1st token s", "peak RSS MB"]
    rows = []
    for entry in entries:
        own = runs[entry, False]
        prefill, decode = paired(own, llama, "prefill_tok_s"), paired(own, llama, "decode_tok_s")
        compared = entry.engine != "llama.cpp" and prefill is not None and decode is not None
        meets = compared and prefill >= TARGET_PREFILL and decode >= TARGET_DECODE
        rows.append(
            [
                *names(entry, own),
                cell(median(own, "prefill_tok_s"), ".1f"),
                cell(median(own, "decode_tok_s"), ".1f"),
                cell(prefill if compared else None, ".2f", "x"),
                cell(decode if compared else None, ".2f", "x"),
                ("yes" if meets else "no") if compared and entry.engine == "ladle" else "",
                cell(median(own, "load_s"), ".2f"),
                cell(median(own, "peak_rss_mb"), ".0f"),
            ]
        )
    print(f"\n{head}")
    print_rows(columns, rows, entries, [runs[e, False] for e in entries])
    print(
        "vs llama.cpp: ladle / llama.cpp, the median of each round's pair; the issue's target "
        f"is >= {TARGET_PREFILL:.1f}x prefill and >= {TARGET_DECODE:.1f}x decode"
    )
    short_runs(entries, runs, job["decode_tokens"])


def print_busy_table(entries: list[Entry], runs: Runs, head: str) -> None:
    columns = ["engine", "isa", "busy prefill tok/s", "busy decode tok/s"]
    columns += ["prefill slowdown", "decode slowdown"]
    rows = []
    for entry in entries:
        quiet, busy = runs[entry, False], runs[entry, True]
        rows.append(
            [
                *names(entry, busy),
                cell(median(busy, "prefill_tok_s"), ".1f"),
                cell(median(busy, "decode_tok_s"), ".1f"),
                cell(paired(quiet, busy, "prefill_tok_s"), ".2f", "x"),
                cell(paired(quiet, busy, "decode_tok_s"), ".2f", "x"),
            ]
        )
    print(f"\nwith one other busy process (a Python loop on one core)\n{head}")
    print_rows(columns, rows, entries, [runs[e, True] for e in entries])
    print(
        "slowdown: busy / quiet time per token, the median of each round's pair "
        "(1.00x: unaffected); compare ladle's rows with llama.cpp's"
    )


def print_rows(
    columns: list[str], rows: list[list[str]], entries: list[Entry], results: list[list[Any]]
) -> None:
    """Aligned rows; an entry with no measured run gets the reason of its first failure."""
    widths = [max(len(row[i]) for row in [columns, *rows]) for i in range(len(columns))]
    for row, entry, own in zip([columns, *rows], [None, *entries], [[], *results], strict=True):
        if entry is not None and not measured(own):
            print(f"{label(entry):<{widths[0] + widths[1] + 2}}  {own[0]}")
            continue
        left = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        print("  ".join(left + [c.rjust(w) for c, w in zip(row[2:], widths[2:], strict=True)]))


def short_runs(entries: list[Entry], runs: Runs, wanted: int) -> None:
    for entry in entries:
        counts = {r["generated"] for r in measured(runs[entry, False])} - {wanted}
        if counts:
            print(f"note: {label(entry)} stopped early ({sorted(counts)} of {wanted} tokens)")


def names(entry: Entry, own: list[Result | str]) -> list[str]:
    """The engine, and the kernel path its runs loaded (ladle's forced set, or the peer's)."""
    loaded = {r["isa"] for r in measured(own)}
    return [entry.engine, ",".join(sorted(loaded)) or entry.isa or ""]


def label(entry: Entry) -> str:
    return f"{entry.engine} {entry.isa}" if entry.isa else entry.engine


def measured(results: list[Result | str]) -> list[Result]:
    return [r for r in results if isinstance(r, dict)]


def median(results: list[Result | str], key: str) -> float | None:
    values = [r[key] for r in measured(results)]
    return statistics.median(values) if values else None


def paired(a: list[Result | str], b: list[Result | str], key: str) -> float | None:
    """The median over rounds of a[round][key] / b[round][key], where both were measured."""
    ratios = [
        x[key] / y[key]
        for x, y in zip(a, b, strict=True)
        if isinstance(x, dict) and isinstance(y, dict) and y[key]
    ]
    return statistics.median(ratios) if ratios else None


def cell(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


if __name__ == "__main__":
    main()
