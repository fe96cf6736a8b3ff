"""Tests for audio.py: wav reading, resampling, speed perturbation, Kaldi fbank, gain -n, CMVN, the full chain.

References: kaldi-native-fbank (an independent C++ Kaldi fbank), tests/fixtures/ref_fbank.pt (ModelScope's own
preprocessing, written by reference/ref_fbank_make.py), the sox program (resampling, speed, gain -n; tests
skip without it), torchaudio (only where it imports). Measured differences are printed (pytest -s).
"""
import math
import shutil
import struct
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import audio  # noqa: E402
import data  # noqa: E402
import files  # noqa: E402
from numerics import EPS, excess, fp32_tol  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"
WAVS = sorted((FIXTURES / "wavs").glob("utt*.wav"))
needs_sox = pytest.mark.skipif(shutil.which("sox") is None, reason="the sox program is not installed")


def write_wav(path, samples, rate, width=2):
    """samples: int numpy array (N,) or (N, C) already in the PCM range of `width` bytes."""
    samples = np.asarray(samples)
    frames = samples if samples.ndim == 2 else samples[:, None]             # (N, C)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(frames.shape[1]), f.setsampwidth(width), f.setframerate(rate)
        if width == 1:
            data = (frames + 128).astype(np.uint8).tobytes()
        elif width == 3:
            data = frames.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
        else:
            data = frames.astype("<i2" if width == 2 else "<i4").tobytes()
        f.writeframes(data)
    return path


def tone(freq, rate, seconds=0.25):
    t = torch.arange(int(rate * seconds), dtype=torch.float64) / rate
    return torch.sin(2 * math.pi * freq * t).float()


def sox_f32(*args):
    """Run sox writing raw float32 to stdout (no dither) and return it as a tensor."""
    out = subprocess.run(["sox", "-D", "-V1", *map(str, args)], capture_output=True, check=True).stdout
    return torch.from_numpy(np.frombuffer(out, dtype="<f4").copy())


def int16_scale(path):
    """What kaldi.fbank receives for a 16 kHz wav: gain -n, then x 2**15."""
    return audio.normalize_volume(audio.read_wav(path)[0]) * 2 ** 15


# ---------------------------------------------------------------------------------------------------------------
# wav reading

def test_read_wav_16bit_mono_is_k_over_32768(tmp_path):
    k = np.array([0, 1, -1, 32767, -32768, 1234], dtype=np.int16)
    x, rate = audio.read_wav(write_wav(tmp_path / "a.wav", k, 16000))
    assert rate == 16000 and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(k.astype(np.float32) / 32768))     # librosa.load's values


def test_read_wav_stereo_is_averaged(tmp_path):
    left, right = np.array([100, -200, 32767]), np.array([300, 200, -32768])
    x, _ = audio.read_wav(write_wav(tmp_path / "s.wav", np.stack([left, right], 1), 16000))
    assert torch.allclose(x, torch.tensor((left + right) / 2 / 32768, dtype=torch.float32), atol=0, rtol=0)


