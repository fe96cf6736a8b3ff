"""synth.py: Mandarin speech from espeak-ng, for the demo corpus (demo.py) and test wavs: pypinyin TONE3 syllables
(neutral tone 5) -> libespeak-ng (through ctypes) voice cmn-latn-pinyin(+variant) at 22.05 kHz, with the sample
where each syllable starts -> sox without dither (-D -R: bit-exact repeatable) -> gain -1 dB -> 16 kHz; and the gold
entity times that follow from the syllable starts (speech_bounds, entity_times).
"""
import ctypes
import ctypes.util
import os
import pickle
import platform
import re
import shutil
import subprocess
import wave

import numpy as np


def check_tools():
    if shutil.which("sox") is None or espeak_library() is None:
        raise RuntimeError("demo corpus: espeak-ng (its library libespeak-ng) or `sox` not found; they synthesise "
                           "the demo speech. Install them with `apt-get install espeak-ng sox` (Debian/Ubuntu), or "
                           "build a text-only corpus (audio=False / python demo.py --no-audio)")
    try:
        import pypinyin  # noqa: F401
    except ImportError as e:
        raise RuntimeError("demo corpus: the speech needs pypinyin (pip install pypinyin)") from e


def tool_versions():
    def first_line(cmd):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True)
            return (p.stdout or p.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return None
    import pypinyin
    return {"espeak-ng": Espeak.instance().version, "sox": first_line(["sox", "--version"]),
            "pypinyin": pypinyin.__version__, "python": platform.python_version()}


def to_pinyin(text):
    """One TONE3 syllable per character (the gold times need the 1:1 map)."""
    from pypinyin import Style, lazy_pinyin
    syllables = lazy_pinyin(text, style=Style.TONE3, neutral_tone_with_five=True)
    bad = [s for s in syllables if not re.fullmatch(r"[a-z]+[1-5]", s)]
    if bad or len(syllables) != len(text):
        raise ValueError(f"demo: pypinyin gave no one-syllable-per-character pinyin for {text!r}: {syllables}")
    return " ".join(syllables)


def espeak_library():
    return ctypes.util.find_library("espeak-ng")


class _EspeakEvent(ctypes.Structure):  # espeak_EVENT of espeak-ng's speak_lib.h
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.POINTER(_EspeakEvent))


class Espeak:
    """libespeak-ng through ctypes: the espeak-ng command's own synthesis (same flags: byte-identical samples, checked
    against `espeak-ng --stdout`) plus the sample position where each word starts. The library keeps global state
    (one per process: Espeak.instance()), and a synthesis leaves some behind (the next one of the same text comes out
    a few samples longer), so speak() runs each one in a forked child of a process that never synthesised."""
    EVENT_LIST_END, EVENT_WORD, EVENT_END = 0, 1, 5
    SYNCHRONOUS, RATE, PITCH = 2, 1, 3                          # AUDIO_OUTPUT_SYNCHRONOUS, espeakRATE, espeakPITCH
    COMMAND_FLAGS = 0x0000 | 0x0100 | 0x1000                    # espeakCHARS_AUTO | espeakPHONEMES | espeakENDPAUSE
    _instance = None

    @classmethod
    def instance(cls):
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self):
        path = espeak_library()
        if path is None:
            raise RuntimeError("demo: libespeak-ng not found (apt-get install espeak-ng)")
        self.lib = ctypes.CDLL(path)
        self.lib.espeak_Info.restype = ctypes.c_char_p
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                          ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = self.lib.espeak_Initialize(self.SYNCHRONOUS, 0, None, 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"demo: espeak_Initialize failed ({self.sample_rate}) with {path}")
        self.version = "eSpeak NG " + self.lib.espeak_Info(None).decode()
        self._chunks, self._words, self._end = [], [], None
        self._callback = _SYNTH_CALLBACK(self._collect)         # kept referenced: the library holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, samples, n, events):
        if n > 0:
            self._chunks.append(ctypes.string_at(samples, 2 * n))
        i = 0
        while events[i].type != self.EVENT_LIST_END:
            if events[i].type == self.EVENT_WORD:
                self._words.append(events[i].sample)
            elif events[i].type == self.EVENT_END:
                self._end = events[i].sample
            i += 1
        return 0

    def speak(self, text, voice, rate, pitch):
        """-> (16-bit mono PCM bytes at self.sample_rate, [sample where each space-separated word starts])."""
        read_end, write_end = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(read_end)
            os.close(write_end)
            raise
        if pid == 0:                              # child: speak once, send the result, never return into the caller
            try:
                os.close(read_end)
                try:
                    result = ("ok", self._speak_here(text, voice, rate, pitch))
                except Exception as e:            # noqa: BLE001 (reported to the parent)
                    result = ("error", str(e))
                with os.fdopen(write_end, "wb") as f:
                    pickle.dump(result, f)
            finally:
                os._exit(0)
        os.close(write_end)
        try:
            with os.fdopen(read_end, "rb") as f:
                data = f.read()
        finally:
            _, wait_status = os.waitpid(pid, 0)
        if not os.WIFEXITED(wait_status) or os.WEXITSTATUS(wait_status) != 0 or not data:
            raise RuntimeError(f"demo: the espeak-ng child died (wait status {wait_status}) on {text!r} ({voice})")
        status, result = pickle.loads(data)
        if status != "ok":
            raise RuntimeError(result)
        return result

    def _speak_here(self, text, voice, rate, pitch):
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"demo: espeak-ng has no voice {voice!r}")
        self.lib.espeak_SetParameter(self.RATE, rate, 0)
        self.lib.espeak_SetParameter(self.PITCH, pitch, 0)
        self._chunks, self._words, self._end = [], [], None
        data = text.encode()
        err = self.lib.espeak_Synth(ctypes.create_string_buffer(data), len(data) + 1, 0, 1, 0, self.COMMAND_FLAGS,
                                    None, None)
        if err != 0 or self.lib.espeak_Synchronize() != 0 or self._end is None:
            raise RuntimeError(f"demo: espeak-ng failed ({err}) on {text!r} with voice {voice}")
        return b"".join(self._chunks), self._words


