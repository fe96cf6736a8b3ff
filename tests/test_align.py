"""align.py: the batched CTC Viterbi against brute force over every frame labelling, and the frame -> time rule."""
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import align  # noqa: E402
from numerics import excess, fp32_tol  # noqa: E402


def collapse(labels):
    """A CTC labelling -> the phone string it spells (repeats merged, blanks dropped)."""
    return tuple(label for i, label in enumerate(labels) if label != align.BLANK and (i == 0 or labels[i - 1] != label))


def brute_force(log_probs, readings):
    """Best labelling of (T, C) log_probs (float64 sums) that spells one reading per character, in order:
    -> (score, labels, readings chosen) or (-inf, None, None)."""
    spellings = {sum(choice, ()): tuple(options.index(r) for options, r in zip(readings, choice))
                 for choice in itertools.product(*readings)}
    best = (-math.inf, None, None)
    t, c = log_probs.shape
    lp = log_probs.double()
    for labels in itertools.product(range(c), repeat=t):
        chosen = spellings.get(collapse(labels))
        if chosen is not None:
            score = float(sum(lp[i, label] for i, label in enumerate(labels)))
            if score > best[0]:
                best = (score, labels, chosen)
    return best


# readings per character: heteronyms (two readings), repeated phones across and inside characters
CASES = [[[(1,)], [(2,)]], [[(1, 2)], [(2,), (3, 1)]], [[(1,)], [(1,)]], [[(3, 3)]], [[(2,), (1, 3)], [(2, 1)]]]


@pytest.mark.parametrize("seed", range(4))
def test_viterbi_finds_the_brute_force_best_path_in_a_batch(seed):
    g = torch.Generator().manual_seed(seed)
    frames = torch.tensor([6, 5, 4, 6, 3])                         # rows of different lengths in one padded batch
    log_probs = torch.randn(len(CASES), 6, 4, generator=g).mul(3).log_softmax(-1)   # (B, T, C): peaked, as CTC is
    graphs = [align.ReadingGraph.build(r) for r in CASES]
    paths, scores = align.viterbi(log_probs, frames, graphs)
    for i, readings in enumerate(CASES):
        n = int(frames[i])
        best, labels, chosen = brute_force(log_probs[i, :n], readings)
        if labels is None:                                          # the text does not fit the frames
            assert scores[i] == -math.inf, i
            continue
        assert excess(scores[i], best, fp32_tol(log_probs[i, :n], n)) <= 1, i   # n float32 additions
        got = tuple(graphs[i].labels[s] for s in paths[i].tolist())
        assert len(got) == n and collapse(got) in {sum(c, ()) for c in itertools.product(*readings)}
        got_score = float(sum(log_probs[i, t, label].double() for t, label in enumerate(got)))
        assert excess(got_score, best, fp32_tol(log_probs[i, :n], n)) <= 1, i   # the path scores what it says
        spans = graphs[i].char_frames(paths[i])
        if got == labels:
            assert [r for _, _, r in spans] == list(chosen)
        assert [a for a, _, _ in spans] == sorted(a for a, _, _ in spans) and all(a <= b for a, b, _ in spans)


def test_a_text_longer_than_the_audio_cannot_be_aligned():
    """Each phone takes a frame, and two equal phones in a row a blank between them."""
    log_probs = torch.zeros(1, 4, 4).log_softmax(-1)
    fits = lambda readings, n: align.viterbi(log_probs, torch.tensor([n]), [align.ReadingGraph.build(readings)])[1][0]
    assert fits([[(1,)], [(2,)], [(3,)]], 3) > -math.inf
    assert fits([[(1,)], [(1,)], [(2,)]], 3) == -math.inf and fits([[(1,)], [(1,)], [(2,)]], 4) > -math.inf
    assert fits([[(3, 3)]], 2) == -math.inf and fits([[(3, 3)]], 3) > -math.inf


def test_bad_readings_are_refused():
    for readings in ([[]], [[()]], [[(0, 1)]]):
        with pytest.raises(ValueError, match="character 0"):
            align.ReadingGraph.build(readings)


def test_frame_to_time_rule():
    """Frame f is centred at 40 f + 42.5 ms; a character starts half a frame before its first frame's centre and
    ends where the next starts (the blank run after its spikes is its own); the last ends half a frame out."""
    spans = [(2, 3, 0), (7, 7, 0), (8, 10, 1)]
    times = align.char_times(spans, frames=20)
    centre = lambda f: 0.04 * f + 0.0425
    assert times[0] == (round(centre(2) - 0.02, 4), round(centre(7) - 0.02, 4))
    assert times[1] == (round(centre(7) - 0.02, 4), round(centre(8) - 0.02, 4))
    assert times[2] == (round(centre(8) - 0.02, 4), round(centre(10) + 0.02, 4))
    assert align.char_times([(0, 19, 0)], frames=20) == [(0.0225, round(centre(19) + 0.02, 4))]


def test_char_log_posteriors_are_the_path_phones_per_character():
    """Per character: the log-probs of the path's phone labels on the frames the character's phones take (blank
    frames belong to no character), so the alignment confidence is their geometric mean."""
    torch.manual_seed(0)
    log_probs = torch.randn(7, 4).log_softmax(-1)
    readings = [[(1, 2)], [(3,), (2,)]]
    graph = align.ReadingGraph.build(readings)
    (path,), _ = align.viterbi(log_probs[None], torch.tensor([7]), [graph])
    got = align.char_log_posteriors(graph, path, log_probs)
    want = [[], []]
    for t, s in enumerate(path.tolist()):
        if graph.char[s] >= 0:
            want[graph.char[s]].append(float(log_probs[t, graph.labels[s]]))
    assert got == want and all(got) and sum(map(len, got)) <= 7
    sure = torch.full((7, 4), -20.0)
    for t, label in enumerate([1, 2, 0, 3, 0, 0, 0]):         # a head certain of 1 2 _ 3: confidence 1
        sure[t, label] = 0.0
    (path,), _ = align.viterbi(sure[None], torch.tensor([7]), [graph])
    assert [math.exp(sum(v) / len(v)) for v in align.char_log_posteriors(graph, path, sure)] == [1.0, 1.0]


def test_a_time_offset_shifts_every_time_within_the_audio():
    """char_times(..., offset_s): every start and end moves by the offset, clipped to [0, the audio the frames see]."""
    spans = [(0, 0, 0), (3, 4, 0), (9, 9, 0)]
    plain, later, earlier = (align.char_times(spans, 10, o) for o in (0.0, 0.015, -0.03))
    end = 9 * align.FRAME_S + align.FRAME_SPAN_S
    for (s0, e0), (s1, e1), (s2, e2) in zip(plain, later, earlier):
        assert s1 == pytest.approx(min(end, s0 + 0.015)) and e1 == pytest.approx(min(end, e0 + 0.015))
        assert s2 == pytest.approx(max(0.0, s0 - 0.03)) and e2 == pytest.approx(max(0.0, e0 - 0.03))
    assert earlier[0][0] == 0.0 and plain[0][0] > 0
