"""Native CPU kernels: C++ sources with a C ABI (`api.h`), built once per instruction set
(`build.py`), chosen for this CPU (`isa.py`) and called on tensors (`native.py`)."""
