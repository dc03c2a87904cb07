"""Text to Piper phoneme ids, as piper-phonemize makes them.

espeak-ng turns text into IPA one clause at a time (`espeak_TextToPhonemes`, called through
ctypes on `libespeak-ng.so.1` as piper-phonemize calls it). The IPA drops punctuation, so the
character that ended each clause is read back from the text and put back: `. ? !` end a
sentence, `, : ;` a clause (followed by a space). Phonemes are Unicode codepoints after NFD
(`ç` is `c` + combining cedilla), with espeak's `(en)` language-switch flags removed. Ids are
`^ _`, then each phoneme's ids followed by the pad `_`, then `$`.

Two fixes over piper-phonemize, which finds the terminator by stepping back two bytes and
skipping spaces: this steps back one character and skips any whitespace, so a period before a
newline or before a non-ASCII letter still ends its sentence; and where espeak ends a clause
without punctuation (at `…` or `—`), a space keeps the next clause's first word apart from
the last one instead of gluing them together.

espeak keeps its state (voice, translator, text decoder) in C globals, so one `Espeak` per
process serves every voice, each call under its lock.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
import unicodedata
from collections import Counter

from ladle.errors import ModelLoadError

logger = logging.getLogger(__name__)

LIBRARY = "libespeak-ng.so.1"
PAD, BOS, EOS = "_", "^", "$"  # Piper's reserved phonemes
PUNCTUATION = frozenset(" .,?!:;")  # what Piper adds between words; not speech by itself
_CLAUSE_ENDS = {".": ".", "?": "?", "!": "!", ",": ", ", ":": ": ", ";": "; "}
_SENTENCE_ENDS = frozenset(".?!")
_DEFAULT_PHONEME_MAPS = {"pt-br": {"c": ["k"]}}  # piper-phonemize's, for voices without one
_AUDIO_OUTPUT_SYNCHRONOUS = 0x02
_INITIALIZE_DONT_EXIT = 0x8000  # report a missing data folder instead of exiting the process
_CHARS_AUTO = 0
_PHONEMES_IPA = 0x02


class Espeak:
    """espeak-ng's library: IPA phonemes of text, by clause. Use `espeak()`, not this."""

    def __init__(self, library: ctypes.CDLL) -> None:
        library.espeak_Initialize.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        library.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        library.espeak_TextToPhonemes.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_int,
            ctypes.c_int,
        ]
        library.espeak_TextToPhonemes.restype = ctypes.c_char_p
        self._library = library
        self._lock = threading.Lock()
        self._voice: str | None = None
        options = _INITIALIZE_DONT_EXIT
        if library.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, options) < 0:
            raise ModelLoadError(
                LIBRARY, "espeak-ng failed to initialize (is espeak-ng-data installed?)"
            )

    def has_voice(self, voice: str) -> bool:
        """Whether espeak-ng knows `voice` (e.g. "en-us"), which then becomes the current one."""
        with self._lock:
            return self._set_voice(voice)

    def phonemize(self, text: str, voice: str) -> list[list[str]]:
        """`text`'s phonemes in `voice`, one list of codepoints per sentence, punctuation kept."""
        with self._lock:
            if not self._set_voice(voice):
                raise ModelLoadError(LIBRARY, f"espeak-ng has no voice {voice!r}")
            clauses = self._clauses(text.replace("\0", " ").encode("utf-8"))  # C strings end at NUL
        return _sentences(clauses)

    def _set_voice(self, voice: str) -> bool:
        if voice != self._voice:
            if self._library.espeak_SetVoiceByName(voice.encode()) != 0:
                return False
            self._voice = voice
        return True

    def _clauses(self, data: bytes) -> list[tuple[str, str]]:
        """(IPA, terminator) of each clause espeak finds in `data` (UTF-8)."""
        buffer = ctypes.create_string_buffer(data)
        start = ctypes.addressof(buffer)
        cursor = ctypes.c_void_p(start)
        clauses = []
        while cursor.value is not None:
            ipa = self._library.espeak_TextToPhonemes(
                ctypes.byref(cursor), _CHARS_AUTO, _PHONEMES_IPA
            )
            done = data if cursor.value is None else data[: cursor.value - start]
            clauses.append(((ipa or b"").decode("utf-8"), _terminator(done, cursor.value is None)))
        return clauses