@pytest.mark.parametrize("width,scale", [(1, 128), (3, 2 ** 23), (4, 2 ** 31)])
def test_read_wav_other_sample_widths(tmp_path, width, scale):
    k = np.array([0, 1, -1, scale - 1, -scale, scale // 3])
    x, _ = audio.read_wav(write_wav(tmp_path / "w.wav", k, 16000, width))
    assert excess(x, k / scale, fp32_tol(k / scale, 1, k=0.5)) <= 1        # one float32 rounding of k / scale


@pytest.mark.parametrize("rate", [8000, 44100])
def test_load_audio_resamples_to_16k(tmp_path, rate):
    k = (tone(440.0, rate) * 16000).round().numpy().astype(np.int16)
    x = audio.load_audio(write_wav(tmp_path / "r.wav", k, rate))
    assert x.shape == (math.ceil(len(k) * 16000 / rate),)
    expected = tone(440.0, 16000)[: len(x)] * (16000 / 32768)
    assert (x - expected)[200:-200].abs().max() < 1e-3       # 16-bit quantisation of the source dominates


def test_read_wav_bad_inputs(tmp_path):
    with pytest.raises(files.InputError, match="nope.wav"):
        audio.read_wav(tmp_path / "nope.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.wav.*empty"):
        audio.read_wav(tmp_path / "empty.wav")
    (tmp_path / "text.wav").write_text("hello, not audio")
    with pytest.raises(files.InputError, match="text.wav.*not a wav file"):
        audio.read_wav(tmp_path / "text.wav")
    with pytest.raises(ValueError, match="zero.wav.*no samples"):
        audio.read_wav(write_wav(tmp_path / "zero.wav", np.zeros(0, np.int16), 16000))
    # an ADPCM wav (format tag 2) and a 40-bit PCM header: both refused with a clear message
    for name, tag, bits in [("adpcm.wav", 2, 16), ("wide.wav", 1, 40)]:
        block = bits // 8
        fmt = struct.pack("<HHIIHH", tag, 1, 16000, 16000 * block, block, bits)
        body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", 4 * block) + \
            bytes(4 * block)
        (tmp_path / name).write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
        with pytest.raises(ValueError, match=name):
            audio.read_wav(tmp_path / name)


# ---------------------------------------------------------------------------------------------------------------
# resampling and speed perturbation

RATE_PAIRS = [(44100, 16000), (22050, 16000), (48000, 16000), (8000, 16000), (16000, 8000), (17600, 16000),
              (14400, 16000)]


@pytest.mark.parametrize("orig,new", RATE_PAIRS)
def test_resample_passes_tones_below_cutoff(orig, new):
    nyquist = min(orig, new) / 2
    for freq in (100.0, 1000.0, 0.5 * nyquist, 0.88 * nyquist):
        y = audio.resample(tone(freq, orig), orig, new)
        assert y.shape == (math.ceil(orig * 0.25 * new / orig),)
        err = (y - tone(freq, new)[: len(y)])[300:-300].abs().max().item()   # edges see the zero padding
        assert err < 1e-4, (orig, new, freq, err)


@pytest.mark.parametrize("orig,new", [(44100, 16000), (48000, 16000), (17600, 16000), (16000, 8000)])
def test_resample_rejects_tones_above_new_nyquist(orig, new):
    for freq in (1.01 * new / 2, (new + orig) / 4, 0.49 * orig):           # between the two Nyquists
        peak = audio.resample(tone(freq, orig), orig, new)[300:-300].abs().max().item()
        assert 20 * math.log10(peak) < -80, (orig, new, freq, 20 * math.log10(peak))   # measured <= -90 dB


def test_resample_identity_batch_and_errors():
    x = torch.randn(3, 4410)
    assert audio.resample(x, 16000, 16000) is x
    y = audio.resample(x, 44100, 16000)
    assert y.shape == (3, 1600)
    taps = audio._polyphase_filter(441, 160, x.device)[0].shape[-1]         # one output = a dot product of taps
    assert excess(y[1], audio.resample(x[1], 44100, 16000), fp32_tol(x[1], taps)) <= 1
    assert audio.resample(x.double(), 44100, 16000).dtype == torch.float64
    with pytest.raises(ValueError, match="positive"):
        audio.resample(x, 0, 16000)
    with pytest.raises(ValueError, match="too fine"):
        audio.resample(x, 16001, 16000)


@needs_sox
@pytest.mark.parametrize("rate,tolerance", [(44100, 1e-3), (8000, 5e-3)])
def test_resample_close_to_sox_on_speech(tmp_path, rate, tolerance):
    """A real utterance at `rate` (made by sox), brought to 16 kHz by us and by `sox rate 16000`."""
    source = tmp_path / f"utt_{rate}.wav"
    subprocess.run(["sox", "-D", "-V1", WAVS[2], "-r", str(rate), "-b", "16", source], check=True)
    x, r = audio.read_wav(source)
    ours, ref = audio.resample(x, r, 16000), sox_f32(source, "-t", "f32", "-", "rate", "16000")
    assert abs(len(ours) - len(ref)) <= 1
    n = min(len(ours), len(ref))
    rel = ((ours[:n] - ref[:n]).norm() / ref[:n].norm()).item()
    print(f"\nresample {rate}->16000 vs sox: relative RMS error {rel:.2e}, "
          f"max abs {(ours[:n] - ref[:n]).abs().max():.2e}")
    assert rel < tolerance                               # measured 4.0e-4 (44.1 kHz), 2.4e-3 (8 kHz)


def test_speed_perturb_length_and_identity():
    x = torch.randn(16003)
    assert audio.speed_perturb(x, 1.0) is x
    for factor in (0.9, 1.1):
        assert audio.speed_perturb(x, factor).shape == (round(len(x) / factor),)
    frames = {f: audio.speech_features(x.clamp(-1, 1), speed=f).shape[0] for f in (0.9, 1.0, 1.1)}
    assert abs(frames[0.9] - frames[1.0] / 0.9) <= 2 and abs(frames[1.1] - frames[1.0] / 1.1) <= 2
    with pytest.raises(ValueError, match="speed_perturb: factor must be positive"):
        audio.speed_perturb(x, 0)


@needs_sox
@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturb_close_to_sox(factor):
    x, _ = audio.read_wav(WAVS[2])
    ours = audio.speed_perturb(x, factor)
    ref = sox_f32(WAVS[2], "-t", "f32", "-", "speed", factor, "rate", "16000")
    assert ours.shape == ref.shape                       # same length convention as sox
    rel = ((ours - ref).norm() / ref.norm()).item()
    print(f"\nspeed {factor} vs sox: relative RMS error {rel:.2e}")
    assert rel < 3e-3                                    # measured 4.8e-4 (0.9), 9.5e-4 (1.1)


# ---------------------------------------------------------------------------------------------------------------
# gain -n

def test_normalize_volume_closed_form_edge_cases():
    assert torch.equal(audio.normalize_volume(torch.zeros(100)), torch.zeros(100))   # no division by zero
    y = audio.normalize_volume(torch.tensor([0.25, 0.125, 0.0]))                   # no negative samples
    assert y[0] == 1.0 and y[1] == 0.5 and y[2] == 0.0
    y = audio.normalize_volume(torch.tensor([-0.25, 0.125, 0.0]))                  # negative peak -> -1
    assert y[0] == -1.0 and y[1] == 0.5
    x = torch.rand(1000) - 0.5
    # ~ x / max|x|, up to the 24-bit rounding (half a step: 2**-25) and one float32 rounding
    assert (audio.normalize_volume(x) - x / x.abs().max()).abs().max() <= 2 ** -25 + EPS / 2


@needs_sox
def test_normalize_volume_matches_sox_program():
    """torchaudio feeds sox int32 trunc(x * 2**31) and returns 24-bit-rounded floats; sox -t s32 here."""
    gen = torch.Generator().manual_seed(0)
    for x in [torch.rand(5000, generator=gen) * 0.3 - 0.1, torch.rand(500, generator=gen) * 0.2,
              -torch.rand(500, generator=gen) * 0.7, audio.read_wav(WAVS[0])[0]]:
        s = torch.trunc(x.double() * 2 ** 31).to(torch.int32).numpy().astype("<i4")
        out = subprocess.run(["sox", "-D", "-V1", "-t", "s32", "-r", "16000", "-c", "1", "-", "-t", "s32", "-",
                              "gain", "-n"], input=s.tobytes(), capture_output=True, check=True).stdout
        y = torch.from_numpy(np.frombuffer(out, dtype="<i4").astype(np.int64))
        expected = torch.where(y > 2 ** 31 - 1 - 64, 2 ** 31, (y + 64) & ~127).double() / 2 ** 31
        assert torch.equal(audio.normalize_volume(x), expected.float())


# ---------------------------------------------------------------------------------------------------------------
# Kaldi fbank

FFT_SIZE = 512      # the longest float32 sum behind one fbank value (the frame's DC mean sums 400)


def fbank_excess(ours, ref):
    """How far log mel energies (..., T, M) are from `ref`, in units of float32 rounding; <= 1 passes.

    The FFT rounds relative to the whole frame, so a mel energy E is off by up to ~EPS * sqrt(512) times the
    frame's loudest mel energy, whatever its own size: compared as energies, tol = fp32_tol(E, 512) per frame.
    (In the log, that is tol / E: quiet bins move most, e.g. 1e-3 in a bin 23 below the frame's loudest.)
    """
    energy, ref_energy = ours.double().exp(), ref.double().exp()
    return excess(energy, ref_energy, fp32_tol(ref_energy, FFT_SIZE, dim=-1))


def knf_fbank(samples):
    knf = pytest.importorskip("kaldi_native_fbank", reason="kaldi-native-fbank (requirements-test.txt) missing")
    import bench  # its knf_options(): torchaudio's kaldi.fbank defaults with 80 bins and dither 0
    opts = bench.knf_options()
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000, samples.numpy())
    fbank.input_finished()
    return torch.tensor(np.array([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]))


def test_fbank_matches_kaldi_native_fbank():
    inputs = {p.name: int16_scale(p) for p in WAVS}
    inputs["noise"] = torch.randn(32000, generator=torch.Generator().manual_seed(0)) * 3000
    for name, x in inputs.items():
        ref = knf_fbank(x)
        ours, frames = audio.kaldi_fbank(x)
        assert ours.shape == ref.shape and frames == ref.shape[0]
        diff = (ours - ref).abs()
        loud = diff[ref > 8]
        print(f"\n{name}: vs kaldi-native-fbank max abs {diff.max():.2e}, mean {diff.mean():.2e}, "
              f"bins with log energy > 8: max {loud.max():.2e}")
        # knf rounds its mel weights differently (2e-5); quiet bins amplify float32 noise in the log
        assert diff.mean() < 3e-5 and loud.max() < 5e-4 and diff.max() < 2e-2


def test_fbank_short_and_batched():
    gen = torch.Generator().manual_seed(1)
    lengths = [16000, 399, 400, 559, 560, 9000]
    waves = [torch.randn(n, generator=gen) * 1000 for n in lengths]
    batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)                # (B, N)
    feats, frames = audio.kaldi_fbank(batch, torch.tensor(lengths))
    assert frames.tolist() == [98, 0, 1, 1, 2, 54]                                  # 1 + (n - 400) // 160
    assert feats.shape == (6, 98, 80)
    for row, (x, t) in enumerate(zip(waves, frames.tolist())):
        single, t1 = audio.kaldi_fbank(x)
        assert t1 == t and single.shape == (t, 80)
        assert fbank_excess(feats[row, :t], single) <= 1 if t else True          # BLAS may block B rows apart
        assert not feats[row, t:].any()                                             # padding frames are 0
    assert audio.kaldi_fbank(torch.zeros(100))[0].shape == (0, 80)
    assert audio.kaldi_fbank(batch.double(), torch.tensor(lengths))[0].dtype == torch.float32
    with pytest.raises(ValueError, match="lengths"):
        audio.kaldi_fbank(batch, torch.tensor(lengths) + 1)                          # longer than the batch


