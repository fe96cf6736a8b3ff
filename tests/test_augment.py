"""Tests for augment.py: entity swaps in text rows, entity gaps (bleeped entities) in speech rows, background noise."""
import math
import re
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import audio  # noqa: E402
import augment  # noqa: E402
import data  # noqa: E402
import weights  # noqa: E402


def test_entity_swap_changes_text_rows_only_and_is_redrawn_per_epoch():
    samples = [data.Sample("a", "张三去北京", [data.Entity(0, 2, "PER"), data.Entity(3, 5, "LOC")], "a.wav"),
               data.Sample("b", "李四在上海", [data.Entity(0, 2, "PER"), data.Entity(3, 5, "LOC")], "b.wav"),
               data.Sample("c", "王小明到广州市", [data.Entity(0, 3, "PER"), data.Entity(4, 7, "LOC")], "c.wav")]
    assets = weights.assets_for_scratch(samples)
    featurizer = data.Featurizer(assets)
    plain = data.BatchBuilder(samples, featurizer)
    swapped = data.BatchBuilder(samples, featurizer, entity_swap=augment.EntitySwap(samples, 1.0, seed=3))
    targets = lambda batches, epoch, task: [featurizer.vocab.decode(t) for t in
                                            batches[(epoch, [(i, task, 1.0) for i in range(3)])]["target"]]
    assert all(swapped.sample(0, i, task) == (samples[i], None) for i in range(3) for task in ("SNER", "MNER"))  # speech
    assert targets(plain, 0, "TNER") == ["[张三]去(北京)", "[李四]在(上海)", "[王小明]到(广州市)"]
    epochs = [targets(swapped, e, "TNER") for e in range(6)]
    assert epochs[0] == targets(swapped, 0, "TNER")                    # deterministic in (epoch, sample)
    assert len({tuple(e) for e in epochs}) > 1                          # and redrawn every epoch
    names, places = {"[张三]", "[李四]", "[王小明]"}, {"(北京)", "(上海)", "(广州市)"}
    for row in (t for e in epochs for t in e):
        person, place = re.fullmatch(r"(\[.+?\])(去|在|到)(\(.+?\))", row).group(1, 3)
        assert person in names and place in places, row



def test_entity_swap_keeps_nested_entities_and_shifts_offsets():
    pool = [data.Sample("p", "欧阳娜娜和王五", [data.Entity(0, 4, "PER"), data.Entity(5, 7, "PER")])]
    # file order: the ORG comes before the LOC inside it; the flat PER sits between nested ones
    s = data.Sample("s", "末阳市文联主席张三在北京", [data.Entity(0, 5, "ORG"), data.Entity(0, 3, "LOC"),
                                                  data.Entity(7, 9, "PER"), data.Entity(10, 12, "LOC")])
    swap = augment.EntitySwap(pool + [s], 1.0, seed=0)
    assert swap.pool == {"PER": ["张三", "欧阳娜娜", "王五"], "LOC": ["北京"]}  # nested ones are not mentions
    seen = set()
    for key in range(30):
        out = swap(s, key)
        seen.add(out.text)
        assert out.audio is None and [e.type for e in out.entities] == ["ORG", "LOC", "PER", "LOC"]
        assert data.linearize(out.text, out.entities).startswith("<(末阳市)文联>主席[")
        person = out.text[out.entities[2].start:out.entities[2].end]
        assert person in swap.pool["PER"] and out.text == f"末阳市文联主席{person}在北京"
        assert out.text[out.entities[3].start:out.entities[3].end] == "北京"
    assert len(seen) == 3                                                  # every PER mention gets drawn
    twice = data.Sample("t", "张三在北京", [data.Entity(0, 2, "PER"), data.Entity(0, 2, "PER")])
    out = swap(twice, 0)
    person = out.text[:-3]
    assert out.text.endswith("在北京") and person in swap.pool["PER"] and out.entities == [(0, len(person), "PER")] * 2
    assert augment.EntitySwap(pool + [s], 0.0)(s, 0) is s
    with pytest.raises(ValueError, match="probability"):
        augment.EntitySwap(pool, 1.5)




