"""The shape of a model, read from a Hugging Face `config.json` or from GGUF metadata.

Both readers end in the same `ModelConfig`, named with Hugging Face's field names, so an
architecture is written once against one config whatever file it was loaded from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

from ladle.engine.layers.rotary import rotary_dim
from ladle.engine.loading.gguf import GGUFFile
from ladle.errors import ModelLoadError, UnsupportedArchitectureError

# Hugging Face `model_type`s whose config this module reads (the models registry implements them).
SUPPORTED_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
)
# GGUF `general.architecture` -> Hugging Face `model_type`, as transformers maps them.
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
_GEMMA = ("gemma", "gemma2", "gemma3", "gemma3_text")
# Keys each RoPE scaling type needs (`original_max_position_embeddings` is filled in if absent).
_ROPE_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "longrope": ("short_factor", "long_factor"),
    "freq_factors": ("factors",),  # GGUF's `rope_freqs` tensor: inv_freq = default / factors
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
_OPTIONAL_COUNTS = ("num_key_value_heads", "head_dim", "original_max_position_embeddings")
_NUMBERS = ("rms_norm_eps", "rope_theta", "partial_rotary_factor")
_OPTIONAL_NUMBERS = (
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "rope_local_base_freq",
)
_ROPE_POSITIVE = ("factor", "low_freq_factor", "high_freq_factor", "attention_factor")
_ROPE_NUMBERS = ("mscale", "mscale_all_dim", "beta_fast", "beta_slow")  # 0: not set
_ROPE_LISTS = ("short_factor", "long_factor", "factors")
# Far above any model (Llama 3.1 405B has 126), and a bound on the per-layer lists built here
# from a number the file merely states.
MAX_LAYERS = 1 << 16


def is_count(value: object) -> bool:
    """A positive int; JSON's and GGUF's booleans are ints to Python, and count as none."""
    return is_index(value) and value != 0


def is_index(value: object) -> bool:
    """An int from 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(slots=True)