def test_fbank_matches_torchaudio_when_available():
    torchaudio = pytest.importorskip("torchaudio", reason="torchaudio does not import beside this torch")
    x = int16_scale(WAVS[1])
    ref = torchaudio.compliance.kaldi.fbank(x[None], num_mel_bins=80, sample_frequency=16000, dither=0.0)
    assert fbank_excess(audio.kaldi_fbank(x)[0], ref[0]) <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fbank_on_gpu_matches_cpu():
    x = torch.stack([int16_scale(WAVS[0]), int16_scale(WAVS[0]).flip(0)])
    cpu, frames = audio.kaldi_fbank(x, torch.tensor([47316, 30000]))
    gpu, frames_gpu = audio.kaldi_fbank(x.cuda(), torch.tensor([47316, 30000]).cuda())
    diff = (gpu.cpu() - cpu).abs()
    assert torch.equal(frames, frames_gpu.cpu()) and diff.mean() < 3e-5 and diff[cpu > 8].max() < 5e-4
    y, ref = audio.resample(x.cuda(), 16000, 44100).cpu(), audio.resample(x, 16000, 44100)
    assert (y - ref).abs().max() < 2e-3 * ref.abs().max()    # cuDNN may run the conv in TF32
    z = audio.speech_features(x[0].cuda() / 2 ** 15)
    assert z.device.type == "cuda" and (z.cpu() - audio.speech_features(x[0] / 2 ** 15)).abs().mean() < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# the whole chain against ModelScope's own preprocessing

