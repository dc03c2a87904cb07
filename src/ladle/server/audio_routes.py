"""OpenAI's audio routes: `/v1/audio/speech`, `/v1/audio/transcriptions`, `/v1/audio/translations`.

Speech answers with the audio's bytes as the voice speaks them (WAV and PCM sentence by
sentence) or, with `stream_format: "sse"`, with OpenAI's `speech.audio.delta` events. The
first chunk is awaited before the response starts, so a bad voice or empty text is still a
plain 400; a failure after that ends the audio early (or, as SSE, sends an error event).
Transcriptions take OpenAI's multipart form: the audio `file` and the fields beside it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ladle.cores.speech import media_type
from ladle.errors import InvalidRequestError
from ladle.protocol.audio import (
    SpeechRequest,
    Transcription,
    TranscriptionForm,
    VerboseTranscription,
)
from ladle.protocol.openai import parse_body
from ladle.server.errors import to_error
from ladle.server.lifecycle import Lease, ModelPool
from ladle.server.openai_routes import ClosingStreamingResponse
from ladle.server.openapi import Operation, documented


def _transcribing(summary: str) -> Operation:
    """A route that takes OpenAI's transcription form and answers JSON or text."""
    return Operation(
        summary,
        "OpenAI",
        body=TranscriptionForm,
        body_media_type="multipart/form-data",
        returns=Transcription | VerboseTranscription,
        media_type="text/plain",
        errors=(400, 404, 503),
    )


class AudioRoutes:
    def __init__(self, pool: ModelPool, stall_timeout: float | None = None) -> None:
        self.pool = pool
        self.stall_timeout = stall_timeout

    def routes(self) -> list[Route]:
        return [
            Route("/v1/audio/speech", self.speech, methods=["POST"]),
            Route("/v1/audio/transcriptions", self.transcriptions, methods=["POST"]),
            Route("/v1/audio/translations", self.translations, methods=["POST"]),
        ]

    @documented(
        Operation(
            "Speech from text, in the asked audio format (streamed as it is spoken)",
            "OpenAI",
            body=SpeechRequest,
            media_type="application/octet-stream",
            streams=True,
            errors=(400, 404, 503),
        )
    )
    async def speech(self, request: Request) -> Response:
        req = parse_body(SpeechRequest, await request.body())
        lease = await self.pool.acquire(req.model)
        try:
            stream = await lease.model.stream_speech_request(req)
            first = await anext(stream, b"")  # the request is checked before headers go
        except BaseException:
            lease.release()
            raise
        body = _audio(stream, first, lease, sse=req.stream_format == "sse")
        return ClosingStreamingResponse(body, media_type(req), stall_timeout=self.stall_timeout)

    @documented(_transcribing("Text of an audio file (multipart form: `file` and the fields)"))
    async def transcriptions(self, request: Request) -> Response:
        return await self._transcribe(request, "transcribe")

    @documented(_transcribing("English text of an audio file in another language"))
    async def translations(self, request: Request) -> Response:
        return await self._transcribe(request, "translate")

    async def _transcribe(self, request: Request, task: str) -> Response:
        audio, fields = await _read_form(request)
        model = fields.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequestError("the form has no model field", param="model")
        async with self.pool.use(model) as lease_model:
            body, media_type = await lease_model.send_transcription_request(
                audio, fields, task=task
            )
        return Response(body, media_type=media_type)


async def _read_form(request: Request) -> tuple[bytes, dict[str, Any]]:
    """The uploaded file's bytes and the other fields (`timestamp_granularities[]` as a list)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequestError(
            f"send a multipart/form-data body with the audio as `file`, not {content_type!r}",
            param="file",
        )
    try:
        form = await request.form(max_files=1, max_fields=32)
    except Exception as e:  # python-multipart's parse errors, Starlette's limits
        raise InvalidRequestError(f"the multipart body cannot be read: {e}", "file") from e
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError("the form has no audio `file` part", param="file")
        audio = await upload.read()
        fields: dict[str, Any] = {}
        for key in form:
            if key == "file":
                continue
            values = [v for v in form.getlist(key) if isinstance(v, str)]
            if key.endswith("[]"):
                fields[key] = values
            elif values:
                fields[key] = values[-1]
    finally:
        await form.close()  # the upload's spooled file
    return audio, fields


async def _audio(
    stream: AsyncGenerator[bytes, None], first: bytes, lease: Lease, sse: bool
) -> AsyncGenerator[bytes, None]:
    try:
        if first:
            yield first
        async for chunk in stream:
            yield chunk
    except Exception as e:  # the headers are sent: an SSE client gets an error event
        if sse:
            _, body = to_error(e)
            yield f"data: {body.model_dump_json()}\n\n".encode()
    finally:
        lease.release()
        await stream.aclose()
