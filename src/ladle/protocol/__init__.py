"""Wire types only: OpenAI's (openai.py) and Foundry Local's management shapes (foundry.py).

Nothing here imports the engine, the cores or the server: the SDK, the service and its
clients all speak these types.
"""