@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURES / "ref_fbank.pt", weights_only=True)


def test_chain_matches_reference_dump(reference):
    """gain -n is exact integer arithmetic: bit-exact. The fbank is float32 FFT and matmul, whose summation order
    is the CPU's (the dump was made with AVX2 kernels): bit-exact under AVX2, within fbank_excess <= 1 anywhere
    (measured 0.18 with ATEN_CPU_CAPABILITY=default: log differences up to 2.8e-5 in loud bins, 1.1e-3 in quiet
    ones). CMVN is numpy float32 on one thread, the same on every CPU: exact on the reference's own fbank."""
    for i, name in enumerate(reference["wavs"]):
        x, rate = audio.read_wav(FIXTURES / "wavs" / name)
        assert rate == 16000
        waveform = audio.normalize_volume(x) * 2 ** 15
        assert torch.equal(waveform, reference["waveform"][i])                     # gain -n bit-exact
        raw, _ = audio.kaldi_fbank(reference["waveform"][i])
        without = audio.speech_features(x, cmvn="none")
        e_raw, e_none = fbank_excess(raw, reference["fbank_raw"][i]), fbank_excess(without, reference["fbank_raw"][i])
        print(f"\n{name}: vs reference dump, in float32 tolerances: raw fbank {e_raw:.2f}, cmvn none {e_none:.2f} "
              f"(max log difference {(raw - reference['fbank_raw'][i]).abs().max():.1e})")
        assert e_raw <= 1 and e_none <= 1
        assert torch.equal(audio.utterance_cmvn(reference["fbank_raw"][i]), reference["fbank"][i])
        assert torch.equal(audio.speech_features(x, cmvn="utterance"), audio.utterance_cmvn(without))