SILENCE_DB = -40     # gold times: a sample is speech when |x| >= peak * 10^(SILENCE_DB / 20) (peak of its utterance)


def speech_bounds(pcm, word_starts, sample_rate):
    """Per word: (first, last + 1 non-silent sample) / sample_rate in seconds, searched between its own start
    event and the next word's (the last word: up to the end of the audio)."""
    x = np.abs(np.frombuffer(pcm, dtype=np.int16).astype(np.int32))
    loud = np.flatnonzero(x >= x.max() * 10 ** (SILENCE_DB / 20))                   # (L,) sample indices
    ends = list(word_starts[1:]) + [len(x)]
    lo, hi = np.searchsorted(loud, word_starts), np.searchsorted(loud, ends) - 1      # (W,) into loud
    if (lo > hi).any():
        w = int(np.flatnonzero(lo > hi)[0])
        raise RuntimeError(f"demo: word {w} of an utterance is silent from sample {word_starts[w]} to {ends[w]}")
    return [(int(loud[a]) / sample_rate, (int(loud[b]) + 1) / sample_rate) for a, b in zip(lo, hi)]


def entity_times(entities, word_seconds):
    """[[start_s, end_s]] per entity [start, end, text, TYPE]: from its first character's first speech sample to its
    last character's last (characters = pinyin words, one each)."""
    return [[round(word_seconds[s][0], 4), round(word_seconds[e - 1][1], 4)] for s, e, _, _ in entities]


def synthesize(pinyin, variant, rate, pitch, path):
    """libespeak-ng (22.05 kHz) | sox -> 16 kHz mono 16-bit wav at path; returns (its number of samples,
    [(speech start_s, end_s)] per pinyin syllable). sox's rate is linear-phase (no delay), so times carry over."""
    espeak = Espeak.instance()
    pcm, words = espeak.speak(pinyin, f"cmn-latn-pinyin+{variant}", rate, pitch)
    if len(words) != len(pinyin.split()):
        raise RuntimeError(f"demo: espeak-ng reported {len(words)} words for {len(pinyin.split())} syllables "
                           f"in {pinyin!r}")
    cmd = ["sox", "-D", "-R", "-t", "raw", "-r", str(espeak.sample_rate), "-e", "signed-integer", "-b", "16", "-c",
           "1", "-", "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer", str(path), "gain", "-1", "rate",
           "16000"]
    conv = subprocess.run(cmd, input=pcm, capture_output=True)
    if conv.returncode != 0:
        raise RuntimeError(f"demo: `{' '.join(cmd)}` failed ({conv.returncode}): {conv.stderr.decode()}")
    try:
        bounds = speech_bounds(pcm, words, espeak.sample_rate)
    except RuntimeError as e:
        raise RuntimeError(f"{e} ({pinyin!r}, {path})") from None
    with wave.open(str(path)) as w:
        return w.getnframes(), bounds
