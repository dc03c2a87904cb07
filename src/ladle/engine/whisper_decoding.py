"""Decoding one 30-s window with Whisper, as openai-whisper's `DecodingTask` decodes it.

The decode starts from Whisper's prompt: optional previous text after `<|startofprev|>`, then
`<|startoftranscript|>`, the language and task tokens (multilingual models only), and
`<|notimestamps|>` when no timestamps are wanted. Each step filters the logits in openai's
order: the blank and end-of-text at the first step (`suppress_blank`), the suppressed ids
(`config.json`'s `suppress_ids` plus the control tokens), then the timestamp rules
(timestamps come in pairs, never decrease, open the text no later than
`max_initial_timestamp`, and win when their summed probability beats every text token);
then picks the likeliest token, or draws one at a temperature above 0. A decode that reads
as a failure (too repetitive, too unlikely) is tried again hotter (`decode_with_fallback`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ladle.engine.audio_features import HOP_LENGTH, N_FRAMES, SAMPLE_RATE
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.engine.models.whisper import WhisperForConditionalGeneration

# openai-whisper's defaults for `transcribe()` and `DecodingOptions`
COMPRESSION_RATIO_THRESHOLD = 2.4
LOGPROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6
MAX_INITIAL_TIMESTAMP = 1.0  # seconds

CrossKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True, slots=True)
class WhisperTokens:
    """The control tokens of a Whisper vocabulary, found by name in the tokenizer.

    English-only and multilingual vocabularies number them differently (the multilingual one
    has one more text token), and large-v3 adds a language; the names are the same.
    """

    eot: int
    sot: int
    translate: int
    transcribe: int
    sot_lm: int
    sot_prev: int
    no_speech: int
    no_timestamps: int
    timestamp_begin: int  # `<|0.00|>`; the tokenizer does not list timestamps, they follow
    languages: dict[str, int]  # language code -> its token, in the vocabulary's order

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> WhisperTokens:
        """Raises KeyError naming a control token the tokenizer lacks."""

        def find(*names: str) -> int:
            for name in names:
                if (token_id := tokenizer.token_to_id(name)) is not None:
                    return token_id
            raise KeyError(names[0])

        sot, translate = find("<|startoftranscript|>"), find("<|translate|>")
        no_timestamps = find("<|notimestamps|>")
        # the language tokens lie between <|startoftranscript|> and <|translate|>
        names = [tokenizer.id_to_token(i) or "" for i in range(sot + 1, translate)]
        return cls(
            eot=find("<|endoftext|>"),
            sot=sot,
            translate=translate,
            transcribe=find("<|transcribe|>"),
            sot_lm=find("<|startoflm|>"),
            sot_prev=find("<|startofprev|>"),
            no_speech=find("<|nospeech|>", "<|nocaptions|>"),  # openai's name, then HF's
            no_timestamps=no_timestamps,
            timestamp_begin=no_timestamps + 1,
            languages={n[2:-2]: sot + 1 + i for i, n in enumerate(names)},
        )


@dataclass(slots=True)
class Decoded:
    """One window's decode at one temperature."""

    tokens: list[int]  # the sampled tokens, without the closing end-of-text
    text: str
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    temperature: float

    def needs_fallback(self) -> bool:
        """Too repetitive or too unlikely to keep, unless it is silence (openai's rule)."""
        too_unlikely = self.avg_logprob < LOGPROB_THRESHOLD
        if self.no_speech_prob > NO_SPEECH_THRESHOLD and too_unlikely:
            return False
        return too_unlikely or self.compression_ratio > COMPRESSION_RATIO_THRESHOLD

    def is_silence(self) -> bool:
        return self.no_speech_prob > NO_SPEECH_THRESHOLD and self.avg_logprob <= LOGPROB_THRESHOLD


