"""ladle's GGUF header parser agrees with the `gguf` package's reader, and fails clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize

from ladle.engine.loading.gguf import read_gguf
from ladle.errors import ModelLoadError, UnsupportedTensorTypeError


def write_sample(
    path: Path, extra_tensor: tuple[str, np.ndarray, GGMLQuantizationType] | None = None
) -> None:
    w = GGUFWriter(path, "llama")
    w.add_uint32("test.u32", 7)
    w.add_int64("test.i64", -3)
    w.add_float32("test.f32", 0.5)
    w.add_bool("test.flag", True)
    w.add_string("test.name", "naïve 東京")
    w.add_array("test.ints", [1, 2, 3])
    w.add_array("test.floats", [0.25, -1.0])
    w.add_array("test.strings", ["a", "", "🙂"])
    rng = np.random.default_rng(0)
    w.add_tensor("dense", rng.standard_normal((3, 64)).astype(np.float32))
    q = quantize(rng.standard_normal((4, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    w.add_tensor("quant", q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    if extra_tensor:
        name, data, qtype = extra_tensor
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_metadata_and_tensors_match_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "sample.gguf"
    write_sample(path)
    ours = read_gguf(path)
    ref = GGUFReader(path)
    for key, f in ref.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == f.contents(), key
    assert ours.metadata["test.strings"] == ["a", "", "🙂"]
    assert ours.architecture == "llama"
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.shape == tuple(reversed(t.shape.tolist()))
        assert mine.ggml_type == t.tensor_type
        assert np.array_equal(
            np.asarray(mine.data).ravel(), np.asarray(t.data).view(np.uint8).ravel()
        )
    dense = ours.tensors["dense"].dequantize()
    assert np.allclose(dense.numpy(), np.asarray(ref.tensors[0].data))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no such file"):
        read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("just some text, not a model")
    with pytest.raises(ModelLoadError, match=r"notes\.gguf.*not a GGUF"):
        read_gguf(path)


@pytest.mark.parametrize("keep", [10, 200, -100])
def test_truncated_file_names_the_file(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "whole.gguf"
    write_sample(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(ModelLoadError, match=r"cut\.gguf"):
        read_gguf(cut)


def test_unsupported_tensor_type_names_file_and_tensor(tmp_path: Path) -> None:
    path = tmp_path / "iq.gguf"
    raw = np.zeros((2, 66), dtype=np.uint8)  # two IQ2_XXS blocks of 256 values
    write_sample(path, ("blk.0.attn_q.weight", raw, GGMLQuantizationType.IQ2_XXS))
    with pytest.raises(
        UnsupportedTensorTypeError, match=r"iq\.gguf.*blk\.0\.attn_q\.weight.*IQ2_XXS"
    ):
        read_gguf(path)
