"""
search.py: how an IMAGE model's output is searched: the beam search, the bracket constraint, the joint CTC scorer,
under the search fields of options.DecodeOptions. Tensors in, hypotheses out; decode.py turns inputs into encoder
outputs and hypotheses into entities.

- beam_search: fairseq's SequenceGenerator + BeamSearch (what ModelScope's MMSpeech pipeline runs), token for
  token, over the explicit KV cache of image.py: encode once, decode one token per step for all live beams of all
  live sentences, drop sentences as soon as they have `beam` finished hypotheses.
- BracketConstraint (TNER/MNER): the output is the input text with well-nested entity brackets inserted; the known
  character is scored with the whole character mass.
- CTCPrefixScorer (SNER): joint CTC/attention decoding with the encoder's phone CTC head.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from options import DecodeOptions
from text import BOS, CLOSE_OF, EOS, MAX_DEPTH, OPEN_OF, PAD, TO_FULLWIDTH, TYPES


# ----------------------------------------------------------------------------------------------------------
# search results


@dataclass
class Hypothesis:
    tokens: list            # generated ids, without BOS and without the final EOS
    score: float            # length-normalised log-probability (fairseq convention, EOS counted)
    positional_scores: list  # per-token log-probabilities, the last one is EOS's
    finished: bool = True   # False only when the search was cut at max_len without any EOS (never in fairseq)
    positional_gains: list | None = None   # per token, what the biases added to its score (--entity-bias, the
    #                                        entity list); None: no bias was on. Confidences take them off.

    def unbiased_scores(self) -> list:
        """positional_scores without what the biases added: the model's own log-probabilities."""
        if self.positional_gains is None:
            return self.positional_scores
        return [lp - g for lp, g in zip(self.positional_scores, self.positional_gains)]


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


