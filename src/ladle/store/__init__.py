"""Where models come from and where they live.

transfer.py (one source's bytes into one verified file) <- entry.py (a catalog entry and its
files) <- cache.py (the folders on disk) <- download.py (a whole model, locked, resumed) <-
catalog.py (entries, aliases, the variant for this machine). Each imports only those before it;
atomic.py (state files replaced in one step) serves them all.
"""
