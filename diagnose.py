"""diagnose.py: what speech predictions get right beyond entity F1: entity times against the gold times
(frame-F1, start and end errors, redaction coverage), confidence calibration, redacted recordings decoded again,
and long recordings scored per gold utterance (and their cut into pieces, against the gold utterances).

    python evaluate.py times --predictions p.jsonl --task MNER --dataset demo --split test     # entity times
    python evaluate.py confidence --predictions p.jsonl --task TNER --dataset cnerta --data-dir D  # calibration
    python evaluate.py playback --predictions replay.jsonl --original orig.jsonl --task SNER --dataset demo --split test
    python evaluate.py long-form --predictions p.jsonl --task SNER --dataset demo --data-dir LONG  # per utterance
    python evaluate.py pieces --data-dir LONG --vad energy                                      # the cut alone

Sections: 1 entity times | 2 confidence | 3 playback and long recordings. Nothing here runs a model (pieces runs the
voice activity detector); evaluate.py is the command line.
"""
from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import audio
import segment
from data import SPLITS, DataError, Sample, json_lines, load_split
from scoring import edit_distance, prf, read_predictions, score_predictions
from search import platt
from text import TYPES, Phonemizer, read_phone_dict


# ----------------------------------------------------------------------------------------------------------------
# 1. Entities in time: localization against gold times, redaction coverage

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
    frame = {k: prf(tp[k], n_pred[k], n_gold[k]) for k in ("all", *TYPES)}
    return {"task": task, "sentences": len(pairs), "offset_ms": offset_s * 1000, "frame_f1": frame,
            "errors_ms": {k: _quantiles(v) for k, v in errors.items()}, "entities_without_time": untimed,
            "redaction": {"pad_ms": pad_s * 1000, "min_align_confidence": min_align_confidence,
                          **{k: cover[k, "replaced"] / cover[k, "gold"] if cover[k, "gold"] else None
                             for k in ("right", "all", "outside")}}}


# ----------------------------------------------------------------------------------------------------------------
# 2. Confidence: calibration (ECE, AUROC; temperature and Platt maps fitted 2-fold)


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


# ----------------------------------------------------------------------------------------------------------------
# 3. Redacted recordings played back, and long recordings scored per utterance


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


def long_split(split: str) -> str:
    """A long-form set's split name (demo.build_long_form: test, or valid for dev/valid): its NAME.json, wav/NAME/."""
    if split not in SPLITS or SPLITS[split] == "train":
        raise DataError(f"long-form split {split!r}: test or valid")
    return "test" if SPLITS[split] == "test" else "valid"


def segmentation(data_dir, vad="silero", split="test", **plan) -> dict:
    """How the pieces of long recordings (data_dir/test.json or valid.json, demo.py --long-form) match their gold
    utterances, before any model runs: voice activity (segment.detector(vad)) and segment.plan_pieces(**plan) per
    recording. Counted: pieces; pieces holding most of two utterances or more; utterances no piece holds whole
    (98 % of their time); utterances no piece touches; the share of piece time outside every utterance. MNER's gap
    pieces (segment.gap_pieces) are counted apart: whether one is decoded depends on the transcript's split."""
    name = long_split(split)
    lines = [d for _, d in json_lines(Path(data_dir) / f"{name}.json")]
    if not lines or any("utterances" not in d for d in lines):
        raise DataError(f"{data_dir}/{name}.json: not long recordings (lines with \"utterances\", as demo.py "
                        "--long-form writes)")
    detector = segment.detector(vad)
    counts = collections.Counter()
    overlap = lambda p, u: min(p.end_s, u["end_s"]) - max(p.start_s, u["start_s"])      # noqa: E731
    for line in lines:
        wav = Path(data_dir) / "wav" / name / f"{line['audio']}.wav"
        seconds = audio.wav_info(wav).seconds
        planned = segment.plan_pieces(segment.speech_probabilities(str(wav), detector), seconds, **plan)
        pieces = [p for p in planned if not p.gap]       # gaps hold text only if the alignment gives them some
        counts["gaps"] += len(planned) - len(pieces)
        utts = line["utterances"]
        counts["pieces"] += len(pieces)
        counts["several"] += sum(sum(overlap(p, u) > (u["end_s"] - u["start_s"]) / 2 for u in utts) > 1
                                 for p in pieces)
        for u in utts:
            best = max(overlap(p, u) for p in pieces) / (u["end_s"] - u["start_s"])
            counts["utterances"] += 1
            counts["not_whole"] += best < 0.98
            counts["missed"] += best <= 0
        counts["piece_s"] += sum(p.end_s - p.start_s for p in pieces)
        counts["outside_s"] += sum(p.end_s - p.start_s - sum(max(0.0, overlap(p, u)) for u in utts) for p in pieces)
    return {"vad": vad, "plan": plan, "recordings": len(lines), "utterances": counts["utterances"],
            "pieces": counts["pieces"], "pieces_with_several_utterances": counts["several"],
            "utterances_not_whole_in_a_piece": counts["not_whole"], "utterances_missed": counts["missed"],
            "time_outside_utterances": counts["outside_s"] / counts["piece_s"] if counts["piece_s"] else None,
            "gap_pieces": counts["gaps"]}


