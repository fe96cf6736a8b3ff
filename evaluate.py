"""evaluate.py: the command line of scoring and analysis, and the analyses of entity predictions: an error
breakdown (P/R/F1 by type, nesting, seen/unseen, kind of error), a gazetteer baseline, a corpus split at a glance.

    python evaluate.py stats --dataset cnerta --data-dir ../shared/data/cnerta --split dev   # a corpus at a glance
    python evaluate.py breakdown --predictions preds.jsonl --dataset cnerta --data-dir D     # decode.py errors
    python evaluate.py gazetteer --train-dataset image4imner --train-dir D --dataset cnerta --data-dir D  # baseline
    python evaluate.py times --predictions p.jsonl --task MNER --dataset demo --split test     # entity times
    python evaluate.py confidence --predictions p.jsonl --task TNER --dataset cnerta --data-dir D  # calibration
    python evaluate.py long-form --predictions p.jsonl --task SNER --dataset demo --data-dir LONG  # per utterance
    python evaluate.py pieces --data-dir LONG --vad silero                                        # the cut alone
    python evaluate.py entities --dataset cnerta --data-dir D --split train --out train_entities.txt  # a list
    python evaluate.py report --predictions p.jsonl --task SNER --dataset demo --split test --out report.html
    python evaluate.py choose w0=dev_w0.jsonl w1=dev_w1.jsonl --dataset cnerta --data-dir D   # a setting, 2-fold

The scorers themselves (ours and the official one, CER; decode.py --eval uses them) are in scoring.py; the error
taxonomy (what went wrong per sentence, the breakdown tables) in breakdown.py; the HTML page in report.py; entity
times, confidence, playback and long recordings per utterance in diagnose.py.

Sections: 1 analyses (error breakdown, gazetteer baseline) | 2 corpus statistics | 3 command line.
Nothing here runs a model (decode.py does; `pieces` runs the voice activity detector).
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import audio
import diagnose
import files
import report
import scoring
import segment
from data import (DATASETS, SPLITS, DataError, Entity, linearize, linearize_official, load_split, nest, parse,
                  parse_official, read_lines)
from breakdown import Sentence, breakdown, compare, format_breakdown, tables
from scoring import prf, read_predictions
from options import PIECE_RULES, VADS, DecodeOptions
from text import BRACKET_CHARS, TYPES


# ----------------------------------------------------------------------------------------------------------------
# 1. Analyses: an error breakdown (P/R/F1 by type, nesting and seen/unseen) and a gazetteer baseline


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


def entity_list(samples, min_chars: int = 1, types: str = "all") -> list[str]:
    """The entity list of a split, as decode.py --entities reads it: 'STRING TYPE' per (string, type) annotated
    (types='all') or per string with its majority type ('majority'), most frequent first, then in first-seen order."""
    g = Gazetteer(samples, min_chars=min_chars, types=types)
    lines = []
    for string, counts in sorted(g.counts.items(), key=lambda kv: -sum(kv[1].values())):
        if len(string) < min_chars or any(c.isspace() or c in BRACKET_CHARS for c in string):
            continue          # a list line is one string without white space or bracket characters
        kinds = [t for t, _ in counts.most_common()] if types == "all" else [counts.most_common(1)[0][0]]
        lines += [f"{string} {t}" for t in kinds]
    return lines


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


def compare_file(predictions, dataset, data_dir, split, task="TNER", train_dataset=None, train_dir=None,
                 train_split="train") -> tuple[list[Sentence], dict]:
    """A decode.py predictions file against its gold split, lined up by sample id -> (compared sentences in the
    split's order, what was compared). Gold samples without a record (decode.py --limit, or no audio for MNER) are
    left out and counted; with train_dataset, every entity is marked seen or unseen in that training split."""
    records = read_predictions(predictions, task)
    samples = load_split(dataset, data_dir, split, errors="collect", verbose=False)
    by_id = {s.id: s for s in samples}
    for i, r in records.items():
        s = by_id.get(i)
        if s is None:
            raise DataError(f"{predictions}: id {i!r} is not in {dataset} {SPLITS[split]} ({samples.report['file']})")
        if task != "SNER" and r.get("input_text", s.text) != s.text:
            raise DataError(f"{predictions}: id {i!r}: input text {r['input_text']!r} is not the gold {s.text!r}")
    seen = None
    if train_dataset is not None:
        seen = Gazetteer(load_split(train_dataset, train_dir, train_split, errors="collect", verbose=False)).seen
    sentences = []
    for s in samples:
        if s.id in records:
            r = records[s.id]
            preds = [Entity(e["start"], e["end"], e["type"]) for e in r["entities"]]
            sentences.append(compare(s, preds, task, r.get("text", s.text), seen, r))
    info = {"predictions": str(predictions), "task": task, "dataset": dataset, "split": SPLITS[split],
            "file": samples.report["file"], "sentences_without_prediction": len(samples) - len(sentences),
            "seen_from": None if seen is None else f"{train_dataset} {SPLITS[train_split]}"}
    return sentences, info


def breakdown_file(predictions, dataset, data_dir, split, task="TNER", train_dataset=None, train_dir=None,
                   train_split="train") -> dict:
    """breakdown.tables() of a decode.py predictions file against its gold split (see compare_file)."""
    sentences, info = compare_file(predictions, dataset, data_dir, split, task, train_dataset, train_dir, train_split)
    return {k: info[k] for k in ("predictions", "task", "dataset", "split", "sentences_without_prediction")} | \
        tables(sentences, info["seen_from"] is not None)


def choose_two_fold(runs: dict, dataset, data_dir, split, task="TNER") -> dict:
    """A decoding setting chosen without looking at what it is scored on: runs = {setting: predictions file} of
    one split; the split's sentences (those every run has) in two halves by position (even, odd); the setting best
    on one half (our F1) is scored on the other, both ways, and the two held-out halves pooled.
    -> {"settings": {name: {"f1", "half_f1": [even, odd]}}, "chosen": [on even, on odd], "held_out": P/R/F1}."""
    if len(runs) < 2:
        raise ValueError("choose needs two or more NAME=FILE settings to choose from")
    found = {name: {s.sample.id: s for s in compare_file(path, dataset, data_dir, split, task)[0]}
             for name, path in runs.items()}
    ids = [i for i in next(iter(found.values())) if all(i in f for f in found.values())]
    halves = [ids[0::2], ids[1::2]]
    score = {name: [tables([f[i] for i in half]) for half in (ids, *halves)] for name, f in found.items()}
    chosen = [max(runs, key=lambda name: score[name][1 + h]["f1"]) for h in (0, 1)]
    held = [score[chosen[h]][2 - h] for h in (0, 1)]     # chosen on even -> scored on odd, and back
    tp, pred, gold = (sum(x[k] for x in held) for k in ("tp", "pred", "gold"))
    return {"task": task, "sentences": len(ids), "chosen": chosen, "held_out": prf(tp, pred, gold),
            "settings": {name: {"f1": sc[0]["f1"], "p": sc[0]["p"], "r": sc[0]["r"],
                                "half_f1": [sc[1]["f1"], sc[2]["f1"]]} for name, sc in score.items()}}


# ----------------------------------------------------------------------------------------------------------------
# 2. A corpus split at a glance (python evaluate.py stats)


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
# 3. Command line


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
    bd.add_argument("--task", default="TNER", choices=("TNER", "SNER", "MNER"),
                    help="whose records to score (default TNER; SNER entities are placed in the gold text by "
                         "aligning the transcription to it)")
    add_split_args(bd, train_required=False)
    rp = sub.add_parser("report", help="one self-contained HTML page of a decode.py predictions file against its "
                                       "gold split: score tables, every sentence with gold and predicted entities "
                                       "highlighted, errors by kind, filters, search, audio")
    rp.add_argument("--predictions", required=True, help="decode.py --predictions (or --out) JSON lines file")
    rp.add_argument("--task", required=True, choices=("TNER", "SNER", "MNER"), help="whose records to show")
    add_split_args(rp, train_required=False)
    rp.add_argument("--out", required=True, help="HTML file to write (atomically); wav links are relative to it")
    rp.add_argument("--audio", choices=report.AUDIO_MODES, default="link", help="speech tasks: link each "
                    "utterance's wav (default), embed it in the page (large), or none")
    rp.add_argument("--title", default=None, help="page title (default: task, corpus, split, predictions file)")
    ch = sub.add_parser("choose", help="choose a decoding setting 2-fold: predictions of one split decoded with "
                                       "each setting, the best on one half of the sentences scored on the other, "
                                       "both ways (a held-out F1 for a setting tried on the split itself)")
    ch.add_argument("runs", nargs="+", metavar="NAME=FILE", help="a setting's name and its decode.py predictions, "
                    "e.g. w0=dev_w0.jsonl w1=dev_w1.jsonl")
    ch.add_argument("--task", default="TNER", choices=("TNER", "SNER", "MNER"), help="whose records (default TNER)")
    ch.add_argument("--dataset", required=True, choices=DATASETS, help="corpus format of the gold split")
    ch.add_argument("--data-dir", default=None, help="folder with the gold annotation files")
    ch.add_argument("--split", default="dev", choices=sorted(SPLITS), help="gold split (default dev)")
    st = sub.add_parser("stats", help="print one JSON object describing a corpus split: sentences, entities per "
                                      "type, nesting depth, crossing spans, linearization round trip, audio found")
    def add_corpus_args(q):  # stats and entities: one split of one corpus
        q.add_argument("--dataset", required=True, choices=DATASETS, help="corpus format")
        q.add_argument("--data-dir", default=None, help="folder with the annotation files (demo: generated if absent)")
        q.add_argument("--split", default="train", choices=sorted(SPLITS), help="split to read (default train; dev = "
                                                                             "valid)")

    add_corpus_args(st)
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
                                     "scored per gold utterance, as the same audio cut at the utterances is (entity "
                                     "F1, CER, entity times and redaction coverage; MNER: alignment failures): "
                                     "--data-dir LONG (its test.json, or valid.json), --dataset demo")):
        q = sub.add_parser(name, help=what)
        q.add_argument("--predictions", required=True, help="decode.py --predictions (or --out) JSON lines file")
        q.add_argument("--task", required=True, choices=("TNER", "SNER", "MNER"), help="whose records to score")
        q.add_argument("--dataset", required=True, choices=DATASETS, help="corpus format of the gold split")
        q.add_argument("--data-dir", default=None, help="folder with the gold annotation files")
        if name == "long-form":                                 # the set's test.json, or its valid.json
            q.add_argument("--split", default="test", choices=("test", "valid"), help="long-form split (default "
                           "test; choose settings on valid)")
        else:
            q.add_argument("--split", default="dev", choices=sorted(SPLITS), help="gold split (default dev)")
    el = sub.add_parser("entities", help="write the entity list of a split (decode.py --entities reads it): one "
                                         "'STRING TYPE' a line, most frequent first")
    add_corpus_args(el)
    el.add_argument("--out", required=True, help="list file to write (atomically)")
    el.add_argument("--min-chars", type=int, default=1, help="shortest string listed (default 1)")
    el.add_argument("--types", choices=("majority", "all"), default="all", help="a string annotated with several "
                    "types: a line per type (all, default) or its most frequent type only (majority)")
    pc = sub.add_parser("pieces", help="how long recordings (demo.py --long-form) are cut into pieces, against "
                                       "their gold utterances, before any model runs: pieces, pieces holding "
                                       "several utterances, utterances cut or missed, time outside utterances")
    pc.add_argument("--data-dir", required=True, help="the long-form folder (its test.json and wav/test/, or "
                    "valid.json and wav/valid/)")
    pc.add_argument("--split", default="test", choices=("test", "valid"), help="the long-form split: test (default) "
                    "or valid (demo.py --long-form builds both; choose settings on valid)")
    pc.add_argument("--vad", choices=VADS, default="silero", help="voice activity detector (default silero)")
    pc.add_argument("--pieces", choices=PIECE_RULES, default="pauses", help="decode.py --pieces (default pauses)")
    pc.add_argument("--max-piece-seconds", type=float, default=20.0, help="decode.py --max-piece-seconds "
                    "(default 20)")
    pc.add_argument("--min-pause-seconds", type=float, default=0.2, help="decode.py --min-pause-seconds "
                    "(default 0.2)")
    pc.add_argument("--piece-pad-seconds", type=float, default=0.2, help="decode.py --piece-pad-seconds "
                    "(default 0.2)")
    pc.add_argument("--task", choices=("SNER", "MNER"), default="SNER", help="the task the pieces are for: MNER "
                    "adds --quiet-threshold's and --gap-piece-seconds' pieces (default SNER)")
    pc.add_argument("--vad-threshold", type=float, default=0.5, help="decode.py --vad-threshold (above 0.15, "
                    "below 1; default 0.5)")
    pc.add_argument("--quiet-threshold", type=files.number_or_none, default=0.1, help="decode.py --quiet-threshold "
                    "(used with --task MNER only; default 0.1; none: no quiet pieces)")
    pc.add_argument("--pause-level", type=files.number_or_none, default=0.25, help="decode.py --pause-level "
                    "(default 0.25; none: pauses by their length only)")
    pc.add_argument("--short-piece-seconds", type=float, default=2.0, help="decode.py --short-piece-seconds "
                    "(default 2)")
    pc.add_argument("--join-piece-seconds", type=files.number_or_none, default=6.5, help="decode.py "
                    "--join-piece-seconds (default 6.5; none: no joins of touching pieces)")
    pc.add_argument("--gap-piece-seconds", type=files.number_or_none, default=2.5, help="decode.py "
                    "--gap-piece-seconds (used with --task MNER only, counted apart as gap_pieces; default 2.5; none: "
                    "no gap pieces)")
    tm, cf = sub.choices["times"], sub.choices["confidence"]
    sub.choices["long-form"].add_argument("--pad-ms", type=float, default=0.0, help="redaction padding around "
                                          "each entity (default 0)")
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
    if args.command == "entities":
        try:
            files.check_output_file(args.out, "--out")
            samples = load_split(args.dataset, args.data_dir, args.split, errors="collect", verbose=False)
            lines = entity_list(samples, args.min_chars, args.types)
            files.write_atomic(args.out, "".join(line + "\n" for line in lines))
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"evaluate.py entities: {e}")
        print(f"{args.out}: {len(lines)} entries from {args.dataset} {SPLITS[args.split]} ({len(samples)} "
              "sentences)")
        return
    if args.command == "pieces":
        try:
            fields = ("max_piece_seconds", "min_pause_seconds", "piece_pad_seconds", "vad_threshold", "vad",
                      "pieces", "quiet_threshold", "pause_level", "short_piece_seconds", "join_piece_seconds",
                      "gap_piece_seconds")
            options = DecodeOptions(**{f: getattr(args, f) for f in fields})    # each flag is its field's name
            options.check({f: "--" + f.replace("_", "-") for f in fields})
            result = diagnose.segmentation(args.data_dir, args.vad, split=args.split,
                                           **segment.plan_options(options, args.task))
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"evaluate.py pieces: {e}")
        print(json.dumps(result, ensure_ascii=False, indent=1))
        return
    if args.command in ("times", "confidence", "playback", "long-form"):
        try:
            pairs = [] if args.command == "long-form" else scoring.prediction_pairs(
                args.predictions, args.dataset, args.data_dir, args.split, args.task, args.command == "times")
            if args.command == "long-form":
                result = diagnose.long_form(args.predictions, args.data_dir, args.task, args.pad_ms / 1000,
                                            args.split)
            elif args.command == "playback":
                if args.task != "SNER":
                    raise DataError("playback: SNER only (a given text would say the redacted names)")
                result = diagnose.playback(pairs, scoring.prediction_pairs(args.original, args.dataset, args.data_dir, args.split,
                                                          args.task))
            elif args.command == "times":
                if args.task == "TNER":
                    raise DataError("times: TNER has no audio (choose SNER or MNER)")
                result = diagnose.localization(args.task, pairs, args.offset_ms / 1000, args.pad_ms / 1000,
                                      args.min_align_confidence)
            else:
                result = diagnose.calibration(args.task, pairs, args.temperature)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"evaluate.py {args.command}: {e}")
        print(json.dumps(result, ensure_ascii=False, indent=1))
        return
    if args.command == "choose":
        bad = [r for r in args.runs if "=" not in r or not r.split("=", 1)[0] or not r.split("=", 1)[1]]
        if bad:
            p.error(f"choose: {bad[0]!r} is not NAME=FILE")
        try:
            result = choose_two_fold(dict(r.split("=", 1) for r in args.runs), args.dataset, args.data_dir,
                                     args.split, args.task)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"evaluate.py choose: {e}")
        print(json.dumps(result, ensure_ascii=False, indent=1))
        return
    if args.command in ("breakdown", "report") and args.train_dir is not None and args.train_dataset is None:
        p.error("--train-dir needs --train-dataset")
    if args.command == "report":
        try:
            files.check_output_file(args.out, "--out")
            sentences, info = compare_file(args.predictions, args.dataset, args.data_dir, args.split, args.task,
                                           args.train_dataset, args.train_dir, args.train_split)
            result = tables(sentences, info["seen_from"] is not None)
            page = report.render(sentences, info, result, args.out, args.audio, args.title)
            files.write_atomic(args.out, page)
        except (OSError, ValueError) as e:          # a wav --audio embed cannot read, too
            raise SystemExit(f"evaluate.py report: {e}")
        print(f"{args.out}: {len(sentences)} sentences, {len(page.encode()) / 1e6:.1f} MB; {args.task} F1 "
              f"{result['f1']:.2f}")
        return
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
