"""evaluate.py: scores of entity predictions (our evaluator and the official one, CER), error analyses, tables.

    python evaluate.py stats --dataset cnerta --data-dir ../shared/data/cnerta --split dev   # a corpus at a glance
    python evaluate.py breakdown --predictions preds.jsonl --dataset cnerta --data-dir D     # decode.py errors
    python evaluate.py gazetteer --train-dataset image4imner --train-dir D --dataset cnerta --data-dir D  # baseline
    python evaluate.py times --predictions p.jsonl --task MNER --dataset demo --split test     # entity times
    python evaluate.py confidence --predictions p.jsonl --task TNER --dataset cnerta --data-dir D  # calibration
    python evaluate.py long-form --predictions p.jsonl --task SNER --dataset demo --data-dir LONG  # per utterance

Two evaluators score every prediction (decode.py --eval, train.py's dev and test scores via decode.evaluate_split,
which runs the model): ours counts every entity, exact (type, start, end) in the input text, or (type, entity text)
for SNER, as per-sentence multisets; the official code's parses both strings with its own bracket rule (last-
character bug included) and compares sets, (type, pronunciation) for SNER. CER: edit distance of the output text
to the gold text over the gold characters. The analyses break predictions down by type, nesting, seen/unseen and
kind of error, and score a gazetteer baseline.

Sections: 1 scorers and score tables | 2 analyses (error breakdown, gazetteer baseline) | 3 corpus statistics |
4 entity times and confidence (localization, redaction coverage, calibration) | 5 command line.
Nothing here runs a model: decode.py does, and calls these.
"""
from __future__ import annotations

import argparse
import collections
import json
import math

from pathlib import Path

import audio
import segment
from data import (DATASETS, SPLITS, DataError, Entity, Sample, json_lines, linearize, linearize_official, load_split,
                  nest, parse, parse_official, read_lines)
from search import platt
from text import TYPES, Phonemizer, read_phone_dict


# ----------------------------------------------------------------------------------------------------------------
# 1. Scorers: ours, the official one, CER; score tables


def _prf(tp, n_pred, n_gold):
    p = 100.0 * tp / n_pred if n_pred else 0.0
    r = 100.0 * tp / n_gold if n_gold else 0.0
    return {"p": p, "r": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "tp": tp, "pred": n_pred, "gold": n_gold}


class Scorer:
    """Micro P/R/F1 (percent), overall and per type, over per-sentence multisets of entity keys (type first)."""

    def __init__(self):
        self.counts = collections.Counter()                        # (type or "all", "tp"/"pred"/"gold") -> n

    def add(self, pred_keys, gold_keys):
        pred, gold = collections.Counter(pred_keys), collections.Counter(gold_keys)
        hit = pred & gold
        for name, bag in (("pred", pred), ("gold", gold), ("tp", hit)):
            for key, n in bag.items():
                self.counts[(key[0], name)] += n
                self.counts[("all", name)] += n

    def result(self):
        types = sorted({t for t, _ in self.counts} - {"all"})
        res = _prf(self.counts[("all", "tp")], self.counts[("all", "pred")], self.counts[("all", "gold")])
        res["per_type"] = {t: _prf(self.counts[(t, "tp")], self.counts[(t, "pred")], self.counts[(t, "gold")])
                           for t in types}
        return res


def our_keys(task, text, spans):
    """Our scoring keys. TNER/MNER: (type, start, end) in input coordinates (unalignable spans never match);
    SNER: (type, entity text), position-free, a multiset."""
    if task == "SNER":
        return [(t, text[s:e]) for s, e, t in spans]
    return [(t, s, e) if s is not None else (t, "unaligned", i) for i, (s, e, t) in enumerate(spans)]


def official_keys(task, bracketed, phones_of=None):
    """The official evaluator's keys for one string (IMAGE.md 1.7), a set: (type, start, end) in the string's own
    bracket-free text, or (type, pronunciation) for SNER. data.parse_official pairs brackets as the official code
    does, with its bug: an entity ending at the last character is never found (gold and prediction alike)."""
    raw, ents = parse_official(bracketed.replace(" ", ""))
    if task == "SNER":
        return sorted({(e.type, phones_of(raw[e.start:e.end])) for e in ents})
    return sorted({(e.type, e.start, e.end) for e in ents})