def beam_search(model, enc, cfg: DecodeOptions, constraint=None, max_lens=None, scorer=None, boost=None):
    """Beam search for every input of `enc`. -> list (one per input) of up to `beam` Hypothesis, best first.

    model: new_cache(enc, max_len) / decode_step(tokens (N,), cache, vocab_limit) -> (N, V) logits, V cut to
        vocab_limit when given / cache.reorder(index).
    constraint: optional per-row token filter (BracketConstraint): start(); mask(step, row_max_lens, vocab,
        device) -> (N, V) bool of allowed tokens on device, applied before log_softmax; rescore(logits) -> logits;
        bias(lprobs) -> lprobs after log_softmax (biases() -> whether it adds anything); reorder(rows);
        advance(new_tokens). What bias and boost add to the chosen tokens is kept apart (Hypothesis.positional_gains),
        so that confidences can take it off.
    scorer: optional joint scorer (CTCPrefixScorer): start(); score(lprobs, gained) -> (N, V) scores that replace
        the log-probs after every mask and bias (gained: what the biases added, or None); select(rows, new_tokens).
    boost: optional per-row bonus (entitylist.SpellingBoost): start(); bias(lprobs) -> lprobs, added after the
        constraint and before the scorer (its candidate pre-selection sees the bonus, and the model's own best
        without it); select(rows, new_tokens).
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
    cache = model.new_cache(enc, longest + 2)   # one row per input: beams are made by the first reorder
    if constraint is not None:
        constraint.start()
    if scorer is not None:
        scorer.start()
    if boost is not None:
        boost.start()

    # Row r belongs to live sentence r // width; width = 1 at step 0 (fairseq scores only beam 0 there).
    # The bookkeeping of which sentences live and how long they may run stays on the host (max_lens, live): no
    # device read is needed to decide what ends or what the constraint allows.
    live = torch.arange(batch)                                    # (A,) original index of each live sentence, host
    width = 1
    tokens = torch.full((batch, longest + 2), cfg.pad, dtype=torch.long, device=dev)   # (N, longest+2)
    tokens[:, 0] = cfg.bos
    scores = torch.zeros(batch, longest + 1, device=dev)          # (N, longest+1) cumulative log-probs
    biased = boost is not None or (constraint is not None and getattr(constraint, "biases", lambda: False)())
    gains = torch.zeros(batch, longest + 1, device=dev) if biased else None   # (N, longest+1) cumulative biases
    ignore = torch.zeros(batch, beam, dtype=torch.bool, device=dev)   # fairseq cands_to_ignore
    finalized = [[] for _ in range(batch)]

    # ids >= the constraint range's end are always banned: the LM head skips them (same search, fewer FLOPs)
    vocab_limit = None if cfg.constraint_range is None else cfg.constraint_range[1]
    for step in range(longest + 1):
        logits = model.decode_step(tokens[:, step], cache, vocab_limit=vocab_limit).float()   # (N, V')
        vocab = logits.size(-1)
        if cfg.constraint_range is not None:
            logits[:, 4:cfg.constraint_range[0]] = -math.inf
        row_max = max_lens[live].repeat_interleave(width)         # (N,) host
        if constraint is not None:                                # renormalise over what the brackets allow
            allowed = constraint.mask(step, row_max.tolist(), vocab, dev)
            logits = constraint.rescore(logits).masked_fill(~allowed, -math.inf)
        lprobs = F.log_softmax(logits, dim=-1)                    # (N, V)
        raw = lprobs.clone() if biased else None                  # what the model says, before any bias
        if constraint is not None:
            lprobs = constraint.bias(lprobs)
        if step < cfg.min_len:
            lprobs[:, cfg.eos] = -math.inf
        lprobs = lprobs.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        lprobs[:, cfg.pad] = -math.inf
        at_max = row_max <= step                                  # (N,) host: rows that may only end now
        if bool(at_max.any()):
            eos_col = lprobs[:, cfg.eos].clone()
            lprobs.masked_fill_(at_max.to(dev)[:, None], -math.inf)
            lprobs[:, cfg.eos] = eos_col
        if cfg.no_repeat_ngram_size > 0 and not isinstance(constraint, BracketConstraint):   # copies: no block
            _block_repeated_ngrams(lprobs, tokens, step, cfg.no_repeat_ngram_size)
        if boost is not None:
            lprobs = boost.bias(lprobs)
        gained = (lprobs - raw).nan_to_num(0.0, 0.0, 0.0) if biased else None   # (N, V); -inf rows are never taken
        if scorer is not None:
            lprobs = scorer.score(lprobs, gained)

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
        cand_gains = None
        if biased:                                                # (A, k) cumulative gains of the candidates
            flat = gained.view(n_live, width * vocab).gather(1, cand_flat)
            cand_gains = flat if step == 0 else flat + gains[:, step - 1].gather(0, cand_rows.flatten()).view_as(flat)
        done_now = _finalize(is_eos[:, :beam], cand_rows, cand_scores, tokens, scores, step, live, finalized,
                             max_lens, cfg, gains, cand_gains)
        at_end = max_lens[live] <= step                            # (A,) host
        for a in (at_end & ~done_now).nonzero().flatten().tolist():   # no finite EOS at max_len: keep the best
            sent = int(live[a])
            if not finalized[sent]:
                best = a * width + (int(scores[a * width: (a + 1) * width, step - 1].argmax()) if step else 0)
                finalized[sent].append(Hypothesis(tokens[best, 1: step + 1].tolist(), -math.inf, [], False))
        keep = ~(done_now | at_end)
        if not keep.any():
            break

        # each remaining sentence continues with its best `beam` non-EOS candidates, in candidate order
        kept = keep.nonzero().flatten().to(dev)                    # (A',) index_select: no device read, unlike [bool]
        skip = is_eos.clone()
        skip[:, :beam] |= ignore
        order = skip.long() * k + torch.arange(k, device=dev)      # non-EOS first, then by rank
        picked_key, picked = torch.topk(order.index_select(0, kept), beam, dim=1, largest=False)   # (A', beam)
        ignore = picked_key >= k
        rows = cand_rows.index_select(0, kept).gather(1, picked).flatten()   # (A'*beam,) source row of each beam
        tokens = tokens[rows]
        tokens[:, step + 1] = cand_tokens.index_select(0, kept).gather(1, picked).flatten()
        scores = scores[rows]
        scores[:, step] = cand_scores.index_select(0, kept).gather(1, picked).flatten()
        if biased:
            gains = gains[rows]
            gains[:, step] = cand_gains.index_select(0, kept).gather(1, picked).flatten()
        live = live[keep]
        width = beam
        cache.reorder(rows)
        if constraint is not None or scorer is not None or boost is not None:   # host state machines: one read
            rows_list, new_tokens = torch.stack((rows, tokens[:, step + 1])).tolist()
        if constraint is not None:
            constraint.reorder(rows_list)
            constraint.advance(new_tokens)
        if scorer is not None:
            scorer.select(rows_list, new_tokens)
        if boost is not None:
            boost.select(rows_list, new_tokens)

    for hyps in finalized:                                         # best first (stable for equal scores)
        hyps.sort(key=lambda h: -h.score)
    return finalized


def _finalize(eos_top, cand_rows, cand_scores, tokens, scores, step, live, finalized, max_lens, cfg, gains=None,
              cand_gains=None):
    """Store the hypotheses ending with EOS among the top `beam` candidates. -> (A,) bool: sentence done.
    gains, cand_gains: the cumulative biases of the rows and of the candidates (None: no bias on)."""
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
    gained = [None] * len(rows)
    if gains is not None:
        gained = torch.cat([gains[rows, :step], cand_gains[a_idx, j_idx][:, None]], dim=1)
        gained[:, 1:] = gained[:, 1:] - gained[:, :-1]
        gained = gained.tolist()
    normalised = eos_scores / (step + 1) ** cfg.len_penalty
    hyp_tokens = tokens[rows, 1: step + 1].tolist()
    positional, normalised, live = positional.tolist(), normalised.tolist(), live.tolist()
    for i, (a, j) in enumerate(hits.tolist()):
        sent = live[a]
        if len(finalized[sent]) < beam:
            finalized[sent].append(Hypothesis(hyp_tokens[i], normalised[i], positional[i],
                                              positional_gains=gained[i]))
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

    listed, list_weight: a user's entity list (entitylist.py): listed[i] = entitylist.occurrences of the list in
    input i ({start: {type: ends}}, or None). An opening bracket of a listed type where an occurrence starts gains
    list_weight x the longest such occurrence's length (once: not again inside its own bracket); its closing bracket
    keeps list_weight x the entity's length if it closes at the end of an occurrence of its type, else takes the
    whole gain back, and so does the character (or an opening bracket, which needs one) that would carry it past
    the last end: at once, not at the end of the sentence, so that a hypothesis holding a gain it must lose does
    not crowd the others out of the beam.

    pool_chars: the known next character is scored with the model's whole character mass (every token that is
    not a bracket or EOS), not its own probability. The text is given, so the only question at each step is
    "bracket, or the next character?": a model unsure between homophones (it reads phones) then does not push
    probability into brackets. False = each character's own probability.
    """

    def __init__(self, char_ids, open_ids, close_ids, max_depth=MAX_DEPTH, pool_chars=True, entity_bias=0.0,
                 listed=None, list_weight=0.0):
        self.char_ids = [list(ids) for ids in char_ids]          # per input: decoder id of each text character
        self.listed = list(listed) if listed is not None else [None] * len(self.char_ids)
        self.list_weight = float(list_weight)
        if not 0 <= self.list_weight < math.inf:
            raise ValueError(f"list_weight must be a finite number >= 0, got {list_weight}")
        self.open_ids = [open_ids[t] for t in TYPES]
        self.close_ids = [close_ids[t] for t in TYPES]
        self.max_depth = max_depth
        self.pool_chars = pool_chars
        self.entity_bias = finite_bias(entity_bias)
        self.brackets = set(self.open_ids) | set(self.close_ids)
        self.structural = [BOS, PAD, EOS, *self.brackets]       # not characters: outside the pooled mass
        self._structural_masks = {}                              # (vocab, device) -> (V,) bool, see rescore
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

    def allowed_pairs(self, step, row_max_lens):
        """-> (rows, tokens): lists of the (row, token) pairs allowed at this step, those that still end by the
        row's max_len. A handful per row: the search moves these, not an (N, V) mask, to the device."""
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
        return rows_idx, cols

    def mask(self, step, row_max_lens, vocab, device="cpu"):
        """(N, V) bool on `device`: tokens each row may emit at this step (and still end by its max_len). Built
        there from allowed_pairs: one (2, pairs) index copy per step instead of N x V bytes (MBs for MMSpeech)."""
        index = torch.tensor(self.allowed_pairs(step, row_max_lens), dtype=torch.long).to(device)   # (2, pairs)
        allowed = torch.zeros(len(self.rows), vocab, dtype=torch.bool, device=device)
        allowed[index[0], index[1]] = True
        return allowed

    def _structural_mask(self, vocab, device):
        """(V,) bool of the structural ids, built once per (vocab, device) of a search, not every step."""
        key = (vocab, str(device))
        if key not in self._structural_masks:
            structural = torch.zeros(vocab, dtype=torch.bool)
            structural[self.structural] = True
            self._structural_masks[key] = structural.to(device)
        return self._structural_masks[key]

    def rescore(self, logits):
        """(N, V) logits -> (N, V), with pool_chars: each row's next input character gets the log of the summed
        exp-logits of all non-structural tokens (a literal bracket character in the text keeps its own)."""
        if not self.pool_chars:
            return logits
        pairs = []                                               # (row, its next character)
        for r, (sent, pos, _, _) in enumerate(self.rows):
            ids = self.char_ids[sent]
            if pos < len(ids) and ids[pos] not in self.brackets:
                pairs.append((r, ids[pos]))
        if not pairs:
            return logits
        structural = self._structural_mask(logits.size(-1), logits.device)
        mass = torch.logsumexp(logits.masked_fill(structural, -math.inf), dim=-1)   # (N,)
        rows, chars = torch.tensor(pairs, dtype=torch.long).to(logits.device).T   # (pairs,) each: one copy
        logits = logits.clone()
        logits[rows, chars] = mass[rows]
        return logits

    def biases(self) -> bool:
        """Whether bias() adds anything (entity_bias, or a list with a weight)."""
        return bool(self.entity_bias) or bool(self.list_weight and any(self.listed))

    def bias(self, lprobs):
        """(N, V) log-probs -> (N, V) with entity_bias added to the opening brackets and the entity list's gains
        and take-backs (class docstring) to the brackets of the rows that have them."""
        if self.entity_bias:
            lprobs[:, self.open_ids] += self.entity_bias
        if not self.list_weight or not any(self.listed):
            return lprobs
        rows, cols, values = [], [], []
        for r, (sent, pos, stack, _) in enumerate(self.rows):
            listed = self.listed[sent]
            if not listed:
                continue
            for t, ends in listed.get(pos, {}).items():          # open where a listed string of type t starts,
                if (TYPES.index(t), pos) not in stack:           # once: not again inside its own bracket
                    rows.append(r), cols.append(self.open_ids[TYPES.index(t)])
                    values.append(self.list_weight * (ends[-1] - pos))
            for depth, (t, start) in enumerate(stack):
                ends = listed.get(start, {}).get(TYPES[t])
                if not ends or pos > ends[-1] or (t, start) in stack[:depth] or any(
                        s >= ends[-1] for _, s in stack[depth + 1:]):
                    continue                                     # no gain (an outer twin holds it) or given back
                gain = self.list_weight * (ends[-1] - start)
                if depth == len(stack) - 1:                      # its close keeps the gain at an occurrence's end
                    rows.append(r), cols.append(self.close_ids[t])
                    values.append(self.list_weight * (pos - start) - gain if pos in ends else -gain)
                if pos == ends[-1]:                              # the next character, or a bracket opening
                    ahead = sorted(set(self.char_ids[sent][pos: pos + 1] + self.open_ids))   # (which needs one)
                    rows += [r] * len(ahead)                     # would carry it past the last end: given back
                    cols += ahead
                    values += [-gain] * len(ahead)
        if rows:
            index = torch.tensor([rows, cols], dtype=torch.long, device=lprobs.device)
            lprobs.index_put_((index[0], index[1]), torch.tensor(values, dtype=lprobs.dtype, device=lprobs.device),
                              accumulate=True)
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