class ModelConfig:
    """Hyperparameters of one decoder-only model, with Hugging Face's names and meanings.

    `layer_types` is always a list after construction (every layer "full_attention" unless a
    sliding window applies); `rope_scaling` is None for plain RoPE, else a dict with
    `rope_type` and that type's keys, as in transformers' `rope_parameters`.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 2048
    original_max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None
    rope_local_base_freq: float | None = None
    torch_dtype: str | None = None
    path: str = ""  # the file or folder it came from, for error messages

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                self.path or "config",
                f"architecture '{self.architecture}' is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
            )
        self._check_types()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            self._fail(
                "num_key_value_heads",
                f"{self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}",
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                self._fail("head_dim", "missing, and hidden_size is not a multiple of the heads")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act not in ACTIVATIONS:
            self._fail("hidden_act", f"'{self.hidden_act}' is not supported ({ACTIVATIONS})")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            self._fail(
                "partial_rotary_factor", f"must be in (0, 1], got {self.partial_rotary_factor}"
            )
        if not self.sliding_window:  # GGUF writes 0 for "none"
            self.sliding_window = None
        self._complete_layer_types()
        self._complete_rope_scaling()

    def _fail(self, field: str, reason: str) -> NoReturn:
        raise ModelLoadError(self.path or "config", f"{field}: {reason}")

    def _check_types(self) -> None:
        """Every field holds what its annotation says: a config file may hold anything."""
        for name in (*_REQUIRED, "num_attention_heads", "max_position_embeddings"):
            if not is_count(getattr(self, name)):
                self._fail(name, f"must be a positive integer, got {getattr(self, name)!r}")
        for name in _OPTIONAL_COUNTS:
            if getattr(self, name) is not None and not is_count(getattr(self, name)):
                self._fail(name, f"must be a positive integer, got {getattr(self, name)!r}")
        if self.num_hidden_layers > MAX_LAYERS:
            self._fail("num_hidden_layers", f"{self.num_hidden_layers} is over {MAX_LAYERS}")
        for name in (*_NUMBERS, *_OPTIONAL_NUMBERS):
            value = getattr(self, name)
            if not is_number(value) and (value is not None or name in _NUMBERS):
                self._fail(name, f"must be a number, got {value!r}")
        if self.sliding_window is not None and not is_index(self.sliding_window):
            self._fail("sliding_window", f"must be an integer from 0, got {self.sliding_window!r}")

    def _complete_layer_types(self) -> None:
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if not isinstance(self.layer_types, list):
            self._fail("layer_types", f"must be a list, got {self.layer_types!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            self._fail(
                "layer_types",
                f"{len(self.layer_types)} entries for {self.num_hidden_layers} layers",
            )
        if any(t not in LAYER_TYPES for t in self.layer_types):
            self._fail("layer_types", f"entries must be one of {LAYER_TYPES}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            self._fail("sliding_window", "sliding_attention layers need a sliding_window")

    def _complete_rope_scaling(self) -> None:
        if not self.rope_scaling:
            self.rope_scaling = None
            return
        if not isinstance(self.rope_scaling, dict):
            self._fail("rope_scaling", f"must be a mapping, got {self.rope_scaling!r}")
        scaling = dict(self.rope_scaling)
        rope_type = scaling.pop("type", None) or scaling.get("rope_type") or "default"
        if not isinstance(rope_type, str):
            self._fail("rope_scaling", f"rope type {rope_type!r} is not a name")
        if self.architecture == "phi3" and rope_type in ("su", "yarn"):
            rope_type = "longrope"  # Phi-3's own names for it, as transformers reads them
        if rope_type == "default":
            self.rope_scaling = None
            return
        if rope_type not in _ROPE_KEYS:
            self._fail("rope_scaling", f"rope type '{rope_type}' is not supported")
        missing = [k for k in _ROPE_KEYS[rope_type] if scaling.get(k) is None]
        if missing:
            self._fail("rope_scaling", f"'{rope_type}' needs {', '.join(missing)}")
        scaling["rope_type"] = rope_type
        for key in (*_ROPE_POSITIVE, *_ROPE_NUMBERS):
            value = scaling.get(key)
            if value is None:
                continue
            if not is_number(value) or value < 0 or (value == 0 and key in _ROPE_POSITIVE):
                self._fail("rope_scaling", f"{key} must be a positive number, got {value!r}")
        assert self.head_dim is not None
        half = rotary_dim(self.head_dim, self.partial_rotary_factor) // 2
        for key in _ROPE_LISTS:
            factors = scaling.get(key)
            if factors is not None and not (
                isinstance(factors, list) and all(map(is_number, factors))
            ):
                self._fail("rope_scaling", f"{key} must be a list of numbers")
            if factors is not None and len(factors) != half:
                self._fail("rope_scaling", f"{key} has {len(factors)} entries, not {half}")
        # A top-level value wins, as in transformers (Phi-3 keeps it outside the rope dict).
        original = self.original_max_position_embeddings or scaling.get(
            "original_max_position_embeddings", self.max_position_embeddings
        )
        if not is_count(original):
            self._fail("rope_scaling", f"original_max_position_embeddings is {original!r}")
        scaling["original_max_position_embeddings"] = original
        self.original_max_position_embeddings = original
        self.rope_scaling = scaling

    @classmethod
    def from_hf(cls, config: dict[str, Any], path: object = "") -> ModelConfig:
        """Read a Hugging Face `config.json` dict (transformers 4.x or 5.x layout).

        The file is untrusted: a value of the wrong type anywhere in it is a `ModelLoadError`.
        """
        if not isinstance(config, dict):
            raise ModelLoadError(path, "config.json does not hold a JSON object")
        try:
            return cls._from_hf(config, path)
        except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
            raise ModelLoadError(path, f"malformed config.json ({e})") from e

    @classmethod
    def _from_hf(cls, config: dict[str, Any], path: object) -> ModelConfig:
        if config.get("text_config"):  # multimodal wrappers (gemma3) keep the decoder inside
            config = {**config, **config["text_config"], "model_type": config.get("model_type")}
        arch = config.get("model_type")
        if not arch:
            raise ModelLoadError(path, "model_type: missing from config.json")
        for name in (*_REQUIRED, "num_attention_heads"):
            if config.get(name) is None:
                raise ModelLoadError(path, f"{name}: missing from config.json")
        _check_layer_count(config["num_hidden_layers"], path)  # before lists are built per layer
        theta, scaling, local_theta, partial = _hf_rope(config)
        sliding_window = config.get("sliding_window")
        if not config.get("use_sliding_window", True):  # qwen2/qwen3 keep a window they disable
            sliding_window = None
        is_gemma = arch in _GEMMA
        return cls(
            architecture=arch,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config.get("num_key_value_heads"),
            head_dim=config.get("head_dim"),
            # Gemma runs tanh-GELU whatever `hidden_act` says (transformers reads
            # `hidden_activation`).
            hidden_act=(config.get("hidden_activation") or "gelu_pytorch_tanh")
            if is_gemma
            else config.get("hidden_act", "silu"),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            partial_rotary_factor=partial,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            original_max_position_embeddings=config.get("original_max_position_embeddings"),
            tie_word_embeddings=config.get("tie_word_embeddings", is_gemma),
            attention_bias=config.get("attention_bias", False),
            sliding_window=sliding_window,
            layer_types=config.get("layer_types") or _hf_layer_types(config, sliding_window),
            attn_logit_softcapping=config.get("attn_logit_softcapping"),
            final_logit_softcapping=config.get("final_logit_softcapping"),
            query_pre_attn_scalar=config.get("query_pre_attn_scalar"),
            rope_local_base_freq=local_theta,
            torch_dtype=config.get("dtype") or config.get("torch_dtype"),
            path=str(path),
        )

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> ModelConfig:
        """Read GGUF metadata (`<arch>.block_count`, ...) the way llama.cpp interprets it."""
        gguf_arch = gguf.architecture
        if gguf_arch not in GGUF_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                gguf.path,
                f"architecture '{gguf_arch}' is not supported "
                f"(supported: {', '.join(GGUF_ARCHITECTURES)})",
            )
        arch = GGUF_ARCHITECTURES[gguf_arch]
        required = {}
        for key in (
            "block_count",
            "embedding_length",
            "feed_forward_length",
            "attention.head_count",
            "attention.layer_norm_rms_epsilon",
        ):
            if gguf.get(key) is None:
                raise ModelLoadError(gguf.path, f"{gguf_arch}.{key}: missing from the metadata")
            required[key] = gguf.get(key)
        # checked here: the arithmetic below comes before the config checks its fields
        num_layers, hidden = _gguf_count(gguf, "block_count"), _gguf_count(gguf, "embedding_length")
        num_heads = _gguf_count(gguf, "attention.head_count")
        _check_layer_count(num_layers, gguf.path)
        head_dim = _gguf_count(gguf, "attention.key_length") or hidden // num_heads
        if not head_dim:
            raise ModelLoadError(gguf.path, f"{gguf_arch}.embedding_length: fewer than the heads")
        rope_dims = _gguf_count(gguf, "rope.dimension_count") or head_dim
        sliding_window = gguf.get("attention.sliding_window") or None
        return cls(
            architecture=arch,
            vocab_size=_gguf_vocab_size(gguf),
            hidden_size=hidden,
            intermediate_size=required["feed_forward_length"],
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=gguf.get("attention.head_count_kv"),
            head_dim=head_dim,
            hidden_act="gelu_pytorch_tanh" if arch in _GEMMA else "silu",
            rms_norm_eps=required["attention.layer_norm_rms_epsilon"],
            rope_theta=gguf.get("rope.freq_base", 10000.0),
            rope_scaling=_gguf_rope_scaling(gguf),
            partial_rotary_factor=rope_dims / head_dim,
            max_position_embeddings=gguf.get("context_length", 2048),
            original_max_position_embeddings=gguf.get("rope.scaling.original_context_length"),
            tie_word_embeddings="output.weight" not in gguf.tensors,
            attention_bias="blk.0.attn_q.bias" in gguf.tensors,
            sliding_window=sliding_window,
            layer_types=_gguf_layer_types(arch, num_layers, sliding_window),
            attn_logit_softcapping=gguf.get("attn_logit_softcapping"),
            final_logit_softcapping=gguf.get("final_logit_softcapping"),
            query_pre_attn_scalar=_gguf_query_pre_attn_scalar(
                arch, num_layers, hidden, num_heads, head_dim
            ),
            # llama.cpp hard-codes Gemma 3's local RoPE base; GGUF stores only the global one.
            rope_local_base_freq=10000.0 if arch == "gemma3_text" else None,
            path=str(gguf.path),
        )


def _hf_rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float | None, float]:
    """RoPE base, scaling, local base and rotary fraction from either config layout.

    transformers 5 writes one `rope_parameters` dict (or one per layer type, as gemma3 does);
    4.x wrote `rope_theta`, `rope_scaling`, `rope_local_base_freq` and `partial_rotary_factor`.
    """
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    local_theta = config.get("rope_local_base_freq")
    if "full_attention" in params:
        local_theta = (params.get("sliding_attention") or {}).get("rope_theta", local_theta)
        params = params["full_attention"] or {}
    scaling = dict(params)
    theta = scaling.pop("rope_theta", None) or config.get("rope_theta", 10000.0)
    partial = scaling.pop("partial_rotary_factor", None) or config.get("partial_rotary_factor")
    return float(theta), scaling or None, local_theta, float(partial or 1.0)


def _hf_layer_types(config: dict[str, Any], sliding_window: int | None) -> list[str] | None:
    """Which layers slide, for configs written before transformers stored `layer_types`."""
    if not sliding_window:
        return None
    num_layers, arch = config["num_hidden_layers"], config["model_type"]
    if arch == "gemma2":
        return _every_nth_global(num_layers, 2)
    if arch in ("gemma3", "gemma3_text"):
        return _every_nth_global(num_layers, config.get("sliding_window_pattern", 6))
    if "max_window_layers" in config:  # qwen2/qwen3: layers from max_window_layers on slide
        first = config["max_window_layers"]
        return ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    return None


def _every_nth_global(num_layers: int, n: int) -> list[str]:
    return [
        "full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(num_layers)
    ]


def _check_layer_count(value: Any, path: object) -> None:
    if not is_count(value) or value > MAX_LAYERS:
        raise ModelLoadError(path, f"num_hidden_layers: {value!r} is not 1 to {MAX_LAYERS}")


def _gguf_count(gguf: GGUFFile, key: str) -> Any:
    """`<arch>.<key>`, a positive integer if present."""
    value = gguf.get(key)
    if value is not None and not is_count(value):
        raise ModelLoadError(
            gguf.path, f"{gguf.architecture}.{key}: must be a positive integer, got {value!r}"
        )
    return value


def _gguf_vocab_size(gguf: GGUFFile) -> Any:
    size = gguf.get("vocab_size")
    if size is None:
        tokens = gguf.metadata.get("tokenizer.ggml.tokens")
        if not tokens or not isinstance(tokens, list):
            raise ModelLoadError(
                gguf.path, "vocab_size: no vocab_size and no tokenizer.ggml.tokens"
            )
        size = len(tokens)
    return size  # checked by the config


def _gguf_rope_scaling(gguf: GGUFFile) -> dict[str, Any] | None:
    """RoPE scaling from `rope.scaling.*` keys and the rope factor tensors llama.cpp writes."""
    if "rope_factors_long.weight" in gguf.tensors:  # Phi-3 128k: LongRoPE
        scaling = {
            "rope_type": "longrope",
            "long_factor": _factors(gguf, "rope_factors_long.weight"),
            "short_factor": _factors(gguf, "rope_factors_short.weight"),
        }
        attention_factor = gguf.get("rope.scaling.attn_factor")
        if attention_factor is not None:
            scaling["attention_factor"] = attention_factor
        return scaling
    if "rope_freqs.weight" in gguf.tensors:  # Llama 3.1+: the llama3 factors, precomputed
        return {"rope_type": "freq_factors", "factors": _factors(gguf, "rope_freqs.weight")}
    rope_type = gguf.get("rope.scaling.type")
    if rope_type in (None, "none"):
        return None
    scaling = {"rope_type": rope_type, "factor": gguf.get("rope.scaling.factor")}
    for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if gguf.get(f"rope.scaling.{key}") is not None:
            scaling[name] = gguf.get(f"rope.scaling.{key}")
    return scaling


def _factors(gguf: GGUFFile, name: str) -> list[float]:
    if name not in gguf.tensors:
        raise ModelLoadError(gguf.path, f"{name}: missing (its rope factor twin is present)")
    return gguf.tensors[name].dequantize().tolist()


def _gguf_layer_types(arch: str, num_layers: int, sliding_window: int | None) -> list[str] | None:
    if not sliding_window:
        return None
    if arch == "gemma2":  # llama.cpp: swa pattern 2 (even layers slide)
        return _every_nth_global(num_layers, 2)
    if arch == "gemma3_text":  # llama.cpp: swa pattern 6 (every 6th layer is global)
        return _every_nth_global(num_layers, 6)
    return None


def _gguf_query_pre_attn_scalar(
    arch: str, num_layers: int, hidden: int, num_heads: int, head_dim: int
) -> float | None:
    """Gemma 2/3 scale queries by 1/sqrt(head_dim), except the 27B models (llama.cpp's rule)."""
    if arch not in ("gemma2", "gemma3_text"):
        return None
    is_27b = num_layers == (46 if arch == "gemma2" else 62)
    return float(hidden // num_heads if is_27b else head_dim)
