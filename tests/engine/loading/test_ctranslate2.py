"""CTranslate2's `model.bin` reader, on the real Whisper tiny.en file and damaged copies of it."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from ladle.engine.loading.ctranslate2 import CT2Model, read_ctranslate2, read_spec_name
from ladle.errors import ModelLoadError, UnsupportedArchitectureError


@pytest.fixture(scope="module")
def tiny(whisper_tiny_path: Path) -> CT2Model:
    return read_ctranslate2(whisper_tiny_path / "model.bin")


def _copy(whisper_tiny_path: Path, tmp_path: Path) -> tuple[Path, bytearray]:
    data = bytearray((whisper_tiny_path / "model.bin").read_bytes())
    return tmp_path / "model.bin", data


def test_every_variable_of_whisper_tiny_has_the_spec_shape(tiny: CT2Model) -> None:
    assert (tiny.spec, tiny.revision) == ("WhisperSpec", 3)
    assert tiny.layer_count("encoder") == tiny.layer_count("decoder") == 4
    d, vocab = 384, 51864
    expected = {
        "encoder/conv1/weight": (d, 80, 3),
        "encoder/conv2/weight": (d, d, 3),
        "encoder/position_encodings/encodings": (1500, d),
        "decoder/embeddings/weight": (vocab, d),
        "decoder/position_encodings/encodings": (448, d),
        "encoder/num_heads": (),
    }
    per_layer = {
        "self_attention/linear_0/weight": (3 * d, d),  # q, k, v fused
        "self_attention/linear_0/bias": (3 * d,),
        "self_attention/linear_1/weight": (d, d),
        "ffn/linear_0/weight": (4 * d, d),
        "ffn/linear_1/weight": (d, 4 * d),
        "ffn/layer_norm/gamma": (d,),
    }
    cross = {"attention/linear_0/weight": (d, d), "attention/linear_1/weight": (2 * d, d)}
    for i in range(4):
        expected |= {f"encoder/layer_{i}/{k}": v for k, v in per_layer.items()}
        expected |= {f"decoder/layer_{i}/{k}": v for k, v in (per_layer | cross).items()}
    for name, shape in expected.items():
        assert tuple(tiny.variable(name).shape) == shape, name
    # 12 tensors an encoder layer, 20 a decoder layer; convolutions, position tables, final
    # norms and the embedding table; head counts and the decoder's flags
    assert len(tiny.variables) == 4 * 12 + 4 * 20 + 11 + 9
    weights = [v for n, v in tiny.variables.items() if v.ndim > 0]
    assert {v.dtype for v in weights} == {torch.float16}
    assert int(tiny.variable("encoder/num_heads")) == int(tiny.variable("decoder/num_heads")) == 6
    # the head is stored once, as the embedding table, and aliased
    assert tiny.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert tiny.variable("decoder/projection/weight") is tiny.variable("decoder/embeddings/weight")
    # CTranslate2 fuses k without a bias: zeros stand in its place
    qkv_bias = tiny.variable("encoder/layer_0/self_attention/linear_0/bias")
    assert not qkv_bias[d : 2 * d].any() and qkv_bias[:d].any()


def test_a_truncated_file_is_named_in_the_error(whisper_tiny_path: Path, tmp_path: Path) -> None:
    path, data = _copy(whisper_tiny_path, tmp_path)
    for size in (3, 30, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:size])
        with pytest.raises(ModelLoadError, match="truncated") as error:
            read_ctranslate2(path)
        assert error.value.path == str(path)


def test_a_garbled_header_is_refused(whisper_tiny_path: Path, tmp_path: Path) -> None:
    path, data = _copy(whisper_tiny_path, tmp_path)
    name = b"decoder/activation\0"  # the first variable: a scalar, so rank 0 then its type id
    type_at = data.index(name) + len(name) + 1
    for offset, value, message in [
        (type_at, 9, "unknown data type id 9"),
        (type_at, 4, "claims 1 bytes"),  # float16 takes 2
        (type_at - 1, 200, "rank 200"),
        (0, 7, "binary version 7"),
    ]:
        garbled = bytearray(data)
        garbled[offset] = value
        path.write_bytes(garbled)
        with pytest.raises(ModelLoadError, match=message) as error:
            read_ctranslate2(path)
        assert error.value.path == str(path)
    path.write_bytes(data + b"\0")
    with pytest.raises(ModelLoadError, match="bytes follow"):
        read_ctranslate2(path)


def test_another_spec_or_a_newer_revision_is_unsupported(
    whisper_tiny_path: Path, tmp_path: Path
) -> None:
    path, data = _copy(whisper_tiny_path, tmp_path)
    path.write_bytes(data.replace(b"WhisperSpec", b"WhisperSpeX", 1))
    assert read_spec_name(path) == "WhisperSpeX"
    with pytest.raises(UnsupportedArchitectureError, match="'WhisperSpeX' is not"):
        read_ctranslate2(path).require_spec("WhisperSpec", 3)
    with pytest.raises(ModelLoadError, match="revision 3 is newer than 2"):
        read_ctranslate2(whisper_tiny_path / "model.bin").require_spec("WhisperSpec", 2)
    assert read_spec_name(tmp_path / "absent.bin") is None


def test_a_missing_variable_is_named_with_the_file(tiny: CT2Model) -> None:
    with pytest.raises(ModelLoadError, match="'encoder/layer_9/ffn/linear_0/weight' is missing"):
        tiny.variable("encoder/layer_9/ffn/linear_0/weight")


def test_int8_and_int16_weights_come_back_divided_by_their_scales() -> None:
    weight = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.5]])
    # what CTranslate2's converter writes for int8: one scale per row, 127 / max |row|
    scale8 = 127.0 / weight.abs().amax(dim=1)
    q8 = torch.round(weight * scale8[:, None]).to(torch.int8)
    scale16 = 2.0**10 / weight.abs().max()  # and for int16: one per tensor
    q16 = torch.round(weight * scale16).to(torch.int16)
    model = CT2Model(
        Path("model.bin"),
        "WhisperSpec",
        3,
        {"a/weight": q8, "a/weight_scale": scale8, "b/weight": q16, "b/weight_scale": scale16},
        {"c/weight": "a/weight"},
    )
    for name in ("a/weight", "c/weight"):  # an alias brings its target's scale
        torch.testing.assert_close(model.float_variable(name), q8.float() / scale8[:, None])
        assert (model.float_variable(name) - weight).abs().max() <= 0.5 / scale8.min()
    assert (model.float_variable("b/weight") - weight).abs().max() <= 0.5 / scale16


def test_a_model_split_in_parts_reads_as_the_whole(
    tiny: CT2Model, whisper_tiny_path: Path, tmp_path: Path
) -> None:
    """Whisper base comes from PyPI as `model.bin.part1` and `.part2`: the parts, in the
    order of their numbers (10 after 9), read as the file they were cut from."""
    data = (whisper_tiny_path / "model.bin").read_bytes()
    cuts = [0, 7, len(data) // 3, len(data) // 2, len(data)]  # a cut inside the header too
    for number, (start, end) in zip([1, 2, 9, 10], itertools.pairwise(cuts), strict=True):
        (tmp_path / f"model.bin.part{number}").write_bytes(data[start:end])
    (tmp_path / "model.bin.partial").write_bytes(b"not a part")  # not numbered: left out
    split = read_ctranslate2(tmp_path / "model.bin")
    assert read_spec_name(tmp_path / "model.bin") == "WhisperSpec"
    assert split.variables.keys() == tiny.variables.keys()
    assert all(torch.equal(split.variables[k], v) for k, v in tiny.variables.items())
    (tmp_path / "model.bin.part9").unlink()  # a part missing: the rest does not parse
    with pytest.raises(ModelLoadError, match=r"model\.bin: (truncated|garbled)"):
        read_ctranslate2(tmp_path / "model.bin")
