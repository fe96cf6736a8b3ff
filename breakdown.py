"""breakdown.py: what went right and wrong in entity predictions, sentence by sentence (compare) and in tables
(tables): one error taxonomy, shared by `evaluate.py breakdown` and the HTML report (report.py).

A prediction is correct when our scorer counts it (scoring.our_keys): the exact (type, start, end) in the input text
for TNER/MNER, the (type, entity text) for SNER, matched as per-sentence multisets. Every other entity, gold or
predicted, gets one kind from what the other side has where it lies. SNER predictions are placed in the gold text by
aligning the transcription to it (char_alignment: edit distance, substitutions keep their place).

  wrong_type  the same span with another type
  misheard    (SNER) a same-type entity overlapping it, where the transcription inside the predicted entity differs
              from the gold text there: the name was heard wrong
  overlap     a span of another extent overlapping it: a boundary error
  missed      (gold) nothing predicted there
  spurious    (prediction) nothing in the gold there; also a prediction that cannot be placed in the gold text

Classes of the tables: nesting (an entity that contains or lies inside another of its own side) and, given a training
split's (string, type) set, seen vs unseen. Nothing here reads files or runs a model.
"""
from __future__ import annotations

import collections
import dataclasses

from data import Entity, Sample
from scoring import Scorer, our_keys

KINDS = ("wrong_type", "misheard", "overlap", "missed", "spurious")
SIDE_KINDS = {"gold": ("wrong_type", "misheard", "overlap", "missed"),
              "pred": ("wrong_type", "misheard", "overlap", "spurious")}


@dataclasses.dataclass
class Mark:
    """One gold or predicted entity of a sentence and its verdict."""
    entity: Entity            # offsets into its own side's text (gold text; predicted text); start None: unplaced
    place: tuple | None       # (start, end) in the gold text; None: a prediction that cannot be placed there
    kind: str                 # "correct" or one of KINDS
    nested: bool | None       # contains or lies inside another entity of its side (None: no offsets)
    seen: bool | None         # its (string, type) is in the training set (None: no training split given)


@dataclasses.dataclass
class Sentence:
    sample: Sample            # the gold sentence
    task: str
    text: str                 # the predicted text: SNER's transcription; TNER/MNER: the gold text itself
    gold: list[Mark]
    pred: list[Mark]
    record: dict | None = None    # the decode.py record it came from (wav, entity times, confidences)


def char_alignment(hyp: str, ref: str) -> list[int | None]:
    """Levenshtein alignment of hyp to ref -> for each character of hyp its index in ref (substitutions included),
    None for an inserted character. Ties prefer the diagonal, so a misheard character keeps its place."""
    if hyp == ref:
        return list(range(len(hyp)))
    n, m = len(hyp), len(ref)
    cost = [[0] * (m + 1) for _ in range(n + 1)]          # (n+1, m+1) edit distances of prefixes
    for i in range(n + 1):
        cost[i][0] = i
    for j in range(m + 1):
        cost[0][j] = j
    for i in range(1, n + 1):
        row, up = cost[i], cost[i - 1]
        for j in range(1, m + 1):
            row[j] = min(up[j - 1] + (hyp[i - 1] != ref[j - 1]), up[j] + 1, row[j - 1] + 1)
    mapping, i, j = [None] * n, n, m
    while i > 0 and j > 0:
        if cost[i][j] == cost[i - 1][j - 1] + (hyp[i - 1] != ref[j - 1]):
            mapping[i - 1] = j - 1
            i, j = i - 1, j - 1
        elif cost[i][j] == cost[i - 1][j] + 1:
            i -= 1
        else:
            j -= 1
    return mapping


def _place(e: Entity, mapping) -> tuple | None:
    """A predicted span -> its (start, end) in the gold text: from its first to its last character that has a place."""
    if e.start is None:
        return None
    inside = [mapping[k] for k in range(e.start, e.end) if mapping[k] is not None]
    return (min(inside), max(inside) + 1) if inside else None


