"""
recognize.py: the Python API: texts and/or speech -> model rows -> search.py -> entities with confidences and times.

    rec = Recognizer("best.pt")                                   # or Recognizer((model, assets), beam=3)
    rec.recognize(texts=["末阳市文联主席张三"])                     # TNER
    rec.recognize(wavs=["a.wav"])                                 # SNER; texts and wavs together: MNER

Inputs (Request: text, wav path or waveform) become model rows (data.Featurizer), the rows are encoded in batches,
search.py searches them (beam_search, BracketConstraint, CTCPrefixScorer; the knobs: options.DecodeOptions), and the
hypotheses become entities with offsets into the input text (TNER/MNER) or the transcription (SNER), each with a
confidence and, from speech, its time (align.py). decode.py is the command line over it.
"""
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

import align
import audio
import data
import devices
import entitylist
import files
import segment
import weights
from options import MIN_PIECE_SECONDS, DecodeOptions
from search import (BracketConstraint, CTCPrefixScorer, beam_search, entity_log_confidence, platt,
                    spans_from_constrained)
from text import CLOSE_OF, OPEN_OF, TYPES, UNK, map_spans


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}   # --dtype names


# ----------------------------------------------------------------------------------------------------------
# from inputs to model rows


@dataclass
class Request:
    """One thing to recognise: text and/or speech (a wav path or a 16 kHz waveform)."""
    text: Optional[str] = None
    wav: Optional[str] = None
    waveform: Optional[torch.Tensor] = None
    id: str = ""
    span: Optional[tuple] = None            # (start_s, end_s): only this stretch of the speech (a piece, or a
                                            # stretch the user chose: times still in the recording's)
    entities: Optional[list] = None         # this input's own entity list: 'STRING' or 'STRING TYPE' (entitylist.py),
                                            # on top of the options' list file

    @property
    def has_speech(self):
        return self.wav is not None or self.waveform is not None

    def task(self):
        if self.text is not None and self.has_speech:
            return "MNER"
        return "TNER" if self.text is not None else "SNER"


