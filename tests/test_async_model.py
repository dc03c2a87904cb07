"""AsyncModel mirrors Model: same answers, async streams, concurrent requests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ladle import AsyncModel, InvalidRequestError, TextModelBuilder

QUESTION = [{"role": "user", "content": "Name a fruit."}]
REQUEST = {"messages": QUESTION, "temperature": 0, "max_tokens": 12}


async def _with_model(path: Path) -> tuple[AsyncModel, list[str]]:
    model = await TextModelBuilder(path).build_async()
    async with model:
        single = (await model.send_chat_request(REQUEST)).choices[0].message.content or ""
        streamed = "".join(
            [
                c.choices[0].delta.content or ""
                async for c in model.stream_chat_request(REQUEST)
                if c.choices
            ]
        )
        concurrent = await asyncio.gather(*(model.send_chat_request(REQUEST) for _ in range(3)))
        texts = [r.choices[0].message.content or "" for r in concurrent]
        completion = await model.send_completion_request(
            {"prompt": "One, two,", "max_tokens": 4, "temperature": 0}
        )
        ids = await model.tokenize("One, two,")
        assert await model.detokenize(ids) == "One, two,"
        assert (await model.config()).architecture == "llama"
        for bad in ({"max_tokens": -3}, {"temperature": 9}):
            with pytest.raises(InvalidRequestError):
                await model.send_chat_request({**REQUEST, **bad})
        return model, [single, streamed, *texts, completion.choices[0].text]


def test_async_model_matches_itself_and_the_sync_model(smollm2_path: Path) -> None:
    _, texts = asyncio.run(_with_model(smollm2_path))
    single, streamed, *concurrent, completion = texts
    assert single and streamed == single
    assert concurrent == [single] * 3
    with TextModelBuilder(smollm2_path).build() as sync_model:
        assert sync_model.send_chat_request(REQUEST).choices[0].message.content == single
        sync_completion = sync_model.send_completion_request(
            {"prompt": "One, two,", "max_tokens": 4, "temperature": 0}
        )
        assert sync_completion.choices[0].text == completion


def test_async_stream_can_be_abandoned(smollm2_path: Path) -> None:
    async def run() -> str:
        async with await TextModelBuilder(smollm2_path).build_async() as model:
            stream = model.stream_chat_request({"messages": QUESTION, "max_tokens": 300})
            async for _ in stream:
                break
            await stream.aclose()
            return await model.chat("Say yes.")

    assert asyncio.run(asyncio.wait_for(run(), timeout=120))


def test_concurrent_async_streams_each_get_their_own_tokens_in_order(smollm2_path: Path) -> None:
    """A step's events, made on the engine thread, reach each stream of one loop in order."""
    prompts = ["Name a fruit.", "Count to five.", "Say hello in French.", "Name a colour."]

    def request(text: str) -> dict[str, object]:
        return {"messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 10}

    async def stream(model: AsyncModel, text: str) -> str:
        parts = [
            c.choices[0].delta.content or ""
            async for c in model.stream_chat_request(request(text))
            if c.choices
        ]
        return "".join(parts)

    async def run() -> list[str]:
        async with await TextModelBuilder(smollm2_path).build_async() as model:
            return list(await asyncio.gather(*(stream(model, p) for p in prompts)))

    streamed = asyncio.run(run())
    with TextModelBuilder(smollm2_path).build() as sync_model:
        alone = [
            sync_model.send_chat_request(request(p)).choices[0].message.content for p in prompts
        ]
    assert streamed == alone
    assert len(set(streamed)) == len(prompts)


def test_events_put_from_another_thread_reach_each_queue_in_order() -> None:
    """The engine thread's puts reach the loop's queues through one mailbox, in order."""
    import threading

    from ladle.model import _AsyncSink

    async def main() -> list[list[object]]:
        sinks = [_AsyncSink() for _ in range(3)]
        assert len({id(s.mailbox) for s in sinks}) == 1  # one loop, one mailbox

        def engine() -> None:
            for i in range(300):
                sinks[i % 3].put(i)  # type: ignore[arg-type]
            sinks[1].fail(ValueError("stop"))

        thread = threading.Thread(target=engine)
        thread.start()
        got: list[list[object]] = [[], [], []]
        for k, sink in enumerate(sinks):
            for _ in range(100 + (k == 1)):
                got[k].append(await asyncio.wait_for(sink.queue.get(), 10))
        thread.join()
        return got

    got = asyncio.run(main())
    assert [g[:100] for g in got] == [list(range(k, 300, 3)) for k in range(3)]
    assert isinstance(got[1][100], ValueError)
