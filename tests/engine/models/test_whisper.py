"""Whisper against transformers' `WhisperForConditionalGeneration` holding the same weights.

The real tiny.en weights are converted from CTranslate2's variables into transformers' state
dict here, in fp32 (q, k and v split, the key's zero bias dropped); a tiny random multilingual
model goes the other way, into CTranslate2's variables, to check language detection.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
import torch
from tokenizers import Tokenizer as Backend
from transformers import GenerationConfig, WhisperFeatureExtractor
from transformers import WhisperConfig as HFWhisperConfig
from transformers import WhisperForConditionalGeneration as HFWhisper
from transformers.modeling_outputs import BaseModelOutput

from ladle.engine.audio_features import N_SAMPLES, log_mel_spectrogram, pad_or_trim
from ladle.engine.loader import load_checkpoint
from ladle.engine.loading.ctranslate2 import CT2Model, read_ctranslate2
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.engine.models.whisper import (
    WhisperConfig,
    WhisperForConditionalGeneration,
    ctranslate2_weights,
)
from ladle.engine.transcriber import LoadedWhisper, load_whisper, transcribe_windows
from ladle.engine.whisper_decoding import WhisperTokens, WindowDecoder

RELATIVE_TOLERANCE = 1e-4  # of the largest reference value


def _modules(encoder_layers: int, decoder_layers: int) -> Iterator[tuple[str, str, int]]:
    """(transformers module, CTranslate2 scope, how many of q/k/v the scope fuses)."""
    yield from [
        ("model.encoder.conv1", "encoder/conv1", 0),
        ("model.encoder.conv2", "encoder/conv2", 0),
        ("model.encoder.embed_positions", "encoder/position_encodings", 0),
        ("model.encoder.layer_norm", "encoder/layer_norm", 0),
        ("model.decoder.embed_tokens", "decoder/embeddings", 0),
        ("model.decoder.embed_positions", "decoder/position_encodings", 0),
        ("model.decoder.layer_norm", "decoder/layer_norm", 0),
    ]
    for side, count in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        for i in range(count):
            hf, ct2 = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            yield from [
                (f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", 3),
                (f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1", 0),
                (f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm", 0),
                (f"{hf}.fc1", f"{ct2}/ffn/linear_0", 0),
                (f"{hf}.fc2", f"{ct2}/ffn/linear_1", 0),
                (f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm", 0),
            ]
            if side == "decoder":
                yield from [
                    (f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0", 0),
                    (f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", 2),
                    (f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2", 0),
                    (f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm", 0),
                ]


def _params(ct2_scope: str) -> list[tuple[str, str]]:
    if ct2_scope.endswith("layer_norm"):
        return [("weight", "gamma"), ("bias", "beta")]
    if ct2_scope.endswith("position_encodings"):
        return [("weight", "encodings")]
    if ct2_scope.endswith("embeddings"):
        return [("weight", "weight")]
    return [("weight", "weight"), ("bias", "bias")]


def hf_state_dict(ct2: CT2Model) -> dict[str, torch.Tensor]:
    state = {}
    for hf, scope, fused in _modules(ct2.layer_count("encoder"), ct2.layer_count("decoder")):
        if not fused:
            for param, ct2_param in _params(scope):
                state[f"{hf}.{param}"] = ct2.float_variable(f"{scope}/{ct2_param}").float()
            continue
        parts = ["q_proj", "k_proj", "v_proj"][-fused:]
        weights = ct2.float_variable(f"{scope}/weight").float().chunk(fused)
        biases = ct2.float_variable(f"{scope}/bias").float().chunk(fused)
        for part, weight, bias in zip(parts, weights, biases, strict=True):
            state[f"{hf}.{part}.weight"] = weight
            if part == "k_proj":
                assert not bias.any()  # Whisper's key has no bias: CTranslate2 fills zeros
            else:
                state[f"{hf}.{part}.bias"] = bias
    state["proj_out.weight"] = ct2.float_variable("decoder/projection/weight").float()
    return state


def ct2_model(hf: HFWhisper) -> CT2Model:
    """The variables CTranslate2's converter would write for `hf`, in fp16, held in memory."""
    state, config = hf.state_dict(), hf.config
    variables = {}
    for module, scope, fused in _modules(config.encoder_layers, config.decoder_layers):
        if not fused:
            for param, ct2_param in _params(scope):
                variables[f"{scope}/{ct2_param}"] = state[f"{module}.{param}"].half()
            continue
        parts = ["q_proj", "k_proj", "v_proj"][-fused:]
        weights = [state[f"{module}.{p}.weight"] for p in parts]
        biases = [
            state.get(f"{module}.{p}.bias", torch.zeros(w.shape[0]))
            for p, w in zip(parts, weights, strict=True)
        ]
        variables[f"{scope}/weight"] = torch.cat(weights).half()
        variables[f"{scope}/bias"] = torch.cat(biases).half()
    variables["encoder/num_heads"] = torch.tensor(config.encoder_attention_heads, dtype=torch.int16)
    variables["decoder/num_heads"] = torch.tensor(config.decoder_attention_heads, dtype=torch.int16)
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    return CT2Model(Path("memory/model.bin"), "WhisperSpec", 3, variables, aliases)


