"""Tool calling: the call syntax of each model family, replies read back as calls, and the
grammar that forces a well-formed call (parser.py; the agent loop, sessions and MCP come next)."""
