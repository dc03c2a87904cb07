"""`write_quantized_gguf` on a tiny GGUF: which tensors change type, and imatrix lookup."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from ladle.engine.loading.gguf import read_gguf
from ladle.engine.quant.calibration import ActivationStats
from ladle.engine.quant.ggml_quantize import quantize
from ladle.engine.quant.gguf_export import write_quantized_gguf
from ladle.engine.quant.imatrix import save_cimatrix

T = GGMLQuantizationType


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.add_tensor("token_embd.weight", rng.standard_normal((64, 256), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(256, dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((32, 256), dtype=np.float32))
    writer.add_tensor("blk.0.ffn_down.weight", rng.standard_normal((256, 96), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_types_metadata_and_fused_cimatrix(tiny: Path, tmp_path: Path) -> None:
    vector = torch.rand(256) * 10
    stats = ActivationStats(256)
    stats.sum_sq, stats.rows = vector.double() * 4, 4
    cimatrix = tmp_path / "m.cimatrix"
    save_cimatrix(cimatrix, {"model.layers.0.self_attn.qkv_proj": stats})  # fused name
    out = tmp_path / "q.gguf"
    counts = write_quantized_gguf(tiny, out, "q4k", cimatrix)
    assert counts == {"Q4_K": 1, "Q4_1": 1, "Q6_K": 1, "F32": 1}
    written, source = read_gguf(out), read_gguf(tiny)
    assert written.metadata["tokenizer.chat_template"] == "{{ messages }}"
    assert written.metadata["general.file_type"] == 15  # MOSTLY_Q4_K_M
    assert written.tensors["output_norm.weight"].shape == (256,)
    assert written.tensors["token_embd.weight"].ggml_type == T.Q6_K  # kept at 6 bits
    q = written.tensors["blk.0.attn_q.weight"]
    weighted = quantize(source.tensors["blk.0.attn_q.weight"].dequantize(), T.Q4_K, vector)
    assert np.array_equal(q.data, weighted.data)  # the .cimatrix vector reached attn_q
    assert written.tensors["blk.0.ffn_down.weight"].ggml_type == T.Q4_1  # 96 wide: fallback
