"""Speech front end: wav reading, band-limited resampling, speed perturbation and the MMSpeech feature chain.

The chain reproduces ModelScope's OFA-ASR preprocessing (`prepare_fbank`) in plain torch:

    librosa.load (k / 32768 for 16-bit input)
    -> sox `speed f` + `rate 16000`        (training only; identity at f = 1)
    -> sox `gain -n`                        (peak normalisation in sox's int32 domain, closed form below)
    -> x 2**15                              ("Kaldi compliance": int16 scale)
    -> Kaldi fbank, 80 bins                 (torchaudio.compliance.kaldi.fbank defaults, dither 0)
    -> utterance CMVN                       (fairseq's UtteranceCMVN, when fbank_config.yaml asks for it)

No torchaudio: the fbank is written here and tested against kaldi-native-fbank and against a dump of the
reference chain. Resampling is our own Kaiser-windowed sinc (not librosa's soxr), so only non-16 kHz input
and speed perturbation differ from the reference, and only at the level of resampler design.
"""
import contextlib
import functools
import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from files import InputError, atomic_path, write_atomic

SAMPLE_RATE = 16000
NUM_MEL_BINS = 80
LOG_FLOOR = torch.finfo(torch.float32).eps   # Kaldi floors mel energies at float32 epsilon before the log
CMVN_MODES = ("utterance", "none")
FEATURES_VERSION = 1   # part of the disk feature cache's key (data.Featurizer): raise it when speech_features changes

# Resampler design: cutoff at ROLLOFF x the lower Nyquist, sinc truncated after SINC_ZEROS zero crossings on
# each side, Kaiser window with KAISER_BETA (about 90 dB side lobes). See tests/test_audio.py for the measured
# pass-band error and stop-band attenuation.
ROLLOFF = 0.955
SINC_ZEROS = 64
KAISER_BETA = 9.0
MAX_FILTER_ENTRIES = 1 << 24            # polyphase table limit (rates with a tiny gcd would need a huge table)


# ---------------------------------------------------------------------------------------------------------------
# Reading wav files

MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 384000     # telephone speech .. the fastest common audio hardware
SILENCE_DBFS = -60.0    # a peak below this is no speech: 16-bit dither peaks near -90 dBFS, a quiet room's
                        # noise through a real microphone near -50, speech near -20 (dBFS: 0 = full scale)
WAVE_PCM, WAVE_FLOAT, WAVE_EXTENSIBLE = 1, 3, 0xFFFE                        # format tags of the fmt chunk
_SUBFORMAT_TAIL = bytes.fromhex("000000001000800000aa00389b71")   # extensible subformat GUID after its tag


class WavInfo(NamedTuple):
    """The format facts of a wav header (enough to write audio back in the input's own format)."""
    sample_rate: int
    channels: int
    bits: int               # bits per stored sample: 8, 16, 24, 32 (integer PCM) or 32, 64 (float)
    is_float: bool          # IEEE float samples (format 3, or extensible with the float subformat)
    frames: int             # samples per channel
    extensible: bool        # WAVE_FORMAT_EXTENSIBLE header (0xFFFE), as sox writes above 16 bits
    data_offset: int        # file offset of the first sample

    @property
    def seconds(self):
        return self.frames / self.sample_rate

    @property
    def samples_16k(self):                  # samples once resampled to SAMPLE_RATE (what the features see)
        return self.frames * SAMPLE_RATE // self.sample_rate


def wav_info(path):
    """Read only the header of a wav file (RIFF chunks fmt and data; other chunks skipped). Returns WavInfo.

    Integer PCM (8-bit unsigned, 16/24/32-bit signed) and IEEE float (32/64-bit), plain or WAVE_FORMAT_EXTENSIBLE.
    Anything else, or a header that is cut short or impossible, raises files.InputError naming the file.
    """
    path = Path(path)
    with _open_wav(path) as f:
        return _parse_header(f, path, os.fstat(f.fileno()).st_size)


