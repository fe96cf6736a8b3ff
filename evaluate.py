"""evaluate.py: scores of entity predictions (our evaluator and the official one, CER), error analyses, tables.

    python evaluate.py stats --dataset cnerta --data-dir ../shared/data/cnerta --split dev   # a corpus at a glance
    python evaluate.py breakdown --predictions preds.jsonl --dataset cnerta --data-dir D     # decode.py errors
    python evaluate.py gazetteer --train-dataset image4imner --train-dir D --dataset cnerta --data-dir D  # baseline

Two evaluators score every prediction (decode.py --eval, train.py's dev and test scores via decode.evaluate_split,
which runs the model): ours counts every entity, exact (type, start, end) in the input text, or (type, entity text)
for SNER, as per-sentence multisets; the official code's parses both strings with its own bracket rule (last-
character bug included) and compares sets, (type, pronunciation) for SNER. CER: edit distance of the output text
to the gold text over the gold characters. The analyses break predictions down by type, nesting, seen/unseen and
kind of error, and score a gazetteer baseline.

Sections: 1 scorers and score tables | 2 analyses (error breakdown, gazetteer baseline) | 3 corpus statistics |
4 command line.
Nothing here runs a model: decode.py does, and calls these.
"""
from __future__ import annotations

import argparse
import collections
import json

from pathlib import Path

from data import (DATASETS, SPLITS, DataError, Entity, json_lines, linearize, linearize_official, load_split, nest,
                  parse, parse_official, read_lines)
from text import TYPES


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


def score_predictions(task, golds, results, phones_of=None):
    """golds: data.Sample list; results: decode.Recognizer results in the same order.
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
# 4. Command line


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
    args = p.parse_args(argv)
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
