"""Native CPU kernels: C++ sources of the `ladle_kernels` torch operators, and `native`, which
builds and loads them."""