class Recognizer:
    """Python API: recognise entities in texts and/or waveforms with a trained model.

        rec = Recognizer("best.pt")                   # or Recognizer((model, assets)), Recognizer("best.pt", beam=3)
        rec.recognize(texts=["末阳市文联主席张三"])               # TNER
        rec.recognize(waveforms=[wav_tensor], sample_rate=16000)  # SNER; both lists -> MNER
    Each result: {"task", "output" (bracketed), "text" (plain), "entities": [{type, text, start, end}], "score"}.
    How it decodes: one DecodeOptions (beam, constrain, asr, nbest, ...; see there), resolved against the checkpoint.
    """

    def __init__(self, model, options=None, device=None, dtype=None, featurizer=None, **overrides):
        """model: a checkpoint path or (model, assets); options: DecodeOptions, its unset search settings from the
        checkpoint; overrides: DecodeOptions fields (Recognizer("best.pt", beam=3)) that replace those of options.
        dtype: None (the model's own), a torch.dtype, or a precision name as decode.py's --dtype (auto, fp32, bf16,
        fp16) resolved for the device by decode_dtype, which also sets the process's TF32 switches."""
        options = dataclasses.replace(options or DecodeOptions(), **overrides)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, str):
            dtype = decode_dtype(dtype, device, options)
        assets = None
        if isinstance(model, (str, os.PathLike)):
            loading = {"modelscope_padding": True} if options.modelscope_padding else {}
            model, assets, _ = weights.load_checkpoint(str(model), device, **loading)
        elif isinstance(model, tuple):
            model, assets = model[0], model[1]
        if assets is None:
            raise ValueError("Recognizer needs the checkpoint's assets (vocabulary, phones, fbank settings)")
        self.model = model.to(device=device, dtype=dtype or next(model.parameters()).dtype).eval()
        self.capacity = self.model.decoder.max_len - 2           # positions for BOS + max_len + EOS step
        self.options = options.resolve(assets, self.capacity)
        self.device, self.assets = device, assets
        if featurizer is None:      # the pseudo text as long as in training (the checkpoint's assets say how long)
            featurizer = (data.Featurizer(assets, pseudo_text_len=self.options.pseudo_text_len)
                          if self.options.pseudo_text_len else data.Featurizer(assets))   # else the default
        self.featurizer = featurizer
        self.vocab = self.featurizer.vocab
        self.open_ids = {t: self.vocab.char_id(OPEN_OF[t]) for t in TYPES}
        self.close_ids = {t: self.vocab.char_id(CLOSE_OF[t]) for t in TYPES}
        self.brackets_known = UNK not in set(self.open_ids.values()) | set(self.close_ids.values())
        self._reading_cache = {}                                 # (character, CTC classes) -> its readings
        self._vad = None                                         # the voice activity detector, made when needed
        self.entity_list = entitylist.read_entity_list(self.options.entities) if self.options.entities else []
        self._tries = {}                                         # "list" or id(own entries) -> SNER tries

    # -- features -------------------------------------------------------------------------------------------

    def _speech(self, req):
        """-> (fbank (T, 80), warnings). Wav files go through the featurizer (cached); waveforms are 16 kHz."""
        where = req.wav or f"waveform {req.id}".strip()
        if req.span is not None:                               # a piece of a long recording: read on its own
            start, end = req.span
            x = audio.load_audio_span(req.wav, start, end) if req.waveform is None else \
                req.waveform[round(start * audio.SAMPLE_RATE): round(end * audio.SAMPLE_RATE)]
            if x.shape[0] < align.FRAME_SPAN_S * audio.SAMPLE_RATE:   # < 7 fbank frames, as below
                raise files.InputError(f"{where} {start:.2f}-{end:.2f} s: too short a piece to recognise")
            silent = [f"{where}: the audio is silent (peak below {audio.SILENCE_DBFS:g} dBFS)"] if \
                audio.is_silent(x) else []
            return audio.speech_features(x.float(), cmvn=self.featurizer.cmvn), silent
        if req.waveform is not None:
            x = req.waveform
            if x.dim() != 1:
                raise files.InputError(f"{where}: expected a mono waveform (N,), got shape {tuple(x.shape)}")
            seconds = x.shape[0] / audio.SAMPLE_RATE
        else:
            seconds = audio.wav_info(req.wav).seconds
        limit = self.options.max_audio_seconds
        if seconds > limit:
            raise files.InputError(f"{where}: {seconds:.1f} s of audio is over the {limit:g} s limit "
                                   f"(--max-audio-seconds); split it into utterances")
        if seconds < align.FRAME_SPAN_S:                       # < 7 fbank frames: nothing left after subsampling
            raise files.InputError(f"{where}: {seconds * 1000:.0f} ms of audio is too short to recognise")
        # silence is judged on the raw samples: gain -n lifts dither to full scale and CMVN leaves rounding noise
        if req.waveform is not None:
            fbank = audio.speech_features(x.float(), cmvn=self.featurizer.cmvn)
            silent = audio.is_silent(x)
        else:
            fbank = self.featurizer.speech(req.wav)
            silent = audio.is_silent(audio.read_wav(req.wav)[0])
        return fbank, [f"{where}: the audio is silent (peak below {audio.SILENCE_DBFS:g} dBFS)"] if silent else []

    def _row(self, req, task):
        """-> (unbatched model inputs, warnings) for one request under `task` (pseudo input for what is absent;
        asr: speech only); the decoder starts from BOS."""
        fbank, warn = self._speech(req) if task in ("SNER", "MNER") else (self.featurizer.pseudo_speech(), [])
        if self.options.asr:
            return data.asr_row(fbank), warn
        return self.featurizer.row(task, fbank, req.text), warn

    def _encode(self, rows):
        batch = data.collate(rows)
        dtype = next(self.model.parameters()).dtype
        fbank = batch["fbank"].to(self.device, dtype)
        lengths = batch["fbank_lengths"].to(self.device)
        if self.options.asr:                                     # plain MMSpeech: no text stream, no modality flag
            return self.model.encode(fbank, lengths)
        dev = lambda k: batch[k].to(self.device)                 # noqa: E731
        return self.model.encode(fbank, lengths, dev("phones"), dev("phone_chars"), dev("phone_lengths"),
                                 dev("speech_present"), dev("text_present"))

    # -- one batch ------------------------------------------------------------------------------------------

    def _check_text(self, req):
        if not req.text or not req.text.strip():
            raise files.InputError(f"input {req.id or ''}: empty text".replace("  ", " "))
        if len(req.text) > self.capacity // 2:
            raise files.InputError(f"input {req.id}: text of {len(req.text)} characters is longer than this "
                                   f"decoder can bracket ({self.capacity // 2}); split it into sentences")

    def _batch(self, reqs, task, pieces=None):
        """pieces[i]: reqs[i] is a piece of a planned recording (timed whatever --timestamps says: the stitching
        needs its times); None: none is."""
        rows, warns = [], []
        for req in reqs:
            if task in ("TNER", "MNER"):
                self._check_text(req)
            row, warn = self._row(req, task)
            rows.append(row)
            warns.append(warn)
        with torch.no_grad():
            enc = self._encode(rows)
            constrained = task in ("TNER", "MNER") and self.options.constrain and not self.options.asr
            constraint, max_lens, lists = None, None, [self._entries(r) for r in reqs]
            if constrained:
                if not self.brackets_known:
                    raise ValueError("the vocabulary has no bracket tokens [ ] ( ) < >: use --no-constrain")
                char_ids = [self.vocab.encode(r.text) for r in reqs]
                listed = [entitylist.occurrences(r.text, entries) if self.options.list_weight(task) else None
                          for r, entries in zip(reqs, lists)]
                constraint = BracketConstraint(char_ids, self.open_ids, self.close_ids,
                                               pool_chars=self.options.pool_chars,
                                               entity_bias=self.options.entity_bias, listed=listed,
                                               list_weight=self.options.list_weight(task))
                max_lens = [min(self.capacity, max(self.options.max_len, 2 * len(ids))) for ids in char_ids]
            pieces = pieces or [False] * len(reqs)
            timed = task in ("SNER", "MNER") and not self.options.asr and (self.options.timestamps != "none"
                                                                            or any(pieces))
            ctc = None
            if timed or (task == "SNER" and self.options.ctc_weight > 0):
                ctc = self.model.speech_phone_log_probs(enc, max(r["fbank"].size(0) for r in rows))   # (B, T', C)
            scorer = self._ctc_scorer(*ctc) if task == "SNER" and self.options.ctc_weight > 0 else None
            boost = None
            if task == "SNER" and not self.options.asr and any(lists) and self.options.list_weight(task):
                boost = entitylist.SpellingBoost([self._sner_tries(r) for r in reqs], self.open_ids,
                                                 self.close_ids, self.options.list_weight(task), self.options.eos)
            hyps = beam_search(self.model, enc, self.options, constraint=constraint, max_lens=max_lens,
                               scorer=scorer, boost=boost)
        results = [self._result(req, task, h, warn, constrained) for req, h, warn in zip(reqs, hyps, warns)]
        if timed:
            self._add_times(results, *ctc, pieces)
        self._finish_confidence(results, task)
        return results

    def _own_entries(self, req):
        """A request's own entries, parsed: strings 'STRING' or 'STRING TYPE' (blank and # ones dropped) or Entry."""
        own = [e if isinstance(e, entitylist.Entry) else entitylist.parse_entry(e, f"input {req.id}: entities[{k}]")
               for k, e in enumerate(req.entities or [])]
        return [e for e in own if e is not None]

    def _entries(self, req):
        """The entity list of one request (run has parsed its own entries): the options' list, then its own."""
        return self.entity_list + req.entities if req.entities else self.entity_list

    def _sner_tries(self, req):
        """SNER: the tries of a request's list (entitylist.tries_for, which refuses characters the decoder cannot
        write), built once per list: the options' list for every run, a request's own for the run (its pieces
        share the list object)."""
        key = "list" if not req.entities else id(req.entities)
        if key not in self._tries:
            entries = self._entries(req)
            self._tries[key] = entitylist.tries_for(entries, self.vocab, UNK) if entries else None
        return self._tries[key]

    def _readings(self, piece, classes):
        """Every reading of a character (or word piece) as CTC classes (phone id - 3, as in training); [] if none.
        Cached: pypinyin is slow, and every SNER/MNER result asks again for the same characters."""
        key = (piece, classes)
        if key not in self._reading_cache:
            self._reading_cache[key] = self._find_readings(piece, classes)
        return self._reading_cache[key]

    def _find_readings(self, piece, classes):
        phonemizer, phone_id = self.featurizer.phonemizer, self.featurizer.phone_id
        piece = piece.removeprefix("##")                         # MMSpeech's vocabulary has BERT word pieces
        said = phonemizer.readings(piece) if len(piece) == 1 else [[u for us in phonemizer.units(piece) for u in us]]
        ids = [[phone_id.get(u, UNK) - 3 for u in units] for units in said]
        return [r for r in ids if r and all(1 <= c < classes for c in r)]

    def _ctc_scorer(self, logp, frames):
        """Joint CTC/attention scorer for an SNER batch: the model's phone CTC over its speech frames."""
        brackets = [*self.open_ids.values(), *self.close_ids.values()]
        return CTCPrefixScorer(logp, frames, lambda token: self._readings(self.vocab.tokens[token], logp.size(-1)),
                               brackets, self.options.ctc_weight, self.options.ctc_candidates)

    def _add_times(self, results, logp, frames, pieces=None):
        """Entity times (start_s, end_s, in the recording's time) from a forced alignment of each result's text
        (MNER: the given text; SNER: the transcription) against the phone CTC head (align.py); with --timestamps
        chars every character's too. Characters without a reading (digits, punctuation, Latin) take no frames:
        an entity made only of them has no time. align_confidence: the geometric mean posterior the head gives the
        entity's phones on the frames they take (align.char_log_posteriors)."""
        pieces = pieces or [False] * len(results)               # piece results always keep char_times (stitching)
        readings, graphs, paths, scores = self._force_align([res["text"] for res in results], logp, frames)
        for row, (res, rs, graph, path, score, n) in enumerate(zip(results, readings, graphs, paths, scores.tolist(),
                                                                    frames.tolist())):
            if self.options.timestamps == "none" and not pieces[row]:   # aligned only beside pieces in its batch
                continue
            said = [i for i, r in enumerate(rs) if r]            # characters in the alignment, in order
            times, posteriors = [None] * len(rs), [[] for _ in rs]   # per character: (start_s, end_s), phone log-probs
            if said and score > -float("inf"):
                offset_s = self.options.time_offset_ms / 1000
                for i, t, lps in zip(said, align.char_times(graph.char_frames(path), n, offset_s),
                                     align.char_log_posteriors(graph, path, logp[row])):
                    times[i], posteriors[i] = t, lps
            elif said:
                res.setdefault("warnings", []).append("the text has more phones than the audio has frames: no times")
            for e in res["entities"]:
                inside = [times[i] for i in range(e["start"] or 0, e["end"] or 0) if times[i] is not None]
                e["start_s"], e["end_s"] = (inside[0][0], inside[-1][1]) if inside else (None, None)
                lps = [lp for i in range(e["start"] or 0, e["end"] or 0) for lp in posteriors[i]]
                e["align_confidence"] = round(math.exp(sum(lps) / len(lps)), 4) if inside and lps else None
            if self.options.timestamps == "chars" or pieces[row]:
                res["char_times"] = [[c, *(t or (None, None))] for c, t in zip(res["text"], times)]

    def _force_align(self, texts, logp, frames):
        """Each text aligned over its row of the phone CTC head's log-probs (B, T', C), frames (B,) (align.viterbi;
        a character without a reading takes no frames). -> (each text's readings per character, graphs, best paths,
        scores (B,): -inf where the text does not fit its frames)."""
        readings = [[self._readings(c, logp.size(-1)) for c in text] for text in texts]
        graphs = [align.ReadingGraph.build([r for r in rs if r] or [[(1,)]]) for rs in readings]
        return (readings, graphs, *align.viterbi(logp, frames, graphs))

    def _result(self, req, task, hyps, warn, constrained):
        hyp = hyps[0]
        res = {"id": req.id, "task": "ASR" if self.options.asr else task}
        if req.text is not None:
            res["input_text"] = req.text
        if req.wav is not None:
            res["wav"] = req.wav
        warn = list(warn)
        if req.text is not None:
            unknown = sorted({c for c in req.text if self.vocab.char_id(c) == UNK})
            if unknown:
                warn.append(f"characters outside the vocabulary (read as <unk>): {''.join(unknown)}")
        if not hyp.finished or len(hyp.tokens) >= self.options.max_len and not constrained:
            warn.append(f"output reached max_len {self.options.max_len} without ending (raise --max-len)")
        if constrained:
            text, char_ids = req.text, self.vocab.encode(req.text)
            spans, complete, output = spans_from_constrained(hyp.tokens, char_ids, self.open_ids, self.close_ids, text)
            if not complete:                                     # cannot happen unless the search was cut short
                spans, output, warn = [], text, warn + ["constrained search did not finish; no entities"]
            log_conf = entity_log_confidence(hyp.tokens, hyp.unbiased_scores(), self.open_ids, self.close_ids,
                                             lambda tok: 1, char_ids)
            confidences = [log_conf.get(span) for span in spans]
        else:
            output = self.vocab.decode(hyp.tokens, unk="\ufffd")
            plain, ents = data.parse(output)
            spans = [(e.start, e.end, e.type) for e in ents]
            # SNER's joint CTC scores of characters are no probabilities: its brackets only (_finish_confidence
            # adds how surely the head hears the entity there)
            log_conf = entity_log_confidence(hyp.tokens, hyp.unbiased_scores(), self.open_ids, self.close_ids,
                                             lambda tok: len(self.vocab.decode([tok], unk="\ufffd")),
                                             inside=task != "SNER")
            confidences = [log_conf.get(span) for span in spans]           # keyed in the output's own offsets
            if task in ("TNER", "MNER") and not self.options.asr:   # offsets into the input text
                spans = map_spans(spans, plain, req.text)
                text = req.text
            else:
                text = plain
        res["output"] = output
        res["text"] = text
        if not self.options.asr:
            res["entities"] = [{"type": t, "text": text[s:e] if s is not None else None, "start": s, "end": e,
                                "log_confidence": lc}
                               for (s, e, t), lc in sorted(zip(spans, confidences), key=lambda x: (
                                   x[0][0] is None, x[0][0] or 0, -(x[0][1] or 0)))]
        res["score"] = hyp.score
        if self.options.asr:
            res["tokens"] = hyp.tokens
            res["positional_scores"] = hyp.positional_scores
        if self.options.nbest > 1:
            ids = self.vocab.encode(req.text) if constrained else None
            render = (lambda t: spans_from_constrained(t, ids, self.open_ids, self.close_ids, req.text)[2]) \
                if constrained else (lambda t: self.vocab.decode(t, unk="\ufffd"))
            res["nbest"] = [{"tokens": h.tokens, "score": h.score, "output": render(h.tokens)}
                            for h in hyps[: self.options.nbest]]
        if warn:
            res["warnings"] = warn
        return res

    def heard_phones(self, wavs, batch_size=8):
        """What the phone CTC head hears in each wav (SNER rows; greedy: best class per frame, repeats merged,
        blanks dropped) as CTC classes: the check of the head that entity times rely on (evaluate_split)."""
        return self._heard([Request(wav=w) for w in wavs], batch_size, edges=False)[0]

    def _heard(self, reqs, batch_size=8, edges=True):
        """What the phone CTC head hears in each piece: -> (greedy phone strings, per piece the log-probs of its
        first and last segment.EDGE_FRAMES frames, or None (with edges=False, no edges: []), per piece the first
        and last frames whose best class is a phone, or None)."""
        heard, ends, spans = [], [], []
        for k in range(0, len(reqs), batch_size):
            rows = [self._row(dataclasses.replace(r, text=None), "SNER")[0] for r in reqs[k: k + batch_size]]
            with torch.no_grad():
                logp, frames = self.model.speech_phone_log_probs(self._encode(rows),
                                                                 max(r["fbank"].size(0) for r in rows))
            host = logp.half().cpu().numpy() if edges else None    # (B, T', C), one copy a batch
            for b, (best, n) in enumerate(zip(logp.argmax(-1).tolist(), frames.tolist())):
                heard.append([c for i, c in enumerate(best[:n]) if c != align.BLANK and (i == 0 or best[i - 1] != c)])
                said = [i for i, c in enumerate(best[:n]) if c != align.BLANK]
                spans.append((said[0], said[-1]) if said else None)
                if edges:                                       # (W, C) each end, float16: ~12 KB a piece
                    w = min(segment.EDGE_FRAMES, n)
                    ends.append((host[b, :w].copy(), host[b, n - w:n].copy()) if n >= 2 else None)
        return heard, ends, spans

    def _finish_confidence(self, results, task):
        """confidence = exp(log-confidence / T), Platt-scaled with confidence_platt (6 decimals; None without
        per-token scores, a hypothesis cut at
        max_len). SNER: its brackets times its align_confidence (its characters' joint CTC scores are no
        probabilities), None without one. Entities below --min-confidence move to "below_min_confidence"."""
        for res in results:
            for e in res.get("entities", []):
                lc, a = e.pop("log_confidence"), e.get("align_confidence")
                lc = None if lc is None or (task == "SNER" and a is None) else \
                    lc + (math.log(max(a, 1e-9)) if task == "SNER" else 0.0)
                if lc is not None:
                    lc /= self.options.confidence_temperature
                    e["confidence"] = round(platt(lc, *self.options.confidence_platt)
                                            if self.options.confidence_platt else math.exp(lc), 6)
                else:
                    e["confidence"] = None
            below = [e for e in res.get("entities", []) if e["confidence"] is not None
                     and e["confidence"] < self.options.min_confidence]
            if below:
                res["entities"], res["below_min_confidence"] = [e for e in res["entities"] if e not in below], below

    # -- public ---------------------------------------------------------------------------------------------

    def check(self, requests, task=None) -> list:
        """Every request checked before any long work (files.InputError 'input ID: why'); -> the requests, those with
        their own entity list parsed (a copy; the caller's list stays). Starts a run: own lists' tries are dropped."""
        requests = list(requests)
        self._tries = {k: v for k, v in self._tries.items() if k == "list"}   # own lists: for this run only
        for i, req in enumerate(requests):
            t = task or req.task()
            if t in ("SNER", "MNER") and not req.has_speech:
                raise files.InputError(f"input {req.id or i}: task {t} needs speech (wav)")
            if t in ("TNER", "MNER") and req.text is None:
                raise files.InputError(f"input {req.id or i}: task {t} needs text")
            if self.options.asr and not req.has_speech:
                raise files.InputError(f"input {req.id or i}: --asr needs speech (wav)")
            if req.span is not None:
                if t == "TNER":
                    raise files.InputError(f"input {req.id or i}: start_s/end_s choose a stretch of speech, but "
                                           "task TNER reads the text alone")
                self._check_span(req, i)
            if t in ("TNER", "MNER") and not req.text.strip():
                raise files.InputError(f"input {req.id or i}: empty text")
            if req.entities is not None:
                if not isinstance(req.entities, (list, tuple)) or not all(
                        isinstance(e, (str, entitylist.Entry)) for e in req.entities):
                    raise files.InputError(f"input {req.id or i}: entities must be a list of 'STRING' or "
                                           "'STRING TYPE' strings")
                req = requests[i] = dataclasses.replace(req, entities=self._own_entries(req))
            if t == "SNER" and not self.options.asr and self.options.list_weight(t):
                self._sner_tries(req)                           # a list the decoder cannot spell: refused now
        return requests

    def _check_span(self, req, i):
        """A speech request's span: a stretch that stretch_problem passes (and, with --asr, at most
        --max-audio-seconds long, as a whole recording)."""
        where = f"input {req.id or i}"
        if req.waveform is not None and req.waveform.dim() != 1:
            raise files.InputError(f"{where}: expected a mono waveform (N,), got shape {tuple(req.waveform.shape)}")
        if not (isinstance(req.span, (tuple, list)) and len(req.span) == 2 and all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in req.span)):
            raise files.InputError(f"{where}: span must be two finite numbers (start_s, end_s), got {req.span!r}")
        start, end = req.span
        problem = stretch_problem(start, end, req.waveform.shape[0] / audio.SAMPLE_RATE if req.waveform is not None
                                  else audio.wav_info(req.wav).seconds)
        if problem:
            raise files.InputError(f"{where}: {problem}")
        if self.options.asr and end - start > self.options.max_audio_seconds:
            raise files.InputError(f"{where}: {end - start:.1f} s (start_s to end_s) is over the "
                                   f"{self.options.max_audio_seconds:g} s limit of --asr (--max-audio-seconds)")

    def run(self, requests, batch_size=8, progress=False, task=None):
        """Recognise a list of Request. -> list of result dicts in the same order. task forces TNER/SNER/MNER.
        A recording longer than max_piece_seconds is cut into pieces at pauses (segment.py), its pieces decoded in
        the batches with everything else, and their results stitched into one (with "pieces")."""
        return self.run_checked(self.check(requests, task), batch_size, progress, task)

    def run_checked(self, requests, batch_size=8, progress=False, task=None):
        """run() of requests that check() returned (decode.ShardedRecognizer checks all once, then runs them a
        batch at a time: their own lists' tries, built by check, are kept for the whole run)."""
        items, plans, shares = [], {}, {}                       # items: (request index, request or piece, task)
        for i, req in enumerate(requests):
            t = task or req.task()
            plans[i] = self._pieces(req, t)
            if plans[i] is None:
                items.append((i, req, t))
                continue
            parts = [dataclasses.replace(req, span=(p.start_s, p.end_s)) for p in plans[i]]
            if t == "SNER" and self.options.onset_lead_seconds is not None:   # start where the first phone is heard
                spans = self._heard(parts, batch_size, edges=False)[2]
                plans[i] = segment.snap_onsets(plans[i], [None if f is None else f[0] * align.FRAME_S for f in spans],
                                               self.options.onset_lead_seconds)
                parts = [dataclasses.replace(req, span=(p.start_s, p.end_s)) for p in plans[i]]
            if t == "MNER":                                     # each piece gets its share of the transcript
                plans[i], parts, shares[i] = self._share_text(req, plans[i], parts, batch_size)
            items += [(i, part, t) for part in parts]
        # Sort by length for speed, unless ModelScope's batch-dependent padding is on (keep the reference order).
        keep_order = getattr(self.model.config, "modelscope_padding", False)
        speech = all(req.has_speech for _, req, _ in items)
        bar = progress_bar(sum(map(request_seconds, (req for _, req, _ in items))) if speech else len(items), progress,
                           speech)
        decoded = [None] * len(items)
        for j, (_, req, t) in enumerate(items):                 # a piece with no share of the transcript
            if t == "MNER" and req.span is not None and not (req.text or "").strip():
                decoded[j] = {"id": req.id, "task": t, "wav": req.wav, "text": req.text or "", "entities": [],
                              "char_times": [[c, None, None] for c in req.text or ""]}
        for t in dict.fromkeys(t for _, _, t in items):
            idx = [j for j, item in enumerate(items) if item[2] == t and decoded[j] is None]
            if not keep_order:
                idx = sorted(idx, key=lambda j: -length_hint(items[j][1]))
            for k in range(0, len(idx), batch_size):
                chunk = idx[k: k + batch_size]
                for j, res in zip(chunk, self._batch([items[j][1] for j in chunk], t,
                                                     [plans[items[j][0]] is not None for j in chunk])):
                    decoded[j] = res
                bar.update(sum(request_seconds(items[j][1]) for j in chunk) if speech else len(chunk))
        bar.close()
        results = [[] for _ in requests]
        for (i, _, _), res in zip(items, decoded):
            results[i].append(res)
        out = [self._stitch(plans[i], parts, shares.get(i)) if plans[i] is not None else parts[0]
               for i, parts in enumerate(results)]
        for i, (req, res) in enumerate(zip(requests, out)):     # a stretch of a recording: times in the recording
            if req.span is not None:
                if plans[i] is None:
                    in_recording(res, req.span[0])
                res["start_s"], res["end_s"] = req.span
        return out

    def _pieces(self, req, task):
        """The pieces of a recording longer than max_piece_seconds or max_audio_seconds (segment.plan_pieces; of
        at most the shorter of them), else None."""
        if task == "TNER" or self.options.asr:
            return None
        seconds, longest = request_seconds(req), self.options.longest_piece_seconds
        if seconds <= longest:
            return None
        if longest < MIN_PIECE_SECONDS:
            raise files.InputError(f"{req.wav or req.id}: {seconds:.1f} s of audio is over the {longest:g} s limit "
                                   f"(--max-audio-seconds) and too short a piece to cut it into (at least "
                                   f"{MIN_PIECE_SECONDS:g} s)")
        if self._vad is None:
            self._vad = segment.detector(self.options.vad)
        probs = segment.speech_probabilities(req.waveform if req.waveform is not None else req.wav, self._vad,
                                             span=req.span)
        pieces = segment.plan_pieces(probs, seconds, **segment.plan_options(self.options, task))
        return pieces if req.span is None else segment.shifted(pieces, req.span[0])   # a stretch of a recording

    def _share_text(self, req, pieces, parts, batch_size=8):
        """MNER on a long recording: each piece's share of the transcript (segment.split_text), found by aligning
        what the phone CTC head hears in each piece against the transcript's phones (a gap piece: room for what
        nobody heard); a gap given a share joins a neighbour (segment.join_gaps); then each boundary moved to
        the pause that an alignment of both shares over both pieces' audio finds (_realign).
        -> (pieces, their requests with their shares, {"text", "bounds", "failures"})."""
        heard, edges, spans = self._heard(parts, batch_size)
        classes = self.model.config.phone_dict_size - 3
        char_phones = [(self._readings(c, classes) or [[]])[0] for c in req.text]
        room = [round(segment.ROOM_PHONES_PER_S * (p.end_s - p.start_s)) if p.gap else 0 for p in pieces]
        split, _, failures = segment.split_text(char_phones, heard, room=room)
        if self.options.join_piece_seconds is not None and any(room):   # a gap's share may be a neighbour's rest
            quiet = [(math.inf, math.inf) if s is None else (s[0] * align.FRAME_S, p.end_s - p.start_s - (s[1] + 1)
                                                              * align.FRAME_S) for p, s in zip(pieces, spans)]
            pieces, joined, groups = segment.join_gaps(pieces, split, quiet, min(self.options.join_piece_seconds,
                                                                                 self.options.longest_piece_seconds))
            heard, edges = segment.regroup(groups, heard, edges)
            failures = [j for j, g in enumerate(groups) if (len(g) == 1 and g[0] in failures) or (
                len(g) > 1 and segment.share_failed(char_phones[joined[j]: joined[j + 1]], heard[j]))]
            split = joined
        bounds = segment.refine_bounds(split, char_phones, edges)
        if self.options.realign_margin_seconds is not None:
            pieces, bounds = self._realign(req, list(pieces), bounds, batch_size)
        moved = {k for k in range(len(pieces)) if bounds[k: k + 2] != split[k: k + 2]}   # a share judged again
        failures = sorted(set(failures) - moved | {k for k in moved if not pieces[k].gap and segment.share_failed(
            char_phones[bounds[k]: bounds[k + 1]], heard[k])})
        shared = [dataclasses.replace(req, span=(p.start_s, p.end_s), text=req.text[a:b])
                  for p, a, b in zip(pieces, bounds, bounds[1:])]
        return pieces, shared, {"text": req.text, "bounds": bounds, "failures": failures}

    def _realign(self, req, pieces, bounds, batch_size=8):
        """Each boundary between two pieces with shares, moved to the pause between utterances: both shares are
        aligned (align.viterbi) over the two pieces' joint audio (pairs at most longest_piece_seconds long), segment.
        pause_between picks the pause (and may move a character or two across), segment.recut moves the pieces'
        ends to it. Proposals are made from the split as it came, then applied left to right. -> (pieces, bounds)."""
        longest = self.options.longest_piece_seconds
        pairs = [k for k in range(len(pieces) - 1) if bounds[k] < bounds[k + 1] < bounds[k + 2]
                 and pieces[k + 1].end_s - pieces[k].start_s <= longest]
        found = {}
        for at in range(0, len(pairs), batch_size):
            chunk = pairs[at: at + batch_size]
            rows = [self._row(dataclasses.replace(req, span=(pieces[k].start_s, pieces[k + 1].end_s), text=None),
                              "SNER")[0] for k in chunk]
            with torch.no_grad():                                # (B, T', C) log-probs, (B,) frames
                logp, frames = self.model.speech_phone_log_probs(self._encode(rows),
                                                                 max(r["fbank"].size(0) for r in rows))
            readings, graphs, paths, scores = self._force_align([req.text[bounds[k]: bounds[k + 2]] for k in chunk],
                                                                logp, frames)
            for row, (k, rs, graph, path, score) in enumerate(zip(chunk, readings, graphs, paths, scores.tolist())):
                if score == -math.inf:                          # the shares' phones do not fit the frames
                    continue
                aligned = iter([(first, last, math.exp(sum(lps) / len(lps))) for (first, last, _), lps in
                                zip(graph.char_frames(path), align.char_log_posteriors(graph, path, logp[row]))])
                spans = [next(aligned) if r else None for r in rs]   # (first frame, last frame, confidence) or None
                got = segment.pause_between(spans, bounds[k], bounds[k + 1], bounds[k + 2],
                                            margin_s=self.options.realign_margin_seconds,
                                            min_confidence=audio.MIN_ALIGN_CONFIDENCE)
                if got is not None:
                    found[k] = (got[0], pieces[k].start_s + got[1], pieces[k].start_s + got[2])
        for k, (bound, end_s, start_s) in sorted(found.items()):
            moved = segment.recut(pieces[k], pieces[k + 1], end_s, start_s, self.options.piece_pad_seconds, longest)
            if moved is not None and bounds[k] < bound < bounds[k + 2]:   # bounds[k]: as the pair before left it
                bounds[k + 1], (pieces[k], pieces[k + 1]) = bound, moved
        return pieces, bounds

    def _stitch(self, pieces, parts, share=None):
        """One result of a long recording's pieces; share: the transcript's split among them (MNER)."""
        res = segment.stitch(pieces, parts, by_time=share is None)
        if share is not None:
            res["input_text"] = share["text"]
            res["pieces"] = [dict(p, chars=[a, b], **({"alignment_failed": True} if k in share["failures"] else {}))
                             for k, (p, a, b) in enumerate(zip(res["pieces"], share["bounds"], share["bounds"][1:]))]
            if share["failures"]:
                res.setdefault("warnings", []).append(f"pieces {share['failures']}: what the model hears does not "
                                                      "match their share of the transcript (alignment failed)")
        if self.options.timestamps != "chars":
            del res["char_times"]
        if self.options.timestamps == "none":                   # the pieces were timed for the stitching only
            for e in res["entities"] + res.get("below_min_confidence", []):
                e.pop("start_s", None), e.pop("end_s", None)
        return res

    def recognize(self, texts=None, waveforms=None, sample_rate=16000, task=None, wavs=None, batch_size=8):
        """texts: list of str; waveforms: list of 1-D tensors/arrays at sample_rate; wavs: list of paths.
        Give texts alone (TNER), speech alone (SNER) or both, aligned (MNER)."""
        speech = wavs if wavs is not None else waveforms
        n = len(texts) if texts is not None else len(speech or [])
        if texts is not None and speech is not None and len(speech) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(speech)} waveforms/wavs")
        reqs = []
        for i in range(n):
            req = Request(text=texts[i] if texts is not None else None, id=str(i))
            if wavs is not None:
                req.wav = str(wavs[i])
            elif waveforms is not None:
                x = torch.as_tensor(waveforms[i], dtype=torch.float32)
                req.waveform = audio.resample(x, sample_rate, audio.SAMPLE_RATE) if sample_rate != 16000 else x
            reqs.append(req)
        return self.run(reqs, batch_size=batch_size, task=task)





