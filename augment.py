"""augment.py: training-time augmentations of a corpus sample, each drawn afresh for every (epoch, sample).

EntitySwap changes the text of text-only (TNER) rows; EntityGap changes the audio of speech-only (SNER) rows;
NoiseMix adds background noise to the audio of every speech row (SNER, MNER). All are deterministic in (seed, key),
so a resumed run redraws what the killed one drew. data.BatchBuilder applies them; train.py builds them from
--entity-swap, --entity-gap and --noise. Speed perturbation is audio.speed_perturb.
"""
from __future__ import annotations

import collections
import math
import random

import numpy as np
import torch

import audio
from data import Entity, Sample


class EntitySwap:
    """Mention replacement for text-only training rows (Dai & Adel 2020, "An Analysis of Simple Data Augmentation
    for Named Entity Recognition"): each flat entity (one that overlaps no other entity of its sentence) is, with
    probability p, replaced by a flat mention of the same type drawn from the training samples. Offsets after it
    shift; the audio is dropped, since the text no longer matches it."""

    def __init__(self, samples, p: float, seed: int = 0):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"entity swap probability must be in [0, 1], got {p}")
        self.p, self.seed = p, seed
        pool = collections.defaultdict(set)
        for s in samples:
            for e in self.flat(s.entities):
                pool[e.type].add(s.text[e.start:e.end])
        self.pool = {t: sorted(m) for t, m in pool.items()}  # sorted: the draws do not depend on set order

    @staticmethod
    def flat(entities) -> list[Entity]:
        return [e for e in entities if not any(o != e and o.start < e.end and e.start < o.end for o in entities)]

    def __call__(self, sample: Sample, key) -> Sample:
        rng = random.Random(f"{self.seed}:{key}")
        swaps = {e: rng.choice(self.pool[e.type]) for e in self.flat(sample.entities) if rng.random() < self.p}
        if not swaps:
            return sample
        text, moved, shift, last = [], {}, 0, 0  # moved: old entity -> new entity
        for e in sorted(set(sample.entities), key=lambda e: (e.start, -e.end)):  # a listed-twice entity moves once
            if e in swaps:  # flat: nothing else starts inside it, so the text before it is final
                text += [sample.text[last:e.start], swaps[e]]
                moved[e] = Entity(e.start + shift, e.start + shift + len(swaps[e]), e.type)
                shift += len(swaps[e]) - (e.end - e.start)
                last = e.end
            else:
                moved[e] = Entity(e.start + shift, e.end + shift, e.type)
        text.append(sample.text[last:])
        return Sample(sample.id, "".join(text), [moved[e] for e in sample.entities], None)  # file order kept


class EntityGap:
    """Redaction augmentation for speech-only training rows of a corpus with gold entity times (Sample.times; the
    demo corpus records them): with probability p a row has some of its outermost entities (each with probability
    1/2, at least one) replaced in its audio by what audio.redact writes (a beep or silence, drawn per row) over
    its gold interval plus a pad drawn in [0, max_pad_s] on each side, and their characters (with every entity
    that shares one) leave the target. A model trained so hears a bleeped stretch as saying nothing: decoding a redacted
    recording then neither recovers the entity nor derails on the rest (a model that never heard a beep writes
    runs of brackets over the whole sentence)."""

    def __init__(self, p: float, seed: int = 0, max_pad_s: float = 0.1, fills=audio.REDACT_FILLS):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"entity gap probability must be in [0, 1], got {p}")
        if max_pad_s < 0 or not fills or any(f not in audio.REDACT_FILLS for f in fills):
            raise ValueError(f"entity gap: max_pad_s >= 0 and fills from {audio.REDACT_FILLS}, got {max_pad_s}, "
                             f"{fills}")
        self.p, self.seed, self.max_pad_s, self.fills = p, seed, max_pad_s, tuple(fills)

    @staticmethod
    def outermost(entities) -> list[int]:
        """Indices of the entities inside no other (an identical span of another type counts as outermost)."""
        return [i for i, e in enumerate(entities) if not any(
            o.start <= e.start and e.end <= o.end and (o.start, o.end) != (e.start, e.end) for o in entities)]

    def draw(self, sample: Sample, key):
        """-> None (row unchanged) or (gap intervals [(start_s, end_s)], fill, the gapped Sample)."""
        rng = random.Random(f"gap:{self.seed}:{key}")
        outer = self.outermost(sample.entities) if sample.times is not None and sample.audio is not None else []
        if not outer or rng.random() >= self.p:
            return None
        chosen = [i for i in outer if rng.random() < 0.5] or [rng.choice(outer)]
        fill = rng.choice(self.fills)
        gaps = []
        for i in chosen:
            start, end = sample.times[i]
            gaps.append((max(0.0, start - rng.uniform(0, self.max_pad_s)), end + rng.uniform(0, self.max_pad_s)))
        cut = {k for i in chosen for k in range(sample.entities[i].start, sample.entities[i].end)}  # characters
        keep = [(e, t) for e, t in zip(sample.entities, sample.times) if not cut & set(range(e.start, e.end))]
        shift = [sum(1 for j in cut if j < k) for k in range(len(sample.text) + 1)]   # characters cut before k
        text = "".join(c for k, c in enumerate(sample.text) if k not in cut)
        entities = [Entity(e.start - shift[e.start], e.end - shift[e.start], e.type) for e, _ in keep]
        return gaps, fill, Sample(sample.id, text, entities, sample.audio, [t for _, t in keep])

    def __call__(self, sample: Sample, key):
        """-> None, or (the gapped Sample, its waveform float32 (N,) at 16 kHz)."""
        drawn = self.draw(sample, key)
        if drawn is None:
            return None
        gaps, fill, gapped = drawn
        wave = audio.load_audio(sample.audio, sample_rate=audio.SAMPLE_RATE).clone()     # (N,)
        for start_s, end_s in gaps:
            a = max(0, int(start_s * audio.SAMPLE_RATE))
            b = min(len(wave), int(np.ceil(end_s * audio.SAMPLE_RATE)))
            if a < b:
                wave[a:b] = torch.from_numpy(audio.fill_wave(a, b, audio.SAMPLE_RATE, fill)).to(wave.dtype)
        return gapped, wave