def test_chain_tolerance_catches_a_planted_preemphasis_bug(reference):
    """Pre-emphasis 0.971 instead of 0.97 moves low bins by ~0.1 in the log: >= 10x the tolerance (measured
    ~6000x), so the tolerance above cannot hide a bug of that size."""
    for i in range(len(reference["wavs"])):
        planted, _ = audio.kaldi_fbank(reference["waveform"][i], preemphasis=0.971)
        assert fbank_excess(planted, reference["fbank_raw"][i]) >= 10


def test_pseudo_speech_matches_reference(reference):
    pseudo = reference["pseudo"]
    assert pseudo["samples"] == data.PSEUDO_SPEECH_SAMPLES and pseudo["waveform_max"] == 0.0
    zeros = torch.zeros(data.PSEUDO_SPEECH_SAMPLES)
    assert torch.equal(audio.speech_features(zeros, cmvn="none"), pseudo["fbank_raw"])   # log(eps) everywhere
    ours = audio.speech_features(zeros, cmvn="utterance")
    # CMVN of a constant is float32 rounding noise / sqrt(1e-10): not 0 in the reference, and reproduced exactly
    assert torch.equal(ours, pseudo["fbank"]) and pseudo["fbank"].abs().min() > 0.01


def test_utterance_cmvn_normalises_and_checks_shape():
    x = torch.randn(300, 80, generator=torch.Generator().manual_seed(2)) * 3 + 7
    y = audio.utterance_cmvn(x)
    # sums of T = 300 terms of size max|x| (~20), divided by the std (3): the mean's rounding, in units of std
    tol = fp32_tol(x, 300) / 3
    assert y.mean(0).abs().max() <= tol and (y.std(0, unbiased=False) - 1).abs().max() <= tol
    with pytest.raises(ValueError, match="T > 0"):
        audio.utterance_cmvn(torch.zeros(0, 80))


def test_speech_features_bad_inputs():
    with pytest.raises(ValueError, match="cmvn"):
        audio.speech_features(torch.zeros(16000), cmvn="global")
    with pytest.raises(ValueError, match="shorter than one"):
        audio.speech_features(torch.zeros(399))
    with pytest.raises(ValueError, match="1-D"):
        audio.speech_features(torch.zeros(2, 16000))


# ---------------------------------------------------------------------------------------------------------------
# Issue #14: silence judged on the raw samples, wav formats beyond 16-bit PCM, every read error an InputError

def sox_wav(path, *args):
    """Run `sox -n ... path <effects>`; args are the output options then the effects."""
    subprocess.run(["sox", "-V1", "-n", "-r", "16000", *map(str, args[:args.index("--")]), str(path),
                    *map(str, args[args.index("--") + 1:])], check=True)
    return path


def peak_lsb(path):
    """The largest |sample| of a 16-bit wav in LSB (read with the standard library, not with audio.py)."""
    with wave.open(str(path), "rb") as f:
        return int(np.abs(np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.int32)).max())


def silence_wavs(tmp_path):
    """Exact digital zeros (sox -D: no dither) and 1-2 LSB dither, as sox writes them."""
    zeros = sox_wav(tmp_path / "zeros.wav", "-D", "-b", "16", "--", "trim", "0", "1")
    dither = sox_wav(tmp_path / "dither.wav", "-b", "16", "--", "trim", "0", "1")          # sox dithers by default
    hiss = sox_wav(tmp_path / "hiss.wav", "-b", "16", "--", "synth", "1", "whitenoise", "vol", "0.00003")
    assert peak_lsb(zeros) == 0 and 1 <= peak_lsb(dither) <= 2 and 1 <= peak_lsb(hiss) <= 2
    return [zeros, dither, hiss]


@needs_sox
def test_silence_is_judged_on_raw_samples(tmp_path):
    for path in silence_wavs(tmp_path):
        assert audio.is_silent(audio.read_wav(path)[0]) and audio.is_silent(audio.load_audio(path)), path.name
    for path in WAVS:                                       # real speech
        assert not audio.is_silent(audio.read_wav(path)[0]), path.name
    just_below, just_above = (10.0 ** ((audio.SILENCE_DBFS + d) / 20) for d in (-0.1, 0.1))
    assert audio.is_silent(torch.full((100,), -just_below)) and not audio.is_silent(torch.full((100,), just_above))
    assert audio.is_silent(torch.zeros(0))


