"""The request rules that `Model`, `AsyncModel` and the server share, one module per task.

text.py: chat and completion requests -> engine requests, and back (with responses.py for the
OpenAI shapes and structured.py for constraints); embedding.py: embedding requests -> vectors.
A core does no waiting: `Model` waits on a thread queue, `AsyncModel` on an asyncio one.
"""
