"""`ladle speak TEXT --out hello.wav` and `ladle transcribe meeting.wav`, in this process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, get_args

from ladle.builders import SpeechModelBuilder, TranscriptionModelBuilder
from ladle.cli._common import cache_dir_option, download_with_bar
from ladle.errors import InvalidRequestError
from ladle.protocol.audio import SpeechFormat, TranscriptFormat
from ladle.store.cache import ModelCache
from ladle.store.catalog import Catalog

DEFAULT_VOICE = "piper-en-us-joe-medium"
DEFAULT_TRANSCRIBER = "whisper-tiny-en"


def add_audio(sub: Any) -> None:
    speak = sub.add_parser("speak", help="speak a text into an audio file")
    speak.add_argument("text", help="what to say ('-': read it from stdin)")
    speak.add_argument(
        "--out",
        "-o",
        type=Path,
        default=Path("speech.wav"),
        help="the audio file; its suffix picks the format (default: speech.wav)",
    )
    speak.add_argument(
        "--model",
        "-m",
        default=DEFAULT_VOICE,
        help=f"a voice: alias, id or .onnx path (default: {DEFAULT_VOICE})",
    )
    speak.add_argument("--voice", default="default", help="a speaker of a multi-speaker voice")
    speak.add_argument("--speed", type=float, default=1.0, help="0.25 to 4.0 (default: 1.0)")
    speak.add_argument("--seed", type=int, default=None, help="the same seed, the same audio")
    _common(speak)
    speak.set_defaults(func=_speak)

    listen = sub.add_parser("transcribe", help="write down the speech in an audio file")
    listen.add_argument("file", type=Path, help="WAV, FLAC, OGG or MP3 (more with ffmpeg)")
    listen.add_argument(
        "--model",
        "-m",
        default=DEFAULT_TRANSCRIBER,
        help=f"a Whisper model, alias, id or folder ({DEFAULT_TRANSCRIBER})",
    )
    listen.add_argument("--language", default=None, help="its language code (default: detected)")
    listen.add_argument("--translate", action="store_true", help="English from another language")
    listen.add_argument(
        "--format",
        "-f",
        default="text",
        choices=get_args(TranscriptFormat),
        help="text, json, verbose_json, srt or vtt (default: text)",
    )
    listen.add_argument("--out", "-o", type=Path, default=None, help="write it here, not stdout")
    _common(listen)
    listen.set_defaults(func=_transcribe)  # fmt: skip


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    cache_dir_option(parser)


def _model_path(name: str, cache_dir: Path | None) -> Path:
    """A local path as given, else the catalog's model, downloaded with a bar if need be."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    cache = ModelCache(cache_dir)
    return download_with_bar(Catalog.load().get(name, cached_ids=cache.cached_ids()), cache)


def _speak(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    fmt = args.out.suffix.lower().lstrip(".")
    fmt = {"ogg": "opus", "wave": "wav"}.get(fmt, fmt)
    if fmt not in get_args(SpeechFormat):
        raise InvalidRequestError(
            f"{args.out}: give the file a suffix that names its format "
            f"({', '.join(get_args(SpeechFormat))})"
        )
    builder = SpeechModelBuilder(_model_path(args.model, args.cache_dir))
    if args.threads:
        builder.with_num_threads(args.threads)
    with builder.build() as model:
        speech = model.generate_speech(text, voice=args.voice, speed=args.speed, seed=args.seed)
    speech.save(args.out)
    seconds = len(speech.pcm) / speech.sample_rate
    print(f"wrote {args.out} ({seconds:.1f} s at {speech.sample_rate} Hz)", file=sys.stderr)
    return 0


def _transcribe(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise InvalidRequestError(f"{args.file}: no such file")
    audio = args.file.read_bytes()
    builder = TranscriptionModelBuilder(_model_path(args.model, args.cache_dir))
    if args.threads:
        builder.with_num_threads(args.threads)
    fields = {"language": args.language, "response_format": args.format}
    task = "translate" if args.translate else "transcribe"
    with builder.build() as model:
        try:
            body, _ = model.send_transcription_request(audio, fields, task=task)
        except InvalidRequestError as e:
            if e.param != "file":
                raise
            raise InvalidRequestError(f"{args.file}: {e.message}") from e
    if args.out is not None:
        args.out.write_text(body, encoding="utf-8")
    else:
        sys.stdout.write(body if body.endswith("\n") else body + "\n")
    return 0