def speech_wav(path, seconds=2.0, rate=16000):
    """A mono 16-bit wav of a 300 Hz tone at -12 dBFS (never silent, so a gap shows)."""
    n = int(seconds * rate)
    x = np.round(0.25 * np.sin(2 * np.pi * 300 * np.arange(n) / rate) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(x.tobytes())
    return str(path)


NESTED = data.Sample("n", "末阳市文联主席张三在北京", [data.Entity(0, 5, "ORG"), data.Entity(0, 3, "LOC"),
                                                data.Entity(7, 9, "PER"), data.Entity(10, 12, "LOC")],
                     "n.wav", [(0.0, 0.9), (0.0, 0.5), (1.3, 1.6), (1.8, 2.0)])


def test_entity_gap_drops_the_bleeped_entities_from_the_target():
    gap = augment.EntityGap(1.0, seed=0, max_pad_s=0.05)
    assert gap.outermost(NESTED.entities) == [0, 2, 3]              # the LOC inside the ORG is not outermost
    seen = set()
    for key in range(40):
        gaps, fill, out = gap.draw(NESTED, key)
        assert fill in ("beep", "silence") and out.audio == "n.wav"
        assert gap.draw(NESTED, key) == (gaps, fill, out)          # deterministic in the key
        outer_kept = [m for m in ("末阳市文联", "张三", "北京") if m in out.text]
        assert len(gaps) == 3 - len(outer_kept)
        # every gap covers its entity's gold interval, padded by at most max_pad_s
        for start, end in gaps:
            assert any(t[0] - 0.05 - 1e-9 <= start <= t[0] and t[1] <= end <= t[1] + 0.05 + 1e-9 for t in NESTED.times)
        # the target is the sentence without the cut characters, entities intact and shifted
        assert data.linearize(out.text, out.entities) in {
            "主席[张三]在(北京)", "<(末阳市)文联>主席在(北京)", "<(末阳市)文联>主席[张三]在", "主席在(北京)", "主席[张三]在",
            "<(末阳市)文联>主席在", "主席在"}
        text_of = lambda s, e: (s.text[e.start:e.end], e.type)
        assert out.times == [t for e, t in zip(NESTED.entities, NESTED.times) if text_of(NESTED, e) in
                             [text_of(out, o) for o in out.entities]]
        seen.add(out.text)
    assert len(seen) == 7                                           # every non-empty subset of the 3 outermost
    assert augment.EntityGap(0.0).draw(NESTED, 0) is None
    untimed = data.Sample("u", NESTED.text, NESTED.entities, "n.wav")
    assert augment.EntityGap(1.0).draw(untimed, 0) is None          # no gold times: nothing to bleep
    with pytest.raises(ValueError, match="probability"):
        augment.EntityGap(1.5)


def test_entity_gap_writes_the_redaction_fill_over_the_gap_only(tmp_path):
    path = speech_wav(tmp_path / "n.wav")
    sample = data.Sample("n", NESTED.text, NESTED.entities, path, NESTED.times)
    gap = augment.EntityGap(1.0, seed=1, max_pad_s=0.0)
    original = audio.load_audio(path)
    for key in range(6):
        gaps, fill, _ = gap.draw(sample, key)
        out, wave_ = gap(sample, key)
        assert out == gap.draw(sample, key)[2] and wave_.shape == original.shape
        replaced = torch.zeros(len(original), dtype=torch.bool)
        for start, end in gaps:
            a, b = int(start * 16000), math.ceil(end * 16000)
            replaced[a:b] = True
            expect = torch.from_numpy(audio.fill_wave(a, b, 16000, fill)).float()
            assert torch.equal(wave_[a:b], expect)
        assert torch.equal(wave_[~replaced], original[~replaced])   # the rest of the audio is untouched
        assert replaced.any()


def test_batch_builder_bleeps_speech_rows_only(tmp_path):
    path = speech_wav(tmp_path / "n.wav")
    sample = data.Sample("n", NESTED.text, NESTED.entities, path, NESTED.times)
    featurizer = data.Featurizer(weights.assets_for_scratch([sample]))
    builder = data.BatchBuilder([sample], featurizer, ctc_classes=100, entity_gap=augment.EntityGap(1.0, seed=2))
    plain = data.BatchBuilder([sample], featurizer, ctc_classes=100)
    for task in ("TNER", "MNER"):
        assert builder.sample(0, 0, task) == (sample, None)
        assert torch.equal(builder[(0, [(0, task, 1.0)])]["target"], plain[(0, [(0, task, 1.0)])]["target"])
    gapped, wave_ = builder.sample(0, 0, "SNER")
    batch, before = builder[(0, [(0, "SNER", 1.0)])], plain[(0, [(0, "SNER", 1.0)])]
    assert featurizer.vocab.decode(batch["target"][0]) == data.linearize(gapped.text, gapped.entities)
    assert len(gapped.text) < len(sample.text)
    classes = lambda text: [int(c) for c in featurizer.text(text)[0] - 3 if 1 <= c < 100]
    assert batch["ctc_phones"][0, :int(batch["ctc_lengths"][0])].tolist() == classes(gapped.text)
    assert int(batch["ctc_lengths"][0]) < int(before["ctc_lengths"][0]) == len(classes(sample.text))
    assert torch.equal(batch["fbank"][0], audio.speech_features(wave_))
    assert not torch.equal(batch["fbank"], before["fbank"])


def test_colored_noise_has_unit_power_and_its_spectral_slope():
    rng = np.random.default_rng(0)
    slopes = {}
    for kind in augment.NOISES:
        x = augment.colored_noise(1 << 16, kind, rng)
        assert np.mean(x ** 2) == pytest.approx(1.0)
        power = np.abs(np.fft.rfft(x)) ** 2
        low, high = power[64:128].mean(), power[4096:8192].mean()       # 64x apart in frequency: 6 octaves
        slopes[kind] = 10 * np.log10(low / high) / 6                    # dB per octave
    assert slopes["white"] == pytest.approx(0, abs=0.5)
    assert slopes["pink"] == pytest.approx(3, abs=0.5)                  # power ~ 1/f: 3 dB an octave
    assert slopes["brown"] == pytest.approx(6, abs=0.5)                 # ~ 1/f^2: 6 dB an octave
    with pytest.raises(ValueError, match="noise kind"):
        augment.colored_noise(10, "blue", rng)


def test_noise_mix_hits_the_drawn_snr_and_is_repeatable():
    wave_ = torch.from_numpy(np.sin(np.arange(32000) / 7.0).astype(np.float32)) * 0.3
    mix = augment.NoiseMix(1.0, seed=3, snr_db=(12.0, 12.0))
    for key in range(5):
        noisy = mix(wave_, key)
        noise = (noisy - wave_).double()
        snr = 10 * math.log10(float((wave_.double() ** 2).mean() / (noise ** 2).mean()))
        assert snr == pytest.approx(12.0, abs=0.01) and torch.equal(noisy, mix(wave_, key))
    assert not torch.equal(mix(wave_, 0), mix(wave_, 1))                # redrawn per key
    assert augment.NoiseMix(0.0, seed=3)(wave_, 0) is wave_             # p = 0: untouched
    rate = np.mean([augment.NoiseMix(0.3, seed=4)(wave_, k) is not wave_ for k in range(400)])
    assert 0.22 < rate < 0.38
    with pytest.raises(ValueError, match="SNR range"):
        augment.NoiseMix(0.5, snr_db=(30.0, 0.0))
    assert augment.snr_range("-5,20") == (-5.0, 20.0)
    for bad in ("5", "30,5", "-inf,20", "a,b"):
        with pytest.raises(ValueError):
            augment.snr_range(bad)


def test_noise_mix_margins_put_noise_alone_before_and_after_the_speech():
    wave_ = torch.from_numpy(np.sin(np.arange(16000) / 5.0).astype(np.float32)) * 0.3
    mix = augment.NoiseMix(1.0, seed=7, snr_db=(20.0, 20.0), margin=0.5)
    leads = []
    for key in range(40):
        noisy = mix(wave_, key)
        extra = len(noisy) - len(wave_)
        assert 0 <= extra <= 16000 and torch.equal(noisy, mix(wave_, key))
        # the speech sits at the lead's offset; what is left over the whole row is noise at the drawn SNR
        lead = min(range(extra + 1), key=lambda k: float(((noisy[k:k + len(wave_)] - wave_) ** 2).mean()))
        noise = noisy.double().clone()
        noise[lead:lead + len(wave_)] -= wave_.double()
        snr = 10 * math.log10(float((wave_.double() ** 2).mean() / (noise ** 2).mean()))
        assert snr == pytest.approx(20.0, abs=0.01)
        leads.append(lead)
    assert min(leads) < 2000 and max(leads) > 6000                      # drawn from 0 to 0.5 s
    assert len(augment.NoiseMix(1.0, seed=7, snr_db=(20.0, 20.0))(wave_, 0)) == len(wave_)   # margin 0: same length
    with pytest.raises(ValueError, match="margin"):
        augment.NoiseMix(0.5, margin=-1.0)


def test_batch_builder_adds_noise_to_speech_rows_only(tmp_path):
    path = speech_wav(tmp_path / "n.wav")
    sample = data.Sample("n", NESTED.text, NESTED.entities, path, NESTED.times)
    featurizer = data.Featurizer(weights.assets_for_scratch([sample]))
    mix = augment.NoiseMix(1.0, seed=5, snr_db=(10.0, 10.0))
    builder = data.BatchBuilder([sample], featurizer, noise=mix)
    plain = data.BatchBuilder([sample], featurizer)
    assert builder.sample(0, 0, "TNER") == (sample, None)
    for task in ("SNER", "MNER"):
        same, wave_ = builder.sample(0, 0, task)
        assert same == sample and torch.equal(wave_, mix(audio.load_audio(path), "0:0"))
        batch, before = builder[(0, [(0, task, 1.0)])], plain[(0, [(0, task, 1.0)])]
        assert torch.equal(batch["target"], before["target"])
        assert torch.equal(batch["fbank"][0], audio.speech_features(wave_))
        assert not torch.equal(batch["fbank"], before["fbank"])
    both = data.BatchBuilder([sample], featurizer, entity_gap=augment.EntityGap(1.0, seed=2), noise=mix)
    gapped, noisy = both.sample(0, 0, "SNER")                          # gap first, then noise over it
    _, gapped_wave = augment.EntityGap(1.0, seed=2)(sample, "0:0")
    assert torch.equal(noisy, mix(gapped_wave, "0:0")) and len(gapped.text) < len(sample.text)


def test_noise_margins_start_at_their_epoch_over_the_same_noise(tmp_path):
    """margin_from_epoch (train.py --noise-margin-epochs): before it a noisy row has no margins, from it on it has;
    the noise and its SNR are drawn as without the margins; BatchBuilder passes the row's epoch."""
    wave_ = torch.from_numpy(np.sin(np.arange(16000) / 5.0).astype(np.float32)) * 0.3
    late = augment.NoiseMix(1.0, seed=7, snr_db=(20.0, 20.0), margin=0.5, margin_from_epoch=2)
    always = augment.NoiseMix(1.0, seed=7, snr_db=(20.0, 20.0), margin=0.5)
    never = augment.NoiseMix(1.0, seed=7, snr_db=(20.0, 20.0))
    grown = 0
    for key in range(10):
        assert torch.equal(late(wave_, key, epoch=0), never(wave_, key)) and torch.equal(
            late(wave_, key, epoch=1), never(wave_, key))
        assert torch.equal(late(wave_, key, epoch=2), always(wave_, key))
        grown += len(late(wave_, key, epoch=3)) > len(wave_)
    assert grown >= 9
    path = speech_wav(tmp_path / "n.wav")
    sample = data.Sample("n", NESTED.text, NESTED.entities, path, NESTED.times)
    builder = data.BatchBuilder([sample], data.Featurizer(weights.assets_for_scratch([sample])), noise=late)
    n = len(audio.load_audio(path))
    assert len(builder.sample(1, 0, "SNER")[1]) == n and len(builder.sample(2, 0, "SNER")[1]) > n
    loader = data.Loader([sample], builder.featurizer, 1, train=True, noise=late)   # what train.py tells assets
    assert [loader.margin_at(e) for e in range(4)] == [0.0, 0.0, 0.5, 0.5]
    assert data.Loader([sample], builder.featurizer, 1, train=True).margin_at(5) == 0.0


def test_noise_margins_count_in_the_frame_budget_but_leave_the_batches(tmp_path):
    """The frame budget (--max-frames) counts a noisy row's longest lead and tail; the length buckets of the
    batch plan do not move (with margins counted there, speech rows would sort apart from text rows: other steps)."""
    wavs = [speech_wav(tmp_path / f"{k}.wav", seconds=0.5 + 0.25 * k) for k in range(4)]
    samples = [data.Sample(str(i), NESTED.text, NESTED.entities, wavs[i % 4]) for i in range(40)]
    featurizer = data.Featurizer(weights.assets_for_scratch(samples))
    loaders = [data.Loader(samples, featurizer, 8, train=True, seed=1, speeds=(1.0,),
                           noise=augment.NoiseMix(1.0, margin=m)) for m in (0.0, 0.5)]
    assert loaders[0].batch_plan() == loaders[1].batch_plan()
    item = (0, "SNER", 1.0)
    n = loaders[0].wav_samples[0]
    assert loaders[0].frames(item) == audio.num_fbank_frames(n)
    assert loaders[1].frames(item) == audio.num_fbank_frames(n + 16000)       # 0.5 s before and after
    assert loaders[1].frames((0, "TNER", 1.0)) == data.PSEUDO_FRAMES
