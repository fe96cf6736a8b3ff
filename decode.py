"""
Decode with a trained IMAGE model: beam search, constrained bracket decoding, entities, CLI.

  python decode.py --ckpt best.pt --text "末阳市文联主席张三"              # TNER
  python decode.py --ckpt best.pt --wav a.wav                            # SNER
  python decode.py --ckpt best.pt --wav a.wav --text "..."               # MNER
  python decode.py --ckpt best.pt --input inputs.jsonl --out preds.jsonl # one {"text"?, "wav"?} per line
  python decode.py --ckpt best.pt --dataset cnerta --data-dir D --split test --task MNER --eval
  python decode.py --ckpt mmspeech.pt --asr --wav a.wav b.wav           # plain MMSpeech ASR (parity mode)

The search is fairseq's SequenceGenerator + BeamSearch (what ModelScope's MMSpeech pipeline runs), token for
token, over the explicit KV cache of image.py: encode once, decode one token per step for all live beams of all
live sentences, drop sentences as soon as they have `beam` finished hypotheses. Python API: Recognizer
(how it decodes: DecodeOptions; unset search settings come from the checkpoint).
TNER/MNER: the output is the input text with brackets inserted (BracketConstraint; the known character is scored
with the whole character mass). SNER: optionally joint CTC/attention scoring with the phone CTC head
(CTCPrefixScorer, --ctc-weight). --eval runs a split through the model (evaluate_split) and scores it with
evaluate.py's two evaluators and CER.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import audio
import data
import evaluate
import files
from text import BOS, CLOSE_OF, EOS, OPEN_OF, PAD, TO_FULLWIDTH, TYPES, UNK

MAX_DEPTH = 4            # constrained decoding: deepest bracket nesting allowed (CNERTA needs 3)
MAX_AUDIO_SECONDS = 60.0  # longer wavs are refused (the encoder's attention is quadratic in frames)


# ----------------------------------------------------------------------------------------------------------
# search settings and results


# search settings built into the code: what an option left unset (None) gets when the checkpoint has no value
SEARCH_DEFAULTS = dict(beam=5, max_len=128, min_len=1, no_repeat_ngram_size=5, constraint_range=None,
                       len_penalty=1.0, ctc_weight=0.0)


@dataclass(frozen=True)
class DecodeOptions:
    """Every decoding knob: the beam search's settings (fairseq SequenceGenerator's) and what the Recognizer decodes.

    A search setting left None takes the checkpoint's assets["decoding"] value, else SEARCH_DEFAULTS (resolve());
    explicit values win. beam_search reads the search fields, Recognizer the others.
    """
    # search
    beam: Optional[int] = None                  # beam width; 1 = greedy
    max_len: Optional[int] = None               # max_len_b (max_len_a is 0): at step max_len only EOS is allowed
    min_len: Optional[int] = None               # EOS is barred while step < min_len
    no_repeat_ngram_size: Optional[int] = None  # ban repeating an n-gram of this size (0 = off)
    constraint_range: Optional[tuple] = None    # (start, end): logits[4:start], logits[end:] = -inf before log_softmax
    len_penalty: Optional[float] = None         # final score = sum(logprobs) / len**len_penalty (len includes EOS)
    ctc_weight: Optional[float] = None          # SNER: joint CTC/attention weight (0 = decoder only, as fairseq)
    ctc_candidates: int = 10                    # SNER joint decoding: characters per row the CTC scores each step
    bos: int = BOS                              # special ids: 0/1/2 in our vocabularies; only a ModelScope directory
    pad: int = PAD                              # with the bare BERT vocab.txt puts them elsewhere (parity tests)
    eos: int = EOS
    # what to decode
    asr: bool = False                           # plain MMSpeech recognition (no text stream); results carry tokens
    constrain: bool = True                      # TNER/MNER: the input text with brackets inserted (BracketConstraint)
    pool_chars: bool = True                     # constrained: the known character scores the whole character mass
    entity_bias: float = 0.0                    # constrained: added to every opening bracket's log-probability
    nbest: int = 1                              # results also list the best nbest hypotheses (at most beam)
    # inputs
    pseudo_text_len: Optional[int] = None       # SNER pseudo text length (None: the checkpoint's, else Featurizer's)
    max_audio_seconds: float = MAX_AUDIO_SECONDS  # longer audio is refused
    modelscope_padding: bool = False            # ModelScope's batch-dependent encoder padding (when loading a path)

    def resolve(self, assets=None, capacity=None):
        """-> these options with every unset search setting (and pseudo_text_len) taken from the checkpoint's
        assets, else SEARCH_DEFAULTS; checked, max_len against `capacity` (the decoder's positions) when given."""
        saved = dict((assets or {}).get("decoding") or {})
        if "max_len_b" in saved:                                 # fairseq's name
            saved["max_len"] = saved["max_len_b"]
        saved["constraint_range"] = tuple(saved["constraint_range"]) if saved.get("constraint_range") else None
        unset = {name: saved.get(name, default) for name, default in SEARCH_DEFAULTS.items()
                 if getattr(self, name) is None}
        if self.pseudo_text_len is None:
            unset["pseudo_text_len"] = (assets or {}).get("pseudo_text_len")
        options = dataclasses.replace(self, **unset)
        options.check()
        if options.nbest > options.beam:
            raise files.InputError(f"nbest {options.nbest} must be between 1 and the beam size {options.beam}")
        if capacity is not None and options.max_len > capacity:
            raise files.InputError(f"max_len {options.max_len} must be in [1, {capacity}] (decoder positions)")
        return options

    def check(self, flags=None):
        """InputError for a value out of range (unset ones pass); flags: {field: CLI flag} names the flag."""
        name = lambda field: (flags or {}).get(field, field)      # noqa: E731
        for field in ("beam", "max_len", "nbest", "ctc_candidates", "pseudo_text_len"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise files.InputError(f"{name(field)} must be >= 1, got {value}")
        if self.ctc_weight is not None and not 0 <= self.ctc_weight < math.inf:   # NaN fails it too
            raise files.InputError(f"{name('ctc_weight')} must be >= 0, got {self.ctc_weight}")
        if not math.isfinite(self.entity_bias):
            raise files.InputError(f"{name('entity_bias')} must be a finite number, got {self.entity_bias}")
        if self.entity_bias and (self.asr or not self.constrain):
            raise files.InputError(f"{name('entity_bias')} biases the constrained search: not with {name('asr')} "
                                   f"or unconstrained ({name('constrain')})")
        if not 0 < self.max_audio_seconds < math.inf:
            raise files.InputError(f"{name('max_audio_seconds')} must be a positive number, got "
                                   f"{self.max_audio_seconds}")


@dataclass
class Hypothesis:
    tokens: list            # generated ids, without BOS and without the final EOS
    score: float            # length-normalised log-probability (fairseq convention, EOS counted)
    positional_scores: list  # per-token log-probabilities, the last one is EOS's
    finished: bool = True   # False only when the search was cut at max_len without any EOS (never in fairseq)


# ----------------------------------------------------------------------------------------------------------
# the beam search (fairseq semantics, vectorized over sentences x beams)


def _block_repeated_ngrams(lprobs, tokens, step, n):
    """fairseq NGramRepeatBlock: ban every token that would repeat an n-gram already in the row (BOS included).

    lprobs (N, V) modified in place; tokens (N, >= step+1) with BOS at column 0 and the prefix up to column step.
    """
    if step + 2 - n < 0:
        return
    seq = tokens[:, : step + 1]                                   # (N, step+1)
    if seq.size(1) < n:
        return
    windows = seq.unfold(1, n, 1)                                 # (N, W, n) every n-gram of the prefix
    context = seq[:, step + 2 - n:]                               # (N, n-1) the last n-1 tokens
    hit = (windows[:, :, : n - 1] == context[:, None, :]).all(-1)  # (N, W)
    rows, cols = hit.nonzero(as_tuple=True)
    lprobs[rows, windows[rows, cols, n - 1]] = -math.inf


def beam_search(model, enc, cfg: DecodeOptions, constraint=None, max_lens=None, scorer=None):
    """Beam search for every input of `enc`. -> list (one per input) of up to `beam` Hypothesis, best first.

    model: new_cache(enc, max_len) / decode_step(tokens (N,), cache, vocab_limit) -> (N, V) logits, V cut to
        vocab_limit when given / cache.reorder(index).
    constraint: optional per-row token filter (BracketConstraint): start(); mask(step, row_max_lens) -> (N, V)
        bool of allowed tokens, applied before log_softmax; rescore(logits) -> logits; bias(lprobs) -> lprobs
        after log_softmax; reorder(rows); advance(new_tokens).
    scorer: optional joint scorer (CTCPrefixScorer): start(); score(lprobs) -> (N, V) scores that replace the
        log-probs after every mask; select(rows, new_tokens).
    max_lens: optional per-input max lengths (default cfg.max_len). An input's result never depends on the other
        inputs of the batch (fairseq uses one max_len per batch; identical when all are equal).
    cfg: the search fields of DecodeOptions; unset ones take SEARCH_DEFAULTS.
    """
    cfg = cfg.resolve()
    beam = cfg.beam
    batch = enc.hidden.size(0)
    dev = enc.hidden.device
    max_lens = torch.as_tensor([cfg.max_len] * batch if max_lens is None else max_lens, dtype=torch.long)
    if (max_lens < cfg.min_len).any():
        raise ValueError(f"min_len {cfg.min_len} is larger than max_len {max_lens.min().item()}")
    longest = int(max_lens.max())
    max_lens_dev = max_lens.to(dev)
    cache = model.new_cache(enc, longest + 2)   # one row per input: beams are made by the first reorder
    if constraint is not None:
        constraint.start()
    if scorer is not None:
        scorer.start()

    # Row r belongs to live sentence r // width; width = 1 at step 0 (fairseq scores only beam 0 there).
    live = torch.arange(batch, device=dev)                        # (A,) original index of each live sentence
    width = 1
    tokens = torch.full((batch, longest + 2), cfg.pad, dtype=torch.long, device=dev)   # (N, longest+2)
    tokens[:, 0] = cfg.bos
    scores = torch.zeros(batch, longest + 1, device=dev)          # (N, longest+1) cumulative log-probs
    ignore = torch.zeros(batch, beam, dtype=torch.bool, device=dev)   # fairseq cands_to_ignore
    finalized = [[] for _ in range(batch)]

    # ids >= the constraint range's end are always banned: the LM head skips them (same search, fewer FLOPs)
    vocab_limit = None if cfg.constraint_range is None else cfg.constraint_range[1]
    for step in range(longest + 1):
        logits = model.decode_step(tokens[:, step], cache, vocab_limit=vocab_limit).float()   # (N, V')
        vocab = logits.size(-1)
        if cfg.constraint_range is not None:
            logits[:, 4:cfg.constraint_range[0]] = -math.inf
        row_max = max_lens_dev[live].repeat_interleave(width)     # (N,)
        if constraint is not None:                                # renormalise over what the brackets allow
            allowed = constraint.mask(step, row_max.tolist(), vocab).to(dev)
            logits = constraint.rescore(logits).masked_fill(~allowed, -math.inf)
        lprobs = F.log_softmax(logits, dim=-1)                    # (N, V)
        if constraint is not None:
            lprobs = constraint.bias(lprobs)
        if step < cfg.min_len:
            lprobs[:, cfg.eos] = -math.inf
        lprobs = lprobs.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        lprobs[:, cfg.pad] = -math.inf
        at_max = row_max <= step                                  # (N,) rows that may only end now
        if bool(at_max.any()):
            eos_col = lprobs[:, cfg.eos].clone()
            lprobs[at_max] = -math.inf
            lprobs[:, cfg.eos] = eos_col
        if cfg.no_repeat_ngram_size > 0 and not isinstance(constraint, BracketConstraint):   # copies: no block
            _block_repeated_ngrams(lprobs, tokens, step, cfg.no_repeat_ngram_size)
        if scorer is not None:
            lprobs = scorer.score(lprobs)

        # candidates: top 2*beam of (cumulative score + next-token log-prob) over each sentence's rows
        n_live = live.numel()
        cand = lprobs if step == 0 else lprobs + scores[:, step - 1, None]
        cand = cand.view(n_live, width * vocab)
        k = min(2 * beam, width * vocab - 1)
        cand_scores, cand_flat = torch.topk(cand, k)              # (A, k)
        cand_tokens = cand_flat % vocab
        first_row = torch.arange(n_live, device=dev)[:, None] * width
        cand_rows = torch.div(cand_flat, vocab, rounding_mode="floor") + first_row   # (A, k) row of the current layout

        # finalize: EOS among the top `beam` candidates, with a finite score
        is_eos = (cand_tokens == cfg.eos) & (cand_scores != -math.inf)   # (A, k)
        is_eos[:, :beam] &= ~ignore
        done_now = _finalize(is_eos[:, :beam], cand_rows, cand_scores, tokens, scores, step, live, finalized,
                             max_lens, cfg)
        at_end = (max_lens_dev[live] <= step).cpu()
        for a in (at_end & ~done_now).nonzero().flatten().tolist():   # no finite EOS at max_len: keep the best
            sent = int(live[a])
            if not finalized[sent]:
                best = a * width + (int(scores[a * width: (a + 1) * width, step - 1].argmax()) if step else 0)
                finalized[sent].append(Hypothesis(tokens[best, 1: step + 1].tolist(), -math.inf, [], False))
        keep = ~(done_now | at_end)
        if not keep.any():
            break

        # each remaining sentence continues with its best `beam` non-EOS candidates, in candidate order
        keep = keep.to(dev)
        skip = is_eos.clone()
        skip[:, :beam] |= ignore
        order = skip.long() * k + torch.arange(k, device=dev)      # non-EOS first, then by rank
        picked_key, picked = torch.topk(order[keep], beam, dim=1, largest=False)   # (A', beam)
        ignore = picked_key >= k
        rows = cand_rows[keep].gather(1, picked).flatten()        # (A'*beam,) source row of each new beam
        tokens = tokens[rows]
        tokens[:, step + 1] = cand_tokens[keep].gather(1, picked).flatten()
        scores = scores[rows]
        scores[:, step] = cand_scores[keep].gather(1, picked).flatten()
        live = live[keep]
        width = beam
        cache.reorder(rows)
        if constraint is not None:
            constraint.reorder(rows.tolist())
            constraint.advance(tokens[:, step + 1].tolist())
        if scorer is not None:
            scorer.select(rows.tolist(), tokens[:, step + 1].tolist())

    for hyps in finalized:                                         # best first (stable for equal scores)
        hyps.sort(key=lambda h: -h.score)
    return finalized


def _finalize(eos_top, cand_rows, cand_scores, tokens, scores, step, live, finalized, max_lens, cfg):
    """Store the hypotheses ending with EOS among the top `beam` candidates. -> (A,) bool: sentence done."""
    beam = cfg.beam
    done = torch.zeros(eos_top.size(0), dtype=torch.bool)
    hits = eos_top.nonzero()                                      # (h, 2) [live sentence, candidate], row-major
    if hits.numel() == 0:
        return done
    a_idx, j_idx = hits[:, 0], hits[:, 1]
    rows = cand_rows[a_idx, j_idx]
    eos_scores = cand_scores[a_idx, j_idx]                        # (h,) cumulative, float32 as fairseq
    positional = torch.cat([scores[rows, :step], eos_scores[:, None]], dim=1)   # (h, step+1) cumulative
    positional[:, 1:] = positional[:, 1:] - positional[:, :-1]
    normalised = eos_scores / (step + 1) ** cfg.len_penalty
    hyp_tokens = tokens[rows, 1: step + 1].tolist()
    positional, normalised, live = positional.tolist(), normalised.tolist(), live.tolist()
    for i, (a, j) in enumerate(hits.tolist()):
        sent = live[a]
        if len(finalized[sent]) < beam:
            finalized[sent].append(Hypothesis(hyp_tokens[i], normalised[i], positional[i]))
        if len(finalized[sent]) == beam or step >= int(max_lens[sent]):
            done[a] = True
    return done


# ----------------------------------------------------------------------------------------------------------
# constrained decoding: the output is the input text with well-nested entity brackets inserted


def finite_bias(value) -> float:
    """entity_bias as a float; NaN or infinity would silently force or forbid every bracket."""
    if not math.isfinite(value):
        raise ValueError(f"entity_bias must be a finite number, got {value}")
    return float(value)


class BracketConstraint:
    """Per-hypothesis state machine that allows only outputs which strip to the input text.

    State of a row: (input index, position in its text, stack of open (type, start), spans closed here).
    Allowed next tokens: the next input character; an opening bracket (depth < MAX_DEPTH); the closing bracket of
    the innermost open entity if it holds >= 1 character and would not duplicate a span of the same type just
    closed here; EOS once the text is consumed and nothing is open. A token is allowed only if the search can still
    finish within the row's max_len (every open entity needs a character and a close; same-type entities with the
    same start need distinct ends), so every hypothesis that ends is valid and no row runs into a dead end.
    A text character that is itself a bracket symbol is read as the character (that bracket cannot open there).

    entity_bias: added to the log-probability of every opening bracket after normalisation (0 = plain search).
    > 0 finds more entities (recall), < 0 fewer (precision); hypothesis scores then include it.

    pool_chars: the known next character is scored with the model's whole character mass (every token that is
    not a bracket or EOS), not its own probability. The text is given, so the only question at each step is
    "bracket, or the next character?": a model unsure between homophones (it reads phones) then does not push
    probability into brackets. False = each character's own probability.
    """

    def __init__(self, char_ids, open_ids, close_ids, max_depth=MAX_DEPTH, pool_chars=True, entity_bias=0.0):
        self.char_ids = [list(ids) for ids in char_ids]          # per input: decoder id of each text character
        self.open_ids = [open_ids[t] for t in TYPES]
        self.close_ids = [close_ids[t] for t in TYPES]
        self.max_depth = max_depth
        self.pool_chars = pool_chars
        self.entity_bias = finite_bias(entity_bias)
        self.brackets = set(self.open_ids) | set(self.close_ids)
        self.structural = [BOS, PAD, EOS, *self.brackets]       # not characters: outside the pooled mass
        self.rows = []

    def start(self):
        self.rows = [(i, 0, (), frozenset()) for i in range(len(self.char_ids))]

    def _can_finish(self, ids, pos, stack, closed_here):
        """Can every open entity still close, inner first, each after >= 1 char, without duplicating a span?

        Greedy earliest ends, innermost first. A close cannot happen where the next text character is that very
        bracket symbol (it would be read as the character)."""
        n = len(ids)
        last_end = {key: pos for key in closed_here}
        end = pos
        for key in reversed(stack):
            end = max(end, key[1] + 1)
            while last_end.get(key) == end or (end < n and ids[end] == self.close_ids[key[0]]):
                end += 1
            last_end[key] = end
        return end <= n

    def _successors(self, row):
        """-> list of (token, next state or None for EOS) for one row, before the length budget."""
        sent, pos, stack, closed_here = row
        ids = self.char_ids[sent]
        n = len(ids)
        out = []
        if pos < n:
            out.append((ids[pos], (sent, pos + 1, stack, frozenset())))
            if len(stack) < self.max_depth:
                for t, tok in enumerate(self.open_ids):
                    if tok != ids[pos]:
                        out.append((tok, (sent, pos, stack + ((t, pos),), closed_here)))
        if stack:
            key = stack[-1]
            tok = self.close_ids[key[0]]
            if pos > key[1] and key not in closed_here and (pos >= n or tok != ids[pos]):
                out.append((tok, (sent, pos, stack[:-1], closed_here | {key})))
        if pos == n and not stack:
            out.append((EOS, None))
        return out

    def mask(self, step, row_max_lens, vocab):
        """(N, V) bool: tokens each row may emit at this step (and still end by its max_len)."""
        allowed = torch.zeros(len(self.rows), vocab, dtype=torch.bool)
        rows_idx, cols = [], []
        for r, row in enumerate(self.rows):
            slots = row_max_lens[r] - 1 - step                   # tokens still possible after this one
            ids = self.char_ids[row[0]]
            for tok, nxt in self._successors(row):
                if nxt is not None:
                    _, pos, stack, closed_here = nxt
                    if (len(ids) - pos) + len(stack) > slots or not self._can_finish(ids, pos, stack, closed_here):
                        continue
                rows_idx.append(r)
                cols.append(tok)
        allowed[rows_idx, cols] = True
        return allowed

    def rescore(self, logits):
        """(N, V) logits -> (N, V), with pool_chars: each row's next input character gets the log of the summed
        exp-logits of all non-structural tokens (a literal bracket character in the text keeps its own)."""
        if not self.pool_chars:
            return logits
        rows, chars = [], []
        for r, (sent, pos, _, _) in enumerate(self.rows):
            ids = self.char_ids[sent]
            if pos < len(ids) and ids[pos] not in self.brackets:
                rows.append(r)
                chars.append(ids[pos])
        if not rows:
            return logits
        structural = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)
        structural[self.structural] = True
        mass = torch.logsumexp(logits.masked_fill(structural, -math.inf), dim=-1)   # (N,)
        rows_t = torch.tensor(rows, device=logits.device)
        logits = logits.clone()
        logits[rows_t, torch.tensor(chars, device=logits.device)] = mass[rows_t]
        return logits

    def bias(self, lprobs):
        """(N, V) log-probs -> (N, V) with entity_bias added to the opening brackets."""
        if self.entity_bias:
            lprobs[:, self.open_ids] += self.entity_bias
        return lprobs

    def reorder(self, rows):
        self.rows = [self.rows[i] for i in rows]

    def advance(self, tokens):
        new = []
        for row, tok in zip(self.rows, tokens):
            nxt = dict(self._successors(row)).get(tok)
            # a token outside the mask only reaches -inf rows (fewer live candidates than beams): keep the state
            new.append(nxt if nxt is not None else row)
        self.rows = new


def spans_from_constrained(tokens, char_ids, open_ids, close_ids, text=None):
    """Replay a constrained output. -> (entities [(start, end, type)] in input coordinates, complete: bool,
    the bracketed string written with the input's own characters, literal bracket characters made full width)."""
    open_type = {open_ids[t]: t for t in TYPES}
    close_type = {close_ids[t]: t for t in TYPES}
    pos, stack, spans, out = 0, [], [], []
    for tok in tokens:
        if pos < len(char_ids) and tok == char_ids[pos]:
            out.append(text[pos].translate(TO_FULLWIDTH) if text is not None else "")
            pos += 1
        elif tok in open_type:
            stack.append((open_type[tok], pos))
            out.append(OPEN_OF[open_type[tok]])
        elif tok in close_type and stack and stack[-1][0] == close_type[tok]:
            t, s = stack.pop()
            spans.append((s, pos, t))
            out.append(CLOSE_OF[t])
        else:
            return spans, False, "".join(out)
    return spans, pos == len(char_ids) and not stack, "".join(out)


# ----------------------------------------------------------------------------------------------------------
# joint CTC/attention decoding (SNER): the encoder's phone CTC head checks the characters the decoder proposes


class CTCPrefixScorer:
    """Joint CTC/attention scoring (Watanabe et al. 2017) of a character decoder against a phone CTC.

    Every row carries the CTC forward variables of the phones of its characters so far. Each step, the
    `candidates` best characters of every row (by the decoder) are extended by each of their readings; a
    character's CTC score is log P(prefix + its phones starts the audio's phone string) - log P(prefix), of its
    best reading. A token's score is decoder log-prob + weight * CTC score. Brackets are silent (CTC score 0);
    EOS gets log P(the audio says exactly the prefix) - log P(prefix);
    characters outside the candidates, and characters without a reading, are dropped (ESPnet's pre-beam).

    ctc_logp (B, T, C): log-probs over CTC classes (0 = blank) per speech frame; frames (B,) valid frames;
    readings(token) -> list of tuples of CTC classes; silent: the bracket ids.
    """

    def __init__(self, ctc_logp, frames, readings, silent, weight, candidates, eos=EOS):
        if not weight > 0.0:
            raise ValueError(f"CTC weight must be > 0, got {weight}")
        self.x = ctc_logp.float()                                # (B, T, C)
        self.x_ct = self.x.transpose(1, 2).contiguous()          # (B, C, T): one phone's row is one index away
        self.blank_sums = self.x[:, :, 0].cumsum(1)              # (B, T) log P(all blank up to t)
        self.frames = frames.to(ctc_logp.device)                 # (B,)
        self.readings, self.weight, self.candidates, self.eos = readings, weight, candidates, eos
        self.silent = sorted(set(silent) - {eos})
        self._cache = {}

    def start(self):
        b, t, _ = self.x.shape
        self.sent = torch.arange(b, device=self.x.device)        # (N,) sentence of each row
        self.rn = torch.full((b, t), -math.inf, device=self.x.device)   # (N, T) paths ending in a phone at t
        self.rb = self.blank_sums.clone()                        # (N, T) ending in blank (all blank so far)
        self.psi = torch.zeros(b, device=self.x.device)         # (N,) log P(prefix)
        self.last = torch.full((b,), -1, dtype=torch.long, device=self.x.device)   # (N,) last phone, -1 none

    def _reading(self, token):
        if token not in self._cache:
            self._cache[token] = [tuple(r) for r in self.readings(token)]
        return self._cache[token]

    def _extend(self, sent, rn, rb, last, phone):
        """One phone more for M prefixes. sent/last/phone (M,), rn/rb (M, T) -> (rn, rb, log prefix prob)."""
        xc, lb = self.x_ct[sent, phone], self.blank_sums[sent]   # (M, T) the phone's log-probs, blank sums
        phi = torch.where((last == phone)[:, None], rb, torch.logaddexp(rn, rb))    # (M, T) may enter after t
        start = torch.where(last < 0, 0.0, -math.inf).to(phi)    # an empty prefix may start at frame 0
        phi_prev = torch.cat([start[:, None], phi[:, :-1]], 1)    # (M, T) phi_{t-1}
        # rn_t = (rn_{t-1} + phi_{t-1}) x_t(c) and rb_t = (rb_{t-1} + rn_{t-1}) x_t(blank), unrolled as cumulative
        # sums in the log domain (the running sums reach -1000s: float32 keeps ~1e-4, enough to rank hypotheses)
        lc = xc.cumsum(1)
        rn_new = lc + torch.logcumsumexp(phi_prev - F.pad(lc[:, :-1], (1, 0)), 1)
        rn_prev = F.pad(rn_new[:, :-1], (1, 0), value=-math.inf)
        rb_new = lb + torch.logcumsumexp(rn_prev - F.pad(lb[:, :-1], (1, 0)), 1)
        valid = torch.arange(xc.size(1), device=xc.device)[None] < self.frames[sent][:, None]
        psi = torch.logsumexp((phi_prev + xc).masked_fill(~valid, -math.inf), 1)   # (M,)
        return rn_new, rb_new, psi

    def score(self, lprobs):
        """(N, V) decoder log-probs (masks applied) -> (N, V) joint scores; remembers the candidates' states."""
        vocab, w = lprobs.size(1), self.weight
        att = lprobs.float()
        joint = torch.full_like(att, -math.inf)
        silent = torch.tensor([t for t in self.silent if t < vocab], device=att.device)
        joint[:, silent] = att[:, silent]
        end = (self.frames[self.sent] - 1)[:, None]              # (N, 1)
        full = torch.logaddexp(self.rn.gather(1, end), self.rb.gather(1, end))[:, 0]
        joint[:, self.eos] = att[:, self.eos] + w * (full - self.psi)
        chars = att.index_fill(1, torch.cat([silent, torch.tensor([self.eos], device=att.device)]), -math.inf)
        top_val, top_tok = chars.topk(min(self.candidates, vocab), dim=1)   # (N, K)
        rows, toks, phones = [], [], []
        for r, (vals, tks) in enumerate(zip(top_val.tolist(), top_tok.tolist())):
            for v, tok in zip(vals, tks):
                if v == -math.inf:
                    break
                for reading in self._reading(tok):                # no reading: the CTC cannot vouch, dropped
                    rows.append(r)
                    toks.append(tok)
                    phones.append(reading)
        self._pending = {}
        if not rows:
            return joint.nan_to_num(nan=-math.inf).to(lprobs.dtype)
        dev = att.device
        rows_t = torch.tensor(rows, device=dev)
        sent, rn, rb, last = self.sent[rows_t], self.rn[rows_t], self.rb[rows_t], self.last[rows_t]
        base = psi = self.psi[rows_t]                            # (M,) log P(prefix) before the character
        longest = max(map(len, phones))
        table = torch.tensor([list(p) + [-1] * (longest - len(p)) for p in phones], device=dev)   # (M, P)
        for j in range(longest):
            go = table[:, j] >= 0
            rn_j, rb_j, psi_j = self._extend(sent, rn, rb, last, table[:, j].clamp(min=0))
            rn, rb = torch.where(go[:, None], rn_j, rn), torch.where(go[:, None], rb_j, rb)
            psi, last = torch.where(go, psi_j, psi), torch.where(go, table[:, j], last)
        delta = (psi - base).tolist()
        best = {}
        for m, (r, tok) in enumerate(zip(rows, toks)):          # best reading of each (row, character)
            if (r, tok) not in best or delta[m] > delta[best[(r, tok)]]:
                best[(r, tok)] = m
        idx = torch.tensor(list(best.values()), device=dev)
        r_best, t_best = rows_t[idx], torch.tensor([toks[m] for m in best.values()], device=dev)
        joint[r_best, t_best] = att[r_best, t_best] + w * (psi[idx] - base[idx])
        self._pending, self._new = best, (rn, rb, psi, last)
        return joint.nan_to_num(nan=-math.inf).to(lprobs.dtype)   # nan: a row whose prefix the CTC rules out

    def select(self, rows, tokens):
        """The search kept row rows[i] extended by tokens[i] (lists): carry the matching states."""
        src = torch.tensor(rows, device=self.x.device)
        item = [self._pending.get((r, t), -1) for r, t in zip(rows, tokens)]
        rn, rb, psi, last = self.rn[src], self.rb[src], self.psi[src], self.last[src]
        if any(m >= 0 for m in item):
            item_t = torch.tensor(item, device=self.x.device)
            use = item_t >= 0
            pick = item_t.clamp(min=0)
            new_rn, new_rb, new_psi, new_last = self._new
            rn = torch.where(use[:, None], new_rn[pick], rn)
            rb = torch.where(use[:, None], new_rb[pick], rb)
            psi, last = torch.where(use, new_psi[pick], psi), torch.where(use, new_last[pick], last)
        self.sent, self.rn, self.rb, self.psi, self.last = self.sent[src], rn, rb, psi, last


# ----------------------------------------------------------------------------------------------------------
# entities: alignment of a free output to the input text


def align_offsets(output_text, input_text):
    """Map each character index of output_text to input_text (None where it has no counterpart)."""
    import difflib
    mapping = [None] * len(output_text)
    matcher = difflib.SequenceMatcher(None, output_text, input_text, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal" or (op == "replace" and i2 - i1 == j2 - j1):   # same-length substitution: position kept
            for k in range(i2 - i1):
                mapping[i1 + k] = j1 + k
    return mapping


def map_spans(spans, output_text, input_text):
    """Spans [(start, end, type)] over output_text -> over input_text ((None, None, type) if not alignable)."""
    if output_text == input_text:
        return list(spans)
    m = align_offsets(output_text, input_text)
    out = []
    for s, e, t in spans:
        a, b = m[s], m[e - 1]
        out.append((a, b + 1, t) if a is not None and b is not None and a <= b else (None, None, t))
    return out


# ----------------------------------------------------------------------------------------------------------
# from inputs to model rows


@dataclass
class Request:
    """One thing to recognise: text and/or speech (a wav path or a 16 kHz waveform)."""
    text: Optional[str] = None
    wav: Optional[str] = None
    waveform: Optional[torch.Tensor] = None
    id: str = ""

    @property
    def has_speech(self):
        return self.wav is not None or self.waveform is not None

    def task(self):
        if self.text is not None and self.has_speech:
            return "MNER"
        return "TNER" if self.text is not None else "SNER"


def load_model(path, device="cpu", **config_overrides):
    """-> (model, assets, ckpt) from our checkpoint format (weights.load_checkpoint; a missing file, a folder or
    another kind of file is a weights.ConversionError, an InputError)."""
    import weights
    return weights.load_checkpoint(path, device, **config_overrides)


def parse_device(name):
    """--device of decode.py and train.py -> torch.device; a bad name or an absent GPU is an InputError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise files.InputError(f"--device {name!r}: not a device; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise files.InputError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise files.InputError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise files.InputError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


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
        checkpoint; overrides: DecodeOptions fields (Recognizer("best.pt", beam=3)) that replace those of options."""
        options = dataclasses.replace(options or DecodeOptions(), **overrides)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        assets = None
        if isinstance(model, (str, os.PathLike)):
            loading = {"modelscope_padding": True} if options.modelscope_padding else {}
            model, assets, _ = load_model(str(model), device, **loading)
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

    # -- features -------------------------------------------------------------------------------------------

    def _speech(self, req):
        """-> (fbank (T, 80), warnings). Wav files go through the featurizer (cached); waveforms are 16 kHz."""
        where = req.wav or f"waveform {req.id}".strip()
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
        if seconds < 0.085:                                    # < 7 fbank frames: nothing left after subsampling
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

    def _batch(self, reqs, task):
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
            constraint, max_lens = None, None
            if constrained:
                if not self.brackets_known:
                    raise ValueError("the vocabulary has no bracket tokens [ ] ( ) < >: use --no-constrain")
                char_ids = [self.vocab.encode(r.text) for r in reqs]
                constraint = BracketConstraint(char_ids, self.open_ids, self.close_ids,
                                               pool_chars=self.options.pool_chars,
                                               entity_bias=self.options.entity_bias)
                max_lens = [min(self.capacity, max(self.options.max_len, 2 * len(ids))) for ids in char_ids]
            scorer = self._ctc_scorer(enc, rows) if task == "SNER" and self.options.ctc_weight > 0 else None
            hyps = beam_search(self.model, enc, self.options, constraint=constraint, max_lens=max_lens,
                               scorer=scorer)
        return [self._result(req, task, h, warn, constrained) for req, h, warn in zip(reqs, hyps, warns)]

    def _ctc_scorer(self, enc, rows):
        """Joint CTC/attention scorer for an SNER batch: the model's phone CTC over its speech frames."""
        logp, frames = self.model.speech_phone_log_probs(enc, max(r["fbank"].size(0) for r in rows))
        classes = logp.size(-1)
        phone_id, vocab = self.featurizer.phone_id, self.vocab

        def readings(token):                                     # CTC class = phone id - 3, as in training
            piece = vocab.tokens[token].removeprefix("##")       # MMSpeech's vocabulary has BERT word pieces
            phonemizer = self.featurizer.phonemizer
            said = phonemizer.readings(piece) if len(piece) == 1 else \
                [[u for us in phonemizer.units(piece) for u in us]]
            ids = [[phone_id.get(u, UNK) - 3 for u in units] for units in said]
            return [r for r in ids if r and all(1 <= c < classes for c in r)]

        brackets = [*self.open_ids.values(), *self.close_ids.values()]
        return CTCPrefixScorer(logp, frames, readings, brackets, self.options.ctc_weight,
                               self.options.ctc_candidates)

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
            text = req.text
            spans, complete, output = spans_from_constrained(hyp.tokens, self.vocab.encode(text), self.open_ids,
                                                             self.close_ids, text)
            if not complete:                                     # cannot happen unless the search was cut short
                spans, output, warn = [], text, warn + ["constrained search did not finish; no entities"]
        else:
            output = self.vocab.decode(hyp.tokens, unk="\ufffd")
            plain, ents = data.parse(output)
            spans = [(e.start, e.end, e.type) for e in ents]
            if task in ("TNER", "MNER") and not self.options.asr:   # offsets into the input text
                spans = map_spans(spans, plain, req.text)
                text = req.text
            else:
                text = plain
        res["output"] = output
        res["text"] = text
        if not self.options.asr:
            res["entities"] = [{"type": t, "text": text[s:e] if s is not None else None, "start": s, "end": e}
                               for s, e, t in sorted(spans, key=lambda x: (x[0] is None, x[0] or 0, -(x[1] or 0)))]
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

    # -- public ---------------------------------------------------------------------------------------------

    def run(self, requests, batch_size=8, progress=False, task=None):
        """Recognise a list of Request. -> list of result dicts in the same order. task forces TNER/SNER/MNER."""
        results = [None] * len(requests)
        groups = {}
        for i, req in enumerate(requests):
            t = task or req.task()
            if t in ("SNER", "MNER") and not req.has_speech:
                raise files.InputError(f"input {req.id or i}: task {t} needs speech (wav)")
            if t in ("TNER", "MNER") and req.text is None:
                raise files.InputError(f"input {req.id or i}: task {t} needs text")
            if self.options.asr and not req.has_speech:
                raise files.InputError(f"input {req.id or i}: --asr needs speech (wav)")
            groups.setdefault(t, []).append(i)
        # Sort by length for speed, unless ModelScope's batch-dependent padding is on (keep the reference order).
        keep_order = getattr(self.model.config, "modelscope_padding", False)
        bar = _progress(len(requests), progress)
        for t, idx in groups.items():
            if not keep_order:
                idx = sorted(idx, key=lambda i: -_length_hint(requests[i]))
            for k in range(0, len(idx), batch_size):
                chunk = idx[k: k + batch_size]
                for i, res in zip(chunk, self._batch([requests[i] for i in chunk], t)):
                    results[i] = res
                bar.update(len(chunk))
        bar.close()
        return results

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





def _length_hint(req):
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


def _progress(total, enabled):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, unit="utt", file=sys.stderr, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------------
# a split through the model, scored by evaluate.py


def evaluate_split(model, samples, featurizer=None, tasks=("TNER", "SNER", "MNER"), options=None, batch_size=32,
                   evaluator="ours", device=None, assets=None, progress=False, recognizer=None, predictions=None):
    """Decode `samples` for each task and score them (evaluate.score_predictions). -> {task: {"p", "r", "f1"
    (percent, by `evaluator`), "ours", "official", "cer", "sentences"}}. SNER/MNER use only samples with audio.
    predictions: optional dict that receives {task: [result, ...]}. options: DecodeOptions, its unset search
    settings from assets (the checkpoint's); without assets beam 5, max_len 128, no n-gram block."""
    if evaluator not in ("ours", "official"):
        raise ValueError(f"evaluator must be 'ours' or 'official', not {evaluator!r}")
    if recognizer is None:
        if assets is None:
            assets = {"vocab": featurizer.vocab.tokens, "decoding": {"no_repeat_ngram_size": 0}}
        device = device or next(model.parameters()).device
        recognizer = Recognizer((model, assets), options, device=device, dtype=next(model.parameters()).dtype,
                                featurizer=featurizer)
    phones_of = recognizer.featurizer.phonemizer.pronounce
    scores = {}
    for task in tasks:
        golds = [s for s in samples if task == "TNER" or s.audio is not None]
        reqs = [Request(text=s.text if task != "SNER" else None, wav=s.audio if task != "TNER" else None,
                        id=s.id) for s in golds]
        results = recognizer.run(reqs, batch_size=batch_size, progress=progress, task=task)
        if predictions is not None:
            predictions[task] = results
        sc = evaluate.score_predictions(task, golds, results, phones_of)
        main = sc[evaluator]
        scores[task] = {"p": main["p"], "r": main["r"], "f1": main["f1"], **sc}
    return scores


# ----------------------------------------------------------------------------------------------------------
# printing


def format_result(res):
    """A readable block for one result (terminal output)."""
    head = f"[{res['task']}] {res.get('wav') or ''}".rstrip()
    lines = [head, f"  output: {res['output']}"]
    for e in res.get("entities", []):
        where = f"{e['start']}-{e['end']}" if e["start"] is not None else "unaligned"
        lines.append(f"  {e['type']:<4} {where:>9}  {e['text']}")
    for w in res.get("warnings", []):
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# command line


JSONL_KEYS = ("text", "wav", "id")
JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "an array",
              dict: "an object", type(None): "null"}


def read_jsonl_requests(path):
    """{"text"?, "wav"?, "id"?} per line: text a non-blank string, wav the path of a file (a relative one is taken
    relative to the jsonl file's folder), id a string or an integer (default: the line number). Anything else,
    unknown keys included (a typo would otherwise drop an input silently), is files.InputError 'FILE:LINE: why'."""
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
        reqs.append(Request(text=obj.get("text"), wav=wav, id=str(uid)))
    if not reqs:
        raise files.InputError(f"{path}: no inputs")
    return reqs


# the flag that sets each DecodeOptions field (error messages name it)
OPTION_FLAGS = {"beam": "--beam", "max_len": "--max-len", "no_repeat_ngram_size": "--no-repeat-ngram",
                "ctc_weight": "--ctc-weight", "ctc_candidates": "--ctc-candidates", "asr": "--asr",
                "constrain": "--no-constrain", "pool_chars": "--char-score", "entity_bias": "--entity-bias",
                "nbest": "--nbest", "pseudo_text_len": "--pseudo-len", "max_audio_seconds": "--max-audio-seconds",
                "modelscope_padding": "--modelscope-padding"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True, help="model checkpoint (.pt from train.py or weights.py)")
    a("--text", nargs="+", help="input sentence(s): TNER, or MNER together with --wav (paired in order)")
    a("--wav", nargs="+", help="input wav file(s): SNER, or MNER together with --text")
    a("--input", help="JSON lines file, one {\"text\"?, \"wav\"?, \"id\"?} per line (wav relative to the file)")
    a("--dataset", help="decode a corpus split instead: cnerta | aishell_ner | demo | msra | image4imner")
    a("--data-dir", help="folder of the dataset files (demo: built automatically when omitted)")
    a("--audio-dir", help="folder searched for the corpus wavs (default DATA_DIR/wav)")
    a("--split", default="test", help="dataset split: train | dev | test (default test)")
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
    a("--asr", action="store_true", help="plain MMSpeech speech recognition (no text stream, no modality embedding), "
                                        "outputs carry tokens; the parity mode against ModelScope")
    a("--batch-size", type=int, default=8, help="inputs per batch (default 8)")
    a("--modelscope-padding", action="store_true",
      help="reproduce ModelScope's batch-dependent encoder padding and keep the input order in batches (to match "
           "reference_decode.py batches of more than one wav; results then depend on the batch)")
    a("--device", help="cpu | cuda | cuda:N (default cuda when available)")
    a("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model precision")
    a("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    a("--pseudo-len", type=int, help="length of the pseudo text for SNER (default: as trained, else 40)")
    a("--max-audio-seconds", type=float, default=MAX_AUDIO_SECONDS, help="refuse longer wavs (default 60)")
    a("--out", help="write JSON here (predictions as JSON lines; with --eval the scores) instead of stdout")
    a("--json", action="store_true", help="JSON lines on stdout even on a terminal (default: a table there)")
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
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.task and len(args.task) > 1 and not args.dataset:
        p.error("--task takes one task unless --dataset is given")
    if args.threads < 0:
        p.error(f"--threads must be >= 0 (0 = torch default), got {args.threads}")
    args.options = DecodeOptions(
        beam=1 if args.greedy else args.beam, max_len=args.max_len, no_repeat_ngram_size=args.no_repeat_ngram,
        ctc_weight=args.ctc_weight, ctc_candidates=args.ctc_candidates, asr=args.asr,
        constrain=not args.no_constrain, pool_chars=args.char_score == "pooled", entity_bias=args.entity_bias,
        nbest=args.nbest, pseudo_text_len=args.pseudo_len, max_audio_seconds=args.max_audio_seconds,
        modelscope_padding=args.modelscope_padding)
    try:
        args.options.check(OPTION_FLAGS)
    except files.InputError as e:
        p.error(str(e))
    if args.device is not None:
        try:
            args.device = parse_device(args.device)
        except files.InputError as e:
            p.error(str(e))
    return args


def main(argv=None):
    args = get_args(argv)
    with files.cli_errors("decode.py"):  # bad inputs: one line; bugs keep their traceback
        _main(args)


def _main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    # every input path and output location before the model and the decoding
    for flag, path in (("--out", args.out), ("--predictions", args.predictions)):
        if path is not None:
            files.check_output_file(path, flag)
    for flag, paths in (("--input", [args.input] if args.input else []), ("--wav", args.wav or [])):
        for path in paths:
            if os.path.isdir(path):
                raise files.InputError(f"{flag} {path}: is a directory, expected a file")
            if not os.path.isfile(path):
                raise files.InputError(f"{flag} {path}: not found")
    rec = Recognizer(args.ckpt, args.options, device=args.device, dtype=getattr(torch, args.dtype))
    progress = args.progress if args.progress is not None else (sys.stderr.isatty() and not (args.text or args.wav))
    if args.dataset:
        return _main_dataset(args, rec, progress, t0)
    if args.input:
        reqs = read_jsonl_requests(args.input)
    else:
        reqs = [Request(text=args.text[i] if args.text else None, wav=args.wav[i] if args.wav else None, id=str(i))
                for i in range(len(args.text or args.wav))]
    results = rec.run(reqs, batch_size=args.batch_size, progress=progress, task=args.task[0] if args.task else None)
    _emit(args, results)
    print(f"decode.py: {len(results)} inputs in {time.time() - t0:.1f} s", file=sys.stderr)


def _emit(args, results):
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if args.out:
        files.write_atomic(args.out, lines)
    elif sys.stdout.isatty() and not args.json:
        print("\n".join(format_result(r) for r in results))
    else:
        sys.stdout.write(lines)


def _main_dataset(args, rec, progress, t0):
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
        _emit(args, results)
        return
    preds = {}
    scores = evaluate_split(None, samples, tasks=tasks, batch_size=args.batch_size, evaluator=args.evaluator,
                      progress=progress, recognizer=rec, predictions=preds)
    report = {"dataset": args.dataset, "split": args.split, "ckpt": args.ckpt, "sentences": len(samples),
              "options": dataclasses.asdict(rec.options), "scores": scores,
              "seconds": round(time.time() - t0, 1)}
    text = json.dumps(report, ensure_ascii=False, indent=1) + "\n"
    if args.out:
        files.write_atomic(args.out, text)
    elif not sys.stdout.isatty() or args.json:
        sys.stdout.write(text)
    if args.predictions:
        files.write_atomic(args.predictions, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                     for task in tasks for r in preds[task]))
    print(evaluate.format_scores(scores), file=sys.stderr if not sys.stdout.isatty() or args.json else sys.stdout)


if __name__ == "__main__":
    main()
