"""The `ladle` command line. Only this package prints; everything else returns or logs.

ladle run [MODEL] [PROMPT]                     chat in the terminal, or answer one prompt (run.py)
ladle serve                                    run the service in the foreground (serve.py)
ladle service start|stop|restart|status|ps     manage the background service (serve.py)
ladle model list|info|download|load|unload     the catalog, and models in the service (models.py)
ladle model register|unregister                local model files under an alias (models.py)
ladle cache list|location|remove               the downloaded models (models.py)
ladle speak TEXT --out F.wav                   speak a text with a voice (audio.py)
ladle transcribe FILE                          write down what an audio file says (audio.py)
ladle perplexity MODEL FILE                    how well a model predicts a text (perplexity.py)
ladle quantize SRC --type T --out F.gguf       write a quantized GGUF file (quantize.py)
"""

from __future__ import annotations

import argparse
import logging
import sys

from ladle.cli.audio import add_audio
from ladle.cli.models import add_cache, add_model
from ladle.cli.perplexity import add_perplexity
from ladle.cli.quantize import add_quantize
from ladle.cli.run import add_run
from ladle.cli.serve import add_serve, add_service
from ladle.errors import LadleError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        (getattr(args, "group_parser", None) or parser).print_help()
        return 2
    if args.command != "serve":  # serve logs everything its own way
        _show_kernel_builds()
    try:
        return int(args.func(args))
    except (LadleError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _show_kernel_builds() -> None:
    """Say so when a model load builds the native kernels (once per machine, half a minute),
    rather than seem to hang."""
    log = logging.getLogger("ladle.engine.kernels.native")
    if not log.handlers and not logging.getLogger().handlers:  # else logging is configured
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ladle", description="Run local AI models.")
    sub = parser.add_subparsers(dest="command")
    add_run(sub)
    add_serve(sub)
    add_service(sub)
    add_model(sub)
    add_cache(sub)
    add_audio(sub)
    add_perplexity(sub)
    add_quantize(sub)
    return parser