class LogitRules:
    """openai's logit filters for one decode: `SuppressBlank`, `SuppressTokens` and
    `ApplyTimestampRules`, applied in place to a `[vocab]` float32 row given the tokens
    sampled so far.

    In numpy: a step's filters, log-softmax and argmax over 51864 values are a few tens of µs
    on one thread, where torch's CPU reductions split such a row across its thread pool and,
    on a shared 2-core machine, waited for a busy core (32 ms a step, measured).
    """

    def __init__(
        self,
        tokens: WhisperTokens,
        suppress_ids: list[int],
        blank_ids: list[int],
        timestamps: bool,
        max_initial_timestamp_index: int,
    ) -> None:
        self.eot = tokens.eot
        self.no_timestamps = tokens.no_timestamps
        self.timestamp_begin = tokens.timestamp_begin
        self.suppress_ids = np.array(suppress_ids, dtype=np.int64)
        self.blank_ids = np.array(blank_ids, dtype=np.int64)
        self.timestamps = timestamps
        self.max_initial_timestamp_index = max_initial_timestamp_index

    def apply(self, logits: np.ndarray, sampled: list[int]) -> None:
        if not sampled:
            logits[self.blank_ids] = -np.inf
        logits[self.suppress_ids] = -np.inf
        if self.timestamps:
            self._timestamp_rules(logits, sampled)

    def _timestamp_rules(self, logits: np.ndarray, sampled: list[int]) -> None:
        begin = self.timestamp_begin
        logits[self.no_timestamps] = -np.inf
        last_was_timestamp = len(sampled) >= 1 and sampled[-1] >= begin
        penultimate_was_timestamp = len(sampled) < 2 or sampled[-2] >= begin
        if last_was_timestamp:
            if penultimate_was_timestamp:  # a pair just closed: text (or the end) comes next
                logits[begin:] = -np.inf
            else:  # a segment is open: only a timestamp may close it (or the text ends)
                logits[: self.eot] = -np.inf
        last_timestamp = next((t for t in reversed(sampled) if t >= begin), None)
        if last_timestamp is not None:
            # never backwards; a segment that just opened must also move forward
            closing = last_was_timestamp and not penultimate_was_timestamp
            logits[begin : last_timestamp if closing else last_timestamp + 1] = -np.inf
        if not sampled:  # the text starts with a timestamp, and not too late
            logits[:begin] = -np.inf
            logits[begin + self.max_initial_timestamp_index + 1 :] = -np.inf
        # comparing log-probabilities is comparing logits: they differ by one constant
        if logsumexp(logits[begin:]) > logits[:begin].max():
            logits[:begin] = -np.inf  # timestamps together are likelier than any text token


