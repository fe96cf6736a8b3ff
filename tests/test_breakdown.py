"""Tests for breakdown.py: the error taxonomy of entity predictions (TNER/MNER spans, SNER transcriptions placed in
the gold text by edit distance) and its tables."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import breakdown  # noqa: E402
import scoring  # noqa: E402
from data import Sample  # noqa: E402
from test_data import E  # noqa: E402


def kinds(marks):
    return [m.kind for m in marks]


def test_breakdown_sorts_errors_into_type_boundary_and_elsewhere():
    gold = [Sample("s", "张三在北京", [E(0, 2, "PER"), E(3, 5, "LOC")]), Sample("t", "上海", [E(0, 2, "LOC")])]
    preds = [[E(0, 2, "LOC"), E(3, 4, "LOC"), E(1, 2, "PER")], [E(0, 2, "LOC")]]
    r = breakdown.breakdown(gold, preds)
    assert (r["tp"], r["pred"], r["gold"]) == (1, 4, 3)
    # 张三 PER predicted as LOC (the type); 北京 predicted as 北 (a boundary); 三 PER overlaps 张三 only
    assert r["errors"] == {"gold": {"wrong_type": 1, "misheard": 0, "overlap": 1, "missed": 0},
                           "pred": {"wrong_type": 1, "misheard": 0, "overlap": 2, "spurious": 0}}
    table = breakdown.format_breakdown(r)
    assert "wrong_type" in table and "spurious" in table


def test_char_alignment_keeps_substitutions_in_place():
    assert breakdown.char_alignment("abc", "abc") == [0, 1, 2]
    assert breakdown.char_alignment("axc", "abc") == [0, 1, 2]              # a misheard character keeps its place
    assert breakdown.char_alignment("abxc", "abc") == [0, 1, None, 2]       # an inserted one has none
    assert breakdown.char_alignment("ac", "abc") == [0, 2]                  # a dropped one leaves a gap
    assert breakdown.char_alignment("", "abc") == [] and breakdown.char_alignment("ab", "") == [None, None]


def test_sner_predictions_are_placed_by_the_transcription():
    gold = Sample("s", "张三在北京开会", [E(0, 2, "PER"), E(3, 5, "LOC"), E(3, 7, "ORG")])
    heard = "张山在北京开会了"           # 三 misheard as 山, 了 inserted
    preds = [E(0, 2, "PER"), E(3, 5, "ORG"), E(5, 8, "LOC"), E(7, 8, "PER")]
    s = breakdown.compare(gold, preds, "SNER", heard)
    assert [m.place for m in s.pred] == [(0, 2), (3, 5), (5, 7), None]       # 了 alone has no place in the gold
    # 张山 PER at 张三: misheard; 北京 ORG where gold has 北京 LOC: wrong type; 开会了 LOC overlaps 北京开会 ORG
    assert kinds(s.pred) == ["misheard", "wrong_type", "overlap", "spurious"]
    assert kinds(s.gold) == ["misheard", "wrong_type", "overlap"]
    # SNER matching is the scorer's: (type, text) anywhere in the sentence
    moved = breakdown.compare(gold, [E(2, 4, "LOC")], "SNER", "开会北京")
    assert kinds(moved.pred) == ["correct"] and kinds(moved.gold) == ["missed", "correct", "overlap"]
    r = breakdown.tables([s, moved])
    sc = scoring.Scorer()
    for sent in (s, moved):
        sc.add(scoring.our_keys("SNER", sent.text, [(m.entity.start, m.entity.end, m.entity.type) for m in sent.pred]),
               scoring.our_keys("SNER", gold.text, [(e.start, e.end, e.type) for e in gold.entities]))
    assert (r["tp"], r["pred"], r["gold"]) == (sc.result()["tp"], 5, 6) == (1, 5, 6)
    assert r["errors"]["gold"] == {"wrong_type": 1, "misheard": 1, "overlap": 2, "missed": 1}


def test_sner_matches_an_entity_at_its_own_place_first():
    """Equal SNER keys (type, text) match as many times as the scorer counts, the one at the same place first."""
    gold = Sample("s", "张三见张三", [E(0, 2, "PER"), E(3, 5, "PER")])
    s = breakdown.compare(gold, [E(3, 5, "PER")], "SNER", "张三见张三")
    assert kinds(s.gold) == ["missed", "correct"] and kinds(s.pred) == ["correct"]
    s = breakdown.compare(gold, [E(1, 3, "PER")], "SNER", "见张三")        # placed at 3-5: the second
    assert kinds(s.gold) == ["missed", "correct"]


def test_seen_and_nesting_classes():
    gold = Sample("s", "北京大学在北京", [E(0, 4, "ORG"), E(0, 2, "LOC"), E(5, 7, "LOC")])
    s = breakdown.compare(gold, [E(0, 4, "ORG"), E(5, 7, "LOC"), E(None, None, "PER")], "TNER",
                          seen={("北京", "LOC")})
    assert [(m.nested, m.seen) for m in s.gold] == [(True, False), (True, True), (False, True)]
    assert [(m.nested, m.seen, m.kind) for m in s.pred] == [(False, False, "correct"), (False, True, "correct"),
                                                             (None, False, "spurious")]
    r = breakdown.tables([s], with_seen=True)
    assert r["seen"]["seen"] == {"gold": 2, "found": 1, "pred": 1, "correct": 1, "r": 50.0, "p": 100.0}
    assert r["nesting"]["unaligned"]["pred"] == 1 and r["errors"]["gold"]["overlap"] == 1
    with pytest.raises(ValueError, match="prediction lists"):
        breakdown.breakdown([gold], [])
    with pytest.raises(ValueError, match="outside"):
        breakdown.compare(gold, [E(5, 9, "LOC")])
