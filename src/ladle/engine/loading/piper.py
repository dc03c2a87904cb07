"""Piper voices: VITS exported to ONNX (`<name>.onnx`) and Piper's config beside it
(`<name>.onnx.json`), read into ladle's PyTorch `VitsModel`.

The ONNX file is only a container of weights here. Most initializers carry their PyTorch names;
the others are named after the node that consumes them: the exporter folds weight norm into
anonymous constants (`onnx::Conv_8168` feeds `/flow/flows.6/enc/in_layers.0/Conv`, hence
`flow.flows.6.enc.in_layers.0.weight`), names the phoneme embedding after an input (`sid`, fed
to `/enc_p/emb/Gather`), and folds the duration flow's `exp(-logs)`. Hyperparameters come from
tensor shapes and convolution attributes (dilations, strides), so Piper's x_low to high
qualities and multi-speaker voices load without a table of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ladle.engine.models.vits import VitsConfig, VitsModel
from ladle.engine.phonemes import BOS, EOS, PAD
from ladle.errors import ModelLoadError

PHONEME_TYPES = ("espeak", "text")  # espeak-ng's IPA, or the text's own characters
_WEIGHT_OPS = ("Conv", "ConvTranspose")


@dataclass(frozen=True, slots=True)
class PiperConfig:
    """What Piper's `.onnx.json` says about a voice; defaults are Piper's own."""

    sample_rate: int
    phoneme_id_map: dict[str, list[int]]
    phoneme_type: str = "espeak"
    espeak_voice: str = "en-us"
    phoneme_map: dict[str, list[str]] | None = None  # phoneme -> phonemes, before the ids
    noise_scale: float = 0.667
    length_scale: float = 1.0
    noise_w: float = 0.8
    num_speakers: int = 1
    speaker_id_map: dict[str, int] | None = None

    @classmethod
    def read(cls, path: Path) -> PiperConfig:
        """Parse `path`; `ModelLoadError` names it if it is missing or not a Piper config."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ModelLoadError(path, "missing: a Piper voice needs its .onnx.json") from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(path, f"not a readable JSON file ({e})") from e
        try:
            config = cls._from_dict(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelLoadError(path, f"not a Piper voice config ({e!r})") from e
        if config.phoneme_type not in PHONEME_TYPES:
            raise ModelLoadError(path, f"phoneme_type {config.phoneme_type!r} is not supported")
        if missing := [p for p in (PAD, BOS, EOS) if p not in config.phoneme_id_map]:
            raise ModelLoadError(path, f"phoneme_id_map lacks {missing}")
        return config

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> PiperConfig:
        inference = raw.get("inference", {})
        values = {
            "sample_rate": int(raw["audio"]["sample_rate"]),
            "phoneme_id_map": {k: [int(i) for i in v] for k, v in raw["phoneme_id_map"].items()},
            "phoneme_type": raw.get("phoneme_type"),
            "espeak_voice": raw.get("espeak", {}).get("voice"),
            "phoneme_map": raw.get("phoneme_map") or None,
            "noise_scale": inference.get("noise_scale"),
            "length_scale": inference.get("length_scale"),
            "noise_w": inference.get("noise_w"),
            "num_speakers": raw.get("num_speakers"),
            "speaker_id_map": raw.get("speaker_id_map") or None,
        }
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names and v is not None})


def config_path(onnx_path: Path) -> Path:
    """Where Piper keeps a voice's config: `voice.onnx` -> `voice.onnx.json`."""
    return onnx_path.with_name(onnx_path.name + ".json")


def read_piper_voice(path: Path) -> tuple[VitsModel, PiperConfig]:
    """The model (float32) and config of the voice whose `.onnx` file is `path`.

    Raises `ModelLoadError` naming the file that is missing, unreadable or not a Piper VITS
    voice (a missing or misshapen tensor is named too).
    """
    if not path.is_file():
        raise ModelLoadError(path, "no such file")
    config = PiperConfig.read(config_path(path))
    weights = OnnxWeights.read(path)
    model = weights.model()
    if model.config.num_speakers != config.num_speakers:
        reason = f"{model.config.num_speakers} speakers, its config says {config.num_speakers}"
        raise ModelLoadError(path, reason)
    top = max(i for ids in config.phoneme_id_map.values() for i in ids)
    if top >= model.config.num_symbols:
        raise ModelLoadError(
            path, f"phoneme id {top} is past the {model.config.num_symbols} the model embeds"
        )
    return model, config