@needs_sox
def test_decoder_warns_on_silence_and_not_on_speech(tmp_path):
    """Recognizer._speech with a stand-in recogniser (no model needed): the warning used to test the fbank's std
    after CMVN, which is rounding noise (about 4e-12), never exactly 0."""
    import types

    import recognize
    import options

    featurizer = types.SimpleNamespace(cmvn="utterance",
                                       speech=lambda path: audio.speech_features(audio.load_audio(path)))
    recognizer = types.SimpleNamespace(options=options.DecodeOptions(max_audio_seconds=60.0), featurizer=featurizer)

    def warnings(**request):
        return recognize.Recognizer._speech(recognizer, recognize.Request(**request))[1]

    for path in silence_wavs(tmp_path):
        assert any("silent" in w and path.name in w for w in warnings(wav=str(path))), path.name
    assert any("silent" in w for w in warnings(waveform=torch.zeros(32000), id="0"))   # 2 s: fbank std 3.6e-12
    assert warnings(wav=str(WAVS[0])) == [] and warnings(waveform=audio.read_wav(WAVS[0])[0], id="1") == []


SOX_FORMATS = {                 # name: sox output options; the test signal is 440 Hz (660 Hz on channel 2), -6 dBFS
    "s24": ["-b", "24", "-e", "signed-integer"], "s32": ["-b", "32", "-e", "signed-integer"],
    "f32": ["-b", "32", "-e", "floating-point"], "f64": ["-b", "64", "-e", "floating-point"],
    "u8": ["-b", "8", "-e", "unsigned-integer"], "s24-stereo": ["-b", "24", "-e", "signed-integer", "-c", "2"],
    "f32-stereo": ["-b", "32", "-e", "floating-point", "-c", "2"]}


@needs_sox
@pytest.mark.parametrize("name", SOX_FORMATS)
def test_read_wav_sox_formats_match_16bit(tmp_path, name):
    """Each format against the same signal written as 16-bit PCM. sox -D rounds both to their grids, so they
    differ by at most half an LSB of each: 1 LSB of 16 bit (8-bit: half of its own LSB + half of 16 bit's)."""
    options = SOX_FORMATS[name]
    channels = options[options.index("-c") + 1] if "-c" in options else "1"
    tones = ["sine", "440", "sine", "660"][: 2 * int(channels)]                   # one tone per channel
    effects = ["--", "synth", "0.5", *tones, "vol", "0.5"]
    path = sox_wav(tmp_path / f"{name}.wav", "-D", *options, *effects)
    ref_path = sox_wav(tmp_path / "ref16.wav", "-D", "-b", "16", "-e", "signed-integer", "-c", channels, *effects)
    info = audio.wav_info(path)
    bits, is_float = int(options[1]), options[3] == "floating-point"
    assert (info.sample_rate, info.channels, info.bits, info.is_float, info.frames) == \
        (16000, int(channels), bits, is_float, 8000) and info.seconds == 0.5
    assert info.extensible == (bits > 16 and not is_float) and not audio.wav_info(ref_path).extensible  # sox's
    x, rate = audio.read_wav(path)
    ref, _ = audio.read_wav(ref_path)
    tolerance = 0.5 * (2.0 ** -15 + 2.0 ** -(min(bits, 16) - 1))
    assert rate == 16000 and x.shape == ref.shape == (8000,)
    assert (x - ref).abs().max() <= tolerance and ref.abs().max() > 0.4


def riff(*chunks):
    """A RIFF/WAVE file from (id, payload) chunks; odd payloads get their pad byte."""
    body = b"WAVE" + b"".join(cid + struct.pack("<I", len(data)) + data + b"\0" * (len(data) % 2)
                              for cid, data in chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def fmt_chunk(tag=1, channels=1, rate=16000, bits=16, block_align=None):
    block = channels * bits // 8 if block_align is None else block_align
    return b"fmt ", struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)


