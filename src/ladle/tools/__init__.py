"""Tool calling: each family's call syntax (formats.py), the streaming parser of replies
(parser.py), and the grammar that forces a well-formed call (grammar.py)."""