@contextlib.contextmanager
def _open_wav(path):
    """Open for reading; a missing file, a folder or a read error become InputError naming the path."""
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a wav file")
    try:
        with open(path, "rb") as f:
            yield f
    except FileNotFoundError:
        raise InputError(f"{path}: no such wav file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None


def _parse_header(f, path, size):
    def bad(problem):
        return InputError(f"{path}: {problem}")

    if size == 0:
        raise bad("empty file, not a wav")
    riff = f.read(12)
    if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:] != b"WAVE":
        raise bad(f"not a wav file (no RIFF/WAVE header); convert it, e.g. `sox {path} -b 16 out.wav`")
    fmt, data_offset, data_size = None, None, None
    pos = 12
    while (fmt is None or data_offset is None) and pos + 8 <= size:     # walk the chunks; the end may be junk
        f.seek(pos)
        chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
        if pos + 8 + chunk_size > size:
            raise bad(f"cut short: its {chunk_id.decode('latin-1')!r} chunk at byte {pos} says {chunk_size} bytes, "
                      f"the file holds {size - pos - 8} after its header")
        if chunk_id == b"fmt ":
            fmt = f.read(chunk_size)
        elif chunk_id == b"data":
            data_offset, data_size = pos + 8, chunk_size
        pos += 8 + chunk_size + chunk_size % 2          # chunks are padded to an even size
    if fmt is None or data_offset is None:
        ending = f" (it ends inside a chunk header at byte {pos})" if pos < size else ""
        raise bad(f"no {'fmt' if fmt is None else 'data'} chunk in the wav{ending}")
    if len(fmt) < 16:
        raise bad(f"fmt chunk of {len(fmt)} bytes is cut short (16 at least)")
    tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    extensible = tag == WAVE_EXTENSIBLE
    if extensible:                                      # the real format tag opens the subformat GUID
        if len(fmt) < 40 or fmt[26:40] != _SUBFORMAT_TAIL:
            raise bad("WAVE_FORMAT_EXTENSIBLE fmt chunk without a known subformat GUID")
        tag = struct.unpack_from("<H", fmt, 24)[0]
    if tag not in (WAVE_PCM, WAVE_FLOAT):
        raise bad(f"format tag 0x{tag:04x} is neither PCM nor IEEE float; convert it, e.g. "
                  f"`sox {path} -b 16 out.wav`")
    is_float = tag == WAVE_FLOAT
    kinds = (32, 64) if is_float else (8, 16, 24, 32)
    if bits not in kinds:
        raise bad(f"{bits}-bit {'float' if is_float else 'integer PCM'} samples are not supported "
                  f"({'/'.join(map(str, kinds))}-bit only)")
    if channels == 0:
        raise bad("the header says 0 channels")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise bad(f"impossible sample rate {rate} Hz (expected {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE})")
    frame_bytes = channels * bits // 8
    if block_align != frame_bytes:
        raise bad(f"block align {block_align} does not match {channels} channels of {bits} bits")
    if data_size % frame_bytes:
        raise bad(f"data chunk of {data_size} bytes is not a whole number of {frame_bytes}-byte frames")
    return WavInfo(rate, channels, bits, is_float, data_size // frame_bytes, extensible, data_offset)


def read_wav(path):
    """Read a wav file. Returns (samples float32 (N,), sample_rate); channels are averaged (librosa's mono).

    Integer k of b bits maps to k / 2**(b-1) (16-bit: k / 32768, as librosa), 8-bit is unsigned, float is kept.
    Errors (missing, unreadable, not a wav, unsupported or broken header) raise files.InputError.
    """
    return read_wav_frames(path, 0, None)


def read_wav_frames(path, first, count=None):
    """Sample frames [first, first + count) of a wav (count None: to the end), read from those bytes only: a long
    recording is read a block at a time. Returns (mono float32 (n,), sample_rate), as read_wav."""
    path = Path(path)
    with _open_wav(path) as f:
        info = _parse_header(f, path, os.fstat(f.fileno()).st_size)
        if info.frames == 0:
            raise InputError(f"{path}: the wav holds no samples")
        first = min(max(0, first), info.frames)
        count = info.frames - first if count is None else min(max(0, count), info.frames - first)
        f.seek(info.data_offset + first * info.channels * info.bits // 8)
        data = f.read(count * info.channels * info.bits // 8)
    samples = _samples_to_float(data, info.bits, info.is_float)
    if info.is_float and not bool(torch.isfinite(samples).all()):
        raise InputError(f"{path}: float samples include NaN or infinity")
    samples = samples.view(-1, info.channels)                       # (n, C)
    mono = samples[:, 0] if info.channels == 1 else samples.mean(dim=1)
    return mono.contiguous(), info.sample_rate


def _samples_to_float(data, bits, is_float):
    """Little-endian sample bytes -> float32 (n,); integers scaled by 2**(bits-1), 8-bit is unsigned."""
    if is_float:
        return torch.from_numpy(np.frombuffer(data, dtype="<f4" if bits == 32 else "<f8").astype(np.float32))
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return torch.from_numpy((raw.astype(np.float32) - 128.0) / 128.0)
    if bits == 24:                      # assemble 24-bit little-endian into int32 with sign extension
        b = raw.reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8
    else:
        ints = raw.view("<i2" if bits == 16 else "<i4")
    return torch.from_numpy(ints.astype(np.float32) / np.float32(2.0 ** (bits - 1)))


REDACT_FILLS = ("beep", "silence")
BEEP_HZ, BEEP_LEVEL = 1000.0, 0.1   # the beep: a 1 kHz sine at -20 dBFS


def _float_to_samples(x, bits, is_float):
    """float (n,) in [-1, 1] -> little-endian sample bytes of the format (_samples_to_float's inverse)."""
    x = np.asarray(x, dtype=np.float64)
    if is_float:
        return x.astype("<f4" if bits == 32 else "<f8").tobytes()
    ints = np.round(x * (2.0 ** (bits - 1) - 1)).astype(np.int64)
    if bits == 8:
        return (ints + 128).astype(np.uint8).tobytes()
    if bits == 24:
        return (ints.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]).tobytes()
    return ints.astype("<i2" if bits == 16 else "<i4").tobytes()


# Redaction fails closed for an entity aligned less surely (align.char_log_posteriors). Chosen on the demo dev split:
# right SNER entities align at >= 0.67 (5th percentile), wrong ones at a median 0.31; thresholds of 0.01-0.03 keep
# the non-entity audio replaced at <= 10 %, 0.05 replaces 11 % (each fail-closed entity takes its whole gap).
MIN_ALIGN_CONFIDENCE = 0.02


def label_track(entities):
    """An Audacity label track (File > Import > Labels): start<TAB>end<TAB>TYPE text, a line per timed entity."""
    return "".join(f"{e['start_s']:.3f}\t{e['end_s']:.3f}\t{e['type']} {e['text']}\n"
                   for e in entities if e.get("start_s") is not None)


def redaction_plan(entities, duration, types, pad_s=0.0, min_align_confidence=MIN_ALIGN_CONFIDENCE):
    """What redaction replaces: [{type, text, from_s, to_s, why}] for each entity of `types` (decode.py's entity
    dicts: type, text, start, end, start_s, end_s, align_confidence). Fail closed: an entity without a time, or
    aligned less surely than min_align_confidence, takes the whole stretch between the located entities (timed,
    at or above the threshold) before and after its characters."""
    located = [e for e in entities if e.get("start_s") is not None
               and (e.get("align_confidence") or 0.0) >= min_align_confidence]
    plan = []
    for e in entities:
        if e["type"] not in types:
            continue
        if any(e is x for x in located):
            start, end, why = e["start_s"], e["end_s"], "aligned"
        else:
            before = [x["end_s"] for x in located if e["start"] is not None and x["end"] <= e["start"]]
            after = [x["start_s"] for x in located if e["end"] is not None and x["start"] >= e["end"]]
            start, end = max(before, default=0.0), min(after, default=duration)
            why = ("no time" if e.get("start_s") is None else
                   f"alignment confidence {e.get('align_confidence')} < {min_align_confidence}") + \
                ": the stretch between the located neighbours (fail closed)"
        plan.append({"type": e["type"], "text": e["text"], "from_s": round(max(0.0, start - pad_s), 3),
                     "to_s": round(min(duration, end + pad_s), 3), "why": why})
    return plan


def redact(wav, entities, out, types, fill="beep", pad_ms=100.0, min_align_confidence=MIN_ALIGN_CONFIDENCE):
    """Write `out`: the recording `wav` with its entities of `types` replaced (redact_wav; what and where:
    redaction_plan, which fails closed), and out + ".json": what was replaced and why."""
    replaced = redaction_plan(entities, wav_info(wav).seconds, types, pad_ms / 1000, min_align_confidence)
    redact_wav(wav, out, [(r["from_s"], r["to_s"]) for r in replaced], fill)
    sidecar = {"source": wav, "output": out, "fill": fill, "pad_ms": pad_ms, "types": types,
               "min_align_confidence": min_align_confidence, "replaced": replaced}
    write_atomic(out + ".json", json.dumps(sidecar, ensure_ascii=False, indent=1) + "\n")


def redact_wav(src, dst, intervals, fill="beep", block_frames=1 << 20):
    """Write dst: the wav src with every (start_s, end_s) interval replaced by a beep or silence, in every channel.
    The rest of the file (header, other chunks, every other sample) is copied byte for byte, so the recording keeps
    its duration, rate, channels and sample format. One pass, block_frames sample frames at a time (an hour-long
    recording is never held whole). -> the replaced intervals as (first, end) sample frames, merged and clipped to
    the recording. Written atomically."""
    if fill not in REDACT_FILLS:
        raise ValueError(f"fill must be one of {', '.join(REDACT_FILLS)}, got {fill!r}")
    src = Path(src)
    info = wav_info(src)
    block = info.channels * info.bits // 8                        # bytes of one sample frame (all channels)
    rate, frames = info.sample_rate, info.frames
    merged = merge_intervals((max(0, math.floor(a * rate)), min(frames, math.ceil(b * rate))) for a, b in intervals)
    with open(src, "rb") as f, atomic_path(dst) as tmp, open(tmp, "wb") as out:
        out.write(f.read(info.data_offset))                      # the header and every chunk before the samples
        for first in range(0, frames, block_frames):
            end = min(frames, first + block_frames)
            raw = bytearray(f.read((end - first) * block))
            for a, b in merged:                                  # the replaced stretches inside this block
                a, b = max(a, first), min(b, end)
                if a < b:
                    replacement = _float_to_samples(np.repeat(fill_wave(a, b, rate, fill), info.channels),
                                                    info.bits, info.is_float)   # interleaved
                    raw[(a - first) * block: (b - first) * block] = replacement
            out.write(raw)
        shutil.copyfileobj(f, out)                               # chunks after the samples, padding byte
    return merged


def merge_intervals(intervals):
    """[(start, end)] -> sorted, overlapping and touching ones merged, empty ones dropped."""
    merged = []
    for a, b in sorted(intervals):
        if a >= b:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def fill_wave(first, end, sample_rate, fill="beep"):
    """What redaction writes over samples [first, end) of a recording at sample_rate: float64 (end - first,), a
    beep in phase with the recording's clock, or silence."""
    if fill not in REDACT_FILLS:
        raise ValueError(f"fill must be one of {', '.join(REDACT_FILLS)}, got {fill!r}")
    if fill == "silence":
        return np.zeros(end - first)
    return BEEP_LEVEL * np.sin(2 * np.pi * BEEP_HZ * np.arange(first, end) / sample_rate)


def is_silent(samples):
    """True when a waveform's peak is below SILENCE_DBFS. samples: float (N,) with full scale 1.0, as read_wav and
    load_audio return them. Judge the raw samples: gain -n lifts dither to full scale and CMVN leaves noise."""
    samples = torch.as_tensor(samples)
    peak = float(samples.abs().max()) if samples.numel() else 0.0
    return peak < 10.0 ** (SILENCE_DBFS / 20)


def load_audio(path, sample_rate=SAMPLE_RATE):
    """Read a wav, mix to mono, resample to `sample_rate`. Returns float32 (N,)."""
    samples, rate = read_wav(path)
    return resample(samples, rate, sample_rate)


def load_audio_span(path, start_s, end_s, sample_rate=SAMPLE_RATE):
    """The stretch [start_s, end_s) of a wav as load_audio gives it, read and resampled on its own (at another rate
    its first and last few samples differ from load_audio's by the resampler's edge). Returns float32 (n,)."""
    rate = wav_info(path).sample_rate
    first = math.floor(start_s * rate)
    samples, _ = read_wav_frames(path, first, math.ceil(end_s * rate) - first)
    return resample(samples, rate, sample_rate)


# ---------------------------------------------------------------------------------------------------------------
# Band-limited resampling (polyphase Kaiser-windowed sinc)

@functools.lru_cache(maxsize=32)
def _polyphase_filter(orig, new, device):
    """Filter bank for rates already divided by their gcd. Returns (W (new, 1, K) float32, taps before block).

    Output sample q*new + p sits at input position q*orig + p*orig/new; it is the dot product of W[p] with the
    K input samples starting `left` samples before q*orig (so a strided conv1d computes all phases at once).
    """
    cutoff = 0.5 * ROLLOFF * min(1.0, new / orig)      # cycles per input sample
    half_width = SINC_ZEROS / (2 * cutoff)              # input samples on each side of the output position
    left = math.floor(half_width)
    right = math.ceil((new - 1) * orig / new + half_width)
    k = torch.arange(-left, right + 1, dtype=torch.float64)[None, :]          # (1, K) input offsets
    phase = torch.arange(new, dtype=torch.float64)[:, None] * orig / new      # (new, 1) output offsets
    d = phase - k                                                             # (new, K) distance in samples
    ratio = (d / half_width).clamp(-1, 1)
    window = torch.special.i0(KAISER_BETA * torch.sqrt(1 - ratio ** 2)) / torch.special.i0(
        torch.tensor(KAISER_BETA, dtype=torch.float64))
    w = 2 * cutoff * torch.sinc(2 * cutoff * d) * window * (d.abs() <= half_width)
    w = w / w.sum(dim=1, keepdim=True)                  # unit DC gain in every phase
    return w[:, None, :].to(device=device, dtype=torch.float32), left


def resample(x, orig_sr, new_sr):
    """Band-limited resampling of x (..., N) from orig_sr to new_sr Hz (integers); output length ceil(N*new/orig).

    Kaiser-windowed sinc low-pass at ROLLOFF x the lower Nyquist, polyphase over the gcd-reduced ratio.
    Returns x itself when the rates are equal.
    """
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"resample: sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return x
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    if new * (orig + 2 * SINC_ZEROS * max(1.0, orig / new) / ROLLOFF) > MAX_FILTER_ENTRIES:   # new x K
        raise ValueError(f"resample: {orig_sr} -> {new_sr} Hz reduces to {orig}:{new}, too fine a ratio for "
                         f"the polyphase filter bank; resample through an intermediate rate")
    w, left = _polyphase_filter(orig, new, x.device)    # (new, 1, K)
    n = x.shape[-1]
    n_out = -(-n * new // orig)
    blocks = -(-n_out // new)
    needed = (blocks - 1) * orig + w.shape[-1]          # padded length covering every block's window
    lead = x.reshape(-1, 1, n).float()                  # (B, 1, N)
    padded = torch.nn.functional.pad(lead, (left, max(0, needed - left - n)))
    out = torch.nn.functional.conv1d(padded, w, stride=orig)                  # (B, new, blocks): one row per phase
    out = out.transpose(1, 2).reshape(lead.shape[0], -1)[:, :n_out]          # (B, blocks*new) -> (B, n_out)
    return out.reshape(*x.shape[:-1], n_out).to(x.dtype if x.is_floating_point() else torch.float32)


def speed_perturb(x, factor, sample_rate=SAMPLE_RATE):
    """sox `speed factor` + `rate sample_rate`: play x (..., N) as if recorded at factor x the rate (pitch and
    tempo change). The length becomes round(N / factor), as sox's; factor 1.0 returns x itself.
    """
    n = perturbed_length(x.shape[-1], factor, sample_rate)   # refuses factor <= 0
    return x if factor == 1.0 else resample(x, round(factor * sample_rate), sample_rate)[..., :n]


def perturbed_length(n: int, factor: float, sample_rate=SAMPLE_RATE) -> int:
    """Samples of n samples after speed_perturb(factor): round(n / factor) at the resampler's rational factor."""
    if factor <= 0:
        raise ValueError(f"speed_perturb: factor must be positive, got {factor}")
    if factor == 1.0:
        return n
    orig = round(factor * sample_rate)
    return (2 * n * sample_rate + orig) // (2 * orig)


# ---------------------------------------------------------------------------------------------------------------
# The MMSpeech feature chain

def normalize_volume(x):
    """sox `gain -n` as torchaudio's sox_effects applies it to float x (N,) in [-1, 1]. Returns float32 (N,).

    torchaudio feeds sox int32 s = trunc(x * 2**31); sox scales by m = min((2**31-1)/max(s), -2**31/min(s))
    (max/min start at 0, so a side with no samples is ignored), rounds half away from zero, and torchaudio
    returns the int32 y rounded to 24 bits: ((y + 64) & ~127) / 2**31 (1.0 near the top). All-zero input stays 0.
    """
    s = torch.trunc((x.double() * 2.0 ** 31).clamp(-2.0 ** 31, 2.0 ** 31 - 1))    # sox's int32 samples
    peak_pos, peak_neg = s.max().item(), s.min().item()
    limits = [(2.0 ** 31 - 1) / peak_pos] if peak_pos > 0 else []
    limits += [-2.0 ** 31 / peak_neg] if peak_neg < 0 else []
    if not limits:                                      # silence: sox leaves it untouched
        return torch.zeros_like(x, dtype=torch.float32)
    scaled = s * min(limits)
    y = (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)).clamp(-2.0 ** 31, 2.0 ** 31 - 1).long()
    y24 = torch.where(y > 2 ** 31 - 1 - 64, 2 ** 31, (y + 64) & ~127)
    return (y24.double() / 2.0 ** 31).float()


@functools.lru_cache(maxsize=16)
def _fbank_constants(num_mel_bins, sample_rate, low_freq, high_freq, device):
    """Povey window (L,) and Kaldi mel matrix (fft_size//2 + 1, M), float32.

    Both are computed in float32 arithmetic, as Kaldi (BaseFloat) and torchaudio do: float64 constants would
    be more exact, but shift quiet mel bins by up to 6e-3 in log from the reference features.
    """
    frame_length = int(sample_rate * 0.025)
    fft_size = 1 << (frame_length - 1).bit_length()    # 400 -> 512
    window = torch.hann_window(frame_length, periodic=False, dtype=torch.float32) ** 0.85

    nyquist = sample_rate / 2
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if not 0 <= low_freq < high <= nyquist:
        raise ValueError(f"kaldi_fbank: need 0 <= low_freq < high_freq <= {nyquist}, got {low_freq}, {high}")
    mel_low, mel_high = (1127.0 * math.log(1.0 + f / 700.0) for f in (low_freq, high))
    step = (mel_high - mel_low) / (num_mel_bins + 1)
    index = torch.arange(num_mel_bins, dtype=torch.float32)[None, :]           # (1, M)
    left, center, right = (mel_low + (index + i) * step for i in (0.0, 1.0, 2.0))   # (1, M) each, float32
    freq = torch.arange(fft_size // 2, dtype=torch.float32)[:, None] * (sample_rate / fft_size)   # (F, 1)
    bin_mel = 1127.0 * torch.log(1.0 + freq / 700.0)                          # no Nyquist bin (Kaldi)
    rising = (bin_mel - left) / (center - left)
    falling = (right - bin_mel) / (right - center)
    weights = torch.minimum(rising, falling).clamp(min=0)                     # (F, M) triangles
    weights = torch.cat([weights, torch.zeros(1, num_mel_bins)])              # Nyquist bin: weight 0
    return window.to(device), weights.to(device), fft_size


def num_fbank_frames(samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Frames kaldi_fbank makes of `samples` samples: 25 ms windows every 10 ms, only whole windows (snip_edges)."""
    frame_length, shift = int(sample_rate * 0.025), int(sample_rate * 0.010)
    return max(0, 1 + (samples - frame_length) // shift)


def kaldi_fbank(waveforms, lengths=None, num_mel_bins=NUM_MEL_BINS, sample_rate=SAMPLE_RATE,
                low_freq=20.0, high_freq=0.0, preemphasis=0.97):
    """Kaldi log mel filterbank (torchaudio.compliance.kaldi.fbank defaults, dither 0), batched, CPU or GPU.

    waveforms: (B, N) or (N,), int16 scale (x * 2**15); lengths: (B,) true sample counts or None (all N).
    Frames: 25 ms every 10 ms, snip_edges (only whole frames), DC removed per frame, pre-emphasis, povey
    window, 512-point power spectrum, triangular mel bins (mel = 1127 ln(1 + f/700)), log floored at eps.
    high_freq <= 0 means Nyquist + high_freq (Kaldi). Computes in float32 whatever the input dtype.
    Returns (feats (B, T, M) zero past each row's frames, num_frames (B,) int64); the B dim is dropped for
    1-D input.
    """
    single = waveforms.dim() == 1
    x = waveforms.reshape(1, -1) if single else waveforms
    x = x.float()                                                   # (B, N)
    if lengths is None:
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=x.device)
    if lengths.shape != (x.shape[0],) or bool((lengths < 0).any() | (lengths > x.shape[1]).any()):
        raise ValueError(f"kaldi_fbank: lengths must be (B,) = ({x.shape[0]},) within [0, {x.shape[1]}], "
                         f"got {lengths.tolist()}")
    window, mel, fft_size = _fbank_constants(num_mel_bins, sample_rate, float(low_freq), float(high_freq),
                                             x.device)
    frame_length, shift = window.shape[0], int(sample_rate * 0.010)
    num_frames = torch.where(lengths >= frame_length, (lengths - frame_length) // shift + 1, 0)  # (B,)
    t = max(int(num_frames.max()), 0) if len(num_frames) else 0
    if t == 0:
        feats = x.new_zeros(x.shape[0], 0, num_mel_bins)
    else:
        frames = x[:, : (t - 1) * shift + frame_length].unfold(-1, frame_length, shift)   # (B, T, L) view
        frames = frames - frames.mean(dim=-1, keepdim=True)
        # pre-emphasis y[j] = x[j] - c x[j-1], y[0] = x[0] - c x[0]; written into one buffer to avoid
        # temporaries (large allocations dominate the run time at this size)
        emphasized = torch.empty_like(frames)
        torch.mul(frames[..., :-1], preemphasis, out=emphasized[..., 1:])
        torch.mul(frames[..., :1], preemphasis, out=emphasized[..., :1])
        emphasized = torch.sub(frames, emphasized, out=emphasized).mul_(window)
        # |X|^2 as abs()^2 rather than re^2 + im^2: the latter differs from torchaudio in the last bit
        power = torch.fft.rfft(emphasized, n=fft_size).abs().square_()       # (B, T, F+1)
        feats = (power @ mel).clamp_(min=LOG_FLOOR).log_()                   # (B, T, M)
        if bool((num_frames < t).any()):
            valid = torch.arange(t, device=x.device)[None, :] < num_frames[:, None]   # (B, T)
            feats.masked_fill_(~valid[..., None], 0.0)
    return (feats[0], num_frames[0]) if single else (feats, num_frames)


def utterance_cmvn(feats):
    """fairseq UtteranceCMVN on feats (T, M): (x - mean) / sqrt(max(E[x^2] - mean^2, 1e-10)) per bin.

    Bit-compatible with fairseq's numpy float32 arithmetic: the time sums are numpy's own float32 reductions
    (sequential over frames). That matters for a constant input such as the pseudo speech, where the variance
    is rounding noise clamped to 1e-10 and the output is rounding noise x 1e5 (-0.0954 for 10,000 zeros).
    """
    if feats.dim() != 2 or feats.shape[0] == 0:
        raise ValueError(f"utterance_cmvn: expected (T, M) features with T > 0, got {tuple(feats.shape)}")
    x = feats.detach().to("cpu", torch.float32).numpy()
    t = np.float32(x.shape[0])
    mean = x.sum(axis=0) / t                                    # (M,)
    var = (x * x).sum(axis=0) / t - mean * mean
    out = (x - mean) / np.sqrt(np.maximum(var, np.float32(1e-10)))
    return torch.from_numpy(out).to(feats.device)


def speech_features(x, cmvn="utterance", speed=1.0):
    """The whole MMSpeech chain for x (N,) float in [-1, 1] at 16 kHz. Returns fbank (T, 80) float32.

    Pseudo speech (absent modality) is speech_features(torch.zeros(data.PSEUDO_SPEECH_SAMPLES), cmvn).
    """
    if cmvn not in CMVN_MODES:
        raise ValueError(f"speech_features: cmvn must be one of {CMVN_MODES}, got {cmvn!r}")
    if x.dim() != 1:
        raise ValueError(f"speech_features: expected a 1-D waveform, got shape {tuple(x.shape)}")
    x = speed_perturb(x, speed)
    if x.shape[0] < int(SAMPLE_RATE * 0.025):
        raise ValueError(f"speech_features: {x.shape[0]} samples is shorter than one 25 ms frame")
    feats, _ = kaldi_fbank(normalize_volume(x) * 2 ** 15)     # (T, 80)
    return utterance_cmvn(feats) if cmvn == "utterance" else feats
