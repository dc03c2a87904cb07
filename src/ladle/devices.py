"""Which devices ladle's engine runs models on, asked in one place.

The catalog picks an alias's variant by it and the manager the execution provider it sends to
the service. The engine runs on the CPU only for now (the builders refuse other devices), so
a CUDA variant is never chosen, even where torch sees a GPU.
"""

from __future__ import annotations


def runnable_device_types() -> frozenset[str]:
    """Catalog device types ("CPU", "GPU") whose variants this machine's engine can run."""
    return frozenset({"CPU"})
