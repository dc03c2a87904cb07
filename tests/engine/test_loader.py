"""Bad model files fail at load with one clear ladle error naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from ladle import (
    GgufModelBuilder,
    ModelLoadError,
    TextModelBuilder,
    UnsupportedArchitectureError,
)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="nowhere"):
        TextModelBuilder(tmp_path / "nowhere").build()


def test_text_file_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "readme.txt"
    path.write_text("hello")
    with pytest.raises(ModelLoadError, match=r"readme\.txt"):
        GgufModelBuilder(tmp_path, "readme.txt").build()


def test_truncated_real_model(tmp_path: Path, smollm2_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with smollm2_path.open("rb") as f:
        cut.write_bytes(f.read(50_000_000))
    with pytest.raises(ModelLoadError, match=r"cut\.gguf.*truncated"):
        TextModelBuilder(cut).build()


def test_unknown_architecture(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    w = GGUFWriter(path, "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match=r"mamba\.gguf.*'mamba'"):
        TextModelBuilder(path).build()


def test_unknown_architecture_in_folder(tmp_path: Path) -> None:
    config = {
        "model_type": "rwkv",
        "architectures": ["RwkvForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="rwkv"):
        TextModelBuilder(tmp_path).build()


def test_folder_with_broken_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        TextModelBuilder(tmp_path).build()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Path:
    """A tiny random llama saved by transformers, with SmolLM2's tokenizer and template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="1MB")
    return folder


def test_safetensors_folder_end_to_end(tiny_folder: Path) -> None:
    import torch
    from transformers import LlamaForCausalLM

    assert (tiny_folder / "model.safetensors.index.json").is_file()
    reference = LlamaForCausalLM.from_pretrained(tiny_folder).eval()
    with TextModelBuilder(tiny_folder).build() as model:
        info = model.config()
        assert (info.architecture, info.file_format, info.max_seq_len) == (
            "llama", "safetensors", 256,
        )  # fmt: skip
        messages = [{"role": "user", "content": "Hi there"}]
        logits, prompt_ids = model.send_raw_chat_request(messages)
        with torch.no_grad():
            expected = reference(torch.tensor([prompt_ids])).logits[0, -1]
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        reply = model.send_chat_request({"messages": messages, "max_tokens": 5, "temperature": 0})
        assert reply.usage.completion_tokens <= 5


def test_chat_template_override(tmp_path: Path, tiny_folder: Path) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}>"
    file = tmp_path / "template.jinja"
    file.write_text(template)
    messages = [{"role": "user", "content": "Hi"}]
    for given in (template, str(file)):
        with TextModelBuilder(tiny_folder).with_chat_template(given).build() as model:
            assert model.detokenize(model.tokenize(messages)) == "[user] Hi\n>"


def test_missing_tensor_names_folder_and_tensor(tmp_path: Path, tiny_folder: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(tiny_folder, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    tensors = load_file(shard)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"broken.*model\.layers\.1\.mlp\.down_proj"):
        TextModelBuilder(folder).build()


def test_a_config_claiming_more_than_its_file_holds_is_refused_before_allocating(
    tmp_path: Path, tiny_folder: Path
) -> None:
    """A header may claim any size: a million-wide model in a few kB file is an error naming
    the folder, not an attempt to allocate 4 TB."""
    import shutil

    folder = tmp_path / "claims"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=1_000_000, intermediate_size=4_000_000, head_dim=64)
    config["num_attention_heads"] = config["num_key_value_heads"] = 1_000_000 // 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"claims.*describes [\d,]+ weights, more than"):
        TextModelBuilder(folder).build()