def hf_config(config: WhisperConfig) -> HFWhisperConfig:
    return HFWhisperConfig(
        vocab_size=config.vocab_size,
        num_mel_bins=config.num_mel_bins,
        d_model=config.d_model,
        encoder_layers=config.encoder_layers,
        encoder_attention_heads=config.encoder_attention_heads,
        decoder_layers=config.decoder_layers,
        decoder_attention_heads=config.decoder_attention_heads,
        encoder_ffn_dim=4 * config.d_model,
        decoder_ffn_dim=4 * config.d_model,
        max_source_positions=config.max_source_positions,
        max_target_positions=config.max_target_positions,
    )


def generation_config(decoder: WindowDecoder, blank_ids: list[int]) -> GenerationConfig:
    """What transformers' Whisper `generate` needs to decode as openai's `DecodingTask`."""
    t = decoder.tokens
    languages = {}
    if decoder.model.config.is_multilingual:
        languages = {"lang_to_id": {f"<|{code}|>": i for code, i in t.languages.items()}}
    return GenerationConfig(
        decoder_start_token_id=t.sot,
        eos_token_id=t.eot,
        pad_token_id=t.eot,
        no_timestamps_token_id=t.no_timestamps,
        suppress_tokens=decoder.suppress_ids,
        begin_suppress_tokens=blank_ids,
        is_multilingual=decoder.model.config.is_multilingual,
        task_to_id={"transcribe": t.transcribe, "translate": t.translate},
        max_initial_timestamp_index=50,
        max_new_tokens=decoder.sample_len,
        **languages,
    )


def speech(text: str) -> np.ndarray:
    """espeak-ng's voice reading `text`, at 16 kHz."""
    wav = subprocess.run(["espeak-ng", "--stdout", text], capture_output=True, check=True).stdout
    audio, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(audio, rate, 16000).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(whisper_tiny_path: Path) -> tuple[LoadedWhisper, HFWhisper]:
    whisper = load_whisper(whisper_tiny_path)
    with torch.device("meta"):  # no random initialization: every weight is assigned
        hf = HFWhisper(hf_config(whisper.decoder.model.config))
    state = hf_state_dict(read_ctranslate2(whisper_tiny_path / "model.bin"))
    hf.load_state_dict(state, assign=True)
    return whisper, hf.eval()


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return speech(
        "The quick brown fox jumps over the lazy dog. I would like a cup of coffee, please."
    )


@pytest.fixture(scope="module")
def features(clip: np.ndarray) -> torch.Tensor:
    extracted = WhisperFeatureExtractor()(clip, sampling_rate=16000, return_tensors="pt")
    return extracted.input_features  # [1, 80, 3000]


@pytest.fixture(scope="module")
def encoded(
    tiny: tuple[LoadedWhisper, HFWhisper], features: torch.Tensor
) -> tuple[torch.Tensor, BaseModelOutput]:
    """The speech through ladle's encoder and through transformers'."""
    whisper, hf = tiny
    with torch.inference_mode():
        return whisper.decoder.model.encode(features), hf.model.encoder(features)


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    diff, scale = (got - want).abs().max().item(), want.abs().max().item()
    print(f"{what}: max abs diff {diff:.2e} of max {scale:.1f}")
    assert diff <= RELATIVE_TOLERANCE * scale, (
        f"{what}: {diff:.2e} > {RELATIVE_TOLERANCE:g} x {scale:.1f}"
    )


@torch.inference_mode()
def test_encoder_and_decoder_logits_match_transformers_on_tiny_en(
    tiny: tuple[LoadedWhisper, HFWhisper], encoded: tuple[torch.Tensor, BaseModelOutput]
) -> None:
    whisper, hf = tiny
    model, t = whisper.decoder.model, whisper.decoder.tokens
    audio, hf_audio = encoded[0], encoded[1].last_hidden_state
    _assert_close(audio, hf_audio, "encoder output")

    text = whisper.tokenizer.encode(" The quick brown fox jumps", add_special_tokens=False)
    ids = torch.tensor([[t.sot, t.no_timestamps, *text]])
    want = hf(encoder_outputs=(hf_audio,), decoder_input_ids=ids).logits
    state = model.new_state(audio)
    prefill = model.logits(model.decode(ids[:, :4], state))
    steps = [model.logits(model.decode(ids[:, i : i + 1], state)) for i in range(4, ids.shape[1])]
    _assert_close(prefill, want[:, :4], "prompt logits")
    _assert_close(torch.cat(steps, dim=1), want[:, 4:], "logits of cached steps")


