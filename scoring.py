"""scoring.py: the scores of entity predictions: our evaluator and the official one, CER, score tables, and the
reading of decode.py's prediction files.

Ours counts every entity, exact (type, start, end) in the input text, or (type, entity text) for SNER, as
per-sentence multisets; the official code's parses both strings with its own bracket rule (last-character bug
included) and compares sets, (type, pronunciation) for SNER. CER: edit distance of the output text to the gold
text over the gold characters. decode.py --eval (and train.py's dev and test scores, through decode.evaluate_split)
score with these; evaluate.py and diagnose.py read prediction files with read_predictions and prediction_pairs.
Nothing here runs a model.
"""
from __future__ import annotations

import collections
import json

from data import DataError, Sample, json_lines, linearize_official, load_split, parse_official
from text import TYPES


# ----------------------------------------------------------------------------------------------------------------
# 1. Scorers: ours, the official one, CER; score tables


def prf(tp, n_pred, n_gold):
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
        res = prf(self.counts[("all", "tp")], self.counts[("all", "pred")], self.counts[("all", "gold")])
        res["per_type"] = {t: prf(self.counts[(t, "tp")], self.counts[(t, "pred")], self.counts[(t, "gold")])
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
# 2. Prediction files (what decode.py --predictions and --out write)


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
            if not (isinstance(e, dict) and e.get("type") in TYPES and all(k in e for k in ("start", "end")) and (
                    e["start"] is None is e["end"] or all(isinstance(e[k], int) and not isinstance(e[k], bool)
                                                          for k in ("start", "end")) and 0 <= e["start"] <= e["end"])):
                raise DataError(f"{path}:{lineno}: entity {json.dumps(e, ensure_ascii=False)[:60]} is not "
                                "{type: PER|LOC|ORG, start, end: both null or integers 0 <= start <= end, ...}")
        records[r["id"]] = r
    if not records:
        raise DataError(f"{path}: no {task} records (tasks in the file: {dict(tasks) or 'none'})")
    return records


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