def decode_dtype(name, device, options):
    """A precision name (--dtype) -> the torch dtype the model decodes in on `device`. The parity modes (--asr,
    --modelscope-padding) reproduce ModelScope's fp32, so their auto is fp32 (devices.decode_precision). TF32 is
    allowed on CUDA only when the model runs in bf16/fp16: fp32 decoding stays exact IEEE fp32, the reference."""
    exact, native = options.asr or options.modelscope_padding, devices.native_bf16(device)
    precision = devices.decode_precision(name, device.type, native, exact_fp32=exact)
    warning = devices.precision_warning(precision, device.type, native)
    if warning:
        print(f"decode.py: {warning}", file=sys.stderr)
    devices.set_tf32(device, exact_fp32=precision == "fp32")
    return PRECISION_DTYPES[precision]


def in_recording(res, offset_s):
    """A result decoded from a stretch starting offset_s into its recording: its times (entities', characters')
    moved into the recording's time, in place."""
    for e in res.get("entities", []) + res.get("below_min_confidence", []):
        for key in ("start_s", "end_s"):
            if e.get(key) is not None:
                e[key] = round(e[key] + offset_s, 4)
    for row in res.get("char_times") or []:
        row[1:] = [None if t is None else round(t + offset_s, 4) for t in row[1:]]