@torch.inference_mode()
@pytest.mark.parametrize("timestamps", [True, False], ids=["timestamps", "no-timestamps"])
def test_greedy_tokens_equal_transformers_generate_on_speech(
    tiny: tuple[LoadedWhisper, HFWhisper],
    encoded: tuple[torch.Tensor, BaseModelOutput],
    timestamps: bool,
) -> None:
    whisper, hf = tiny
    decoder = whisper.decoder
    hf.generation_config = generation_config(decoder, decoder.blank_ids)
    generated = hf.generate(encoder_outputs=encoded[1], return_timestamps=timestamps)
    want = generated[0].tolist()
    cross_kv = decoder.model.cross_kv(encoded[0])
    initial = decoder.initial_ids([], "en", "transcribe", timestamps)
    got = decoder.decode(cross_kv, initial, decoder.rules(timestamps), 0.0, None)
    print(got.text)
    assert got.tokens == [i for i in want if i != decoder.tokens.eot]
    assert "lazy dog" in got.text and "cup of coffee" in got.text


def _multilingual_tokenizer(english: Path) -> Tokenizer:
    """tiny.en's tokenizer numbered as a multilingual one: one more text token before
    `<|endoftext|>`, every control token one later, `<|nospeech|>` for `<|nocaptions|>`."""
    data = json.loads((english / "tokenizer.json").read_text())
    data["model"]["vocab"] |= {"Ġmultilingual": 50256, "<|endoftext|>": 50257}
    for token in data["added_tokens"]:
        token["id"] += 1
        token["content"] = token["content"].replace("nocaptions", "nospeech")
    data["post_processor"] = None
    return Tokenizer(Backend.from_str(json.dumps(data)))


@torch.inference_mode()
def test_a_multilingual_model_detects_the_language_and_decodes_as_transformers(
    reference: type, whisper_tiny_path: Path, clip: np.ndarray
) -> None:
    # a short decoder context keeps the decodes short: random weights rarely end a text
    tiny_config = WhisperConfig(80, 64, 2, 4, 2, 4, vocab_size=51865, max_target_positions=32)
    hf = reference.build_hf_model(hf_config(tiny_config), HFWhisper)
    ct2 = ct2_model(hf)
    hf.load_state_dict(hf_state_dict(ct2))  # the fp16 weights the file would hold
    model = WhisperForConditionalGeneration(WhisperConfig.from_ctranslate2(ct2))
    load_checkpoint(model, ctranslate2_weights(ct2, model), torch.float32, ct2.path)
    tokenizer = _multilingual_tokenizer(whisper_tiny_path)
    tokens = WhisperTokens.from_tokenizer(tokenizer)
    assert (tokens.sot, tokens.languages["en"], tokens.timestamp_begin) == (50258, 50259, 50364)
    assert len(tokens.languages) == 99
    blank_ids = [220, tokens.eot]
    decoder = WindowDecoder(model, tokenizer, tokens, [], blank_ids)
    hf.generation_config = generation_config(decoder, blank_ids)

    # the first 30 s of the padded recording, where `transcribe_windows` detects the language
    samples = torch.from_numpy(clip)
    audio = model.encode(pad_or_trim(log_mel_spectrogram(samples, 80, padding=N_SAMPLES))[None])
    hf_audio = BaseModelOutput(last_hidden_state=audio)  # shown equal on tiny.en above
    cross_kv = model.cross_kv(audio)
    probs = decoder.detect_language(cross_kv)
    language = max(probs, key=probs.__getitem__)
    hf_language = hf.detect_language(
        encoder_outputs=hf_audio, generation_config=hf.generation_config
    )
    assert tokens.languages[language] == hf_language.item()
    print(f"detected {language!r} with probability {probs[language]:.3f}")

    initial = decoder.initial_ids([], language, "transcribe", timestamps=False)
    assert initial == [
        tokens.sot,
        tokens.languages[language],
        tokens.transcribe,
        tokens.no_timestamps,
    ]
    got = decoder.decode(cross_kv, initial, decoder.rules(False), 0.0, None)
    want = hf.generate(encoder_outputs=hf_audio, language=language, task="transcribe")
    assert got.tokens == [i for i in want[0].tolist() if i != tokens.eot]
    transcript = transcribe_windows(
        decoder,
        samples,
        language=None,
        task="transcribe",
        temperatures=(0.0,),
        timestamps=False,
        prompt_ids=[],
        generator=None,
    )
    assert transcript.language == language