@needs_sox
def test_read_wav_extensible_float(tmp_path):
    """sox writes float as format 3; the same samples under a WAVE_FORMAT_EXTENSIBLE header with the float
    subformat GUID (as other tools write them) read the same."""
    plain = sox_wav(tmp_path / "f32.wav", "-D", "-b", "32", "-e", "floating-point", "--", "synth", "0.1", "sine",
                    "440")
    info = audio.wav_info(plain)
    samples = plain.read_bytes()[info.data_offset:][: info.frames * 4]
    guid = struct.pack("<H", 3) + bytes.fromhex("000000001000800000aa00389b71")
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 1, 16000, 64000, 4, 32, 22, 32, 4) + guid
    path = tmp_path / "f32-ext.wav"
    path.write_bytes(riff((b"fmt ", fmt), (b"data", samples)))
    ext = audio.wav_info(path)
    assert ext.extensible and ext.is_float and ext.bits == 32 and ext.frames == info.frames == 1600
    assert torch.equal(audio.read_wav(path)[0], audio.read_wav(plain)[0])


def test_wav_info_skips_other_chunks_and_odd_padding(tmp_path):
    k = np.array([1, -2, 300, -32768, 32767], dtype="<i2")
    path = tmp_path / "chunks.wav"
    path.write_bytes(riff((b"LIST", b"odd"), fmt_chunk(), (b"junk", b"x" * 7), (b"data", k.tobytes()),
                          (b"tail", b"after the data")))
    info = audio.wav_info(path)
    assert info == audio.WavInfo(16000, 1, 16, False, 5, False, 12 + 8 + 4 + 24 + 16 + 8)
    assert path.read_bytes()[info.data_offset:][:10] == k.tobytes()
    x, rate = audio.read_wav(path)
    assert rate == 16000 and torch.equal(x, torch.from_numpy(k.astype(np.float32) / 32768))


BROKEN = {  # name: (file bytes, words the message must hold)
    "cut-header.wav": (riff(fmt_chunk(), (b"data", bytes(16)))[:30], ["cut short", "fmt"]),
    "cut-chunk-header.wav": (riff(fmt_chunk())[:-12] + riff(fmt_chunk())[-12:] + b"dat", ["no data chunk"]),
    "cut-data.wav": (riff(fmt_chunk(), (b"data", bytes(16)))[:-6], ["cut short", "data", "16 bytes"]),
    "no-data.wav": (riff(fmt_chunk(), (b"LIST", b"info")), ["no data chunk"]),
    "no-fmt.wav": (riff((b"data", bytes(16))), ["no fmt chunk"]),
    "short-fmt.wav": (riff((b"fmt ", bytes(12)), (b"data", bytes(16))), ["fmt chunk of 12 bytes"]),
    "rate-0.wav": (riff(fmt_chunk(rate=0), (b"data", bytes(16))), ["sample rate 0 Hz"]),
    "rate-7919.wav": (riff(fmt_chunk(rate=7919), (b"data", bytes(16))), ["sample rate 7919 Hz"]),
    "rate-huge.wav": (riff(fmt_chunk(rate=10 ** 9), (b"data", bytes(16))), ["sample rate 1000000000 Hz"]),
    "no-channels.wav": (riff(fmt_chunk(channels=0, block_align=2), (b"data", bytes(16))), ["0 channels"]),
    "partial-frame.wav": (riff(fmt_chunk(channels=2), (b"data", bytes(15))), ["15 bytes", "4-byte frames"]),
    "block-align.wav": (riff(fmt_chunk(block_align=4), (b"data", bytes(16))), ["block align 4"]),
    "float16.wav": (riff(fmt_chunk(tag=3), (b"data", bytes(16))), ["16-bit float"]),
    "ext-guid.wav": (riff((b"fmt ", struct.pack("<HHIIHHHHI", 0xFFFE, 1, 16000, 64000, 4, 32, 22, 32, 4) +
                           bytes(16)), (b"data", bytes(16))), ["subformat GUID"]),
    "not-riff.wav": (b"RIFX" + bytes(40), ["not a wav file"]),
    "float-nan.wav": (riff(fmt_chunk(tag=3, bits=32), (b"data", np.array([0, np.nan], "<f4").tobytes())),
                      ["NaN"]),
}


@pytest.mark.parametrize("name", BROKEN)
def test_read_wav_broken_headers_raise_input_error(tmp_path, name):
    raw, words = BROKEN[name]
    path = tmp_path / name
    path.write_bytes(raw)
    for read in (audio.read_wav, audio.load_audio):
        with pytest.raises(files.InputError) as e:
            read(path)
        assert all(w in str(e.value) for w in [str(path)] + words), str(e.value)