class WindowDecoder:
    """Decodes 30-s windows on one loaded Whisper model (language detection included)."""

    def __init__(
        self,
        model: WhisperForConditionalGeneration,
        tokenizer: Tokenizer,
        tokens: WhisperTokens,
        suppress_ids: list[int],
        blank_ids: list[int],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.tokens = tokens
        t = tokens  # the control tokens are never text, as openai's `_get_suppress_tokens`
        controls = [t.transcribe, t.translate, t.sot, t.sot_prev, t.sot_lm, t.no_speech]
        self.suppress_ids = sorted({*suppress_ids, *controls})
        self.blank_ids = blank_ids
        config = model.config
        self.input_stride = N_FRAMES // config.max_source_positions  # mel frames per position: 2
        self.time_precision = self.input_stride * HOP_LENGTH / SAMPLE_RATE  # a timestamp: 0.02 s
        self.max_prompt_len = config.max_target_positions // 2 - 1
        self.sample_len = config.max_target_positions // 2

    def rules(self, timestamps: bool) -> LogitRules:
        """The logit filters of a decode with or without timestamps."""
        max_initial_index = round(MAX_INITIAL_TIMESTAMP / self.time_precision)
        return LogitRules(
            self.tokens, self.suppress_ids, self.blank_ids, timestamps, max_initial_index
        )

    def initial_ids(
        self, prompt_ids: list[int], language: str, task: str, timestamps: bool
    ) -> list[int]:
        """Whisper's prompt: previous text, start of transcript, language, task, no timestamps."""
        t = self.tokens
        ids = [t.sot_prev, *prompt_ids[-self.max_prompt_len :]] if prompt_ids else []
        ids.append(t.sot)
        if self.model.config.is_multilingual:
            ids += [t.languages[language], t.translate if task == "translate" else t.transcribe]
        if not timestamps:
            ids.append(t.no_timestamps)
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """The tokens of a text that comes before the audio, as openai encodes a prompt."""
        return self.tokenizer.encode(" " + text.strip(), add_special_tokens=False)

    @torch.inference_mode()
    def detect_language(self, cross_kv: CrossKV) -> dict[str, float]:
        """Each language's probability from the token that follows `<|startoftranscript|>`."""
        state = self.model.state_for(cross_kv)
        sot = torch.tensor([[self.tokens.sot]])
        logits = self.model.logits(self.model.decode(sot, state))[0, -1]
        ids = torch.tensor(list(self.tokens.languages.values()))
        probs = torch.softmax(logits[ids], dim=-1).tolist()
        return dict(zip(self.tokens.languages, probs, strict=True))

    @torch.inference_mode()
    def decode(
        self,
        cross_kv: CrossKV,
        initial_ids: list[int],
        rules: LogitRules,
        temperature: float,
        generator: torch.Generator | None,
    ) -> Decoded:
        """Decode one window from its prompt until end-of-text, half the context, or the end
        of the decoder's positions."""
        model, eot = self.model, self.tokens.eot
        state = model.state_for(cross_kv)
        hidden = model.decode(torch.tensor([initial_ids]), state)[0]
        sot_index = initial_ids.index(self.tokens.sot)
        # the logits after <|startoftranscript|> give the no-speech probability
        first = model.logits(hidden[[sot_index, -1]]).numpy()
        no_speech_prob = float(np.exp(first[0, self.tokens.no_speech] - logsumexp(first[0])))
        logits = first[1]
        sampled: list[int] = []
        sum_logprob = 0.0
        for _ in range(self.sample_len):
            rules.apply(logits, sampled)
            token = _pick(logits, temperature, generator)
            sum_logprob += float(logits[token] - logsumexp(logits))
            if token == eot:
                break
            sampled.append(token)
            if state.length >= model.config.max_target_positions:
                break
            logits = model.logits(model.decode(torch.tensor([[token]]), state))[0, -1].numpy()
        text = self.tokenizer.decode([t for t in sampled if t < eot]).strip()
        return Decoded(
            tokens=sampled,
            text=text,
            avg_logprob=sum_logprob / (len(sampled) + 1),
            no_speech_prob=no_speech_prob,
            compression_ratio=compression_ratio(text),
            temperature=temperature,
        )

    def decode_with_fallback(
        self,
        cross_kv: CrossKV,
        initial_ids: list[int],
        rules: LogitRules,
        temperatures: tuple[float, ...],
        generator: torch.Generator | None,
    ) -> Decoded:
        """The first decode at `temperatures`, tried in turn, that `needs_fallback` does not
        reject. When each is, the likeliest of those that do not repeat themselves (else of
        all), as faster-whisper chooses: openai-whisper keeps the last, the hottest, which on
        hard audio is often noise where a cooler try was close."""
        tried: list[Decoded] = []
        for temperature in temperatures:
            decoded = self.decode(cross_kv, initial_ids, rules, temperature, generator)
            if not decoded.needs_fallback():
                return decoded
            tried.append(decoded)
        fluent = [d for d in tried if d.compression_ratio <= COMPRESSION_RATIO_THRESHOLD]
        return max(fluent or tried, key=lambda d: d.avg_logprob)


def compression_ratio(text: str) -> float:
    """How much gzip shrinks `text`: high for a text that repeats itself."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


def logsumexp(values: np.ndarray) -> float:
    """`log(sum(exp(values)))`, -inf for a row of -inf."""
    top = values.max()
    if top == -np.inf:
        return -np.inf
    return float(top + np.log(np.exp(values - top).sum()))


def _pick(logits: np.ndarray, temperature: float, generator: torch.Generator | None) -> int:
    """The likeliest token, or a draw at `temperature` (gpt-fast's exponential race:
    `argmax(p / q)` with q ~ Exp(1) picks each token with probability p, one pass, no sort)."""
    if temperature == 0.0:
        return int(logits.argmax())
    scaled = logits / temperature
    probs = np.exp(scaled - scaled.max())
    q = torch.empty(probs.shape, dtype=torch.float64).exponential_(1, generator=generator)
    return int((probs / q.numpy()).argmax())
