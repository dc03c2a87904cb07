"""Reading a Piper voice: hyperparameters from the ONNX graph, and errors that name the file."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from ladle.engine.loading.piper import OnnxWeights, PiperConfig, config_path, read_piper_voice
from ladle.engine.speech import is_voice, load_voice
from ladle.errors import InvalidRequestError, ModelLoadError

VOICE = "en_US-joe-medium.onnx"


@pytest.fixture(scope="module")
def onnx_path(piper_voice_path: Path) -> Path:
    return piper_voice_path / VOICE


@pytest.fixture(scope="module")
def graph(onnx_path: Path) -> onnx.ModelProto:
    return onnx.load(str(onnx_path))


def test_hyperparameters_come_from_the_graph(onnx_path: Path) -> None:
    config = OnnxWeights.read(onnx_path).config()
    # Piper's "medium" quality: HiFi-GAN V2 blocks, 256 frames of hop (8 * 8 * 4)
    assert (config.num_symbols, config.hidden_channels, config.num_layers) == (256, 192, 6)
    assert (config.num_heads, config.window_size) == (2, 4)
    assert config.resblock == "2"
    assert config.resblock_kernel_sizes == (3, 5, 7)
    assert config.resblock_dilation_sizes == ((1, 2), (2, 6), (3, 12))
    assert config.upsample_rates == (8, 8, 4)
    assert (config.dp_num_flows, config.num_bins, config.flow_num_flows) == (4, 10, 4)
    assert config.num_speakers == 1


def test_piper_config_is_read_with_piper_defaults(onnx_path: Path, tmp_path: Path) -> None:
    config = PiperConfig.read(config_path(onnx_path))
    assert (config.sample_rate, config.espeak_voice, config.noise_w) == (22050, "en-us", 0.8)
    minimal = tmp_path / "voice.onnx.json"
    minimal.write_text('{"audio": {"sample_rate": 16000}, "phoneme_id_map": '
                       '{"_": [0], "^": [1], "$": [2]}}')  # fmt: skip
    config = PiperConfig.read(minimal)
    assert (config.phoneme_type, config.length_scale, config.num_speakers) == ("espeak", 1.0, 1)


def test_missing_json_names_the_json(onnx_path: Path, tmp_path: Path) -> None:
    lonely = tmp_path / VOICE
    lonely.symlink_to(onnx_path)
    assert not is_voice(lonely) and not is_voice(tmp_path)
    with pytest.raises(ModelLoadError, match=r"needs its \.onnx\.json") as e:
        read_piper_voice(lonely)
    assert e.value.path == str(config_path(lonely))


def test_truncated_onnx_names_the_file(onnx_path: Path, tmp_path: Path) -> None:
    path = tmp_path / VOICE
    path.write_bytes(onnx_path.read_bytes()[: 1 << 20])
    shutil.copy(config_path(onnx_path), config_path(path))
    assert is_voice(path)  # names only: the check is cheap
    with pytest.raises(ModelLoadError, match="not an ONNX model") as e:
        load_voice(path)
    assert e.value.path == str(path)


@pytest.mark.parametrize(
    ("name", "replacement", "message"),
    [
        ("dec.conv_post.weight", np.zeros((1, 32, 5), np.float32), r"has shape \[1, 32, 5\]"),
        ("enc_p.proj.bias", None, "is missing"),  # None: the tensor is removed
    ],
)
def test_a_bad_tensor_is_named_with_the_file(
    graph: onnx.ModelProto,
    onnx_path: Path,
    tmp_path: Path,
    name: str,
    replacement: np.ndarray | None,
    message: str,
) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    [tensor] = [t for t in model.graph.initializer if t.name == name]
    if replacement is None:
        model.graph.initializer.remove(tensor)
    else:
        tensor.CopyFrom(numpy_helper.from_array(replacement, name))
    path = tmp_path / VOICE
    onnx.save(model, str(path))
    shutil.copy(config_path(onnx_path), config_path(path))
    with pytest.raises(ModelLoadError, match=f"tensor {re.escape(name)} {message}") as e:
        load_voice(path)
    assert e.value.path == str(path)


def test_a_folder_must_hold_one_voice(onnx_path: Path, tmp_path: Path) -> None:
    for name in ("a.onnx", "b.onnx"):
        (tmp_path / name).symlink_to(onnx_path)
        shutil.copy(config_path(onnx_path), config_path(tmp_path / name))
    assert not is_voice(tmp_path)
    with pytest.raises(ModelLoadError, match=r"holds 2 \.onnx files") as e:
        load_voice(tmp_path)
    assert e.value.path == str(tmp_path)


def test_voices_run_in_float32_only(onnx_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="float32") as e:
        load_voice(onnx_path, torch.bfloat16)
    assert e.value.param == "dtype"