def stretch_problem(start_s, end_s, seconds) -> Optional[str]:
    """Why [start_s, end_s) is no stretch to recognise of a recording of `seconds` (None: it is one)."""
    if not 0 <= start_s < end_s <= seconds + 1e-3:
        return (f"start_s {start_s:g}, end_s {end_s:g} is not a stretch of its {seconds:.3f} s recording "
                "(0 <= start_s < end_s <= its length)")
    if end_s - start_s < align.FRAME_SPAN_S:                 # under 7 fbank frames: nothing left after subsampling
        return f"{1000 * (end_s - start_s):.0f} ms from start_s to end_s is too short to recognise"
    return None


def request_seconds(req):
    """Seconds of speech a request holds (its span's, for a piece); 0 without speech."""
    if req.span is not None:
        return req.span[1] - req.span[0]
    if req.waveform is not None:
        return req.waveform.shape[0] / audio.SAMPLE_RATE
    return audio.wav_info(req.wav).seconds if req.wav is not None else 0.0


def length_hint(req):
    """How long a request is, in the units its batches are sorted by (fbank frames; characters for text)."""
    if req.span is not None:
        return (req.span[1] - req.span[0]) * 100
    if req.waveform is not None:
        return req.waveform.shape[-1] / 160
    if req.wav is not None:
        try:
            return os.path.getsize(req.wav) / 320
        except OSError:
            return 0
    return len(req.text or "")


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def progress_bar(total, enabled, seconds=False):
    """A progress bar on stderr: in audio seconds where every input has speech, else in inputs."""
    if not enabled:
        return _NoBar()
    return tqdm(total=round(total, 1) if seconds else total, unit="s audio" if seconds else "utt", file=sys.stderr,
                dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} {unit} [{elapsed}<{remaining}]"
                if seconds else None)