def platt(log_conf, a, b) -> float:
    """Platt scaling of a confidence c = exp(log_conf): sigmoid(a logit(c) + b); (1, 0) leaves it as it is."""
    c = min(max(math.exp(log_conf), 1e-6), 1 - 1e-6)
    z = a * math.log(c / (1 - c)) + b
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def entity_log_confidence(tokens, positional_scores, open_ids, close_ids, width, char_ids=None, inside=True):
    """How sure the search was of each entity of one hypothesis: the log-probability of writing it as it stands,
    its opening bracket there, each token inside it that is not a bracket (SNER: the entity's characters;
    constrained: going on without a bracket at that character), and its closing bracket there, each against every
    other token at that step (the model's per-token log-probs, Hypothesis.unbiased_scores: no --entity-bias, no list
    bonus; constrained: renormalised over what the brackets allow; inside=False: the brackets only). -> {(start, end, type): log-confidence
    <= 0} in the hypothesis's character offsets. width(token): characters a non-bracket token writes; char_ids
    (constrained): the input's ids, a token equal to the next one being that character first (a literal bracket in
    the text), as spans_from_constrained replays it. Brackets pair as data.parse pairs them: a close with the
    innermost open of its type; an entity written twice keeps its best."""
    open_type = {open_ids[t]: t for t in TYPES}
    close_type = {close_ids[t]: t for t in TYPES}
    pos, stack, found, inside_sum = 0, [], {}, 0.0       # summed log-probs of the non-bracket tokens so far
    for tok, lp in zip(tokens, positional_scores):
        if char_ids is not None and pos < len(char_ids) and tok == char_ids[pos]:
            pos, inside_sum = pos + 1, inside_sum + lp
        elif tok in open_type:
            stack.append((open_type[tok], pos, lp, inside_sum))
        elif tok in close_type:
            depth = next((d for d in range(len(stack) - 1, -1, -1) if stack[d][0] == close_type[tok]), None)
            if depth is not None:
                kind, start, lp_open, inside_before = stack.pop(depth)
                if start < pos:
                    key = (start, pos, kind)
                    within = inside_sum - inside_before if inside else 0.0
                    found[key] = max(found.get(key, -math.inf), min(0.0, lp_open + within + lp))
        else:
            pos, inside_sum = pos + width(tok), inside_sum + lp
    return found


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

    def score(self, lprobs, gained=None):
        """(N, V) decoder log-probs (masks and biases applied) -> (N, V) joint scores; remembers the candidates'
        states. gained (N, V): what biases added to lprobs (None: none); the candidates are then the best
        `candidates` characters with the biases and the best without."""
        vocab, w = lprobs.size(1), self.weight
        att = lprobs.float()
        joint = torch.full_like(att, -math.inf)
        silent = torch.tensor([t for t in self.silent if t < vocab], device=att.device)
        joint[:, silent] = att[:, silent]
        end = (self.frames[self.sent] - 1)[:, None]              # (N, 1)
        full = torch.logaddexp(self.rn.gather(1, end), self.rb.gather(1, end))[:, 0]
        joint[:, self.eos] = att[:, self.eos] + w * (full - self.psi)
        chars = att.index_fill(1, torch.cat([silent, torch.tensor([self.eos], device=att.device)]), -math.inf)
        k = min(self.candidates, vocab)
        top_val, top_tok = chars.topk(k, dim=1)                  # (N, K)
        if gained is not None:                                   # and the model's own best (a list's bonus must
            own_tok = (chars - gained).topk(k, dim=1)[1]         # not crowd the heard character out): (N, 2K)
            top_tok = torch.cat([top_tok, own_tok], 1)
            top_val = chars.gather(1, top_tok)
        rows, toks, phones = [], [], []
        for r, (vals, tks) in enumerate(zip(top_val.tolist(), top_tok.tolist())):
            seen = set()
            for v, tok in zip(vals, tks):
                if v == -math.inf or tok in seen:
                    continue
                seen.add(tok)
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
