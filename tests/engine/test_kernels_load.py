"""The native kernels load wherever ladle is installed: a build that fails is a test failure,
not a silent skip of every test that needs them."""

from __future__ import annotations

import os

import pytest

from ladle.engine.kernels import isa, native


def test_the_kernels_load_unless_turned_off() -> None:
    if os.environ.get("LADLE_NATIVE_KERNELS") == "0":
        pytest.skip("LADLE_NATIVE_KERNELS=0")
    assert native.load(), "the native kernels did not load: see the warning logged"
    assert native.loaded_isa() == isa.selected_isa()