def _nested(e: Entity, entities) -> bool | None:
    """e contains, or lies inside, another entity of the same set (a same-span entity of another type counts)."""
    if e.start is None:
        return None
    return any(o != e and o.start is not None and (o.start <= e.start and e.end <= o.end or
                                                   e.start <= o.start and o.end <= e.end) for o in entities)


def compare(sample: Sample, pred_entities, task: str = "TNER", pred_text: str | None = None, seen=None,
            record=None) -> Sentence:
    """One sentence's verdicts. pred_entities: Entity offsets into pred_text (SNER: the transcription; TNER/MNER:
    the gold text, None = the same); seen: a set of (string, type) or None."""
    text = sample.text if pred_text is None or task != "SNER" else pred_text
    for e in pred_entities:
        if e.start is not None and not 0 <= e.start <= e.end <= len(text):
            raise ValueError(f"{sample.id}: predicted entity {tuple(e)} lies outside its text {text!r}")
    mapping = char_alignment(text, sample.text) if task == "SNER" else None
    gold_keys = our_keys(task, sample.text, [(e.start, e.end, e.type) for e in sample.entities])
    pred_keys = our_keys(task, text, [(e.start, e.end, e.type) for e in pred_entities])
    places = {"gold": [(e.start, e.end) for e in sample.entities],
              "pred": [_place(e, mapping) if mapping is not None else (None if e.start is None else (e.start, e.end))
                       for e in pred_entities]}
    found = {"gold": [False] * len(gold_keys), "pred": [False] * len(pred_keys)}
    # multiset matching, as the scorer's (the same number of matches per key); SNER keys carry no place, so among
    # equal keys a pair at the same place is matched first, then an overlapping one, then the rest in order
    for key in dict.fromkeys(gold_keys):
        golds = [i for i, k in enumerate(gold_keys) if k == key]
        preds = [j for j, k in enumerate(pred_keys) if k == key]
        for near in (lambda a, b: a == b, lambda a, b: a is not None and b is not None and a[0] < b[1] and b[0] < a[1],
                     lambda a, b: True):
            for i in golds:
                j = next((j for j in preds if near(places["gold"][i], places["pred"][j])), None)
                if j is not None and not found["gold"][i]:
                    found["gold"][i] = found["pred"][j] = True
                    preds.remove(j)
            golds = [i for i in golds if not found["gold"][i]]

    def heard_wrong(i):                                    # SNER: the transcription inside prediction i is wrong
        p, e = places["pred"][i], pred_entities[i]
        return mapping is not None and p is not None and text[e.start:e.end] != sample.text[p[0]:p[1]]

    def kind(side, i):
        ents = sample.entities if side == "gold" else pred_entities
        others = pred_entities if side == "gold" else sample.entities
        other_side = "pred" if side == "gold" else "gold"
        place, e = places[side][i], ents[i]
        if place is None:
            return "spurious"
        near = [(j, o) for j, o in enumerate(others) if places[other_side][j] is not None
                and places[other_side][j][0] < place[1] and place[0] < places[other_side][j][1]]
        if any(places[other_side][j] == place and o.type != e.type for j, o in near):
            return "wrong_type"
        if any(o.type == e.type and heard_wrong(i if side == "pred" else j) for j, o in near):
            return "misheard"
        if near:
            return "overlap"
        return "missed" if side == "gold" else "spurious"

    marks = {}
    for side, ents, own_text in (("gold", sample.entities, sample.text), ("pred", pred_entities, text)):
        marks[side] = [Mark(e, places[side][i], "correct" if found[side][i] else kind(side, i), _nested(e, ents),
                            None if seen is None else e.start is not None and (own_text[e.start:e.end], e.type) in seen)
                       for i, e in enumerate(ents)]
    return Sentence(sample, task, text, marks["gold"], marks["pred"], record)


