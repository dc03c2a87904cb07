"""`/v1/audio/speech`, `/v1/audio/transcriptions` and `/v1/audio/translations` on a real
service, driven by the `openai` client as an OpenAI user would, and by raw HTTP for what the
client hides (streamed chunks, bad uploads). The voice and Whisper tiny.en are local catalog
entries of the module's test catalog, loaded on first use."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile

from ladle.server import ServerSettings

VOICE, EARS = "voice", "ears"


@pytest.fixture(scope="module")
def test_catalog(
    ladle_home: Path, piper_voice_path: Path, whisper_tiny_path: Path, smollm2_path: Path
) -> Path:
    def local(alias: str, task: str, fmt: str, path: Path) -> dict[str, object]:
        files = [
            {"name": p.name, "size": p.stat().st_size, "sha256": None, "source": p.as_uri()}
            for p in sorted(path.iterdir() if path.is_dir() else [path])
        ]
        return {"id": f"{alias}-local:1", "alias": alias, "task": task, "format": fmt,
                "uri": path.as_uri(), "provider_type": "Local", "files": files}  # fmt: skip

    entries = [
        local(VOICE, "text-to-speech", "onnx", piper_voice_path),
        local(EARS, "automatic-speech-recognition", "ctranslate2", whisper_tiny_path),
        local("smol", "chat-completion", "gguf", smollm2_path),
    ]
    path = ladle_home / "test-catalog.json"
    path.write_text(json.dumps({"models": entries}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def service(serve) -> ServerSettings:  # type: ignore[no-untyped-def]
    return serve(num_threads=1)


@pytest.fixture(scope="module")
def client(service: ServerSettings) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)


def test_openai_client_speaks_and_transcribes_unchanged(client: openai.OpenAI) -> None:
    speech = client.audio.speech.create(
        model=VOICE, voice="alloy", input="The cat sat on the mat. It was happy."
    )  # mp3, OpenAI's default
    audio, rate = soundfile.read(io.BytesIO(speech.content), dtype="float32")
    assert rate == 22_050 and len(audio) > rate
    transcript = client.audio.transcriptions.create(
        model=EARS, file=("speech.mp3", speech.content, "audio/mpeg")
    )
    assert "cat" in transcript.text.lower() and "mat" in transcript.text.lower()
    verbose = client.audio.transcriptions.create(
        model=EARS,
        file=("speech.mp3", speech.content),
        response_format="verbose_json",
        timestamp_granularities=["segment"],
    )
    assert verbose.language == "en" and verbose.segments and verbose.duration > 1.0
    srt = client.audio.transcriptions.create(
        model=EARS, file=("speech.mp3", speech.content), response_format="srt"
    )
    assert str(srt).startswith("1\n00:00:00,")


def test_wav_streams_as_it_is_spoken(service: ServerSettings) -> None:
    body = {"model": VOICE, "input": "First part. Second part. Third part.",
            "response_format": "wav"}  # fmt: skip
    with httpx.stream("POST", f"{service.url}/v1/audio/speech", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        chunks = list(r.iter_raw())
    data = b"".join(chunks)
    assert data[:4] == b"RIFF" and len(chunks) >= 2  # sentence by sentence, not one piece
    audio, _ = soundfile.read(io.BytesIO(data), dtype="float32")
    assert np.abs(audio).max() > 0.05


def test_errors_are_openai_bodies_naming_the_field(service: ServerSettings) -> None:
    url = service.url

    def error(response: httpx.Response) -> tuple[int, str | None]:
        return response.status_code, response.json()["error"]["param"]

    speech = f"{url}/v1/audio/speech"
    assert error(httpx.post(speech, json={"model": VOICE, "input": ""})) == (400, "input")
    bad_voice = {"model": VOICE, "input": "Hi.", "voice": "nobody"}
    assert error(httpx.post(speech, json=bad_voice)) == (400, "voice")
    aac_or_fine = httpx.post(speech, json={"model": VOICE, "input": "Hi.", "speed": 5})
    assert error(aac_or_fine) == (400, "speed")
    assert error(httpx.post(speech, json={"model": "smol", "input": "Hi."}, timeout=60)) == (
        400,
        "model",
    )
    assert httpx.post(speech, json={"model": "nope", "input": "Hi."}).status_code == 404

    upload = f"{url}/v1/audio/transcriptions"
    not_audio = {"file": ("x.wav", b"this is text, not sound" * 20)}
    assert error(httpx.post(upload, data={"model": EARS}, files=not_audio)) == (400, "file")
    assert error(httpx.post(upload, data={"model": EARS}, files={"other": b"x"})) == (400, "file")
    assert error(httpx.post(upload, json={"model": EARS})) == (400, "file")
    tone = io.BytesIO()
    soundfile.write(tone, np.zeros(16_000, np.float32), 16_000, format="WAV")
    silence = {"file": ("s.wav", tone.getvalue())}
    translate = httpx.post(f"{url}/v1/audio/translations", data={"model": EARS}, files=silence)
    assert error(translate) == (400, "model")  # tiny.en cannot translate
    bad_temp = {"model": EARS, "temperature": "hot"}
    assert error(httpx.post(upload, data=bad_temp, files=silence)) == (400, "temperature")
    ok = httpx.post(upload, data={"model": EARS, "response_format": "text"}, files=silence)
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/plain")
