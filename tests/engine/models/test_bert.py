"""BERT and XLM-RoBERTa encoders against transformers, and a Qwen 3 decoder used as an embedder.

Tiny random models are saved as safetensors (or written as a llama.cpp `bert` GGUF), loaded by
ladle and run on one right-padded batch; every real token's hidden state must match
transformers' to 1e-4, and the decoder's last-token embedding likewise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGUFWriter, get_tensor_name_map
from gguf.constants import MODEL_ARCH
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3Model,
    XLMRobertaConfig,
    XLMRobertaModel,
)

from ladle.engine.embedding_loader import load_embedder
from ladle.engine.loading.encoder_config import EncoderConfig
from ladle.engine.loading.gguf import read_gguf
from ladle.engine.loading.weights import gguf_encoder_weights, safetensors_weights
from ladle.engine.models.bert import BertModel as LadleBert
from ladle.errors import ModelLoadError

LENGTHS = [9, 4, 1, 7]  # one batch, padded to 9
_TINY = {
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def _batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        ids[row, :n] = torch.randint(2, vocab_size, (n,), generator=generator)  # no pad ids
    mask = torch.arange(max(LENGTHS)).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)
    return ids, mask


def _assert_states_match(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> None:
    assert want[mask].std() > 0.3, "states too flat for the comparison to mean much"
    diff = (got[mask] - want[mask]).abs().max().item()
    assert diff <= 1e-4, f"max abs diff {diff:.2e}"


def _build_encoder(reference: type, config: PretrainedConfig, model_cls: type) -> PreTrainedModel:
    """`build_hf_model`, with LayerNorm scales near 1 (its rule matches only lowercase norms)."""
    hf = reference.build_hf_model(config, model_cls)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("LayerNorm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
    return hf


@torch.inference_mode()
def _hf_states(hf: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state


def _load_encoder(folder: Path) -> LadleBert:
    raw = json.loads((folder / "config.json").read_text())
    encoder = LadleBert(EncoderConfig.from_hf(raw, folder))
    encoder.load_weights(safetensors_weights(folder), torch.float32)
    return encoder.eval()


def _word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A whitespace tokenizer whose words are `w<id>`, so a test picks its token ids."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize(
    ("config", "model_cls"),
    [
        (BertConfig(**_TINY), BertModel),
        (XLMRobertaConfig(**_TINY, pad_token_id=1), XLMRobertaModel),
    ],
    ids=["bert", "xlm-roberta"],
)
def test_encoder_matches_transformers_on_a_padded_batch(
    config: PretrainedConfig, model_cls: type[PreTrainedModel], reference: type, tmp_path: Path
) -> None:
    hf = _build_encoder(reference, config, model_cls)
    encoder = _load_encoder(reference.save_hf_model(hf, tmp_path / "model"))
    ids, mask = _batch(config.vocab_size)
    with torch.inference_mode():
        got = encoder(ids, mask)
    _assert_states_match(got, _hf_states(hf, ids, mask), mask)


def test_xlm_roberta_positions_start_after_the_padding_index() -> None:
    config = EncoderConfig.from_hf({**_TINY, "model_type": "xlm-roberta", "pad_token_id": 1})
    assert config.position_offset == 2
    assert config.max_seq_len == 62


def _write_bert_gguf(path: Path, hf: PreTrainedModel) -> Path:
    config = hf.config
    names = get_tensor_name_map(MODEL_ARCH.BERT, config.num_hidden_layers)
    writer = GGUFWriter(path, "bert")
    for key, value in {
        "block_count": config.num_hidden_layers,
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads,
        "pooling_type": 2,  # cls
    }.items():
        writer.add_uint32(f"bert.{key}", value)
    writer.add_float32("bert.attention.layer_norm_epsilon", config.layer_norm_eps)
    writer.add_string("tokenizer.ggml.model", "bert")
    for hf_name, tensor in hf.state_dict().items():
        if hf_name.startswith("pooler.") or hf_name.endswith("position_ids"):
            continue
        base, suffix = hf_name.rsplit(".", 1)
        data = np.ascontiguousarray(tensor.float().numpy())
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bert_gguf_matches_transformers_and_a_vocabless_one_needs_a_tokenizer_folder(
    reference: type, tmp_path: Path
) -> None:
    hf = _build_encoder(reference, BertConfig(**_TINY), BertModel)
    path = _write_bert_gguf(tmp_path / "bert.gguf", hf)
    gguf = read_gguf(path)
    encoder = LadleBert(EncoderConfig.from_gguf(gguf))
    encoder.load_weights(gguf_encoder_weights(gguf), torch.float32)
    ids, mask = _batch(hf.config.vocab_size)
    with torch.inference_mode():
        got = encoder.eval()(ids, mask)
    _assert_states_match(got, _hf_states(hf, ids, mask), mask)

    with pytest.raises(ModelLoadError, match=r"bert\.gguf: missing tokenizer\.ggml\.tokens"):
        load_embedder(path)
    _word_tokenizer(tmp_path, hf.config.vocab_size)
    loaded = load_embedder(path, tokenizer_path=tmp_path)
    assert loaded.embedder.pooling.mode == "cls" and loaded.embedder.pooling.normalize
    vectors = loaded.embedder.embed([ids[0].tolist(), ids[1, :4].tolist()])
    want = F.normalize(_hf_states(hf, ids[:2], mask[:2])[:, 0], dim=-1)
    assert (vectors - want).abs().max() <= 1e-4


def test_qwen3_embedder_pools_the_last_token_like_transformers(
    reference: type, tmp_path: Path
) -> None:
    config = Qwen3Config(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    hf = reference.build_hf_model(config, Qwen3Model)
    folder = reference.save_hf_model(hf, tmp_path / "qwen3-embedding")  # names lack `model.`
    _word_tokenizer(folder, config.vocab_size)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_lasttoken": true}')
    modules = [
        {"path": path, "type": f"sentence_transformers.models.{kind}"}
        for path, kind in (("", "Transformer"), ("1_Pooling", "Pooling"), ("", "Normalize"))
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    loaded = load_embedder(folder)
    assert loaded.architecture == "qwen3" and loaded.max_seq_len == 64

    ids, _ = _batch(config.vocab_size)
    vectors = loaded.embedder.embed([row[:n].tolist() for row, n in zip(ids, LENGTHS, strict=True)])
    with torch.inference_mode():  # one input at a time: transformers' causal mask, no padding
        want = torch.stack(
            [
                hf(input_ids=row[None, :n]).last_hidden_state[0, -1]
                for row, n in zip(ids, LENGTHS, strict=True)
            ]
        )
    diff = (vectors - F.normalize(want, dim=-1)).abs().max().item()
    assert diff <= 1e-4, f"max abs diff {diff:.2e}"