def tables(sentences, with_seen: bool = False) -> dict:
    """P/R/F1 (our scorer) and the breakdown tables of compared sentences ->
    {"sentences", "p", "r", "f1", "tp", "pred", "gold", "per_type", "nesting", ["seen",] "errors"}.
    Per class: recall over the gold entities of the class (gold, found, r) and precision over the predicted ones
    (pred, correct, p); a gold and its matching prediction can fall in different classes, so no F1 per class.
    errors: {"gold": {kind: n} over SIDE_KINDS["gold"], "pred": {kind: n} over SIDE_KINDS["pred"]}."""
    scorer, counts = Scorer(), collections.Counter()       # counts: (table, class, field) -> n
    for s in sentences:
        scorer.add(our_keys(s.task, s.text, [(m.entity.start, m.entity.end, m.entity.type) for m in s.pred]),
                   our_keys(s.task, s.sample.text, [(m.entity.start, m.entity.end, m.entity.type) for m in s.gold]))
        for side, total, hits in (("gold", "gold", "found"), ("pred", "pred", "correct")):
            for m in getattr(s, side):
                classes = {"nesting": "unaligned" if m.nested is None else "nested" if m.nested else "flat"}
                if with_seen:
                    classes["seen"] = "seen" if m.seen else "unseen"
                for table, cls in classes.items():
                    counts[table, cls, total] += 1
                    counts[table, cls, hits] += m.kind == "correct"
                if m.kind != "correct":
                    counts["errors", side, m.kind] += 1
    out = {"sentences": len(sentences), **scorer.result()}
    order = {"nesting": ("nested", "flat", "unaligned"), "seen": ("seen", "unseen")}
    for table in ("nesting", "seen") if with_seen else ("nesting",):
        out[table] = {}
        for cls in order[table]:
            n = {f: counts[table, cls, f] for f in ("gold", "found", "pred", "correct")}
            if cls != "unaligned" or n["pred"]:
                out[table][cls] = {**n, "r": 100.0 * n["found"] / n["gold"] if n["gold"] else 0.0,
                                   "p": 100.0 * n["correct"] / n["pred"] if n["pred"] else 0.0}
    out["errors"] = {side: {k: counts["errors", side, k] for k in kinds} for side, kinds in SIDE_KINDS.items()}
    return out


def breakdown(samples, predictions, seen=None, task: str = "TNER", texts=None) -> dict:
    """tables() of gold samples against predictions (one list of Entity per sample, same order; offsets into the
    sample's text, or for SNER into texts[i], its transcription)."""
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} prediction lists")
    texts = texts or [None] * len(samples)
    return tables([compare(s, p, task, t, seen) for s, p, t in zip(samples, predictions, texts)], seen is not None)


def format_breakdown(res: dict) -> str:
    """The tables() dict as text tables (percent)."""
    lines = [f"{'':<10} {'P':>6} {'R':>6} {'F1':>6} {'gold':>6} {'pred':>6} {'tp':>6}"]
    for name, m in [("all", res), *res["per_type"].items()]:
        lines.append(f"{name:<10} {m['p']:6.2f} {m['r']:6.2f} {m['f1']:6.2f} {m['gold']:6d} {m['pred']:6d} "
                     f"{m['tp']:6d}")
    for table in ("nesting", "seen"):
        if table in res:
            lines += ["", f"{table:<10} {'R':>6} {'gold':>6} {'found':>6}   {'P':>6} {'pred':>6} {'correct':>7}"]
        for cls, m in res.get(table, {}).items():
            lines.append(f"{cls:<10} {m['r']:6.2f} {m['gold']:6d} {m['found']:6d}   {m['p']:6.2f} {m['pred']:6d} "
                         f"{m['correct']:7d}")
    if "errors" in res:
        lines += ["", f"{'errors':<15}" + "".join(f"{k:>11}" for k in KINDS)]
        for side, label in (("gold", "gold not found"), ("pred", "wrong pred")):
            lines.append(f"{label:<15}" + "".join(f"{res['errors'][side][k]:11d}" if k in res['errors'][side]
                                                  else f"{'':>11}" for k in KINDS))
    return "\n".join(lines)