NOISES = ("white", "pink", "brown")


def colored_noise(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """n samples of unit-power noise: white (flat spectrum), pink (power ~ 1/f) or brown (~ 1/f^2), shaped in the
    frequency domain. -> float64 (n,)."""
    if kind not in NOISES:
        raise ValueError(f"noise kind {kind!r}: choose from {NOISES}")
    white = rng.standard_normal(n)
    if kind != "white" and n > 1:
        spectrum = np.fft.rfft(white)
        f = np.arange(len(spectrum), dtype=np.float64)
        f[0] = 1.0                                                   # the constant term: kept as is
        spectrum /= f ** (0.5 if kind == "pink" else 1.0)            # amplitude ~ f^-1/2 (pink), f^-1 (brown)
        white = np.fft.irfft(spectrum, n)
    return white / max(np.sqrt((white ** 2).mean()), 1e-12)


def snr_range(text: str) -> tuple[float, float]:
    """'LOW,HIGH' in dB -> (low, high); ValueError unless two finite numbers with low <= high."""
    low, high = (float(x) for x in text.split(","))
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"SNR range {text!r}: need finite LOW <= HIGH")
    return low, high


class NoiseMix:
    """Background noise for speech training rows (SNER and MNER): with probability p a row's waveform gets white,
    pink or brown noise at an SNR drawn uniformly from snr_db (dB over the row's mean power), and, with margin > 0,
    a lead and a tail of noise alone, each drawn from 0 to margin seconds (from epoch margin_from_epoch on). A model
    trained on clean speech alone hallucinates entities in noise; noisy recordings (demo.py --long-form mixes 5-30 dB
    of the same three kinds under utterances moved by +-12 dB) need it, and their pieces (segment.py) start and end
    with some noise before the speech: a model that only ever heard rows starting on their first syllable derails
    there (learnt in the last epochs, after the clean starts, the margins cost no clean F1: README). Peak
    normalisation follows in the featurizer, so the mix's level does not matter."""

    def __init__(self, p: float, seed: int = 0, snr_db: tuple = (0.0, 30.0), margin: float = 0.0,
                 margin_from_epoch: int = 0):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"noise probability must be in [0, 1], got {p}")
        if len(snr_db) != 2 or not snr_db[0] <= snr_db[1]:
            raise ValueError(f"noise SNR range must be (low, high) dB with low <= high, got {snr_db}")
        if not 0.0 <= margin <= 10.0:
            raise ValueError(f"noise margin must be in [0, 10] seconds, got {margin}")
        self.p, self.seed, self.snr_db, self.margin = p, seed, tuple(float(x) for x in snr_db), float(margin)
        self.margin_from_epoch = margin_from_epoch

    def margin_at(self, epoch: int) -> float:
        """The longest margin of the rows of `epoch` (0-based): margin from margin_from_epoch on, else 0."""
        return self.margin if epoch >= self.margin_from_epoch else 0.0

    def __call__(self, wave: torch.Tensor, key, epoch: int = 0) -> torch.Tensor:
        """wave: float (N,) at 16 kHz -> the same wave, or a noisy copy (lead + N + tail,) with its margins."""
        rng = random.Random(f"noise:{self.seed}:{key}")
        if rng.random() >= self.p or len(wave) == 0:
            return wave
        kind, snr = rng.choice(NOISES), rng.uniform(*self.snr_db)
        lead, tail = (round(rng.uniform(0.0, self.margin) * audio.SAMPLE_RATE) for _ in range(2))
        if not self.margin_at(epoch):                        # drawn all the same: the noise does not depend on it
            lead = tail = 0
        power = float((wave.double() ** 2).mean())           # of the speech alone: margins do not dilute the SNR
        noise = colored_noise(lead + len(wave) + tail, kind, np.random.default_rng(rng.getrandbits(64)))
        mixed = torch.from_numpy(noise * np.sqrt(power / 10 ** (snr / 10))).to(wave.dtype)
        mixed[lead:lead + len(wave)] += wave
        return mixed
