"""`ladle quantize FOLDER`: tiny random Llama / Qwen2 / Qwen3 folders with SmolLM2's real
tokenizer, written as GGUF and read back by ladle and by transformers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType
from safetensors.torch import load_file
from tokenizers import Regex, pre_tokenizers
from tokenizers import Tokenizer as Backend
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ladle import EmbeddingModelBuilder, GgufModelBuilder, TextModelBuilder
from ladle.cli import main
from ladle.engine.loading.config import ModelConfig
from ladle.engine.loading.gguf import read_gguf
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.engine.loading.weights import gguf_weights
from ladle.engine.quant.ggml import GGMLTensor
from ladle.engine.quant.ggml_quantize import quantize

T = GGMLQuantizationType
TEXT = "The quick brown fox jumps over 1234 lazy dogs. It was a sunny day in Paris, and"
# Qwen2's own split (transformers' PRETOKENIZE_REGEX): its digits one by one
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SHAPE = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def tokenizer_folder(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer and chat template, as transformers saves them from its GGUF."""
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    tokenizer.save_pretrained(folder)
    return folder


def build(config: PretrainedConfig, cls: type[PreTrainedModel]) -> PreTrainedModel:
    """Random weights scaled so that logits are O(1)-O(10) and every path moves them."""
    torch.manual_seed(0)
    model = cls(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif "embed" in name:
                param.copy_(noise)
            else:
                param.copy_(noise * param.shape[-1] ** -0.5)
    return model


def make_folder(
    root: Path, tokenizer_folder: Path, config: PretrainedConfig, cls: type[PreTrainedModel]
) -> Path:
    folder = root / config.model_type
    shutil.copytree(tokenizer_folder, folder)
    build(config, cls).save_pretrained(folder)
    return folder


def quantize_folder(folder: Path, isq_type: str) -> Path:
    """`ladle quantize` into the folder, once per type (the folders are this run's own)."""
    out = folder / f"model-{isq_type}.gguf"
    if not out.exists():
        assert main(["quantize", str(folder), "--type", isq_type, "--out", str(out)]) == 0
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def llama(tokenizer_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tied-embedding Llama (the output head is token_embd)."""
    config = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, **SHAPE)
    return make_folder(tmp_path_factory.mktemp("hf"), tokenizer_folder, config, LlamaForCausalLM)


@pytest.fixture(scope="module")
def qwen2(tokenizer_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untied Qwen2 (q/k/v biases) whose tokenizer splits text as Qwen2's does."""
    config = Qwen2Config(vocab_size=49152, tie_word_embeddings=False, **SHAPE)
    folder = make_folder(tmp_path_factory.mktemp("hf"), tokenizer_folder, config, Qwen2ForCausalLM)
    tokenizer = Backend.from_file(str(folder / "tokenizer.json"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def folder_logits(llama: Path, qwen2: Path) -> Iterator[dict[str, tuple[list[int], torch.Tensor]]]:
    """ladle's logits for TEXT on each folder, the reference the GGUFs are held to."""
    found = {}
    for folder in (llama, qwen2):
        with TextModelBuilder(folder).build() as model:
            ids = model.tokenize(TEXT)
            found[folder.name] = ids, model.logits_for(ids)
    yield found


# isq type -> (attn_q's type, the tied head's type). ladle's GGUF logits are held to ladle's
# on the folder (quantization noise: measured 0.08% F16, 1.8% Q8_0, 13-16% Q4K on these
# random models) and to transformers' on the same file (what the file means: measured 0.06%
# F16, 0.5% Q4K on ladle's int4 kernel; 1.2% Q8_0, whose int8 kernel quantizes activations).
TYPES = {"F16": (T.F16, T.F16), "Q8_0": (T.Q8_0, T.Q8_0), "Q4K": (T.Q4_K, T.Q6_K)}
FOLDER_BOUND = {"F16": 0.005, "Q8_0": 0.04, "Q4K": 0.25}
SAME_FILE_BOUND = {"F16": 0.003, "Q4K": 0.02}


@pytest.mark.parametrize("isq_type", list(TYPES))
@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_gguf_matches_the_folder_in_ladle_and_transformers(
    which: str,
    isq_type: str,
    llama: Path,
    qwen2: Path,
    folder_logits: dict[str, tuple[list[int], torch.Tensor]],
) -> None:
    folder = {"llama": llama, "qwen2": qwen2}[which]
    out = quantize_folder(folder, isq_type)
    gguf = read_gguf(out)
    q_type, head_type = TYPES[isq_type]
    assert gguf.architecture == which
    assert gguf.metadata["tokenizer.ggml.pre"] == {"llama": "gpt-2", "qwen2": "qwen2"}[which]
    assert gguf.tensors["blk.0.attn_q.weight"].ggml_type == q_type
    assert gguf.tensors["blk.0.attn_norm.weight"].ggml_type == T.F32
    if which == "llama":  # tied: token_embd is the head, and no output tensor is written
        assert gguf.tensors["token_embd.weight"].ggml_type == head_type
        assert "output.weight" not in gguf.tensors
    else:  # untied: output gets the head's type, token_embd the ISQ type, as llama-quantize
        assert gguf.tensors["output.weight"].ggml_type == head_type
        assert gguf.tensors["token_embd.weight"].ggml_type == q_type
        assert gguf.tensors["blk.0.attn_q.bias"].ggml_type == T.F32
    ids, want = folder_logits[which]
    with GgufModelBuilder(out).build() as model:
        assert model.tokenize(TEXT) == ids
        got = model.logits_for(ids)
    assert relative(got, want) < FOLDER_BOUND[isq_type]
    if isq_type == "Q8_0":
        return  # transformers reads a file in ~9 s (GGUFReader on a 49k vocabulary): F16 and
        # Q4K show what the file means; the Q8_0 blocks are checked against gguf's decoder
    with torch.inference_mode():
        reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=out.name).eval()
        same_file = reference(torch.tensor([ids])).logits[0]
        if isq_type == "F16":  # transformers reads the F16 file as the folder's model
            original = AutoModelForCausalLM.from_pretrained(folder).eval()
            assert relative(same_file, original(torch.tensor([ids])).logits[0]) < 0.002
    assert relative(got, same_file) < SAME_FILE_BOUND[isq_type]


def test_llama_q_and_k_rows_are_permuted_as_llama_cpp_does(llama: Path) -> None:
    """The file holds llama.cpp's interleaved q/k rows (`LlamaModel.permute`), byte for byte
    what quantizing the permuted weight gives, and ladle's loader undoes it exactly."""
    out = quantize_folder(llama, "Q8_0")
    gguf = read_gguf(out)
    source = load_file(str(llama / "model.safetensors"))
    for name, heads in (("q_proj", 4), ("k_proj", 2)):
        weight = source[f"model.layers.1.self_attn.{name}.weight"]
        permuted = weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2)
        written = gguf.tensors[f"blk.1.attn_{name[0]}.weight"]
        expected = quantize(permuted.reshape(weight.shape), T.Q8_0)
        assert (written.data == expected.data).all()
    loaded = dict(gguf_weights(gguf, ModelConfig.from_gguf(gguf)))
    q = loaded["model.layers.1.self_attn.q_proj.weight"]
    assert isinstance(q, GGMLTensor)
    unpermuted = q.dequantize()
    want = quantize(source["model.layers.1.self_attn.q_proj.weight"], T.Q8_0).dequantize()
    assert torch.equal(unpermuted, want)


def test_llama_metadata_is_llama_cpps(llama: Path) -> None:
    gguf = read_gguf(quantize_folder(llama, "Q8_0"))
    config = json.loads((llama / "config.json").read_text())
    m = gguf.metadata
    assert m["general.file_type"] == 7  # MOSTLY_Q8_0
    assert (m["llama.block_count"], m["llama.context_length"]) == (2, 512)
    assert (m["llama.embedding_length"], m["llama.feed_forward_length"]) == (256, 512)
    assert (m["llama.attention.head_count"], m["llama.attention.head_count_kv"]) == (4, 2)
    assert m["llama.rope.dimension_count"] == 64 and m["llama.vocab_size"] == 49152
    assert m["llama.rope.freq_base"] == config["rope_parameters"]["rope_theta"]
    assert m["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert (m["tokenizer.ggml.model"], m["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    tokens = json.loads((llama / "tokenizer.json").read_text())["model"]["vocab"]
    assert m["tokenizer.ggml.tokens"][:1000] == sorted(tokens, key=tokens.get)[:1000]
    assert m["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # <|endoftext|>, <|im_start|>, ...
    assert (m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert len(m["tokenizer.ggml.merges"]) > 40000


def test_tokenizer_and_chat_template_survive(llama: Path) -> None:
    """ladle's and transformers' tokenizers from the GGUF give the folder's ids (special
    tokens included), and the chat template renders the same prompt."""
    out = quantize_folder(llama, "Q8_0")
    folder = Tokenizer.from_folder(llama)
    written = Tokenizer.from_gguf(read_gguf(out).metadata, out)
    text = "<|im_start|>user\nnaïve café, 12345 🦙 we'LL see!\n\n  x<|im_end|>\n"
    assert written.encode(text) == folder.encode(text)
    assert written.chat_template == folder.chat_template
    reference = AutoTokenizer.from_pretrained(llama, gguf_file=out.name)
    assert reference.encode(text) == folder.encode(text)
    messages = [{"role": "user", "content": "Hi there"}]
    with TextModelBuilder(llama).build() as a, GgufModelBuilder(out).build() as b:
        assert a.tokenize(messages) == b.tokenize(messages)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}
OTHERS = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 32}),  # q/k norms, head_dim != 64
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "llama3-rope": (LlamaConfig, LlamaForCausalLM, {"rope_parameters": LLAMA3_ROPE}),
}


@pytest.mark.parametrize("kind", list(OTHERS))
def test_other_decoders_match_their_folder(
    kind: str, tokenizer_folder: Path, tmp_path: Path
) -> None:
    """F16 files, so the logits must agree to fp16 rounding (measured under 0.1%): Mistral
    is written as llama.cpp's `llama`, Llama 3's RoPE factors as its `rope_freqs` tensor."""
    config_cls, model_cls, extra = OTHERS[kind]
    config = config_cls(vocab_size=49152, tie_word_embeddings=True, **SHAPE | extra)
    folder = make_folder(tmp_path, tokenizer_folder, config, model_cls)
    gguf = read_gguf(quantize_folder(folder, "F16"))
    if kind == "qwen3":
        assert gguf.metadata["qwen3.attention.key_length"] == 32
        assert gguf.tensors["blk.0.attn_q_norm.weight"].ggml_type == T.F32
    else:
        assert gguf.architecture == "llama"
    assert ("rope_freqs.weight" in gguf.tensors) == (kind == "llama3-rope")
    with TextModelBuilder(folder).build() as a, GgufModelBuilder(gguf.path).build() as b:
        ids = a.tokenize(TEXT)
        assert b.tokenize(TEXT) == ids
        assert relative(b.logits_for(ids), a.logits_for(ids)) < 0.005


@pytest.mark.parametrize(("isq_type", "cosine_bound"), [("F16", 0.99999), ("Q8_0", 0.998)])
def test_bert_folder_embeds_as_the_folder(
    minilm_path: Path, tmp_path: Path, isq_type: str, cosine_bound: float
) -> None:
    """all-MiniLM-L6-v2 (the default embedding model) as llama.cpp's `bert` GGUF: pooling,
    no causal mask, WordPiece vocabulary with phantom spaces; the folder's ids, and its
    embeddings within a cosine of 0.99999 (F16, measured 0.9999998) or 0.998 (Q8_0 on the
    int8 kernel, measured 0.9995)."""
    out = tmp_path / f"minilm-{isq_type}.gguf"
    assert main(["quantize", str(minilm_path), "--type", isq_type, "--out", str(out)]) == 0
    gguf = read_gguf(out)
    m = gguf.metadata
    assert gguf.architecture == "bert"
    assert (m["bert.pooling_type"], m["bert.attention.causal"]) == (1, False)  # mean pooling
    assert (m["bert.block_count"], m["bert.embedding_length"], m["bert.context_length"]) == (
        6,
        384,
        512,
    )
    folder_tokenizer = Tokenizer.from_folder(minilm_path)
    the, plural = folder_tokenizer.token_to_id("the"), folder_tokenizer.token_to_id("##s")
    assert m["tokenizer.ggml.model"] == "bert"  # phantom spaces: word starts get "▁"
    assert (m["tokenizer.ggml.tokens"][the], m["tokenizer.ggml.tokens"][plural]) == ("▁the", "s")
    assert gguf.tensors["token_types.weight"].ggml_type == T.F32
    head = T.F16 if isq_type == "F16" else T.Q8_0  # the head: 384 is too narrow for Q6_K
    assert gguf.tensors["token_embd.weight"].ggml_type == head
    text = "A cat sits on the mat, doesn't it? Naïve café prices rose 12%."
    assert Tokenizer.from_gguf(m, out).encode(text) == folder_tokenizer.encode(text)
    texts = [text, "Stocks fell sharply on Monday.", "The weather is lovely today."]
    with EmbeddingModelBuilder(minilm_path).build() as model:
        want = torch.tensor(model.generate_embeddings(texts))
    with EmbeddingModelBuilder(out).build() as model:
        got = torch.tensor(model.generate_embeddings(texts))
    cosine = torch.nn.functional.cosine_similarity(got, want)
    assert bool((cosine > cosine_bound).all()), cosine