def test_read_errors_are_input_errors_naming_the_path(tmp_path):
    (tmp_path / "folder.wav").mkdir()
    (tmp_path / "empty.wav").write_bytes(b"")
    cases = {"missing.wav": "no such wav file", "folder.wav": "is a directory", "empty.wav": "empty file"}
    for name, problem in cases.items():
        for read in (audio.wav_info, audio.read_wav):
            with pytest.raises(files.InputError, match=f"{tmp_path / name}: {problem}"):
                read(tmp_path / name)


@needs_sox
@pytest.mark.parametrize("fill", audio.REDACT_FILLS)
def test_redaction_keeps_the_recording_and_replaces_only_the_intervals(tmp_path, fill):
    """8-bit unsigned, 16/24/32-bit integer and 32/64-bit float, mono and stereo, as sox writes them: the redacted
    file (written in one pass, the same bytes whatever the block size) has the input's header and length, every sample outside the (merged) intervals unchanged byte for byte,
    and silence (exact zeros) or the beep (to one step of the format) inside."""
    formats = [("-b", "8", "-e", "unsigned-integer"), ("-b", "16"), ("-b", "24"), ("-b", "32"),
               ("-e", "floating-point", "-b", "32"), ("-e", "floating-point", "-b", "64")]
    for opts in formats:
        for channels in (1, 2):
            src = sox_wav(tmp_path / "in.wav", *opts, "-c", channels, "--", "synth", "0.5", "sine", "440", "vol", "0.5")
            dst = tmp_path / "out.wav"
            replaced = audio.redact_wav(src, dst, [(0.1, 0.2), (0.15, 0.25), (0.4, 9.0)], fill)
            assert replaced == [(1600, 4000), (6400, 8000)], opts
            blocks = tmp_path / "blocks.wav"               # one pass in blocks that cut through the intervals
            assert audio.redact_wav(src, blocks, [(0.1, 0.2), (0.15, 0.25), (0.4, 9.0)], fill, 1000) == replaced
            assert blocks.read_bytes() == dst.read_bytes()
            info = audio.wav_info(src)
            assert audio.wav_info(dst) == info and dst.stat().st_size == src.stat().st_size
            a, b = src.read_bytes(), dst.read_bytes()
            block = info.channels * info.bits // 8
            inside = lambda i: any(info.data_offset + s * block <= i < info.data_offset + e * block
                                   for s, e in replaced)
            assert all(x == y for i, (x, y) in enumerate(zip(a, b)) if not inside(i)), opts
            got = audio.read_wav(dst)[0].double()
            want = torch.zeros(8000, dtype=torch.float64)
            if fill == "beep":
                t = torch.arange(8000, dtype=torch.float64) / 16000
                want = audio.BEEP_LEVEL * torch.sin(2 * math.pi * audio.BEEP_HZ * t)
            step = 0.0 if info.is_float else 2.0 ** (1 - info.bits)     # one quantisation step of the format
            for s, e in replaced:
                assert float((got[s:e] - want[s:e]).abs().max()) <= step + 1e-7, (opts, channels)
    with pytest.raises(ValueError, match="beep, silence"):
        audio.redact_wav(src, dst, [], "noise")


def test_a_span_of_a_wav_is_read_from_its_bytes_alone(tmp_path):
    """read_wav_frames reads frames [first, first + count) of any format (here 24-bit stereo) as read_wav's slice;
    load_audio_span at 16 kHz is load_audio's slice exactly, at 44.1 kHz the same away from its edges."""
    rng = np.random.default_rng(0)
    stereo = rng.integers(-2 ** 23, 2 ** 23, size=(44100, 2))
    path = write_wav(tmp_path / "s24.wav", stereo, 44100, width=3)
    whole, rate = audio.read_wav(path)
    part, rate2 = audio.read_wav_frames(path, 1000, 500)
    assert rate == rate2 == 44100 and torch.equal(part, whole[1000:1500])
    assert torch.equal(audio.read_wav_frames(path, 44000, 500)[0], whole[44000:])       # clipped at the end
    mono16 = write_wav(tmp_path / "m16.wav", rng.integers(-3000, 3000, size=32000), 16000)
    assert torch.equal(audio.load_audio_span(mono16, 0.5, 1.25), audio.load_audio(mono16)[8000:20000])
    span = audio.load_audio_span(path, 0.25, 0.75)                                   # 44.1 kHz -> 16 kHz
    full = audio.load_audio(path)[4000:12000]
    assert span.shape == full.shape
    assert torch.allclose(span[200:-200], full[200:-200], atol=1e-4)   # the resampler's edge is ~64 taps wide