class OnnxWeights:
    """A Piper ONNX file's tensors by PyTorch name, and its convolutions' attributes."""

    def __init__(
        self, path: Path, tensors: dict[str, np.ndarray], attrs: dict[str, dict[str, list[int]]]
    ) -> None:
        self.path = path
        self.tensors = tensors
        self.attrs = attrs  # module name -> ONNX Conv attributes (dilations, strides, ...)

    @classmethod
    def read(cls, path: Path) -> OnnxWeights:
        try:
            import onnx
            from google.protobuf.message import Error as ProtobufError
            from onnx import numpy_helper
        except ImportError as e:
            raise ModelLoadError(path, "Piper voices need onnx: pip install 'ladle[audio]'") from e
        try:
            graph = onnx.load(str(path)).graph
        except (OSError, ProtobufError, ValueError) as e:
            raise ModelLoadError(path, f"not an ONNX model, or truncated ({e})") from e
        arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        tensors, attrs = _by_module(graph.node, arrays)
        if not tensors:
            raise ModelLoadError(path, "holds no named weights: not a Piper VITS voice")
        return cls(path, tensors, attrs)

    def tensor(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise ModelLoadError(self.path, f"tensor {name} is missing: not a Piper VITS voice")
        return self.tensors[name]

    def count(self, pattern: str) -> int:
        """How many distinct indices `(\\d+)` in `pattern` name a tensor."""
        regex = re.compile(pattern)
        return len({m.group(1) for n in self.tensors if (m := regex.fullmatch(n))})

    def attr(self, module: str, name: str) -> int:
        if module not in self.attrs:
            raise ModelLoadError(self.path, f"no convolution {module}: not a Piper VITS voice")
        return self.attrs[module].get(name, [1])[0]

    def config(self) -> VitsConfig:
        """The hyperparameters these tensors were trained with."""
        hidden = self.tensor("enc_p.emb.weight").shape
        rel = self.tensor("enc_p.encoder.attn_layers.0.emb_rel_k").shape  # [1, 2w+1, head_dim]
        ffn = self.tensor("enc_p.encoder.ffn_layers.0.conv_1.weight").shape
        dp_sep = self.tensor("dp.convs.convs_sep.0.weight").shape
        wn = self.tensor("flow.flows.0.enc.in_layers.0.weight").shape
        num_ups = self.count(r"dec\.ups\.(\d+)\.weight")
        num_kernels = self.count(r"dec\.resblocks\.(\d+)\..*") // max(num_ups, 1)
        version = "1" if "dec.resblocks.0.convs1.0.weight" in self.tensors else "2"
        convs = "convs1" if version == "1" else "convs"
        speakers = self.tensors.get("emb_g.weight")
        return VitsConfig(
            num_symbols=hidden[0],
            hidden_channels=hidden[1],
            inter_channels=self.tensor("enc_p.proj.weight").shape[0] // 2,
            filter_channels=ffn[0],
            num_heads=hidden[1] // rel[2],
            num_layers=self.count(r"enc_p\.encoder\.attn_layers\.(\d+)\.conv_q\.weight"),
            ffn_kernel_size=ffn[2],
            window_size=(rel[1] - 1) // 2,
            dp_filter_channels=self.tensor("dp.pre.weight").shape[0],
            dp_kernel_size=dp_sep[2],
            dp_num_layers=self.count(r"dp\.convs\.convs_sep\.(\d+)\.weight"),
            dp_num_flows=self.count(r"dp\.flows\.(\d+)\.pre\.weight") + 1,  # + the skipped one
            num_bins=(self.tensor("dp.flows.3.proj.weight").shape[0] + 1) // 3,
            flow_num_flows=self.count(r"flow\.flows\.(\d+)\.pre\.weight"),
            flow_num_layers=self.count(r"flow\.flows\.0\.enc\.in_layers\.(\d+)\.weight"),
            flow_kernel_size=wn[2],
            flow_dilation_rate=self.attr("flow.flows.0.enc.in_layers.1", "dilations")
            if "flow.flows.0.enc.in_layers.1" in self.attrs
            else 1,
            resblock=version,
            resblock_kernel_sizes=tuple(
                self.tensor(f"dec.resblocks.{j}.{convs}.0.weight").shape[2]
                for j in range(num_kernels)
            ),
            resblock_dilation_sizes=tuple(
                tuple(
                    self.attr(f"dec.resblocks.{j}.{convs}.{i}", "dilations")
                    for i in range(self.count(rf"dec\.resblocks\.{j}\.{convs}\.(\d+)\.weight"))
                )
                for j in range(num_kernels)
            ),
            upsample_rates=tuple(self.attr(f"dec.ups.{i}", "strides") for i in range(num_ups)),
            upsample_initial_channel=self.tensor("dec.conv_pre.weight").shape[0],
            upsample_kernel_sizes=tuple(
                self.tensor(f"dec.ups.{i}.weight").shape[2] for i in range(num_ups)
            ),
            num_speakers=speakers.shape[0] if speakers is not None else 1,
            gin_channels=speakers.shape[1] if speakers is not None else 0,
        )

    def model(self) -> VitsModel:
        """A float32 `VitsModel` holding these weights, folded for inference."""
        try:
            model = VitsModel(self.config())
        except (ValueError, IndexError) as e:  # shapes no VITS has
            raise ModelLoadError(self.path, f"not a Piper VITS voice ({e})") from e
        state = {}
        for name, expected in model.state_dict().items():
            array = self.tensor(name)
            if tuple(array.shape) != tuple(expected.shape):
                reason = (
                    f"tensor {name} has shape {list(array.shape)}, expected {list(expected.shape)}"
                )
                raise ModelLoadError(self.path, reason)
            state[name] = torch.from_numpy(array.astype(np.float32))  # a copy: ONNX's are read-only
        model.load_state_dict(state, assign=True)
        model.fold()
        return model.eval()


def _by_module(
    nodes: Iterable[Any], arrays: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, list[int]]]]:
    """The initializers `arrays` under their PyTorch names, and each convolution's attributes.

    A node named `/dec/ups.0/ConvTranspose` belongs to module `dec.ups.0`, so its weight and
    bias inputs are `dec.ups.0.weight` and `dec.ups.0.bias`, whatever the initializers are
    called; the same goes for an embedding's `Gather`.
    """
    tensors = {name: array for name, array in arrays.items() if _is_module_path(name)}
    attrs: dict[str, dict[str, list[int]]] = {}
    for node in nodes:
        module = ".".join(node.name.strip("/").split("/")[:-1])
        inputs = list(node.input)
        if node.op_type in _WEIGHT_OPS and len(inputs) > 1 and inputs[1] in arrays:
            for param, name in zip(("weight", "bias"), inputs[1:], strict=False):
                if name in arrays:
                    tensors[f"{module}.{param}"] = arrays[name]
            attrs[module] = {a.name: list(a.ints) for a in node.attribute if a.ints}
        elif node.op_type == "Gather" and inputs[0] in arrays:  # an embedding table
            tensors[f"{module}.weight"] = arrays[inputs[0]]
        elif module == "dp.flows.0":  # a tensor named in the file wins over a derived one
            tensors = (
                _affine_logs(node.op_type, [arrays[i] for i in inputs if i in arrays]) | tensors
            )
    return tensors, attrs


def _affine_logs(op_type: str, constants: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The duration flows' `ElementwiseAffine.logs`, from the constant that its reverse pass
    uses, `exp(-logs)`: exporters fold all of it (a `Mul` by the constant) or only the
    negation (an `Exp` of it). Empty if this node is neither."""
    pairs = [c for c in constants if c.shape == (2, 1)]  # the flow's two channels
    if op_type == "Mul" and pairs:
        return {"dp.flows.0.logs": -np.log(pairs[0])}
    if op_type == "Exp" and pairs:
        return {"dp.flows.0.logs": -pairs[0]}
    return {}


def _is_module_path(name: str) -> bool:
    """`dec.ups.0.weight`, not `onnx::Conv_8168` nor `/dp/flows.0/Exp_output_0`."""
    return bool(re.fullmatch(r"[A-Za-z_]\w*(\.\w+)+", name))