def edit_distance(a, b):
    """Levenshtein distance between two sequences (CER numerator)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


HEAD_PER_WARN = 50.0   # percent: a phone CTC head that misses more gives entity times that cannot be trusted


def phone_error_rate(heard, said) -> float:
    """Percent: edit distance of the phones heard to the phones said, over the phones said (CER's rule)."""
    total = sum(len(s) for s in said)
    return 100.0 * sum(edit_distance(h, s) for h, s in zip(heard, said)) / total if total else 0.0


def score_predictions(task, golds, results, phones_of=None):
    """golds: data.Sample list; results: recognize.Recognizer results in the same order.
    -> {"ours": P/R/F1 (+ per type), "official": P/R/F1 (+ per type), "cer": percent, "sentences": n}."""
    ours, official = Scorer(), Scorer()
    edits = chars = 0
    for gold, res in zip(golds, results):
        gold_spans = [(e.start, e.end, e.type) for e in gold.entities]
        pred_spans = [(e["start"], e["end"], e["type"]) for e in res["entities"]]
        if task == "SNER":                                       # entity texts of the transcription
            ours.add([(e["type"], e["text"]) for e in res["entities"]], our_keys(task, gold.text, gold_spans))
        else:
            ours.add(our_keys(task, gold.text, pred_spans), our_keys(task, gold.text, gold_spans))
        gold_string = linearize_official(gold.text, gold.entities)
        official.add(official_keys(task, res["output"], phones_of), official_keys(task, gold_string, phones_of))
        edits += edit_distance(res["text"], gold.text)
        chars += len(gold.text)
    return {"ours": ours.result(), "official": official.result(),
            "cer": 100.0 * edits / chars if chars else 0.0, "sentences": len(golds)}


def format_scores(scores):
    """Table of P/R/F1 per task and evaluator, then per type."""
    lines = [f"{'task':<5} {'evaluator':<9} {'P':>6} {'R':>6} {'F1':>6} {'gold':>6} {'pred':>6}   CER"]
    for task, sc in scores.items():
        for name in ("ours", "official"):
            m = sc[name]
            cer = f"{sc['cer']:6.2f}" if name == "ours" else ""
            lines.append(f"{task:<5} {name:<9} {m['p']:6.2f} {m['r']:6.2f} {m['f1']:6.2f} {m['gold']:6d} "
                         f"{m['pred']:6d} {cer}")
    lines.append("")
    lines.append(f"{'task':<5} {'type':<9} {'P':>6} {'R':>6} {'F1':>6}   (ours)")
    for task, sc in scores.items():
        for t, m in sc["ours"]["per_type"].items():
            lines.append(f"{task:<5} {t:<9} {m['p']:6.2f} {m['r']:6.2f} {m['f1']:6.2f}")
    if any("head_per" in sc for sc in scores.values()):
        lines += ["", "phone error rate of the phone CTC head (SNER audio; entity times rely on it): "
                  f"{scores['SNER']['head_per']:.2f} %"]
    return "\n".join(lines)


def format_table(metrics, tasks):
    """The headline P/R/F1 per task, in the order of `tasks` (train.py's log of the test scores)."""
    lines = [f"{'task':6s} {'P':>7s} {'R':>7s} {'F1':>7s}"]
    for t in tasks:
        if t in metrics:
            m = metrics[t]
            lines.append(f"{t:6s} {m['p']:7.2f} {m['r']:7.2f} {m['f1']:7.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# 2. Analyses: an error breakdown (P/R/F1 by type, nesting and seen/unseen) and a gazetteer baseline


class Gazetteer:
    """Every string annotated as an entity in a training split, and a tagger that marks its occurrences in text.

    tag(text) finds every occurrence of every known string of at least `min_chars` characters. Nesting is
    always allowed: a known string inside a longer tagged one is tagged too. crossing='keep' (default) also keeps
    matches that overlap without nesting; crossing='longest' drops the shorter of two such matches, the later at
    equal length (the rule of `nest`). types='majority' gives a string the type it was annotated with most often
    (ties: the type seen first), types='all' one entity per type it was seen with.

    The defaults reproduce the issue's CNERTA dev numbers from image4imner train, P/R/F1 77.8 / 52.1 / 62.4
    ("longest matches, nested allowed"): they need crossing matches kept, since dropping them leaves 3,909
    predictions and P 78.4 (R 52.1, F1 62.6). types='all' gives 70.2 / 52.6 / 60.1. Single characters are off
    by default: abbreviations like 美, 京, 中 are LOCs in training and would be tagged everywhere (P 28)."""

    def __init__(self, samples, min_chars: int = 2, crossing: str = "keep", types: str = "majority"):
        if crossing not in ("keep", "longest") or types not in ("majority", "all") or min_chars < 1:
            raise ValueError(f"bad gazetteer rule: crossing={crossing!r} (keep|longest), types={types!r} "
                             f"(majority|all), min_chars={min_chars} (>= 1)")
        self.min_chars, self.crossing, self.types = min_chars, crossing, types
        self.counts = collections.defaultdict(collections.Counter)  # string -> type -> times; first seen first
        for s in samples:
            for e in s.entities:
                self.counts[s.text[e.start:e.end]][e.type] += 1
        self.longest = max(map(len, self.counts), default=0)
        self.seen = {(string, t) for string, c in self.counts.items() for t in c}  # for breakdown()

    def tag(self, text: str) -> list[Entity]:
        found = []
        for i in range(len(text)):
            for j in range(i + self.min_chars, min(len(text), i + self.longest) + 1):
                c = self.counts.get(text[i:j])
                if c:
                    kinds = list(c) if self.types == "all" else [c.most_common(1)[0][0]]
                    found += [Entity(i, j, t) for t in kinds]
        return sorted(found) if self.crossing == "keep" else nest(found)[0]


def _is_nested(e: Entity, entities) -> bool:
    """e contains, or lies inside, another entity of the same set (a same-span entity of another type counts)."""
    return any(o != e and (o.start <= e.start and e.end <= o.end or e.start <= o.start and o.end <= e.end)
               for o in entities if o.start is not None)


def breakdown(samples, predictions, seen=None) -> dict:
    """Score predicted entities against gold samples with our evaluator (Scorer: exact (start, end, type),
    micro, multisets) and break the result down by class. predictions: one list of Entity per sample, in the same
    order (start None: a predicted span that could not be placed in the text; it never matches).

    -> {"sentences", "p", "r", "f1", "tp", "pred", "gold", "per_type": {...}, "nesting": {...}, "seen": {...},
    "errors": {"missed": {...}, "wrong": {...}}}.
    Classes: nesting = nested (contains or lies inside another entity of the same side of the same sentence) or
    flat (crossing counts as flat; "unaligned" for predictions without a position); seen = the (string, type)
    is in `seen` (a training split's entities; table left out when seen is None). Per class: recall over the
    gold entities of the class (gold, found, r) and precision over the predicted ones (pred, correct, p). A gold
    and its matching prediction can fall in different nesting classes, so no F1 per class.
    errors: every missed gold entity and every wrong prediction by what the other side has there: the same span
    with another type (wrong_type), a span of another extent overlapping it (overlap: a boundary error), or
    nothing (no_overlap; also unaligned predictions)."""
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} prediction lists")
    scorer, counts = Scorer(), collections.Counter()  # counts: (table, class, field) -> n

    def keys(s, ents):
        return our_keys("TNER", s.text, [(e.start, e.end, e.type) for e in ents])

    for s, pred in zip(samples, predictions):
        scorer.add(keys(s, pred), keys(s, s.entities))
        for mine, other, total, hits in ((s.entities, pred, "gold", "found"), (pred, s.entities, "pred", "correct")):
            left = collections.Counter(other)  # multiset matching, as the scorer's
            for e in mine:
                hit = left[e] > 0
                left[e] -= hit
                placed = e.start is not None
                classes = {"nesting": ("nested" if _is_nested(e, mine) else "flat") if placed else "unaligned"}
                if seen is not None:
                    classes["seen"] = "seen" if placed and (s.text[e.start:e.end], e.type) in seen else "unseen"
                for table, cls in classes.items():
                    counts[table, cls, total] += 1
                    counts[table, cls, hits] += hit
                if not hit:
                    counts["errors", "missed" if total == "gold" else "wrong", _error_kind(e, other)] += 1
    out = {"sentences": len(samples), **scorer.result()}
    order = {"nesting": ("nested", "flat", "unaligned"), "seen": ("seen", "unseen")}
    for table in ("nesting", "seen") if seen is not None else ("nesting",):
        out[table] = {}
        for cls in order[table]:
            n = {f: counts[table, cls, f] for f in ("gold", "found", "pred", "correct")}
            if cls != "unaligned" or n["pred"]:
                out[table][cls] = {**n, "r": 100.0 * n["found"] / n["gold"] if n["gold"] else 0.0,
                                   "p": 100.0 * n["correct"] / n["pred"] if n["pred"] else 0.0}
    out["errors"] = {side: {kind: counts["errors", side, kind] for kind in ERROR_KINDS} for side in ("missed", "wrong")}
    return out


ERROR_KINDS = ("wrong_type", "overlap", "no_overlap")


def _error_kind(e, others) -> str:
    """What the other side has where an unmatched entity e lies (see breakdown)."""
    if e.start is None:
        return "no_overlap"
    placed = [o for o in others if o.start is not None]
    if any((o.start, o.end) == (e.start, e.end) and o.type != e.type for o in placed):
        return "wrong_type"
    if any(o.start < e.end and e.start < o.end and (o.start, o.end) != (e.start, e.end) for o in placed):
        return "overlap"
    return "no_overlap"


def format_breakdown(res: dict) -> str:
    """The breakdown() dict as a table (percent)."""
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
        lines += ["", f"{'errors':<15}" + "".join(f"{k:>12}" for k in ERROR_KINDS)]
        for side, label in (("missed", "missed gold"), ("wrong", "wrong pred")):
            lines.append(f"{label:<15}" + "".join(f"{res['errors'][side][k]:12d}" for k in ERROR_KINDS))
    return "\n".join(lines)


def gazetteer(train_dataset, train_dir, train_split, dataset, data_dir, split, **rule) -> dict:
    """Gazetteer baseline (see Gazetteer; rule: min_chars, crossing, types): build it from the training split, tag
    the evaluation split, score with breakdown() (seen/unseen against the same training split)."""
    train = load_split(train_dataset, train_dir, train_split, errors="collect", verbose=False)
    gaz = Gazetteer(train, **rule)
    samples = load_split(dataset, data_dir, split, errors="collect", verbose=False)
    return {"train": {"dataset": train_dataset, "split": SPLITS[train_split], "file": train.report["file"],
                      "strings": len(gaz.counts)},
            "eval": {"dataset": dataset, "split": SPLITS[split], "file": samples.report["file"]},
            "rule": {"min_chars": gaz.min_chars, "crossing": gaz.crossing, "types": gaz.types},
            **breakdown(samples, [gaz.tag(s.text) for s in samples], gaz.seen)}


def read_predictions(path, task: str) -> dict[str, dict]:
    """decode.py result records (JSON lines; --predictions or --out) of one task -> {sample id: record}."""
    records, tasks = {}, collections.Counter()
    for lineno, r in json_lines(path):
        if not isinstance(r, dict) or not {"id", "task", "entities"} <= set(r):
            raise DataError(f"{path}:{lineno}: not a decode.py record (needs id, task, entities)")
        tasks[r["task"]] += 1
        if r["task"] != task:
            continue
        if r["id"] in records:
            raise DataError(f"{path}:{lineno}: a second {task} record for id {r['id']!r}")
        entities = r["entities"] if isinstance(r["entities"], list) else [None]
        for e in entities:
            if not (isinstance(e, dict) and e.get("type") in TYPES and all(
                    k in e and (e[k] is None or (isinstance(e[k], int) and not isinstance(e[k], bool)))
                    for k in ("start", "end"))):
                raise DataError(f"{path}:{lineno}: entity {json.dumps(e, ensure_ascii=False)[:60]} is not "
                                "{type: PER|LOC|ORG, start, end: integers or null, ...}")
        records[r["id"]] = r
    if not records:
        raise DataError(f"{path}: no {task} records (tasks in the file: {dict(tasks) or 'none'})")
    return records


def breakdown_file(predictions, dataset, data_dir, split, task="TNER", train_dataset=None, train_dir=None,
                   train_split="train") -> dict:
    """breakdown() of a decode.py predictions file against the gold split, lined up by sample id. Gold samples
    without a record (decode.py --limit, or no audio for MNER) are left out and counted."""
    records = read_predictions(predictions, task)
    samples = load_split(dataset, data_dir, split, errors="collect", verbose=False)
    by_id = {s.id: s for s in samples}
    for i, r in records.items():
        s = by_id.get(i)
        if s is None:
            raise DataError(f"{predictions}: id {i!r} is not in {dataset} {SPLITS[split]} ({samples.report['file']})")
        if r.get("input_text", s.text) != s.text:
            raise DataError(f"{predictions}: id {i!r}: input text {r['input_text']!r} is not the gold {s.text!r}")
    golds = [s for s in samples if s.id in records]
    preds = [[Entity(e["start"], e["end"], e["type"]) for e in records[s.id]["entities"]] for s in golds]
    seen = None
    if train_dataset is not None:
        seen = Gazetteer(load_split(train_dataset, train_dir, train_split, errors="collect", verbose=False)).seen
    return {"predictions": str(predictions), "task": task, "dataset": dataset, "split": SPLITS[split],
            "sentences_without_prediction": len(samples) - len(golds), **breakdown(golds, preds, seen)}


# ----------------------------------------------------------------------------------------------------------------
# 3. A corpus split at a glance (python evaluate.py stats)


def depth_histogram(samples) -> dict[str, int]:
    """Sentences by their deepest nesting: 0 = no entity, 1 = flat, 2 = an entity inside another, ..."""
    hist = collections.Counter()
    for s in samples:
        ents = set(s.entities)
        hist[max((sum(o.start <= e.start and e.end <= o.end for o in ents) for e in ents), default=0)] += 1
    return {str(k): hist[k] for k in sorted(hist)}


def round_trip(samples) -> dict:
    """Unique gold entities recovered by ours (linearize -> parse) and by the official rule (linearize_official
    -> parse_official, with and without its last-character bug)."""
    gold = ours = official = official_fixed = 0
    for s in samples:
        g = set(s.entities)
        gold += len(g)
        ours += len(g & set(parse(linearize(s.text, s.entities))[1]))
        bracketed = linearize_official(s.text, s.entities)
        official += len(g & set(parse_official(bracketed)[1]))
        official_fixed += len(g & set(parse_official(bracketed, last_char_bug=False)[1]))
    return {"entities": gold, "ours_recovered": ours, "official_rule_kept": official,
            "official_rule_kept_without_last_char_bug": official_fixed}


def stats(dataset, data_dir, split, audio_dir=None) -> dict:
    samples = load_split(dataset, data_dir, split, audio_dir=audio_dir, errors="collect", verbose=False)
    r = samples.report
    nested = [nest(s.entities) for s in samples]
    types = collections.Counter(e.type for s in samples for e in set(s.entities))
    out = {"dataset": dataset, "split": SPLITS[split], "file": r["file"], "sentences": len(samples),
           "entities": {**{t: types[t] for t in TYPES}, "total": sum(types.values())},
           "duplicate_spans": sum(n[2] for n in nested), "nesting_depth": depth_histogram(samples),
           "crossing_spans": sum(len(n[1]) for n in nested), "round_trip": round_trip(samples),
           "audio": {k: r[k] for k in ("audio_dir", "audio_found", "audio_missing")},
           "brackets_made_fullwidth": r["brackets_made_fullwidth"],
           "malformed": {"count": r["malformed_count"], "first": r["malformed"]}}
    if dataset == "image4imner":  # what the lossy format lost, where the split's JSON lies beside it
        json_file = Path(r["file"]).parent / ("valid.json" if SPLITS[split] == "dev" else f"{SPLITS[split]}.json")
        if json_file.is_file():
            gold = {s.id: set(s.entities) for s in load_split("cnerta", json_file.parent, split, verbose=False)}
            lines = dict(parts for parts in (line.split(maxsplit=1) for line in read_lines(r["file"]))
                         if len(parts) == 2)
            both = [s for s in samples if s.id in gold]
            out["vs_json"] = {
                "file": str(json_file), "sentences_matched": len(both),
                "json_entities": sum(len(gold[s.id]) for s in both),
                "in_file_official_parser": sum(len(gold[s.id] & set(parse_official(lines[s.id].strip())[1]))
                                               for s in both),
                "in_file_without_last_char_bug": sum(len(gold[s.id] & set(s.entities)) for s in both)}
    return out


# ----------------------------------------------------------------------------------------------------------------
# 4. Entities in time and confidence (#17): localization against gold times, redaction coverage, calibration

FRAME_S = 0.010     # frame-F1 frames (SLUE's named-entity localization: 10 ms)


def _frames(intervals) -> set[int]:
    """The 10 ms frames whose centre lies inside any [start_s, end_s) interval (in 0.1 ms integers: a boundary on
    a centre is decided exactly, not by float rounding)."""
    out = set()
    for a, b in intervals:
        a, b = round(a * 10000), round(b * 10000)                  # 0.1 ms; frame k's centre: 100 k + 50
        out.update(range(-((50 - a) // 100), -((50 - b) // 100)))
    return out


def _right(task, gold: Sample, entities) -> list[tuple[int, dict]]:
    """(gold index, predicted entity) of the entities recognised right: TNER/MNER the same (type, start, end);
    SNER the same (type, text), paired one-to-one in order."""
    free = list(enumerate(gold.entities))
    pairs = []
    for e in entities:
        for k, (i, g) in enumerate(free):
            if g.type == e["type"] and ((gold.text[g.start:g.end] == e["text"]) if task == "SNER"
                                        else (g.start, g.end) == (e["start"], e["end"])):
                pairs.append((i, e))
                del free[k]
                break
    return pairs


def _overlapping(task, gold: Sample, i, entities) -> bool:
    """Gold entity i found with its type and an overlapping span (MNER: characters; SNER: time)."""
    g, (a, b) = gold.entities[i], gold.times[i]
    if task == "SNER":
        return any(e["type"] == g.type and e.get("start_s") is not None and e["start_s"] < b and a < e["end_s"]
                   for e in entities)
    return any(e["type"] == g.type and e["start"] is not None and e["start"] < g.end and g.start < e["end"]
               for e in entities)


def _quantiles(values) -> dict:
    if not values:
        return {"n": 0}
    v = sorted(values)
    at = lambda q: v[min(len(v) - 1, int(q * len(v)))]          # noqa: E731 (nearest rank)
    return {"n": len(v), "median": at(0.5), "p90": at(0.9), "mean": sum(v) / len(v)}


def localization(task, pairs, offset_s=0.0, pad_s=0.0, min_align_confidence=audio.MIN_ALIGN_CONFIDENCE) -> dict:
    """pairs: (gold Sample with times, decode.py result with entity times). -> frame P/R/F1 (percent; overall and
    per type), start/end errors in ms of the entities recognised right (|error| quantiles; signed: predicted -
    gold), redaction coverage (audio.redaction_plan, all types): of the entities recognised right (type
    and overlapping span), of every gold entity, and of the audio outside every entity. offset_s shifts every
    predicted time (a constant fitted on dev)."""
    tp, n_pred, n_gold = collections.Counter(), collections.Counter(), collections.Counter()
    errors = {"start": [], "end": [], "start_signed": [], "end_signed": []}
    cover = collections.Counter()
    untimed = 0
    for gold, res in pairs:
        ents = [dict(e, start_s=e["start_s"] + offset_s, end_s=e["end_s"] + offset_s)
                if e.get("start_s") is not None else e for e in res["entities"]]
        untimed += sum(e.get("start_s") is None for e in ents)
        for t in TYPES:
            p = _frames((e["start_s"], e["end_s"]) for e in ents if e["type"] == t and e.get("start_s") is not None)
            g = _frames(iv for e, iv in zip(gold.entities, gold.times) if e.type == t)
            for key in (t, "all"):
                tp[key] += len(p & g)
                n_pred[key] += len(p)
                n_gold[key] += len(g)
        for i, e in _right(task, gold, ents):
            if e.get("start_s") is not None:
                for side, pred, ref in (("start", e["start_s"], gold.times[i][0]),
                                        ("end", e["end_s"], gold.times[i][1])):
                    errors[side].append(abs(pred - ref) * 1000)
                    errors[side + "_signed"].append((pred - ref) * 1000)
        duration = audio.wav_info(res["wav"]).seconds
        replaced = _frames((r["from_s"], r["to_s"]) for r in audio.redaction_plan(ents, duration, TYPES, pad_s,
                                                                            min_align_confidence))
        every = _frames(gold.times)
        for i, iv in enumerate(gold.times):
            f = _frames([iv])
            cover["all", "gold"] += len(f)
            cover["all", "replaced"] += len(f & replaced)
            if _overlapping(task, gold, i, ents):
                cover["right", "gold"] += len(f)
                cover["right", "replaced"] += len(f & replaced)
        outside = set(range(math.ceil(duration / FRAME_S - 0.5))) - every
        cover["outside", "gold"] += len(outside)
        cover["outside", "replaced"] += len(outside & replaced)
    frame = {k: _prf(tp[k], n_pred[k], n_gold[k]) for k in ("all", *TYPES)}
    return {"task": task, "sentences": len(pairs), "offset_ms": offset_s * 1000, "frame_f1": frame,
            "errors_ms": {k: _quantiles(v) for k, v in errors.items()}, "entities_without_time": untimed,
            "redaction": {"pad_ms": pad_s * 1000, "min_align_confidence": min_align_confidence,
                          **{k: cover[k, "replaced"] / cover[k, "gold"] if cover[k, "gold"] else None
                             for k in ("right", "all", "outside")}}}


def expected_calibration_error(conf, correct, bins=10) -> float:
    """ECE over `bins` equal-width confidence bins: sum over bins of |accuracy - mean confidence| x bin share."""
    total, err = len(conf), 0.0
    for b in range(bins):
        inside = [(c, y) for c, y in zip(conf, correct)
                  if b / bins <= c < (b + 1) / bins or (b == bins - 1 and c == 1)]
        if inside:
            err += abs(sum(y for _, y in inside) - sum(c for c, _ in inside)) / total
    return err


def auroc(conf, correct) -> float | None:
    """Area under the ROC curve of confidence for right vs wrong: P(a right one scores above a wrong one), ties
    half (Mann-Whitney over average ranks). None without both kinds."""
    n_pos = sum(correct)
    n_neg = len(correct) - n_pos
    if not n_pos or not n_neg:
        return None
    order = sorted(range(len(conf)), key=lambda i: conf[i])
    ranks, i = [0.0] * len(conf), 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and conf[order[j + 1]] == conf[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return (sum(r for r, y in zip(ranks, correct) if y) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def fit_temperature(log_conf, correct) -> float:
    """T minimising the log loss of exp(log_conf / T) against right (1) / wrong (0), on a log grid 0.05-20."""
    def loss(t):
        total = 0.0
        for lc, y in zip(log_conf, correct):
            p = min(max(math.exp(lc / t), 1e-7), 1 - 1e-7)
            total -= math.log(p) if y else math.log(1 - p)
        return total
    return min((0.05 * 400 ** (k / 200) for k in range(201)), key=loss)


def fit_platt(log_conf, correct, ridge=1e-3) -> tuple[float, float]:
    """(a, b) minimising the log loss of platt(log_conf, a, b) against right (1) / wrong (0): logistic regression
    on one feature by Newton's method (a small ridge keeps it defined when the two kinds separate)."""
    a, b = 1.0, 0.0
    xs = [math.log(c / (1 - c)) for c in (min(max(math.exp(v), 1e-6), 1 - 1e-6) for v in log_conf)]
    for _ in range(100):
        ga = gb = haa = hab = hbb = 0.0
        for x, y in zip(xs, correct):
            p = platt(math.log(1 / (1 + math.exp(-x))), a, b)
            w = p * (1 - p)
            ga, gb = ga + (p - y) * x, gb + (p - y)
            haa, hab, hbb = haa + w * x * x, hab + w * x, hbb + w
        ga, gb, haa, hbb = ga + ridge * (a - 1), gb + ridge * b, haa + ridge, hbb + ridge
        det = haa * hbb - hab * hab
        if det <= 0:
            break
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        a, b = a - da, b - db
        if abs(da) + abs(db) < 1e-9:
            break
    return a, b


def confidence_records(task, pairs) -> tuple[list[float], list[int]]:
    """Every predicted entity with a confidence: (log-confidence at T = 1 as decode.py wrote it, 1 if right)."""
    log_conf, correct = [], []
    for gold, res in pairs:
        right = {id(e) for _, e in _right(task, gold, res["entities"])}
        for e in res["entities"]:
            if e.get("confidence") is not None:
                log_conf.append(math.log(max(e["confidence"], 1e-6)))
                correct.append(int(id(e) in right))
    return log_conf, correct


def calibration(task, pairs, temperature=1.0, bins=10) -> dict:
    """ECE and AUROC of the entity confidences as written (decoded at `temperature`), and 2-fold: a temperature
    (or Platt's two parameters) fitted on the even-numbered sentences, scored on the odd ones, and the other way
    round."""
    def scores(part, t_fit=1.0, map_=None):
        lc, y = confidence_records(task, part)
        conf = [map_(v) if map_ else math.exp(v / t_fit) for v in lc]
        return {"entities": len(y), "accuracy": sum(y) / len(y) if y else None, "mean_confidence":
                sum(conf) / len(conf) if conf else None, "ece": expected_calibration_error(conf, y, bins),
                "auroc": auroc(conf, y)}
    folds, platt_folds = [], []
    for fit, held in ((pairs[0::2], pairs[1::2]), (pairs[1::2], pairs[0::2])):
        t = fit_temperature(*confidence_records(task, fit))
        folds.append({"temperature": t, "effective_temperature": t * temperature, **scores(held, t)})
        a, b = fit_platt(*confidence_records(task, fit))
        platt_folds.append({"a": a, "b": b, **scores(held, map_=lambda v: platt(v, a, b))})
    mean = lambda fs: {k: sum(f[k] for f in fs) / 2 for k in ("ece", "auroc") if all(f[k] is not None for f in fs)}
    return {"task": task, "sentences": len(pairs), "decoded_at_temperature": temperature,
            "as_written": scores(pairs),
            "two_fold": folds, "two_fold_mean": mean(folds),
            "two_fold_platt": platt_folds, "two_fold_platt_mean": mean(platt_folds),
            "temperature_all": fit_temperature(*confidence_records(task, pairs)) * temperature,
            "platt_all": fit_platt(*confidence_records(task, pairs))}


def playback(pairs, original_pairs) -> dict:
    """Redacted recordings decoded again (SNER): pairs = (gold, record of a redacted recording), whose sidecar (the
    record's wav + ".json", decode.py --redact-dir) says what was replaced; original_pairs = the records of the same
    recordings unredacted. A gold entity counts as redacted when half its gold interval or more was replaced.
    Reported: the redacted entities still found (same type and text), still heard (their text in the
    transcription), and the CER of what should remain (the gold text without the redacted entities) beside the CER
    of the original recordings against the whole gold text."""
    original = {g.id: r for g, r in original_pairs}
    counts = collections.Counter()
    for gold, res in pairs:
        if gold.times is None or gold.id not in original:
            raise DataError(f"{gold.id}: no gold entity times, or no record of the original recording")
        try:
            with open(res["wav"] + ".json", encoding="utf-8") as f:
                merged = audio.merge_intervals((r["from_s"], r["to_s"]) for r in json.load(f)["replaced"])
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{res['wav']}.json: not a redaction sidecar ({e})") from None
        gone = [e for e, (a, b) in zip(gold.entities, gold.times)
                if sum(max(0.0, min(b, y) - max(a, x)) for x, y in merged) >= (b - a) / 2 - 1e-9]   # float slack
        cut = {k for e in gone for k in range(e.start, e.end)}
        rest = "".join(c for k, c in enumerate(gold.text) if k not in cut)
        found = {(e["type"], e["text"]) for e in res["entities"] + res.get("below_min_confidence", [])}
        counts["redacted"] += len(gone)
        counts["found"] += sum((e.type, gold.text[e.start:e.end]) in found for e in gone)
        counts["heard"] += sum(gold.text[e.start:e.end] in res["text"] for e in gone)
        counts["errors"] += edit_distance(res["text"], rest)
        counts["chars"] += len(rest)
        counts["original_errors"] += edit_distance(original[gold.id]["text"], gold.text)
        counts["original_chars"] += len(gold.text)
    cer = lambda errors, chars: 100 * counts[errors] / counts[chars] if counts[chars] else None
    return {"sentences": len(pairs), "redacted_entities": counts["redacted"], "still_found": counts["found"],
            "still_heard": counts["heard"], "cer_of_the_rest": cer("errors", "chars"),
            "cer_original": cer("original_errors", "original_chars")}


def long_form(predictions, data_dir, task="SNER") -> dict:
    """Scores of long recordings per gold utterance: each record split back into its utterances (segment.unstitch)
    and scored against the utterances' own lines (data_dir/cut/test.json), as decode.py --eval scores the cut set."""
    lines = {d["audio"]: d for _, d in json_lines(Path(data_dir) / "test.json")}
    records = read_predictions(predictions, task)
    bad = sorted(i for i in records if "utterances" not in lines.get(i, {}))
    if bad:
        raise DataError(f"{predictions}: records {bad[:3]} are not long recordings of {data_dir}/test.json (a line "
                        "with \"utterances\", as demo.py --long-form writes)")
    golds = {s.id: s for s in load_split("demo", Path(data_dir) / "cut", "test")}
    split = [r for i, rec in records.items() for r in segment.unstitch(rec, lines[i]["utterances"])]
    return {"recordings": len(records), **score_predictions(task, [golds[r["id"]] for r in split], split,
                                                            Phonemizer(read_phone_dict()).pronounce)}


def prediction_pairs(predictions, dataset, data_dir, split, task, need_times=False) -> list[tuple[Sample, dict]]:
    """(gold sample, decode.py record) for every record of `task` in a predictions file, by sample id."""
    golds = {s.id: s for s in load_split(dataset, data_dir, split, errors="raise")}
    records = read_predictions(predictions, task)
    missing = sorted(set(records) - set(golds))
    if missing:
        raise DataError(f"{predictions}: {len(missing)} {task} ids not in {dataset} {split}, e.g. {missing[0]!r}")
    if need_times and any(golds[i].times is None for i in records):
        raise DataError(f"{dataset} {split} records no gold entity times (\"entity_times\"; the demo corpus has them)")
    untimed = [i for i, r in records.items() if need_times and (not r.get("wav") or any(
        e.get("start_s") is None and "align_confidence" not in e for e in r["entities"]))]
    if untimed:
        raise DataError(f"{predictions}: record {untimed[0]!r} has no wav or no entity times (decode.py with "
                        "--timestamps entities)")
    return [(golds[i], records[i]) for i in sorted(records)]


# ----------------------------------------------------------------------------------------------------------------
# 5. Command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add_split_args(q, train_required):  # gazetteer and breakdown
        q.add_argument("--dataset", required=True, choices=DATASETS, help="corpus format of the gold split")
        q.add_argument("--data-dir", default=None, help="folder with the gold annotation files")
        q.add_argument("--split", default="dev", choices=sorted(SPLITS), help="gold split (default dev)")
        q.add_argument("--train-dataset", required=train_required, choices=DATASETS,
                       help="corpus format of the training split (its entities: the gazetteer, seen vs unseen)")
        q.add_argument("--train-dir", default=None, help="folder with the training annotation files")
        q.add_argument("--train-split", default="train", choices=sorted(SPLITS),
                       help="training split (default train)")
        q.add_argument("--json", action="store_true", help="print one JSON object instead of tables")

    gz = sub.add_parser("gazetteer", help="baseline: tag every string seen as an entity in a training split, "
                                          "score it (P/R/F1 per type, nesting, seen vs unseen)")
    add_split_args(gz, train_required=True)
    gz.add_argument("--min-chars", type=int, default=2, help="shortest string tagged (default 2: single "
                                                            "characters like 美 would be tagged everywhere)")
    gz.add_argument("--crossing", choices=("keep", "longest"), default="keep",
                    help="matches that overlap without nesting: keep all (default, the issue's rule), or keep "
                         "the longest (the earlier at equal length); nested matches are always kept")
    gz.add_argument("--types", choices=("majority", "all"), default="majority",
                    help="a string seen with several types: its most frequent type (ties: first seen), or all")
    bd = sub.add_parser("breakdown", help="error analysis of a decode.py predictions file: P/R/F1 per type, "
                                          "recall/precision by nesting and (with --train-*) seen vs unseen")
    bd.add_argument("--predictions", required=True, help="decode.py --predictions (or --out) JSON lines file")
    bd.add_argument("--task", default="TNER", choices=("TNER", "MNER"),
                    help="whose records to score (default TNER; SNER spans have no offsets into the gold text)")
    add_split_args(bd, train_required=False)
    st = sub.add_parser("stats", help="print one JSON object describing a corpus split: sentences, entities per "
                                      "type, nesting depth, crossing spans, linearization round trip, audio found")
    st.add_argument("--dataset", required=True, choices=DATASETS, help="corpus format")
    st.add_argument("--data-dir", default=None, help="folder with the annotation files (demo: generated if absent)")
    st.add_argument("--split", default="train", choices=sorted(SPLITS), help="split to read (dev = valid)")
    st.add_argument("--audio-dir", default=None, help="wav folder (AISHELL-1 wav/ or flat); default DATA_DIR/wav")
    for name, what in (("times", "entity times of a decode.py predictions file (SNER/MNER, --timestamps) against "
                                  "the gold times of the corpus (the demo records them): frame-F1 on 10 ms frames, "
                                  "start/end errors, redaction coverage"),
                       ("confidence", "calibration of the entity confidences of a decode.py predictions file: ECE "
                                      "(10 bins) and AUROC, as written and with a temperature or a Platt map fitted "
                                      "2-fold"),
                       ("playback", "redacted recordings decoded again (--predictions of decode.py --dataset D "
                                    "--audio-dir FOLDER --task SNER, FOLDER written by --redact-dir): redacted "
                                    "entities still found or heard, and the CER of the rest against --original's"),
                       ("long-form", "long recordings (demo.py --long-form, decoded with --timestamps chars) "
                                     "scored per gold utterance, as the same audio cut at the utterances is: "
                                     "--data-dir LONG (its test.json), --dataset demo")):
        q = sub.add_parser(name, help=what)
        q.add_argument("--predictions", required=True, help="decode.py --predictions (or --out) JSON lines file")
        q.add_argument("--task", required=True, choices=("TNER", "SNER", "MNER"), help="whose records to score")
        q.add_argument("--dataset", required=True, choices=DATASETS, help="corpus format of the gold split")
        q.add_argument("--data-dir", default=None, help="folder with the gold annotation files")
        q.add_argument("--split", default="dev", choices=sorted(SPLITS), help="gold split (default dev)")
    tm, cf = sub.choices["times"], sub.choices["confidence"]
    sub.choices["playback"].add_argument("--original", required=True, help="decode.py --predictions of the same "
                                         "split and task on the original recordings")
    tm.add_argument("--offset-ms", type=float, default=0.0, help="add this to every predicted time, to try a "
                    "constant offset on dev (decode.py --time-offset-ms is already in the times; default 0)")
    tm.add_argument("--pad-ms", type=float, default=0.0, help="redaction padding around each entity (default 0)")
    tm.add_argument("--min-align-confidence", type=float, default=audio.MIN_ALIGN_CONFIDENCE,
                    help=f"redaction fails closed below this (default {audio.MIN_ALIGN_CONFIDENCE}, as decode.py)")
    cf.add_argument("--temperature", type=float, default=1.0, help="the --confidence-temperature the predictions "
                    "were decoded with (default 1)")
    args = p.parse_args(argv)
    if args.command in ("times", "confidence", "playback", "long-form"):
        try:
            pairs = [] if args.command == "long-form" else prediction_pairs(
                args.predictions, args.dataset, args.data_dir, args.split, args.task, args.command == "times")
            if args.command == "long-form":
                result = long_form(args.predictions, args.data_dir, args.task)
            elif args.command == "playback":
                if args.task != "SNER":
                    raise DataError("playback: SNER only (a given text would say the redacted names)")
                result = playback(pairs, prediction_pairs(args.original, args.dataset, args.data_dir, args.split,
                                                          args.task))
            elif args.command == "times":
                if args.task == "TNER":
                    raise DataError("times: TNER has no audio (choose SNER or MNER)")
                result = localization(args.task, pairs, args.offset_ms / 1000, args.pad_ms / 1000,
                                      args.min_align_confidence)
            else:
                result = calibration(args.task, pairs, args.temperature)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"evaluate.py {args.command}: {e}")
        print(json.dumps(result, ensure_ascii=False, indent=1))
        return
    if args.command == "breakdown" and args.train_dir is not None and args.train_dataset is None:
        p.error("--train-dir needs --train-dataset")
    try:
        if args.command == "stats":
            print(json.dumps(stats(args.dataset, args.data_dir, args.split, args.audio_dir), ensure_ascii=False))
            return
        if args.command == "gazetteer":
            result = gazetteer(args.train_dataset, args.train_dir, args.train_split, args.dataset, args.data_dir,
                               args.split, min_chars=args.min_chars, crossing=args.crossing, types=args.types)
        else:
            result = breakdown_file(args.predictions, args.dataset, args.data_dir, args.split, args.task,
                                    args.train_dataset, args.train_dir, args.train_split)
    except (FileNotFoundError, ValueError) as e:  # DataError too: 'file:line: why'
        raise SystemExit(f"evaluate.py {args.command}: {e}")
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return
    if args.command == "gazetteer":
        print(f"gazetteer: {result['train']['strings']} strings from {result['train']['dataset']} "
              f"{result['train']['split']}, rule {result['rule']}; {result['eval']['dataset']} "
              f"{result['eval']['split']}, {result['sentences']} sentences")
    else:
        print(f"{result['predictions']}: {result['task']} on {result['dataset']} {result['split']}, "
              f"{result['sentences']} sentences ({result['sentences_without_prediction']} without a prediction)")
    print(format_breakdown(result))


if __name__ == "__main__":
    main()
