"""Real-time factors of speech and transcription: ladle beside onnxruntime and faster-whisper.

    python benchmarks/bench_audio.py [--threads 2] [--voice ALIAS_OR_PATH] [--whisper ALIAS_OR_PATH]

Speech: the Piper voice en_US-joe-medium speaks the same paragraph through ladle's PyTorch VITS
and through onnxruntime on the voice's own .onnx file (the same phoneme ids, noise scales at
the voice's defaults), sentence by sentence. Transcription: Whisper tiny.en writes down that
speech (about 30 s) through ladle and through faster-whisper (CTranslate2) at fp32 and int8 on
the same model folder, greedy (beam 1) without timestamps' word alignment. The real-time
factor is seconds of work per second of audio (lower is faster; best of --repeat runs).
The CPU and the kernel paths are printed: the voice and Whisper's encoder run on torch's
kernels, Whisper's per-token decoder projections on ladle's (LADLE_CPU_ISA forces). onnxruntime
and faster-whisper are optional: a missing one is said and skipped. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ladle import SpeechModelBuilder, TranscriptionModelBuilder
from ladle.cores.audio_files import resample
from ladle.engine.kernels import isa
from ladle.engine.speech import load_voice
from ladle.store.catalog import resolve

PARAGRAPH = (
    "Local models run on the computer in front of you. They answer without a network, "
    "they keep your words on your own disk, and they cost nothing per request. "
    "A small voice model reads this paragraph aloud in a few seconds. "
    "A small speech recognizer then writes it down again, word for word. "
    "Both run on two cores of an ordinary processor, with no graphics card at all. "
    "The question this benchmark asks is simple: how many seconds of work does one second "
    "of audio take, in ladle and in the engines people use today?"
)


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--voice", default="piper-en-us-joe-medium")
    parser.add_argument("--whisper", default="whisper-tiny-en")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    voice_path, whisper_path = resolve(args.voice), resolve(args.whisper)
    capability = torch.backends.cpu.get_cpu_capability()
    print(
        f"cpu: {isa.cpu_name()} | torch {torch.__version__}, its {capability} kernels | "
        f"ladle's kernels: {isa.selected_isa()}"
    )
    print(f"{args.threads} threads, best of {args.repeat}\n")

    sentences = load_voice(voice_path).sentences(PARAGRAPH)  # the ids onnxruntime gets too
    with SpeechModelBuilder(voice_path).with_num_threads(args.threads).build() as model:
        spoken = model.generate_speech(PARAGRAPH, seed=0)
        seconds = len(spoken.pcm) / spoken.sample_rate
        ladle_s = best_of(args.repeat, lambda: model.generate_speech(PARAGRAPH, seed=0))
    rows = [("ladle (PyTorch VITS)", ladle_s)]
    onnx_s = _onnxruntime_speech(voice_path, sentences, args)
    if onnx_s is not None:
        rows.append(("onnxruntime", onnx_s))
    print(
        f"speech: {len(sentences)} sentences, {seconds:.1f} s of audio at {spoken.sample_rate} Hz"
    )
    _table(rows, seconds)

    audio16 = resample(spoken.pcm, spoken.sample_rate, 16_000)
    with TranscriptionModelBuilder(whisper_path).with_num_threads(args.threads).build() as ears:
        text = ears.transcribe(audio16, sample_rate=16_000, timestamps=True).text
        ladle_s = best_of(
            args.repeat, lambda: ears.transcribe(audio16, sample_rate=16_000, timestamps=True)
        )
    rows = [("ladle (PyTorch Whisper)", ladle_s)]
    rows += _faster_whisper(whisper_path, audio16, args)
    print(f"\ntranscription: {seconds:.1f} s of audio, Whisper {whisper_path.name}")
    _table(rows, seconds)
    print(f"\nladle heard: {text}")


def _onnxruntime_speech(
    voice_path: Path, sentences: list[list[int]], args: argparse.Namespace
) -> float | None:
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime is not installed: pip install onnxruntime")
        return None
    onnx_file = voice_path if voice_path.is_file() else next(voice_path.glob("*.onnx"))
    config = json.loads(onnx_file.with_name(onnx_file.name + ".json").read_text())
    inference = config.get("inference", {})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(onnx_file), options, ["CPUExecutionProvider"])
    scales = np.array(
        [inference.get("noise_scale", 0.667), inference.get("length_scale", 1.0),
         inference.get("noise_w", 0.8)], dtype=np.float32,
    )  # fmt: skip

    def speak() -> None:
        for ids in sentences:
            feeds = {
                "input": np.array([ids], dtype=np.int64),
                "input_lengths": np.array([len(ids)], dtype=np.int64),
                "scales": scales,
            }
            session.run(None, feeds)

    speak()  # warm-up
    return best_of(args.repeat, speak)


def _faster_whisper(
    whisper_path: Path, audio: np.ndarray, args: argparse.Namespace
) -> list[tuple[str, float]]:
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        print("faster-whisper is not installed: pip install faster-whisper")
        return []
    rows = []
    for compute_type in ("float32", "int8"):
        model = WhisperModel(
            str(whisper_path), device="cpu", compute_type=compute_type, cpu_threads=args.threads
        )

        def run(model: WhisperModel = model) -> None:
            segments, _ = model.transcribe(audio, beam_size=1, language="en")
            list(segments)  # the generator does the work

        run()
        rows.append((f"faster-whisper {compute_type}", best_of(args.repeat, run)))
    return rows


def _table(rows: list[tuple[str, float]], seconds: float) -> None:
    print(f"{'engine':<28}{'seconds':>9}{'RTF':>8}{'vs ladle':>10}")
    for name, took in rows:
        print(f"{name:<28}{took:>9.2f}{took / seconds:>8.3f}{rows[0][1] / took:>9.2f}x")


if __name__ == "__main__":
    main()