@functools.cache
def espeak() -> Espeak:
    """The process's espeak-ng; `ModelLoadError` says how to install it if it is missing."""
    return Espeak(_library(LIBRARY))


def _library(name: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(name)
    except OSError as e:
        reason = "espeak-ng is not installed; Piper voices need it: apt-get install espeak-ng"
        raise ModelLoadError(name, reason) from e


def _terminator(done: bytes, at_end: bool) -> str:
    """The last non-space character of a clause. espeak has read one character past the
    clause by the time it returns (none at the end of the text)."""
    head = done.decode("utf-8", errors="ignore")
    if not at_end:
        head = head[:-1]
    return head.rstrip()[-1:]


def _sentences(clauses: list[tuple[str, str]]) -> list[list[str]]:
    sentences: list[list[str]] = []
    sentence: list[str] | None = None
    apart = False  # the last clause ended without punctuation
    for ipa, terminator in clauses:
        phonemes = _without_language_flags(unicodedata.normalize("NFD", ipa))
        if sentence is None:
            sentence = []
            sentences.append(sentence)
        if apart and sentence and phonemes:
            sentence.append(" ")
        sentence += phonemes
        sentence += _CLAUSE_ENDS.get(terminator, "")
        apart = terminator not in _CLAUSE_ENDS
        if terminator in _SENTENCE_ENDS:
            sentence = None
    return sentences


def _without_language_flags(ipa: str) -> list[str]:
    """Codepoints of `ipa` without espeak's "(fr)...(en)" switches around foreign words."""
    phonemes, in_flag = [], False
    for char in ipa:
        if in_flag:
            in_flag = char != ")"
        elif char == "(":
            in_flag = True
        else:
            phonemes.append(char)
    return phonemes


def codepoints(text: str) -> list[list[str]]:
    """Phonemes of a voice trained on text (`phoneme_type: "text"`): its casefolded NFD
    codepoints, as one sentence (piper-phonemize finds no sentences there)."""
    return [list(unicodedata.normalize("NFD", text.casefold()))]


def map_phonemes(
    sentences: list[list[str]], phoneme_map: dict[str, list[str]] | None, voice: str
) -> list[list[str]]:
    """Replace phonemes per the voice's `phoneme_map` (piper-phonemize's default for its
    espeak voice when it has none): each phoneme becomes zero or more others."""
    mapping = phoneme_map or _DEFAULT_PHONEME_MAPS.get(voice)
    if not mapping:
        return sentences
    return [[q for p in s for q in mapping.get(p, [p])] for s in sentences]


def phoneme_ids(phonemes: list[str], id_map: dict[str, list[int]]) -> list[int]:
    """Piper's ids of one sentence: `^ _`, each phoneme followed by `_`, then `$`. Phonemes
    missing from `id_map` are skipped (and logged), as Piper does."""
    pad = id_map[PAD]
    ids = [*id_map[BOS], *pad]
    missing: Counter[str] = Counter()
    for phoneme in phonemes:
        if phoneme in id_map:
            ids += id_map[phoneme]
            ids += pad
        else:
            missing[phoneme] += 1
    if missing:
        logger.warning("phonemes missing from the voice's id map, skipped: %s", dict(missing))
    return [*ids, *id_map[EOS]]


def is_speech(phonemes: list[str], id_map: dict[str, list[int]]) -> bool:
    """Whether a sentence has a phoneme the voice can say beyond pauses and punctuation."""
    return any(p in id_map and p not in PUNCTUATION for p in phonemes)