def long_form(predictions, data_dir, task="SNER", pad_s=0.0, split="test") -> dict:
    """Scores of long recordings per gold utterance: each record split back into its utterances (segment.unstitch)
    and scored against the utterances' own lines (data_dir/cut/test.json; valid.json for the valid split), as
    decode.py --eval scores the cut set; with the entity times of each utterance, as `times` scores the cut set's
    (localization, on the cut wavs)."""
    name = long_split(split)
    lines = {d["audio"]: d for _, d in json_lines(Path(data_dir) / f"{name}.json")}
    records = read_predictions(predictions, task)
    bad = sorted(i for i in records if "utterances" not in lines.get(i, {}))
    if bad:
        raise DataError(f"{predictions}: records {bad[:3]} are not long recordings of {data_dir}/{name}.json (a "
                        "line with \"utterances\", as demo.py --long-form writes)")
    golds = {s.id: s for s in load_split("demo", Path(data_dir) / "cut", name)}
    split = [dict(r, task=task, wav=str(Path(data_dir) / "cut" / "wav" / name / f"{r['id']}.wav"))
             for i, rec in records.items() for r in segment.unstitch(rec, lines[i]["utterances"])]
    pieces = [p for rec in records.values() for p in rec.get("pieces", [])]
    out = {"recordings": len(records), "pieces": len(pieces),
           **score_predictions(task, [golds[r["id"]] for r in split], split, Phonemizer(read_phone_dict()).pronounce)}
    if task != "TNER" and all(golds[r["id"]].times is not None for r in split):
        out["times"] = localization(task, [(golds[r["id"]], r) for r in split], pad_s=pad_s)
    if task == "MNER":
        out["alignment_failures"] = sum(bool(p.get("alignment_failed")) for p in pieces)   # recognize._stitch
        if all("chars" in u for i in records for u in lines[i]["utterances"]) and all(
                "chars" in p for p in pieces):
            out["shares"] = share_check(records.values(), lines)
    return out


def share_check(records, lines, most=0.75) -> dict:
    """How many pieces got the wrong share of their recording's transcript (MNER, segment.split_text), against
    the gold utterances: each utterance belongs to the piece holding `most` of its time or more, and a piece's
    right share is its utterances' characters (none: empty). A piece that holds part of an utterance no piece
    holds that much of (one the detector split) has no right share and is not checked. -> {checked, wrong,
    unchecked, wrong_ids: ["RECORDING:piece", ...]}."""
    overlap = lambda p, u: min(p["end_s"], u["end_s"]) - max(p["start_s"], u["start_s"])   # noqa: E731
    checked, unchecked, wrong = 0, 0, []
    for rec in records:
        utts, pieces = lines[rec["id"]]["utterances"], rec.get("pieces", [])
        owner = []                                       # per utterance: its piece, or None (split)
        for u in utts:
            held = [overlap(p, u) for p in pieces]
            k = max(range(len(pieces)), key=held.__getitem__) if pieces else None
            owner.append(k if k is not None and held[k] >= most * (u["end_s"] - u["start_s"]) else None)
        for k, p in enumerate(pieces):
            touched = [j for j, u in enumerate(utts) if overlap(p, u) > 0.05]
            if any(owner[j] is None for j in touched):
                unchecked += 1
                continue
            own = [utts[j]["chars"] for j in range(len(utts)) if owner[j] == k]
            right = [own[0][0], own[-1][1]] if own else None
            checked += 1
            if (list(p["chars"]) if p["chars"][1] > p["chars"][0] else None) != right:
                wrong.append(f"{rec['id']}:{k}")
    return {"checked": checked, "wrong": len(wrong), "unchecked": unchecked, "wrong_ids": wrong}
