"""`ladle speak` and `ladle transcribe`, run in this process (`ladle.cli.main`) on the real
voice and Whisper tiny.en, and `ladle model register` knowing both by their files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile

from ladle.cli import main
from ladle.store.catalog import Catalog


def test_speak_then_transcribe_as_subtitles(
    piper_voice_path: Path,
    whisper_tiny_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "hello.flac"
    text = "Hello from the command line. This is ladle speaking."
    assert main(["speak", text, "--out", str(out), "--model", str(piper_voice_path)]) == 0
    info = soundfile.info(str(out))
    assert info.format == "FLAC" and info.samplerate == 22_050 and info.duration > 2.0
    assert "wrote" in capsys.readouterr().err
    args = ["transcribe", str(out), "--model", str(whisper_tiny_path), "--format", "vtt"]
    assert main(args) == 0
    vtt = capsys.readouterr().out
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ") and "command line" in vtt.lower()


def test_bad_files_are_named(
    piper_voice_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["speak", "Hi.", "--out", str(tmp_path / "x.doc")]) == 1
    assert "x.doc: give the file a suffix" in capsys.readouterr().err
    assert main(["transcribe", str(tmp_path / "missing.wav")]) == 1
    assert "missing.wav: no such file" in capsys.readouterr().err
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("no sound here " * 50)
    voice = str(piper_voice_path)  # not a transcriber: refused before the audio is read
    assert main(["transcribe", str(not_audio), "--model", voice]) == 1
    assert "error:" in capsys.readouterr().err


def test_register_knows_voices_and_whispers_by_their_files(
    piper_voice_path: Path,
    whisper_tiny_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LADLE_HOME", str(tmp_path))
    onnx = next(piper_voice_path.glob("*.onnx"))
    assert main(["model", "register", "joe", str(onnx)]) == 0
    assert main(["model", "register", "tiny", str(whisper_tiny_path)]) == 0
    catalog = Catalog.load()
    joe, tiny = catalog.get("joe"), catalog.get("tiny")
    assert (joe.task, joe.format, joe.local_path) == ("text-to-speech", "onnx", onnx)
    assert {f.name for f in joe.files} == {onnx.name, onnx.name + ".json"}
    assert (tiny.task, tiny.format) == ("automatic-speech-recognition", "ctranslate2")
    capsys.readouterr()
    assert main(["model", "list", "--json"]) == 0
    listed = {m["alias"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["piper-en-us-joe-medium"]["task"] == "text-to-speech"
    assert listed["whisper-tiny-en"]["task"] == "automatic-speech-recognition"
