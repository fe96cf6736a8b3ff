"""decode.py: beam search (fairseq semantics), constrained bracket decoding, reference parity, CLI, evaluate_split."""
import copy
import dataclasses
import itertools
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import align  # noqa: E402
import audio  # noqa: E402
import data  # noqa: E402
import decode  # noqa: E402
import recognize  # noqa: E402
import devices  # noqa: E402
import evaluate  # noqa: E402
import scoring  # noqa: E402
import files  # noqa: E402
import search  # noqa: E402
import text  # noqa: E402
import weights  # noqa: E402
from options import SEARCH_DEFAULTS, DecodeOptions  # noqa: E402
from search import beam_search  # noqa: E402
from numerics import excess, fp32_tol, model_terms  # noqa: E402
from test_evaluate import result  # noqa: E402
from test_image import select_rows  # noqa: E402
from text import BOS, EOS, PAD  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


# ------------------------------------------------------------------------------------------------------------
# a toy step model: second-order Markov table + per-input bias (see reference/ref_beam_toy_make.py)


@dataclass
class ToyEncoded:
    hidden: torch.Tensor            # (B, 1, V): the per-input logit bias


class ToyCache:
    """Holds each row's token history, like a KV cache; reorder must move it with the beams."""

    def __init__(self, enc):
        self.bias = enc.hidden[:, 0]
        self.history = torch.zeros(enc.hidden.size(0), 0, dtype=torch.long)
        self.rows_seen = []

    def reorder(self, index):
        self.bias, self.history = self.bias[index], self.history[index]


class Toy:
    def __init__(self, A, B, P):
        self.A, self.B, self.P = A, B, P
        self.last_cache = None

    def new_cache(self, enc, max_len):
        self.last_cache = ToyCache(enc)
        return self.last_cache

    def decode_step(self, tokens, cache, vocab_limit=None):
        cache.rows_seen.append(tokens.numel())
        cache.history = torch.cat([cache.history, tokens[:, None]], 1)
        return self.logits_from_history(cache.history, cache.bias)[:, :vocab_limit]

    def logits_from_history(self, history, bias):
        t = history.size(1)
        x = self.A[history[:, -1]]
        if t >= 2:
            x = x + self.B[history[:, -2]]
        return (x + self.P[t - 1]) + bias


def random_toy(seed, V=14, L=48, batch=5, eos_boost=1.0, loops=2.0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(V, V, generator=g) * 2.0
    B = torch.randn(V, V, generator=g)
    P = torch.randn(L, V, generator=g) * 0.5
    E = torch.randn(batch, V, generator=g)
    A[:, EOS] += eos_boost
    A[torch.arange(4, V), torch.arange(4, V)] += loops
    return Toy(A, B, P), ToyEncoded(E[:, None, :])


def running_sum_tol(positional_scores, vocab):
    """Tolerance of one hypothesis' positional scores. fairseq keeps a float32 running score (a sum of
    len(positional_scores) log-softmax values, each a reduction over `vocab` logits) and reports differences of
    it, so each carries the rounding of the running score's size: k * EPS * sqrt(len * vocab) * |running score|.
    The score is the running score / len**len_penalty: divide by that too."""
    return fp32_tol(sum(positional_scores), len(positional_scores) * vocab)


def model_score_tol(model_config, logits, positional_scores, vocab):
    """Tolerance of the positional scores of a search over a real model, and of a score (their mean): the sum of
    three independent roundings, those of the logits (model_terms sums of values of the logits' size; numerics.py),
    of the log_softmax (a sum over the vocabulary, of values of the positional scores' size) and of fairseq's float32
    running score they are differences of (one rounding of its size, n = 1: ms_tiny_b's 32 steps reach -190, whose
    float32 step 1.5e-5 is what its positional scores differ by). The score = running score / len carries
    sqrt(len) such roundings / len: less."""
    return (fp32_tol(logits, model_terms(model_config)) + fp32_tol(positional_scores, vocab)
            + fp32_tol(sum(positional_scores), 1))


def ctc_tol(logp, value):
    """CTC sums (brute force or the prefix recursion) add T log-probabilities along a path and logaddexp <= C
    paths per frame: n = T x C terms of the size of logp or of the result, whichever is larger."""
    return fp32_tol(torch.cat([logp.flatten(), torch.tensor([value])]).clamp(min=-1e30), logp.numel())


def hyps_as_lists(results):
    return [[(h.tokens, h.score) for h in hyps] for hyps in results]


# ------------------------------------------------------------------------------------------------------------
# a slow, obviously-correct fairseq beam search for one input (lists and loops, no batching)


def slow_search(toy, bias, cfg, max_len, allowed_fn=None, pooled_char_fn=None, joint_fn=None):
    cfg = cfg.resolve()              # unset settings: SEARCH_DEFAULTS, as beam_search reads them
    V = toy.A.size(0)
    beam = cfg.beam
    beams = [([BOS], [])]            # (tokens with BOS, cumulative scores per generated token)
    finalized, ignore = [], [False] * beam
    for step in range(max_len + 1):
        cands = []
        for b, (toks, cum) in enumerate(beams[: 1 if step == 0 else beam]):
            logits = toy.logits_from_history(torch.tensor([toks]), bias[None])[0].clone()
            if cfg.constraint_range:
                logits[4:cfg.constraint_range[0]] = -math.inf
                logits[cfg.constraint_range[1]:] = -math.inf
            if pooled_char_fn is not None and pooled_char_fn(toks[1:]) is not None:
                chars = [v for v in range(V) if v not in STRUCTURAL]
                logits[pooled_char_fn(toks[1:])] = torch.logsumexp(logits[chars], 0)
            if allowed_fn is not None:
                ok = torch.zeros(V, dtype=torch.bool)
                ok[allowed_fn(toks[1:], step, max_len)] = True
                logits[~ok] = -math.inf
            lp = torch.log_softmax(logits, -1)
            if step < cfg.min_len:
                lp[EOS] = -math.inf
            lp[PAD] = -math.inf
            if step >= max_len:
                keep = lp[EOS].clone()
                lp[:] = -math.inf
                lp[EOS] = keep
            n = cfg.no_repeat_ngram_size
            if n and allowed_fn is None and step + 2 - n >= 0:
                context = toks[len(toks) - (n - 1):] if n > 1 else []
                for j in range(0, len(toks) - n + 1):
                    if toks[j:j + n - 1] == context:
                        lp[toks[j + n - 1]] = -math.inf
            if joint_fn is not None:
                lp = joint_fn(toks[1:], lp)
            total = lp + (torch.tensor(cum[-1]) if step else torch.tensor(0.0))
            cands += [(float(total[v]), b * V + v, b, v) for v in range(V)]
        cands.sort(key=lambda c: -c[0])
        k = min(2 * beam, len(cands) - 1)
        cands = cands[:k]
        skip = []
        for j, (score, _, b, v) in enumerate(cands):
            is_eos = v == EOS and score != -math.inf and not (j < beam and ignore[j])
            if is_eos and j < beam and len(finalized) < beam:
                toks, cum = beams[b]
                cums = cum + [score]
                pos = [cums[0]] + [float(torch.tensor(cums[i]) - torch.tensor(cums[i - 1]))
                                   for i in range(1, len(cums))]
                finalized.append((toks[1:], float(torch.tensor(score) / (step + 1) ** cfg.len_penalty), pos))
            skip.append(is_eos or (j < beam and ignore[j]))
        if len(finalized) == beam or step >= max_len:
            break
        order = [j for j in range(k) if not skip[j]] + [j for j in range(k) if skip[j]]
        picks = order[:beam]
        ignore = [skip[j] for j in picks]
        beams = [(beams[cands[j][2]][0] + [cands[j][3]], beams[cands[j][2]][1] + [cands[j][0]]) for j in picks]
    finalized.sort(key=lambda h: -h[1])
    return finalized


# ------------------------------------------------------------------------------------------------------------
# beam search


def test_beam_search_equals_modelscope_sequence_generator():
    """Toy model, batch of 6, five settings: n-best lists equal what ModelScope's SequenceGenerator returned."""
    ref = json.loads((FIXTURES / "ref_beam_toy.json").read_text())
    for rec in ref["records"]:
        c = rec["config"]
        T = lambda k: torch.tensor(rec[k], dtype=torch.float32)  # noqa: E731
        cfg = DecodeOptions(beam=c["beam"], max_len=c["max_len"], min_len=c["min_len"],
                           no_repeat_ngram_size=c["no_repeat_ngram_size"], len_penalty=c["len_penalty"],
                           constraint_range=tuple(c["constraint_range"]) if c["constraint_range"] else None)
        results = beam_search(Toy(T("A"), T("B"), T("P")), ToyEncoded(T("E")[:, None, :]), cfg)
        assert len(results) == len(rec["nbest"])
        for hyps, expected in zip(results, rec["nbest"]):
            assert [h.tokens + [EOS] for h in hyps] == [e["tokens"] for e in expected], c   # identical n-best
            for h, e in zip(hyps, expected):
                tol = running_sum_tol(e["positional_scores"], len(rec["A"]))
                assert excess(h.positional_scores, e["positional_scores"], tol) <= 1
                assert excess(h.score, e["score"], tol / len(h.positional_scores) ** c["len_penalty"]) <= 1


def test_beam_fixture_tolerance_catches_planted_bugs():
    """Logits 0.1 % too large (a temperature bug) move positional scores, and length penalty +0.01 moves scores,
    by >= 10x the tolerances of the test above (measured >= 13x and >= 3600x)."""
    ref = json.loads((FIXTURES / "ref_beam_toy.json").read_text())
    for rec in ref["records"][:2]:
        c = rec["config"]
        T = lambda k: torch.tensor(rec[k], dtype=torch.float32) * 1.001  # noqa: E731
        cfg = DecodeOptions(beam=c["beam"], max_len=c["max_len"], min_len=c["min_len"],
                           no_repeat_ngram_size=c["no_repeat_ngram_size"], len_penalty=c["len_penalty"] + 0.01,
                           constraint_range=tuple(c["constraint_range"]) if c["constraint_range"] else None)
        best = beam_search(Toy(T("A"), T("B"), T("P")), ToyEncoded(T("E")[:, None, :]), cfg)
        for h, e in zip((hyps[0] for hyps in best), (nbest[0] for nbest in rec["nbest"])):
            tol = running_sum_tol(e["positional_scores"], len(rec["A"]))
            assert h.tokens + [EOS] == e["tokens"]                       # the same path, other scores
            assert excess(h.positional_scores, e["positional_scores"], tol) >= 10
            assert excess(h.score, e["score"], tol / len(h.positional_scores) ** c["len_penalty"]) >= 10


@pytest.mark.parametrize("seed,beam,max_len,min_len,ngram,crange,lp,eos_boost", [
    (11, 5, 12, 1, 3, (4, 12), 1.0, 1.5),
    (12, 2, 15, 4, 2, None, 0.7, 2.0),
    (13, 6, 9, 1, 0, (5, 14), 1.3, 0.5),
    (14, 1, 14, 1, 4, None, 1.0, 1.0),
])
def test_beam_search_equals_slow_reference_and_batch_composition(seed, beam, max_len, min_len, ngram, crange, lp,
                                                                 eos_boost):
    toy, enc = random_toy(seed, eos_boost=eos_boost)
    cfg = DecodeOptions(beam=beam, max_len=max_len, min_len=min_len, no_repeat_ngram_size=ngram,
                       constraint_range=crange, len_penalty=lp)
    batched = beam_search(toy, enc, cfg)
    for i, hyps in enumerate(batched):
        slow = slow_search(toy, enc.hidden[i, 0], cfg, max_len)
        assert [h.tokens for h in hyps] == [s[0] for s in slow]
        for h, s in zip(hyps, slow):
            tol = running_sum_tol(s[2], toy.A.size(0))
            assert excess(h.positional_scores, s[2], tol) <= 1
            assert excess(h.score, s[1], tol / len(s[2]) ** lp) <= 1
        alone = beam_search(toy, ToyEncoded(enc.hidden[i:i + 1]), cfg)[0]
        assert hyps_as_lists([alone]) == hyps_as_lists([hyps])       # exactly what it gets alone
    # any order and any sub-batch give the same per-input results
    perm = [3, 0, 4, 1]
    shuffled = beam_search(toy, ToyEncoded(enc.hidden[perm]), cfg)
    assert hyps_as_lists(shuffled) == hyps_as_lists([batched[i] for i in perm])


def test_per_input_max_len_is_independent_of_the_batch():
    toy, enc = random_toy(5, eos_boost=-1.0)                   # rarely ends: lengths hit max_len
    cfg = DecodeOptions(beam=3, max_len=99, no_repeat_ngram_size=3, constraint_range=None)
    lens = [4, 9, 6, 12, 7]
    batched = beam_search(toy, enc, cfg, max_lens=lens)
    for i, hyps in enumerate(batched):
        alone = beam_search(toy, ToyEncoded(enc.hidden[i:i + 1]), cfg, max_lens=[lens[i]])[0]
        assert hyps_as_lists([alone]) == hyps_as_lists([hyps])
        assert all(len(h.tokens) <= lens[i] for h in hyps)
        assert [h.tokens for h in hyps] == [s[0] for s in slow_search(toy, enc.hidden[i, 0], cfg, lens[i])]


def test_finished_sentences_leave_the_batch_and_step_zero_uses_one_row():
    toy, enc = random_toy(21, eos_boost=4.0, batch=5)
    cfg = DecodeOptions(beam=4, max_len=30, no_repeat_ngram_size=0, constraint_range=None)
    results = beam_search(toy, enc, cfg)
    rows = toy.last_cache.rows_seen
    assert rows[0] == 5                                        # step 0: one row per input (beam 0 only)
    assert rows[1] == 5 * 4                                    # then beams
    assert all(a >= b for a, b in zip(rows[1:], rows[2:]))     # rows only ever shrink
    assert rows[-1] < 5 * 4                                    # sentences finished early were dropped
    longest = max(len(h.tokens) for hyps in results for h in hyps)
    assert len(rows) <= longest + 1
    for hyps in results:
        assert len(hyps) == 4 and all(h.finished and len(h.positional_scores) == len(h.tokens) + 1 for h in hyps)
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:                                          # score = sum of positional scores / length
            n = len(h.positional_scores)
            assert excess(h.score, sum(h.positional_scores) / n, running_sum_tol(h.positional_scores, 14) / n) <= 1


def test_greedy_is_beam_one_argmax():
    toy, enc = random_toy(8, eos_boost=1.0)
    cfg = DecodeOptions(beam=1, max_len=20, no_repeat_ngram_size=0, constraint_range=None)
    for i, hyps in enumerate(beam_search(toy, enc, cfg)):
        toks = [BOS]
        for step in range(21):
            logits = toy.logits_from_history(torch.tensor([toks]), enc.hidden[i])[0]
            logits[PAD] = -math.inf
            if step == 0:
                logits[EOS] = -math.inf                        # min_len 1
            nxt = EOS if step == 20 else int(logits.argmax())
            if nxt == EOS:
                break
            toks.append(nxt)
        assert hyps[0].tokens == toks[1:]


# ------------------------------------------------------------------------------------------------------------
# constrained decoding

TOY_OPEN = {"PER": 8, "LOC": 9, "ORG": 10}
TOY_CLOSE = {"PER": 11, "LOC": 12, "ORG": 13}
STRUCTURAL = {BOS, PAD, EOS, *TOY_OPEN.values(), *TOY_CLOSE.values()}


def valid_bracketing(seq, text, max_depth):
    """Independent check: seq strips to text, brackets nest, entities non-empty, no duplicate span, depth ok."""
    kinds = {v: ("open", t) for t, v in TOY_OPEN.items()} | {v: ("close", t) for t, v in TOY_CLOSE.items()}
    stack, spans, chars = [], [], []
    for tok in seq:
        if tok in kinds:
            kind, t = kinds[tok]
            if kind == "open":
                stack.append((t, len(chars)))
                if len(stack) > max_depth:
                    return False
            else:
                if not stack or stack[-1][0] != t or stack[-1][1] == len(chars):
                    return False
                spans.append((stack.pop(), len(chars)))
        else:
            chars.append(tok)
    return chars == text and not stack and len(spans) == len(set(spans))


def constrained_outputs(text, max_len, max_depth):
    """Every sequence the constraint lets through (DFS over its masks); also asserts there is no dead end."""
    c = search.BracketConstraint([text], TOY_OPEN, TOY_CLOSE, max_depth=max_depth)
    found = []

    def walk(rows, prefix):
        c.rows = rows
        allowed = c.mask(len(prefix), [max_len], 14)[0].nonzero().flatten().tolist()
        assert allowed, f"dead end after {prefix}"
        for tok in allowed:
            if tok == EOS:
                found.append(tuple(prefix))
                continue
            c.rows = rows
            c.advance([tok])
            walk(c.rows, prefix + [tok])

    c.start()
    walk(c.rows, [])
    return set(found)


@pytest.mark.parametrize("text,max_len,max_depth", [([4, 5], 6, 4), ([4, 4], 6, 4), ([4], 6, 4), ([4, 5], 6, 1),
                                                     ([4, 5, 4], 5, 4)])
def test_constraint_allows_exactly_the_valid_bracketings(text, max_len, max_depth):
    alphabet = sorted(set(text)) + list(TOY_OPEN.values()) + list(TOY_CLOSE.values())
    brute = {seq for k in range(len(text), max_len + 1) for seq in itertools.product(alphabet, repeat=k)
             if valid_bracketing(seq, text, max_depth)}
    assert constrained_outputs(text, max_len, max_depth) == brute
    assert (tuple(text)) in brute


def test_constraint_same_type_same_start_needs_distinct_ends():
    # <<a>b> is two ORG entities (a inside ab); <<ab>> would be the same span twice: refused, and <<a... may not
    # reach the end of the text with both still open
    outs = constrained_outputs([4, 5], 8, 4)
    assert (10, 10, 4, 13, 5, 13) in outs
    assert (10, 10, 4, 5, 13, 13) not in outs
    c = search.BracketConstraint([[4, 5]], TOY_OPEN, TOY_CLOSE)
    c.start()
    for tok in (10, 10, 4):
        c.advance([tok])
    allowed = c.mask(3, [8], 14)[0].nonzero().flatten().tolist()
    assert allowed == [TOY_CLOSE["ORG"]]                         # "b" would leave two ORG(0, 2): must close now


class TensorsMade(TorchFunctionMode):
    """Records (device type, numel) of every tensor a torch function returns inside the block."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.made.append((out.device.type, out.numel()))
        return out


def random_constraint_states(seed, texts, steps):
    """A BracketConstraint walked `steps` steps by random allowed tokens, rows shuffled by random reorders."""
    g = torch.Generator().manual_seed(seed)
    c = search.BracketConstraint(texts, TOY_OPEN, TOY_CLOSE)
    c.start()
    c.reorder(torch.randint(len(texts), (3 * len(texts),), generator=g).tolist())   # beams of random inputs
    for step in range(steps):
        rows, toks = c.allowed_pairs(step, [99] * len(c.rows))
        choice = [[t for r, t in zip(rows, toks) if r == row] for row in range(len(c.rows))]
        c.advance([opts[int(torch.randint(len(opts), (1,), generator=g))] for opts in choice])
        c.reorder(torch.randint(len(c.rows), (len(c.rows),), generator=g).tolist())
    return c


@pytest.mark.parametrize("seed", range(4))
def test_constraint_mask_is_built_on_the_device_from_the_allowed_pairs(seed):
    # the previous construction: an (N, V) host mask filled from the pairs, copied to the device by the search
    texts = [[4, 5, 6, 7, 4], [5, 5], [7, 6, 5, 4, 4, 5, 6]]
    c = random_constraint_states(seed, texts, steps=seed + 2)
    step, row_max, vocab = seed + 2, [len(texts[row[0]]) + 3 + seed for row in c.rows], 14
    before = torch.zeros(len(c.rows), vocab, dtype=torch.bool)
    before[c.allowed_pairs(step, row_max)] = True
    assert torch.equal(c.mask(step, row_max, vocab, torch.device("cpu")), before)
    # on another device (meta stands in for a GPU): no host tensor of N x V, the mask is made there
    wide = 21128                                               # MMSpeech's vocabulary
    with TensorsMade() as record:
        allowed = c.mask(step, row_max, wide, torch.device("meta"))
    assert allowed.device.type == "meta" and allowed.shape == (len(c.rows), wide)
    assert max(numel for kind, numel in record.made if kind == "cpu") <= 2 * len(c.rows) * 8   # the pairs only


def replay_allowed(text, max_depth=search.MAX_DEPTH):
    """allowed_fn for slow_search: a fresh constraint replayed over the hypothesis (no reorder involved)."""
    def allowed(prefix, step, max_len):
        c = search.BracketConstraint([text], TOY_OPEN, TOY_CLOSE, max_depth=max_depth)
        c.start()
        for tok in prefix:
            c.advance([tok])
        return c.mask(step, [max_len], 14)[0].nonzero().flatten().tolist()
    return allowed


def next_text_char(text):
    """pooled_char_fn for slow_search: the next input character of a prefix (texts here hold no bracket ids)."""
    return lambda prefix: (text[n] if (n := sum(t not in STRUCTURAL for t in prefix)) < len(text) else None)


@pytest.mark.parametrize("pool_chars", [True, False])
def test_constrained_beam_search_outputs_valid_and_matches_slow_reference(pool_chars):
    toy, enc = random_toy(31, batch=4, eos_boost=0.0, loops=0.0)
    texts = [[4, 5, 6, 7], [5, 5, 5], [7], [4, 6, 4, 6, 4, 6]]
    cfg = DecodeOptions(beam=4, max_len=99, no_repeat_ngram_size=3, constraint_range=None)
    max_lens = [len(t) + 4 for t in texts]
    constraint = search.BracketConstraint(texts, TOY_OPEN, TOY_CLOSE, pool_chars=pool_chars)
    results = beam_search(toy, enc, cfg, constraint=constraint, max_lens=max_lens)
    for i, (hyps, text) in enumerate(zip(results, texts)):
        assert len(hyps) == 4
        for h in hyps:
            assert h.finished and valid_bracketing(h.tokens, text, search.MAX_DEPTH), h.tokens
            assert len(h.tokens) <= max_lens[i]
            spans, complete, _ = search.spans_from_constrained(h.tokens, text, TOY_OPEN, TOY_CLOSE)
            assert complete
        slow = slow_search(toy, enc.hidden[i, 0], cfg, max_lens[i], allowed_fn=replay_allowed(text),
                           pooled_char_fn=next_text_char(text) if pool_chars else None)
        assert [h.tokens for h in hyps] == [s[0] for s in slow]
        assert all(excess(h.score, s[1], running_sum_tol(s[2], 14) / len(s[2])) <= 1 for h, s in zip(hyps, slow))


class FixedLogits:
    """A step model that always returns the same logits (no state)."""

    def __init__(self, logits):
        self.logits = logits

    def new_cache(self, enc, max_len):
        return ToyCache(enc)

    def decode_step(self, tokens, cache, vocab_limit=None):
        return self.logits.expand(tokens.numel(), -1)[:, :vocab_limit]


def test_pooled_characters_keep_homophone_doubt_out_of_the_brackets():
    # the model puts 70 % on "a character comes next", spread evenly over chars 4..7, and 30 % on an opening
    # PER bracket: token scoring lets the bracket beat the known character (17.5 %) and tags something;
    # pooled scoring compares the bracket with the whole character mass and tags nothing
    probs = torch.full((14,), 1e-9)
    probs[4:8] = 0.7 / 4
    probs[TOY_OPEN["PER"]] = 0.3
    model = FixedLogits(probs.log())
    enc = ToyEncoded(torch.zeros(1, 1, 14))
    cfg = DecodeOptions(beam=1, max_len=99, no_repeat_ngram_size=0, constraint_range=None)
    text = [4, 5, 6]
    pooled = beam_search(model, enc, cfg, search.BracketConstraint([text], TOY_OPEN, TOY_CLOSE), max_lens=[9])
    by_token = beam_search(model, enc, cfg, search.BracketConstraint([text], TOY_OPEN, TOY_CLOSE, pool_chars=False),
                           max_lens=[9])
    assert pooled[0][0].tokens == text
    assert TOY_OPEN["PER"] in by_token[0][0].tokens
    # the pooled score of a character step is log(0.7 / (0.7 + 0.3)), renormalised over the allowed tokens
    # one log_softmax over 14 logits and a logsumexp over the 4 characters: values of size |log 0.175|
    assert excess(pooled[0][0].positional_scores[0], math.log(0.7), fp32_tol(math.log(0.7 / 4), 14)) <= 1


def test_entity_bias_moves_the_bracket_or_character_decision_by_exactly_its_size():
    # pooled: "a character" 0.7 against an opening PER bracket 0.3, so the plain search tags nothing; a bias just
    # above log(0.7 / 0.3) opens the bracket first, one just below does not
    probs = torch.full((14,), 1e-9)
    probs[4:8] = 0.7 / 4
    probs[TOY_OPEN["PER"]] = 0.3
    model, enc = FixedLogits(probs.log()), ToyEncoded(torch.zeros(1, 1, 14))
    cfg = DecodeOptions(beam=1, max_len=99, no_repeat_ngram_size=0, constraint_range=None)
    text, margin = [4, 5, 6], math.log(0.7 / 0.3)

    def first_steps(bias):
        c = search.BracketConstraint([text], TOY_OPEN, TOY_CLOSE, entity_bias=bias)
        return beam_search(model, enc, cfg, c, max_lens=[9])[0][0]

    assert first_steps(0.0).tokens == text
    assert first_steps(margin - 0.01).tokens[0] == 4
    above = first_steps(margin + 0.01)
    assert above.tokens[0] == TOY_OPEN["PER"]
    # pooled log_softmax as above, plus the bias: values of size |log 0.175|
    assert excess(above.positional_scores[0], math.log(0.3) + margin + 0.01, fp32_tol(math.log(0.7 / 4), 14)) <= 1
    # the bias is kept apart: gained at every opening bracket, nothing elsewhere, and off the model's own scores
    opens = [t in TOY_OPEN.values() for t in above.tokens + [EOS]]
    assert above.positional_gains == pytest.approx([margin + 0.01 if o else 0.0 for o in opens], abs=1e-6)
    assert excess(above.unbiased_scores()[0], math.log(0.3), fp32_tol(math.log(0.7 / 4), 14)) <= 1
    assert first_steps(0.0).positional_gains is None                   # no bias: nothing kept
    # token scoring tags with no bias (see above); a negative bias as large as the margin removes it
    by_token = search.BracketConstraint([text], TOY_OPEN, TOY_CLOSE, pool_chars=False, entity_bias=-5.0)
    assert beam_search(model, enc, cfg, by_token, max_lens=[9])[0][0].tokens == text
    with pytest.raises(ValueError, match="entity_bias"):
        search.BracketConstraint([text], TOY_OPEN, TOY_CLOSE, entity_bias=float("nan"))


# ------------------------------------------------------------------------------------------------------------
# joint CTC/attention decoding (SNER)

TOY_READINGS = {4: [(1,)], 5: [(2,)], 6: [(1, 2), (2,)], 7: [(2, 1)]}   # toy characters -> CTC class strings


def collapse(path):
    out, prev = [], None
    for c in path:
        if c != prev and c != 0:
            out.append(c)
        prev = c
    return out


def brute_ctc(logp, phones, full):
    """log P(the collapsed path starts with / equals `phones`) by summing over every path (small T and C)."""
    T, C = logp.shape
    total = 0.0
    for path in itertools.product(range(C), repeat=T):
        out = collapse(path)
        if (out == list(phones)) if full else (out[:len(phones)] == list(phones)):
            total += math.exp(sum(float(logp[t, c]) for t, c in enumerate(path)))
    return math.log(total) if total > 0 else -math.inf


def test_ctc_prefix_and_full_scores_equal_brute_force():
    torch.manual_seed(0)
    logp = torch.randn(2, 5, 3).log_softmax(-1)
    frames = torch.tensor([5, 4])
    sc = search.CTCPrefixScorer(logp, frames, lambda tok: [], [], 0.5, 4)
    for b in range(2):
        for phones in [(1,), (2,), (1, 1), (1, 2), (2, 1, 2), (1, 1, 1)]:
            sc.start()
            sent = torch.tensor([b])
            rn, rb, last = sc.rn[b:b + 1], sc.rb[b:b + 1], sc.last[b:b + 1]
            for c in phones:
                rn, rb, psi = sc._extend(sent, rn, rb, last, torch.tensor([c]))
                last = torch.tensor([c])
            n = int(frames[b])
            full = float(torch.logaddexp(rn[0, n - 1], rb[0, n - 1]))
            for ours, brute in ((float(psi), brute_ctc(logp[b, :n], phones, full=False)),
                                (full, brute_ctc(logp[b, :n], phones, full=True))):
                assert ours == brute == -math.inf or excess(ours, brute, ctc_tol(logp[b, :n], brute)) <= 1


def slow_joint(logp, frames, weight, candidates):
    """joint_fn for slow_search: an independent joint scorer from brute-force CTC sums over all paths."""
    memo = {}

    def ctc(phones, full):
        if (phones, full) not in memo:
            memo[phones, full] = brute_ctc(logp[:frames], phones, full)
        return memo[phones, full]

    def joint(prefix, lp):
        phones = tuple(c for j, t in enumerate(prefix) if t in TOY_READINGS
                       for c in best_reading[tuple(prefix[:j + 1])])
        psi = ctc(phones, False)
        out = torch.full_like(lp, -math.inf)
        silent = list(TOY_OPEN.values()) + list(TOY_CLOSE.values())
        out[silent] = lp[silent]
        out[EOS] = lp[EOS] + weight * (ctc(phones, True) - psi)
        chars = [t for t in range(lp.numel()) if t not in silent and t != EOS]
        ranked = sorted(chars, key=lambda t: -float(lp[t]))[:candidates]
        for tok in ranked:
            if lp[tok] == -math.inf or tok not in TOY_READINGS:
                continue
            scores = [ctc(phones + r, False) for r in TOY_READINGS[tok]]
            k = max(range(len(scores)), key=lambda i: scores[i])
            best_reading[tuple(prefix) + (tok,)] = TOY_READINGS[tok][k]
            out[tok] = lp[tok] + weight * (scores[k] - psi)
        return out

    best_reading = {}
    return joint


def test_joint_ctc_beam_search_matches_slow_reference():
    toy, enc = random_toy(5, batch=3, eos_boost=0.5, loops=0.0)
    torch.manual_seed(1)
    logp = (torch.randn(3, 5, 3) * 2).log_softmax(-1)
    frames = torch.tensor([5, 4, 5])
    cfg = DecodeOptions(beam=3, max_len=5, no_repeat_ngram_size=0, constraint_range=None)
    scorer = search.CTCPrefixScorer(logp, frames, lambda tok: TOY_READINGS.get(tok, []),
                                    list(TOY_OPEN.values()) + list(TOY_CLOSE.values()), 0.7, 3)
    results = beam_search(toy, enc, cfg, scorer=scorer)
    for i, hyps in enumerate(results):
        slow = slow_search(toy, enc.hidden[i, 0], cfg, 5, joint_fn=slow_joint(logp[i], int(frames[i]), 0.7, 3))
        assert [h.tokens for h in hyps] == [s[0] for s in slow]
        # a running score of len steps, each a log_softmax over 14 and 0.7 x CTC sums of T x C terms; sizes: the
        # running score and 0.7 x the largest path log-probability (T x max|logp|)
        ctc_size = 0.7 * int(frames[i]) * float(logp[i].abs().max())
        for h, s in zip(hyps, slow):
            tol = fp32_tol([sum(s[2]), ctc_size], len(s[2]) * (14 + logp[i].numel())) / len(s[2])
            assert excess(h.score, s[1], tol) <= 1
    plain = beam_search(toy, enc, cfg)
    assert [h[0].tokens for h in plain] != [h[0].tokens for h in results]   # the CTC changed something


def test_joint_ctc_follows_the_audio_when_the_decoder_doubts():
    # the decoder slightly prefers character 4 (CTC class 1) but the audio clearly says class 2 (character 5)
    probs = torch.full((14,), 1e-6)
    probs[4], probs[5], probs[EOS] = 0.5, 0.4, 0.1
    model = FixedLogits(probs.log())
    enc = ToyEncoded(torch.zeros(1, 1, 14))
    logp = torch.full((1, 3, 3), 1e-4).log()
    logp[0, :, 0], logp[0, 1, 2] = math.log(0.6), math.log(0.99)
    logp = logp.log_softmax(-1)
    cfg = DecodeOptions(beam=2, max_len=1, no_repeat_ngram_size=0, constraint_range=None)
    silent = list(TOY_OPEN.values()) + list(TOY_CLOSE.values())
    joint = beam_search(model, enc, cfg, scorer=search.CTCPrefixScorer(
        logp, torch.tensor([3]), lambda tok: TOY_READINGS.get(tok, []), silent, 0.5, 4))
    assert beam_search(model, enc, cfg)[0][0].tokens == [4]
    assert joint[0][0].tokens == [5]


def test_constraint_text_char_that_is_a_bracket_symbol_is_read_as_the_char():
    text = [4, 9, 5, 12]                                       # "a(b)" where ( and ) are the LOC bracket ids
    outs = constrained_outputs(text, 8, 4)
    assert tuple(text) in outs
    for o in outs:
        spans, complete, _ = search.spans_from_constrained(list(o), text, TOY_OPEN, TOY_CLOSE)
        assert complete
        stripped = [t for t in o if t not in (8, 10, 11, 13)]
        assert [t for t in stripped if t in (4, 5)] == [4, 5] and stripped.count(9) >= 1


# ------------------------------------------------------------------------------------------------------------
# the real model (tiny, random but perturbed weights so that scores are well separated)

WAVS = sorted((FIXTURES / "wavs").glob("utt00*.wav"))
SENTENCES = [  # the fixture wavs' sentences (wavs/index.jsonl) with hand-made entities
    ("utt000", "张伟在北京大学读书", [(0, 2, "PER"), (3, 7, "ORG"), (3, 5, "LOC")]),
    ("utt001", "郭涛的公司搬到了合肥", [(0, 2, "PER"), (8, 10, "LOC")]),
    ("utt002", "北京市气象台发布暴雨预警", [(0, 6, "ORG"), (0, 3, "LOC")]),
    ("utt003", "马超和朋友们去了青岛看海", [(0, 2, "PER"), (8, 10, "LOC")]),
]


def gold_samples():
    import data
    return [data.Sample(uid, text, [data.Entity(*e) for e in ents], str(FIXTURES / "wavs" / f"{uid}.wav"))
            for uid, text, ents in SENTENCES]


@pytest.fixture(scope="module")
def tiny():
    import data
    import image
    samples = gold_samples() + [data.Sample("x", "末阳市文联主席张三", [])]
    assets = weights.assets_for_scratch(samples)
    assets["decoding"]["max_len_b"] = 24
    torch.manual_seed(0)
    model = image.IMAGE(image.Config.tiny(vocab_size=len(assets["vocab"]), dropout=0.0)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.08)
    return model, assets


def noise(seconds, seed):
    return torch.randn(int(16000 * seconds), generator=torch.Generator().manual_seed(seed)) * 0.1


def logits_on(rec, requests, task):
    """The model's logits on these inputs, the decoder fed BOS + 24 tokens across the vocabulary: the size of the
    values the search's scores come from (for model_score_tol)."""
    enc = rec._encode([rec._row(req, task)[0] for req in requests])
    tokens = torch.cat([torch.tensor([BOS]), 4 + torch.arange(24) * 37 % (len(rec.vocab.tokens) - 4)])
    with torch.no_grad():
        return rec.model.decode(tokens.expand(len(requests), -1), enc)


def test_real_model_batch_times_beam_equals_one_at_a_time(tiny):
    rec = recognize.Recognizer(tiny, device="cpu", beam=4)
    texts = ["张伟在北京大学读书", "郭涛的公司搬到了合肥", "末阳市文联主席张三"]
    waves = [noise(1.3, 0), noise(0.6, 1), noise(2.1, 2)]
    for task, kwargs in (("TNER", {"texts": texts}), ("SNER", {"waveforms": waves}),
                         ("MNER", {"texts": texts, "waveforms": waves})):
        batched = rec.recognize(batch_size=3, **kwargs)
        requests = [recognize.Request(text=t, waveform=w) for t, w in zip(kwargs.get("texts", [None] * 3),
                                                                       kwargs.get("waveforms", [None] * 3))]
        logits, vocab = logits_on(rec, requests, task), len(rec.vocab.tokens)
        for i, res in enumerate(batched):
            alone = rec.recognize(batch_size=1, **{k: v[i:i + 1] for k, v in kwargs.items()})[0]
            assert res["output"] == alone["output"] and res["entities"] == alone["entities"]
            assert excess(res["score"], alone["score"], model_score_tol(tiny[0].config, logits, [alone["score"]],
                                                                        vocab)) <= 1


def test_real_model_joint_ctc_batch_equals_one_at_a_time(tiny):
    rec = recognize.Recognizer(tiny, device="cpu", beam=3, ctc_weight=0.5, ctc_candidates=4)
    waves = [noise(1.3, 0), noise(0.6, 1), noise(2.1, 2)]
    batched = rec.recognize(waveforms=waves, batch_size=3)
    plain = recognize.Recognizer(tiny, device="cpu", beam=3).recognize(waveforms=waves, batch_size=3)
    assert [r["output"] for r in batched] != [r["output"] for r in plain]
    # the CTC part adds ctc_weight x CTC log-probabilities, computed from the same encoder: of the logits' size
    logits = logits_on(rec, [recognize.Request(waveform=w) for w in waves], "SNER")
    for i, res in enumerate(batched):
        alone = rec.recognize(waveforms=waves[i:i + 1], batch_size=1)[0]
        tol = model_score_tol(tiny[0].config, logits, [alone["score"]], len(rec.vocab.tokens))
        assert res["output"] == alone["output"] and excess(res["score"], alone["score"], tol) <= 1
        assert all(c in rec.vocab.tokens[4:] for c in res["output"])           # never BOS/PAD/UNK
    with pytest.raises(ValueError, match="ctc_weight"):
        recognize.Recognizer(tiny, device="cpu", ctc_weight=-1.0)


def test_real_model_cached_scores_equal_teacher_forced_logits(tiny):
    """Positional scores of the cached search = log_softmax of the full (uncached) decoder on the hypothesis."""
    import data
    model, assets = tiny
    rec = recognize.Recognizer(tiny, device="cpu", beam=3)
    fz = rec.featurizer
    rows = [rec._row(recognize.Request(waveform=noise(s, k)), "SNER")[0] for k, s in enumerate((0.9, 1.6))]
    enc = rec._encode(rows)
    cfg = dataclasses.replace(rec.options, max_len=12)
    with torch.no_grad():
        hyps = beam_search(model, enc, cfg)
        for b, nbest in enumerate(hyps):
            for h in nbest:
                seq = torch.tensor([[BOS] + h.tokens])
                logits = model.decode(seq, select_rows(enc, torch.tensor([b])))[0].float()
                logits[:, cfg.constraint_range[1]:] = -math.inf
                lp = torch.log_softmax(logits, -1)
                ref = lp.gather(1, torch.tensor(h.tokens + [EOS])[:, None])[:, 0]
                tol = model_score_tol(model.config, logits[logits.isfinite()], ref, cfg.constraint_range[1])
                assert excess(h.positional_scores, ref, tol) <= 1
                assert excess(h.score, float(ref.sum()) / len(ref), tol) <= 1
    # constrained: the same with the bracket mask applied before log_softmax (renormalised over allowed tokens)
    text = "郭涛的公司搬到了合肥"
    rows = [rec._row(recognize.Request(text=text), "TNER")[0]]
    enc = rec._encode(rows)
    ids = fz.vocab.encode(text)
    with torch.no_grad():
        nbest = beam_search(model, enc, cfg, search.BracketConstraint([ids], rec.open_ids, rec.close_ids),
                            max_lens=[24])[0]
        for h in nbest:
            logits = model.decode(torch.tensor([[BOS] + h.tokens]), enc)[0].float()
            c = search.BracketConstraint([ids], rec.open_ids, rec.close_ids)
            c.start()
            ref = []
            brackets = set(rec.open_ids.values()) | set(rec.close_ids.values())
            chars = [v for v in range(logits.size(-1)) if v not in brackets | {BOS, PAD, EOS}]
            for step, tok in enumerate(h.tokens + [EOS]):
                allowed = c.mask(step, [24], logits.size(-1))[0]
                row = logits[step].clone()
                stripped = sum(t not in brackets for t in h.tokens[:step])
                if stripped < len(ids):                          # the known next character: all the char mass
                    row[ids[stripped]] = torch.logsumexp(logits[step, chars], 0)
                ref.append(float(torch.log_softmax(row.masked_fill(~allowed, -math.inf), -1)[tok]))
                c.advance([tok])
            assert excess(h.positional_scores, ref, model_score_tol(model.config, logits, ref, logits.size(-1))) <= 1
            rendered = search.spans_from_constrained(h.tokens, ids, rec.open_ids, rec.close_ids, text)[2]
            assert data.parse(rendered)[0] == text


def test_real_model_constrained_outputs_strip_to_the_input(tiny):
    import data
    rec = recognize.Recognizer(tiny, device="cpu", beam=5)
    texts = ["张伟在北京大学读书", "北京市气象台发布暴雨预警", "马超和朋友们去了青岛看海", "末阳市文联主席张三",
             "张三和李四", "a(b)c", "ＸＹＺ张"]               # brackets and characters outside the vocabulary
    for text, res in zip(texts, rec.recognize(texts=texts)):
        plain, ents = data.parse(res["output"])
        assert res["text"] == text and len(plain) == len(text)
        assert [(e.start, e.end, e.type) for e in ents] == sorted((e["start"], e["end"], e["type"])
                                                                  for e in res["entities"])
        for e in res["entities"]:
            assert text[e["start"]:e["end"]] == e["text"] and e["end"] > e["start"]
    unknown = rec.recognize(texts=["ＸＹＺ张"])[0]
    assert any("outside the vocabulary" in w for w in unknown["warnings"])
    free = recognize.Recognizer(tiny, device="cpu", beam=2, constrain=False).recognize(texts=texts[:2])
    for res in free:                                          # unconstrained: offsets only where alignable
        for e in res["entities"]:
            assert e["start"] is None or res["text"][e["start"]:e["end"]] == e["text"]


# ------------------------------------------------------------------------------------------------------------
# exactness against ModelScope: reference_decode.py outputs committed as fixtures (reference/ref_beam_make.sh)

# ms_tiny_b has the bare BERT vocab.txt: ModelScope's tokenizer then appends <s> </s> <unk> <pad> at 996..999 and
# decodes from BOS 996 to EOS 997 (../shared/reference/README.md "Reduced vocabulary"); weights.py keeps the rows.
MS_SPECIALS = {"a": dict(bos=0, pad=1, eos=2), "b": dict(bos=996, pad=999, eos=997)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    weights = pytest.importorskip("weights")
    out = {}
    for d in ("a", "b"):
        path = tmp_path_factory.mktemp("ms") / f"ms_tiny_{d}.pt"
        weights.save_checkpoint(weights.convert(str(FIXTURES / f"ms_tiny_{d}")), str(path))
        out[d] = path
    return out


def read_reference(d, bs):
    return [json.loads(line) for line in (FIXTURES / f"ref_beam_ms_tiny_{d}_bs{bs}.jsonl").read_text().splitlines()]


def reference_score_tol(converted, d, hyp):
    """model_score_tol of a reference hypothesis (its dict) of ms_tiny_{d} on the test wavs, with the size of the
    logits in its reference dump (the same wavs teacher-forced; tests/test_image.py)."""
    dump = torch.load(FIXTURES / f"ref_ms_tiny_{d}.pt", weights_only=True)
    config = torch.load(converted[d], weights_only=True)["config"]
    positional = hyp.get("positional_scores") or [hyp["score"]] * len(hyp["tokens"])  # n-best: score = mean
    return model_score_tol(config, torch.cat(dump["batch"]["logits"]), positional, 1000)


@pytest.mark.parametrize("bs", [1, 4])
def test_asr_cli_tokens_equal_modelscope_reference_decode(converted, bs, capsys):
    """ms_tiny_a end to end through the CLI (our fbank, our model, our search): the 5-best lists of every wav equal
    ModelScope's. Batches of 4 need --modelscope-padding (ModelScope's padding changes results)."""
    argv = ["--ckpt", str(converted["a"]), "--asr", "--wav", *map(str, WAVS), "--max-len", "32", "--nbest", "5",
            "--batch-size", str(bs), "--json"] + (["--modelscope-padding"] if bs > 1 else [])
    decode.main(argv)
    ours = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ref = read_reference("a", bs)
    assert len(ours) == len(ref) == 4
    lengths = set()
    for o, r in zip(ours, ref):
        tol = max(reference_score_tol(converted, "a", n) for n in r["nbest"])
        assert o["tokens"] + [EOS] == r["tokens"]                               # identical tokens and n-best
        assert excess(o["score"], r["score"], tol) <= 1
        assert excess(o["positional_scores"], r["positional_scores"], tol) <= 1
        assert [n["tokens"] + [EOS] for n in o["nbest"]] == [n["tokens"] for n in r["nbest"]]
        assert excess([n["score"] for n in o["nbest"]], [n["score"] for n in r["nbest"]], tol) <= 1
        lengths |= {len(n["tokens"]) for n in r["nbest"]}
    assert len(lengths) >= 3                                  # finalisation at several steps is covered


@pytest.mark.parametrize("bs,modelscope_padding", [(1, False), (4, True)])
def test_asr_tokens_equal_reference_second_model(converted, bs, modelscope_padding):
    """ms_tiny_b: no CMVN, no embedding scale, no entangled positions, 48-wide, 7+1 layers, max-length outputs
    with n-gram blocking at work; the bare-BERT vocabulary moves ModelScope's special ids (see MS_SPECIALS)."""
    cfg = DecodeOptions(beam=5, max_len=32, min_len=1, no_repeat_ngram_size=5, constraint_range=(4, 1000),
                       **MS_SPECIALS["b"])
    rec = recognize.Recognizer(str(converted["b"]), device="cpu", asr=True, options=cfg, nbest=5,
                            modelscope_padding=modelscope_padding)
    ours = rec.recognize(wavs=WAVS, batch_size=bs)
    for o, r in zip(ours, read_reference("b", bs)):
        tol = max(reference_score_tol(converted, "b", n) for n in r["nbest"])
        assert o["tokens"] + [cfg.eos] == r["tokens"]
        assert excess(o["positional_scores"], r["positional_scores"], tol) <= 1
        assert [n["tokens"] + [cfg.eos] for n in o["nbest"]] == [n["tokens"] for n in r["nbest"]]
        assert excess([n["score"] for n in o["nbest"]], [n["score"] for n in r["nbest"]], tol) <= 1


def test_default_padding_gives_each_wav_its_batch_of_one_result(converted):
    """Our default model: a batch of 4 decodes each wav exactly as the reference does one at a time."""
    cfg = DecodeOptions(beam=5, max_len=32, min_len=1, no_repeat_ngram_size=5, constraint_range=(4, 1000),
                       **MS_SPECIALS["b"])
    rec = recognize.Recognizer(str(converted["b"]), device="cpu", asr=True, options=cfg)
    for o, r in zip(rec.recognize(wavs=WAVS, batch_size=4), read_reference("b", 1)):
        assert o["tokens"] + [cfg.eos] == r["tokens"]
        assert excess(o["score"], r["score"], reference_score_tol(converted, "b", r)) <= 1


# ------------------------------------------------------------------------------------------------------------
# command line, Python API, guards


@pytest.fixture(scope="module")
def tiny_ckpt(tiny, tmp_path_factory):
    model, assets = tiny
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"format": "image-checkpoint", "version": 1, "config": dataclasses.asdict(model.config),
                "model": model.state_dict(), "assets": assets, "source": {"kind": "test"}}, path)
    return str(path)


def write_wav(path, samples):
    import wave
    pcm = (samples.clamp(-1, 1) * 32767).to(torch.int16).numpy().tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(pcm)
    return str(path)


def run_cli(argv, capsys):
    decode.main(argv)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_decode_options_take_unset_settings_from_the_checkpoint(tiny, tiny_ckpt, capsys):
    """One rule for every caller: an explicit option wins, an unset one takes assets["decoding"], else the default.
    Before, Recognizer took 21 keywords and an explicit SearchConfig ignored the checkpoint's ctc_weight."""
    model, assets = tiny
    saved = {**assets, "decoding": {**assets["decoding"], "ctc_weight": 0.5, "beam": 4}, "pseudo_text_len": 7}
    opts = DecodeOptions(beam=2, nbest=2).resolve(saved)
    assert (opts.beam, opts.nbest, opts.ctc_weight, opts.max_len, opts.pseudo_text_len) == (2, 2, 0.5, 24, 7)
    assert DecodeOptions().resolve() == DecodeOptions(**SEARCH_DEFAULTS, onset_lead_seconds=None)
    onsets = {**saved, "decoding": {**saved["decoding"], "onset_lead_seconds": 0.0}}   # train.py: a demo model
    assert DecodeOptions().resolve(onsets).onset_lead_seconds == 0.0
    assert DecodeOptions(onset_lead_seconds=None).resolve(onsets).onset_lead_seconds is None
    assert DecodeOptions(onset_lead_seconds=0.1).resolve(onsets).onset_lead_seconds == 0.1
    rec = recognize.Recognizer((model, saved), DecodeOptions(beam=3), device="cpu", ctc_candidates=4)
    assert (rec.options.beam, rec.options.ctc_weight, rec.options.ctc_candidates) == (3, 0.5, 4)
    assert recognize.Recognizer((model, saved), device="cpu").options.beam == 4
    with pytest.raises(TypeError, match="bem"):                    # a misspelt keyword is not silently dropped
        recognize.Recognizer(tiny, device="cpu", bem=3)
    with pytest.raises(files.InputError, match="nbest 5 must be between 1 and the beam size 4"):
        recognize.Recognizer((model, saved), device="cpu", nbest=5)   # checked against the checkpoint's beam
    too_long = model.decoder.max_len - 1                           # BOS + max_len + the EOS step do not fit
    with pytest.raises(files.InputError, match=f"max_len {too_long} must be in \\[1, {too_long - 1}\\]"):
        recognize.Recognizer(tiny, device="cpu", max_len=too_long)
    with pytest.raises(files.InputError, match="entity_bias"):
        recognize.Recognizer(tiny, device="cpu", entity_bias=1.0, constrain=False)
    for flags, words in ((["--nbest", "0"], "--nbest must be >= 1"), (["--ctc-weight", "nan"], "--ctc-weight"),
                         (["--entity-bias", "1", "--no-constrain"], "--entity-bias biases"),
                         (["--max-piece-seconds", "2"], "--max-piece-seconds must be at least"),
                         (["--min-pause-seconds", "0"], "--min-pause-seconds must be in (0, 5]"),
                         (["--piece-pad-seconds", "0.8"], "--piece-pad-seconds must be in [0, 0.5]"),
                         (["--vad-threshold", "1"], "--vad-threshold must be in (0.15, 1)"),
                         (["--onset-lead-seconds", "0.8"], "--onset-lead-seconds must be in [0, 0.5]"),
                         (["--onset-lead-seconds", "soon"], "--onset-lead-seconds: invalid"),
                         (["--quiet-threshold", "1.5"], "--quiet-threshold must be in (0, 1)"),
                         (["--pause-level", "1"], "--pause-level must be in (0, 1)"),
                         (["--short-piece-seconds", "-1"], "--short-piece-seconds must be in [0, 10]"),
                         (["--join-piece-seconds", "0"], "--join-piece-seconds must be a positive number"),
                         (["--realign-margin-seconds", "-0.1"], "--realign-margin-seconds must be 0 or more"),
                         (["--gap-piece-seconds", "0.5"], "--gap-piece-seconds must be 1 second or more"),
                         (["--entities", "/nonexistent/names.txt"], "names.txt: no such file"),
                         (["--entity-weight", "-1"], "--entity-weight must be a finite number >= 0")):
        with pytest.raises(SystemExit):
            decode.get_args(["--ckpt", tiny_ckpt, "--text", "北京", *flags])
        assert words in capsys.readouterr().err
    args = decode.get_args(["--ckpt", tiny_ckpt, "--text", "北京", "--greedy", "--char-score", "token"])
    assert args.options == DecodeOptions(beam=1, pool_chars=False, ctc_candidates=10)


def test_dtype_auto_is_fp32_on_cpu_and_half_on_a_gpu_except_in_the_parity_modes(tiny, tiny_ckpt, monkeypatch):
    assert decode.get_args(["--ckpt", tiny_ckpt, "--text", "北京"]).dtype == "auto"
    model, assets = tiny
    half = copy.deepcopy(model).to(torch.float16)                  # a checkpoint stored in fp16 decodes in fp32 on CPU
    rec = recognize.Recognizer((half, assets), device="cpu", dtype="auto")
    assert {p.dtype for p in rec.model.parameters()} == {torch.float32}
    # on a GPU (its facts passed in): (--dtype, options, native bf16) -> model dtype, exact fp32 (no TF32)
    cuda = torch.device("cuda", 0)
    for name, fields, native, dtype, exact in (
            ("auto", {}, True, torch.bfloat16, False), ("auto", {}, False, torch.float16, False),
            ("auto", {"asr": True}, True, torch.float32, True),
            ("auto", {"modelscope_padding": True}, True, torch.float32, True),
            ("fp32", {}, True, torch.float32, True), ("bf16", {"asr": True}, True, torch.bfloat16, False)):
        tf32 = []
        monkeypatch.setattr(devices, "native_bf16", lambda device: native)
        monkeypatch.setattr(devices, "set_tf32", lambda device, exact_fp32=False: tf32.append((device, exact_fp32)))
        assert recognize.decode_dtype(name, cuda, DecodeOptions(**fields)) == dtype, (name, fields, native)
        assert tf32 == [(cuda, exact)]


def test_cli_text_wav_both_and_jsonl(tiny_ckpt, tmp_path, capsys):
    text, wav = "张伟在北京大学读书", str(WAVS[0])
    for argv, task in ((["--text", text], "TNER"), (["--wav", wav], "SNER"), (["--text", text, "--wav", wav], "MNER")):
        (res,) = run_cli(["--ckpt", tiny_ckpt, "--json", "--beam", "3"] + argv, capsys)
        assert res["task"] == task and res["output"]
        if task != "SNER":
            assert res["text"] == text
            assert all(text[e["start"]:e["end"]] == e["text"] for e in res["entities"])
    shutil.copy(WAVS[1], tmp_path / "a.wav")
    lines = [{"text": "郭涛的公司搬到了合肥"}, {"wav": "a.wav"}, {"text": "马超", "wav": "a.wav", "id": "m"}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    assert run_cli(["--ckpt", tiny_ckpt, "--input", str(tmp_path / "in.jsonl"), "--out", str(out),
                    "--greedy", "--batch-size", "2"], capsys) == []
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["task"] for g in got] == ["TNER", "SNER", "MNER"] and got[2]["id"] == "m"
    assert got[1]["wav"] == str(tmp_path / "a.wav")
    api = recognize.Recognizer(tiny_ckpt, device="cpu", beam=1).recognize(texts=["郭涛的公司搬到了合肥"])
    assert api[0]["output"] == got[0]["output"]               # CLI and Python API agree
    # joint CTC decoding and token character scores reach the search from the command line
    (joint,) = run_cli(["--ckpt", tiny_ckpt, "--json", "--beam", "3", "--wav", wav, "--ctc-weight", "0.5",
                        "--ctc-candidates", "4"], capsys)
    rec = recognize.Recognizer(tiny_ckpt, device="cpu", beam=3, ctc_weight=0.5, ctc_candidates=4)
    assert joint["output"] == rec.run([recognize.Request(wav=wav)])[0]["output"]
    (token,) = run_cli(["--ckpt", tiny_ckpt, "--json", "--beam", "3", "--text", text, "--char-score", "token"], capsys)
    rec = recognize.Recognizer(tiny_ckpt, device="cpu", beam=3, pool_chars=False)
    assert token["output"] == rec.recognize(texts=[text])[0]["output"]


def test_terminal_table():
    res = result("[张三]来了", "张三来了", [(0, 2, "PER")]) | {"task": "TNER", "warnings": ["w"]}
    table = decode.format_result(res)
    assert "[张三]来了" in table and "PER" in table and "0-2" in table and "warning: w" in table


def cnerta_corpus(root):
    lines = [{"sentence": text, "audio": uid, "entity": [[s, e, text[s:e], t] for s, e, t in ents]}
             for uid, text, ents in SENTENCES]
    lines.append({"sentence": "末阳市文联主席张三", "audio": "no_wav", "entity": [[0, 3, "末阳市", "LOC"],
                                                                               [7, 9, "张三", "PER"]]})
    root.mkdir(exist_ok=True)
    (root / "test.json").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    return root


def test_cli_eval_on_a_dataset_split(tiny_ckpt, tmp_path, capsys):
    corpus = cnerta_corpus(tmp_path / "corpus")
    out, preds = tmp_path / "scores.json", tmp_path / "preds.jsonl"
    decode.main(["--ckpt", tiny_ckpt, "--dataset", "cnerta", "--data-dir", str(corpus), "--audio-dir",
                 str(FIXTURES / "wavs"), "--split", "test", "--eval", "--out", str(out), "--predictions", str(preds),
                 "--beam", "2", "--max-len", "20"])
    report = json.loads(out.read_text())
    predictions = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [p["task"] for p in predictions] == ["TNER"] * 5 + ["SNER"] * 4 + ["MNER"] * 4
    golds = data.load_split("cnerta", corpus, "test", audio_dir=FIXTURES / "wavs", verbose=False)
    for task in ("TNER", "SNER", "MNER"):
        sc = report["scores"][task]
        assert set(sc) >= {"p", "r", "f1", "ours", "official", "cer"}
        assert sc["sentences"] == (5 if task == "TNER" else 4)
        assert sc["ours"]["gold"] == (11 if task == "TNER" else 9)
        mine = [p for p in predictions if p["task"] == task]
        g = [s for s in golds if task == "TNER" or s.audio]
        again = scoring.score_predictions(task, g, mine, text.Phonemizer(text.read_phone_dict()).pronounce)
        assert again["ours"] == sc["ours"] and again["official"] == sc["official"]
        if task != "SNER":  # evaluate.py breakdown lines the records up with the gold samples by id
            bd = evaluate.breakdown_file(preds, "cnerta", corpus, "test", task)
            assert {k: bd[k] for k in sc["ours"]} == sc["ours"] and bd["sentences"] == sc["sentences"]
    assert report["scores"]["TNER"]["cer"] == 0.0            # constrained: the text is the input
    assert (report["device"], report["dtype"]) == ("cpu", "float32")   # what the scores were decoded in
    assert "official" in capsys.readouterr().err              # the table


def test_guards_give_clear_messages(tiny_ckpt, tmp_path, capsys):
    def fails(argv, words):
        with pytest.raises(SystemExit) as e:
            decode.main(["--ckpt", tiny_ckpt] + argv)
        msg = str(e.value.code) + capsys.readouterr().err
        assert all(w in msg for w in words), msg

    fails(["--text", "  "], ["empty text"])
    fails(["--wav", str(tmp_path / "missing.wav")], ["not found", "missing.wav"])
    fails(["--text", "a", "--max-len", "5000"], ["max_len 5000"])
    fails(["--text", "a", "--entity-bias", "1", "--no-constrain"], ["--entity-bias", "--no-constrain"])
    long_wav = write_wav(tmp_path / "long.wav", noise(2.0, 3))
    fails(["--wav", long_wav, "--max-audio-seconds", "1"], ["2.0 s", "limit"])
    fails(["--wav", write_wav(tmp_path / "short.wav", noise(0.05, 4))], ["too short"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    fails(["--input", str(bad)], ["bad.jsonl:2", "txt"])
    bad.write_text('{"text": "a"}\nnot json\n')
    fails(["--input", str(bad)], ["bad.jsonl:2", "not JSON"])
    fails(["--text", "a", "--wav", long_wav, long_wav], ["pairs them"])
    fails(["--ckpt", str(tmp_path / "none.pt"), "--text", "a"], ["not found"])
    fails(["--text", "张" * 600], ["longer than"])
    (res,) = run_cli(["--ckpt", tiny_ckpt, "--wav", write_wav(tmp_path / "zero.wav", torch.zeros(16000)), "--json",
                      "--max-len", "8"], capsys)                # silence decodes (no hang) and says so
    assert any("silent" in w for w in res["warnings"])


def test_evaluate_split_as_train_calls_it(tiny):
    """train.py: decode.evaluate_split(model, samples, featurizer, tasks=..., options=..., batch_size=...,
    evaluator=...)."""
    model, assets = tiny
    golds = gold_samples()[:2]
    scores = decode.evaluate_split(model, golds, data.Featurizer(assets), tasks=("TNER", "MNER"),
                                   options=DecodeOptions(beam=2, max_len=16), batch_size=2,
                                   evaluator="official", device="cpu")
    for task in ("TNER", "MNER"):
        sc = scores[task]
        assert (sc["p"], sc["r"], sc["f1"]) == (sc["official"]["p"], sc["official"]["r"], sc["official"]["f1"])
        assert sc["ours"]["gold"] == 5 and sc["cer"] == 0.0
    assert not model.training


# ------------------------------------------------------------------------------------------------------------
# issue #14: valid Chinese that used to crash, jsonl inputs of the wrong shape

def test_constrained_tner_keeps_han_characters_without_a_pinyin_reading(tiny):
    import data
    rec = recognize.Recognizer(tiny, device="cpu", beam=3)
    texts = ["𠮷野家在北京", "兙瓧嗧", "张三去了𠮷野家"]
    for text, res in zip(texts, rec.recognize(texts=texts)):
        assert res["text"] == text and data.parse(res["output"])[0] == text
        assert all(text[e["start"]:e["end"]] == e["text"] for e in res["entities"])


@pytest.mark.parametrize("line, why", [
    ('{"text": 123}', '"text" must be a string, got a number (123)'),
    ('{"wav": 5}', '"wav" must be a string, got a number (5)'),
    ('{"text": "", "wav": ""}', '"text" is empty'),
    ('{"text": "  "}', '"text" is empty'),
    ('{"text": "a", "wav": ""}', '"wav" is empty'),
    ('{"text": "a", "id": [1]}', '"id" must be a string or an integer, got an array'),
    ('{"text": "a", "id": true}', '"id" must be a string or an integer, got a boolean'),
    ("{}", 'needs "text" and/or "wav"'),
    ('{"text": null}', 'needs "text" and/or "wav"'),
    ("[1, 2]", 'expected a JSON object with "text" and/or "wav", got an array'),
    ('"x"', 'expected a JSON object with "text" and/or "wav", got a string'),
    ('{"txt": "a", "wave": "a.wav"}', "unknown key(s) 'txt', 'wave' (known: text, wav, id, entities, start_s, end_s)"),
    ('{"text": "a", "entities": "张三"}', '"entities" must be a list of strings'),
    ('{"text": "a", "entities": ["张三 PERSON"]}', "entities[0]: expected 'STRING' or 'STRING TYPE'"),
    ('{"wav": "missing.wav"}', "wav not found: {dir}/missing.wav"),
    ('{"wav": "sub"}', "wav {dir}/sub is a directory, expected a wav file"),
    ('{"text": "a"}\n\xff', "not UTF-8 (byte 0xff at column 1)"),
])
def test_jsonl_input_problems_name_file_and_line(tmp_path, line, why):
    import re
    import files
    (tmp_path / "sub").mkdir()
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "a"}\n' + line.encode("latin-1" if "\xff" in line else "utf-8") + b"\n")
    at = f"{path}:{3 if chr(0xff) in line else 2}: "
    with pytest.raises(files.InputError, match=re.escape(at + why.format(dir=tmp_path))):
        decode.read_jsonl_requests(str(path))


def test_jsonl_input_bom_relative_wavs_and_ids(tmp_path):
    (tmp_path / "sub").mkdir()
    wav = write_wav(tmp_path / "sub" / "a.wav", torch.zeros(1600))
    lines = ['{"text": "甲", "wav": null}', "", '{"wav": "sub/a.wav", "id": 7}', json.dumps({"text": "乙", "wav": wav})]
    path = tmp_path / "in.jsonl"
    path.write_bytes(("\ufeff" + "\n".join(lines) + "\n").encode())  # a BOM: Windows editors write one
    reqs = decode.read_jsonl_requests(str(path))
    assert [(r.text, r.wav, r.id) for r in reqs] == [("甲", None, "1"), (None, wav, "7"), ("乙", wav, "4")]


def test_recognizer_takes_the_pseudo_text_length_from_the_checkpoint_format():
    """A version 1 best.pt (tests/fixtures/pre_layout, train.py --pseudo-len 7) decodes with the migrated length."""
    path = FIXTURES / "pre_layout" / "best.pt"
    rec = recognize.Recognizer(path, device="cpu")
    assert rec.featurizer.pseudo_text_len == 7
    wave = torch.randn(16000, generator=torch.Generator().manual_seed(0)) * 0.05
    for result in rec.recognize(texts=["张伟在北京工作"]) + rec.recognize(waveforms=[wave], sample_rate=16000):
        assert result["task"] in ("TNER", "SNER") and isinstance(result["output"], str)
    assert recognize.Recognizer(path, device="cpu", pseudo_text_len=9).featurizer.pseudo_text_len == 9  # the caller's
    model, assets, _ = weights.load_checkpoint(str(path))
    assert recognize.Recognizer((model, {**assets, "pseudo_text_len": 5})).featurizer.pseudo_text_len == 5
    without = {k: v for k, v in assets.items() if k != "pseudo_text_len"}                # a converted MMSpeech
    assert recognize.Recognizer((model, without)).featurizer.pseudo_text_len == 40          # the Featurizer's default


def test_entity_times_come_from_the_aligned_phones(tiny):
    """A synthetic CTC head that fires each character's phones at known frames: the entity times are those of the
    frame -> time rule (align.char_times) for those frames, characters without a reading take none, a text with
    more phones than frames gets no times and a warning; --timestamps chars lists every character's times."""
    rec = recognize.Recognizer(tiny, device="cpu", timestamps="chars")
    text = "张三在北京,好"                               # the comma has no reading: no frames, no time
    classes = tiny[0].config.phone_dict_size - 3
    phones = [(rec._readings(c, classes) or [()])[0] for c in text]
    logp = torch.full((1, 60, classes), -20.0)
    logp[0, :, 0] = 0.0                                   # blank everywhere ...
    spans, t = [], 2
    for p in phones:                                      # ... but each phone of each character fires once
        if p:
            spans.append((t, t + len(p) - 1, 0))
            for j, c in enumerate(p):
                logp[0, t + j, c], logp[0, t + j, 0] = 0.0, -20.0
            t += len(p) + 3
    results = [{"text": text, "entities": [{"type": "PER", "start": 0, "end": 2}, {"type": "LOC", "start": 3, "end": 5},
                                           {"type": "ORG", "start": 5, "end": 6}]}]
    rec._add_times(results, logp, torch.tensor([60]))
    expected = align.char_times(spans, 60, -0.01)         # the characters with a reading, in order (-10 ms)
    per, loc, comma = results[0]["entities"]
    assert (per["start_s"], per["end_s"]) == (expected[0][0], expected[1][1])
    assert (loc["start_s"], loc["end_s"]) == (expected[3][0], expected[4][1])
    assert (comma["start_s"], comma["end_s"]) == (None, None)
    times = results[0]["char_times"]
    assert [c for c, _, _ in times] == list(text) and times[5][1:] == [None, None]
    assert [tuple(x[1:]) for x in times if x[1] is not None] == expected
    short = [{"text": text, "entities": [{"type": "PER", "start": 0, "end": 2}]}]
    rec._add_times(short, logp[:, :4], torch.tensor([4]))
    assert short[0]["entities"][0]["start_s"] is None and "more phones than the audio" in short[0]["warnings"][0]


def test_speech_results_carry_entity_times_unless_turned_off(tiny):
    """MNER through the whole Recognizer (an entity bias makes the random model bracket): every entity has a time
    inside the audio and an alignment confidence in [0, 1]; --timestamps none leaves them out; a bad value is
    refused."""
    wave, text = noise(1.5, 3), "张三在北京"
    run = lambda **kw: recognize.Recognizer(tiny, device="cpu", beam=2, entity_bias=8.0, **kw).recognize(
        texts=[text], waveforms=[wave])[0]
    timed, off = run(), run(timestamps="none")
    assert timed["entities"] and timed["entities"] == [
        {**e, "start_s": t["start_s"], "end_s": t["end_s"], "align_confidence": t["align_confidence"]}
        for e, t in zip(off["entities"], timed["entities"])]
    for e in timed["entities"]:
        assert 0 <= e["start_s"] < e["end_s"] <= 1.5 + align.FRAME_SPAN_S and 0 <= e["align_confidence"] <= 1
    assert all("start_s" not in e for e in off["entities"])
    with pytest.raises(files.InputError, match="timestamps"):
        recognize.Recognizer(tiny, device="cpu", timestamps="words")


def test_cli_writes_an_audacity_label_track_per_recording(tiny_ckpt, tmp_path, capsys):
    """--labels FOLDER: FOLDER/<wav name>.txt, a line start<TAB>end<TAB>TYPE text per timed entity, the same
    entities and times as the JSON; refused with --dataset, --asr or --timestamps none."""
    shutil.copy(WAVS[0], tmp_path / "call.wav")
    (res,) = run_cli(["--ckpt", tiny_ckpt, "--json", "--beam", "2", "--entity-bias", "8", "--wav",
                      str(tmp_path / "call.wav"), "--text", "张伟在北京大学读书", "--labels", str(tmp_path / "labels")],
                     capsys)
    track = (tmp_path / "labels" / "call.txt").read_text(encoding="utf-8").splitlines()
    assert res["entities"] and len(track) == len(res["entities"])
    for line, e in zip(track, res["entities"]):
        start, end, label = line.split("\t")
        assert (float(start), float(end), label) == (round(e["start_s"], 3), round(e["end_s"], 3),
                                                     f"{e['type']} {e['text']}")
    for extra in (["--asr"], ["--timestamps", "none"]):
        with pytest.raises(SystemExit):
            decode.get_args(["--ckpt", tiny_ckpt, "--wav", str(WAVS[0]), "--labels", str(tmp_path), *extra])
        assert "--labels" in capsys.readouterr().err


def test_cli_redacts_the_entities_of_one_recording(tiny_ckpt, tmp_path, capsys):
    """--redact OUT.wav: the recording's format kept (audio.redact_wav), each entity of the chosen types replaced
    from its start - pad to its end + pad, and OUT.wav.json says what; refused without exactly one --wav."""
    shutil.copy(WAVS[0], tmp_path / "call.wav")
    out = str(tmp_path / "redacted.wav")
    (res,) = run_cli(["--ckpt", tiny_ckpt, "--json", "--beam", "2", "--entity-bias", "8", "--wav",
                      str(tmp_path / "call.wav"), "--text", "张伟在北京大学读书", "--redact", out, "--pad-ms", "50",
                      "--redact-with", "silence", "--min-align-confidence", "0"], capsys)   # random head: unsure
    side = json.loads(Path(out + ".json").read_text(encoding="utf-8"))
    assert res["entities"] and len(side["replaced"]) == len(res["entities"])
    duration = audio.wav_info(out).seconds
    for r, e in zip(side["replaced"], res["entities"]):
        assert r["why"] == "aligned" and (r["type"], r["text"]) == (e["type"], e["text"])
        assert r["from_s"] == round(max(0.0, e["start_s"] - 0.05), 3) and r["to_s"] == round(min(duration, e["end_s"]
                                                                                                  + 0.05), 3)
    assert audio.wav_info(out) == audio.wav_info(tmp_path / "call.wav")
    samples = audio.read_wav(out)[0]
    for r in side["replaced"]:
        first, end = math.ceil(r["from_s"] * 16000), math.floor(r["to_s"] * 16000)
        assert float(samples[first:end].abs().max()) == 0.0           # silence where an entity was
    for extra in (["--text", "北京"], ["--wav", str(WAVS[0]), str(WAVS[1])], ["--wav", str(WAVS[0]), "--asr"]):
        with pytest.raises(SystemExit):
            decode.get_args(["--ckpt", tiny_ckpt, "--redact", out, *extra])
        assert "--redact" in capsys.readouterr().err


def test_cli_redacts_every_recording_into_a_folder(tiny_ckpt, tmp_path, capsys):
    """--redact-dir FOLDER: FOLDER/<wav name>.wav and its sidecar for every recording, each as --redact writes it
    alone; with --dataset only for one speech task."""
    texts = ["张伟在北京大学读书", "郭涛的公司搬到了合肥"]
    common = ["--ckpt", tiny_ckpt, "--json", "--beam", "2", "--entity-bias", "8", "--min-align-confidence", "0"]
    results = run_cli([*common, "--wav", str(WAVS[0]), str(WAVS[1]), "--text", *texts,
                       "--redact-dir", str(tmp_path / "red")], capsys)
    for res, wav in zip(results, WAVS[:2]):
        out = tmp_path / "red" / wav.name
        assert audio.wav_info(out) == audio.wav_info(wav)
        side = json.loads(Path(str(out) + ".json").read_text(encoding="utf-8"))
        run_cli([*common, "--wav", str(wav), "--text", res["input_text"], "--redact", str(tmp_path / "one.wav")],
                capsys)
        alone = json.loads((tmp_path / "one.wav.json").read_text(encoding="utf-8"))
        assert side["replaced"] == alone["replaced"] and side["source"] == str(wav)
        assert (tmp_path / "one.wav").read_bytes() == out.read_bytes()
    assert any(json.loads(Path(str(tmp_path / "red" / w.name) + ".json").read_text(encoding="utf-8"))["replaced"]
               for w in WAVS[:2])
    for extra in (["--dataset", "demo"], ["--dataset", "demo", "--task", "TNER"], ["--wav", str(WAVS[0]), "--asr"]):
        with pytest.raises(SystemExit):
            decode.get_args(["--ckpt", tiny_ckpt, "--redact-dir", str(tmp_path), *extra])
        assert "--redact-dir" in capsys.readouterr().err


def test_redaction_fails_closed_for_an_entity_without_a_time(tmp_path):
    """An entity with no time (no reading, or no alignment) replaces the stretch between the timed entities before
    and after its characters, and the sidecar says so."""
    wav = write_wav(tmp_path / "a.wav", noise(2.0, 5))
    res = {"wav": wav, "text": "张三和123和北京", "entities": [
        {"type": "PER", "text": "张三", "start": 0, "end": 2, "start_s": 0.2, "end_s": 0.5, "align_confidence": 0.9},
        {"type": "ORG", "text": "123", "start": 3, "end": 6, "start_s": None, "end_s": None, "align_confidence": None},
        {"type": "LOC", "text": "北京", "start": 7, "end": 9, "start_s": 1.4, "end_s": 1.8, "align_confidence": 0.9}]}
    audio.redact(res["wav"], res["entities"], str(tmp_path / "b.wav"), ["ORG"], "beep", 0.0)
    (r,) = json.loads((tmp_path / "b.wav.json").read_text(encoding="utf-8"))["replaced"]
    assert (r["from_s"], r["to_s"]) == (0.5, 1.4) and "no time" in r["why"] and "fail closed" in r["why"]


def test_redaction_replaces_entities_under_min_confidence_too(tiny_ckpt, tmp_path, capsys):
    """--min-confidence keeps an unsure entity out of the entity list, not out of the redaction (fail closed)."""
    shutil.copy(WAVS[0], tmp_path / "call.wav")
    out = str(tmp_path / "redacted.wav")
    (res,) = run_cli(["--ckpt", tiny_ckpt, "--json", "--beam", "2", "--entity-bias", "8", "--wav",
                      str(tmp_path / "call.wav"), "--text", "张伟在北京大学读书", "--redact", out,
                      "--min-align-confidence", "0", "--min-confidence", "1"], capsys)
    side = json.loads(Path(out + ".json").read_text(encoding="utf-8"))
    assert res["entities"] == [] and res["below_min_confidence"]
    assert [(r["type"], r["text"]) for r in side["replaced"]] == [(e["type"], e["text"])
                                                                  for e in res["below_min_confidence"]]


def test_redaction_fails_closed_for_an_entity_aligned_unsurely():
    """An entity whose alignment confidence is under the threshold takes the stretch between its located
    neighbours (an unsure neighbour does not count as located); at or above it, its own interval."""
    ents = [{"type": "PER", "text": "张三", "start": 0, "end": 2, "start_s": 0.2, "end_s": 0.5, "align_confidence": 0.8},
            {"type": "ORG", "text": "文联", "start": 3, "end": 5, "start_s": 0.7, "end_s": 0.9, "align_confidence": 0.1},
            {"type": "LOC", "text": "北京", "start": 6, "end": 8, "start_s": 1.0, "end_s": 1.2, "align_confidence": 0.2},
            {"type": "PER", "text": "李四", "start": 9, "end": 11, "start_s": 1.5, "end_s": 1.8, "align_confidence": 0.3}]
    plan = audio.redaction_plan(ents, 2.0, ["PER", "ORG", "LOC"], pad_s=0.0, min_align_confidence=0.3)
    assert [(r["from_s"], r["to_s"]) for r in plan] == [(0.2, 0.5), (0.5, 1.5), (0.5, 1.5), (1.5, 1.8)]
    assert [r["why"] == "aligned" for r in plan] == [True, False, False, True]
    assert "alignment confidence 0.1 < 0.3" in plan[1]["why"]
    everything = audio.redaction_plan(ents, 2.0, ["ORG"], pad_s=0.1, min_align_confidence=0.0)
    assert [(r["from_s"], r["to_s"], r["why"]) for r in everything] == [(0.6, 1.0, "aligned")]


def test_entity_confidence_is_a_probability_ordered_as_the_scores(tiny):
    """Every MNER entity has a confidence in [0, 1] (the probability of its brackets there and of no bracket at its
    characters, from the search); a higher temperature raises every one of them in the same order;
    --min-confidence moves the entities below it to below_min_confidence and keeps the others unchanged."""
    rec = recognize.Recognizer(tiny, device="cpu", beam=2, entity_bias=6.0)
    texts = ["张伟在北京大学读书", "李娜去了上海"]
    base = rec.recognize(texts=texts, waveforms=[audio.load_audio(WAVS[0]), audio.load_audio(WAVS[1])])
    ents = [e for r in base for e in r["entities"]]
    assert ents and all(0.0 <= e["confidence"] <= 1.0 for e in ents)
    warm = recognize.Recognizer(tiny, device="cpu", beam=2, entity_bias=6.0, confidence_temperature=3.0).recognize(
        texts=texts, waveforms=[audio.load_audio(WAVS[0]), audio.load_audio(WAVS[1])])
    warm_ents = [e for r in warm for e in r["entities"]]
    assert [(e["start"], e["end"], e["type"]) for e in warm_ents] == [(e["start"], e["end"], e["type"]) for e in ents]
    for a, b in zip(ents, warm_ents):       # both rounded to 4 decimals: b^3 within a's and b's rounding of a
        a, b = a["confidence"], b["confidence"]
        assert abs(b ** 3 - a) <= 5e-5 + 3 * b ** 2 * 5e-5 + 1e-7
    cut = sorted(e["confidence"] for e in ents)[len(ents) // 2]
    kept = recognize.Recognizer(tiny, device="cpu", beam=2, entity_bias=6.0, min_confidence=cut).recognize(
        texts=texts, waveforms=[audio.load_audio(WAVS[0]), audio.load_audio(WAVS[1])])
    assert [e for r in kept for e in r["entities"]] == [e for e in ents if e["confidence"] >= cut]
    assert [e for r in kept for e in r.get("below_min_confidence", [])] == [e for e in ents if e["confidence"] < cut]
    assert any(e["confidence"] < cut for e in ents)
    scaled = recognize.Recognizer(tiny, device="cpu", beam=2, entity_bias=6.0, confidence_platt=(0.5, -1.0)).recognize(
        texts=texts, waveforms=[audio.load_audio(WAVS[0]), audio.load_audio(WAVS[1])])
    for a, b in zip(ents, [e for r in scaled for e in r["entities"]]):   # Platt: sigmoid(0.5 logit(c) - 1)
        c = min(max(a["confidence"], 1e-6), 1 - 1e-6)
        assert b["confidence"] == pytest.approx(1 / (1 + math.exp(-(0.5 * math.log(c / (1 - c)) - 1))), abs=2e-4)
    for bad in (dict(min_confidence=1.5), dict(confidence_temperature=0.0), dict(confidence_platt=(1.0,)),
                dict(confidence_platt=(1.0, math.inf))):
        with pytest.raises(files.InputError, match="confidence"):
            recognize.Recognizer(tiny, device="cpu", **bad)


def test_entity_log_confidence_pairs_brackets_as_the_parser():
    """log P(open) + log P(each non-bracket token inside) + log P(close) of each entity from the per-token scores
    (inside=False: the brackets only): nested entities, a close that skips an open of another type (as data.parse
    pairs it), an entity written twice keeps its best; constrained, a token equal to
    the next input character is that character (a literal bracket)."""
    o, c = {"PER": 90, "LOC": 91, "ORG": 92}, {"PER": 93, "LOC": 94, "ORG": 95}
    # <(A)B>[[C]] : tokens 10, 11, 12 are characters; C is written as a PER twice
    tokens = [92, 91, 10, 94, 11, 95, 90, 90, 12, 93, 93]
    lp = [-0.1, -0.2, 0.0, -0.3, 0.0, -0.4, -1.0, -0.2, 0.0, -0.1, -0.5]
    found = search.entity_log_confidence(tokens, lp, o, c, lambda t: 1)
    assert found == pytest.approx({(0, 2, "ORG"): -0.5, (0, 1, "LOC"): -0.5, (2, 3, "PER"): -0.3})
    crossing = search.entity_log_confidence([90, 10, 91, 11, 93, 94], [-1, 0, -2, 0, -3, -4], o, c, lambda t: 1)
    assert crossing == {(0, 2, "PER"): -4, (1, 2, "LOC"): -6}
    # the input "x(y" constrained: the literal '(' (id 91) at position 1 is a character, then PER around y
    literal = search.entity_log_confidence([10, 91, 90, 11, 93], [0.0, -0.1, -0.2, 0.0, -0.3], o, c, lambda t: 1,
                                           char_ids=[10, 91, 11])
    assert literal == pytest.approx({(2, 3, "PER"): -0.5})
    pieces = search.entity_log_confidence([90, 10, 93, 11], [-0.1, 0.0, -0.1, 0.0], o, c, {10: 3, 11: 1}.get)
    assert pieces == pytest.approx({(0, 3, "PER"): -0.2})                 # a word piece of 3 characters
    # [(A)B]: the PER counts its non-bracket tokens A and B, not the LOC's brackets inside it
    tokens, lp = [90, 91, 10, 94, 11, 93], [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6]
    assert search.entity_log_confidence(tokens, lp, o, c, lambda t: 1) == pytest.approx(
        {(0, 2, "PER"): -0.1 - 0.3 - 0.5 - 0.6, (0, 1, "LOC"): -0.2 - 0.3 - 0.4})
    assert search.entity_log_confidence(tokens, lp, o, c, lambda t: 1, inside=False) == pytest.approx(
        {(0, 2, "PER"): -0.7, (0, 1, "LOC"): -0.6})


def test_jsonl_start_and_end_choose_a_stretch_of_the_wav(tmp_path):
    """"start_s"/"end_s": only that stretch (either alone: from the start / to the end); bad values are named
    with their file and line before anything is decoded."""
    import re
    wav = write_wav(tmp_path / "a.wav", torch.zeros(32000))                # 2 s
    lines = ['{"wav": "a.wav", "start_s": 0.5, "end_s": 1.25}', '{"wav": "a.wav", "start_s": 1}',
             '{"wav": "a.wav", "end_s": 0.75}', '{"wav": "a.wav"}']
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [r.span for r in decode.read_jsonl_requests(str(path))] == [(0.5, 1.25), (1.0, 2.0), (0.0, 0.75), None]
    for line, why in [('{"text": "甲", "start_s": 0}', '"start_s"/"end_s" need a "wav"'),
                      ('{"wav": "a.wav", "start_s": "1"}', '"start_s" must be a finite number of seconds, got a '
                                                          'string'),
                      ('{"wav": "a.wav", "end_s": true}', '"end_s" must be a finite number of seconds, got a boolean'),
                      ('{"wav": "a.wav", "end_s": NaN}', '"end_s" must be a finite number of seconds, got a number'),
                      ('{"wav": "a.wav", "start_s": 1' + "0" * 400 + '}', '"start_s" must be a finite number'),
                      ('{"wav": "a.wav", "start_s": 1, "end_s": 1.05}', "50 ms from start_s to end_s is too short"),
                      ('{"wav": "a.wav", "start_s": 1.5, "end_s": 1.5}', "start_s 1.5, end_s 1.5 is not a stretch"),
                      ('{"wav": "a.wav", "end_s": 2.5}', "start_s 0, end_s 2.5 is not a stretch"),
                      ('{"wav": "a.wav", "start_s": -1}', "start_s -1, end_s 2 is not a stretch")]:
        path.write_text(line + "\n", encoding="utf-8")
        with pytest.raises(files.InputError, match=re.escape(f"{path}:1: {why}")):
            decode.read_jsonl_requests(str(path))


def test_cli_refuses_to_redact_a_stretch(tiny_ckpt, tmp_path, capsys):
    """--redact-dir writes whole recordings: an input of only a stretch of one is refused before the model loads."""
    (tmp_path / "in.jsonl").write_text(json.dumps({"wav": str(WAVS[0]), "end_s": 1.0}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        decode.main(["--ckpt", tiny_ckpt, "--input", str(tmp_path / "in.jsonl"), "--redact-dir", str(tmp_path / "r")])
    assert "decode.py: --redact-dir: input 1 gives start_s/end_s" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_cli_decodes_a_stretch_of_a_wav_with_times_in_the_recording(tiny_ckpt, tmp_path, capsys):
    """An --input line with start_s/end_s, end to end: the result says its stretch and every time lies inside it."""
    seconds = audio.wav_info(WAVS[0]).seconds
    (tmp_path / "in.jsonl").write_text(json.dumps({"wav": str(WAVS[0]), "id": "turn", "start_s": 0.5}) + "\n",
                                       encoding="utf-8")
    (res,) = run_cli(["--ckpt", tiny_ckpt, "--json", "--beam", "2", "--timestamps", "chars", "--input",
                      str(tmp_path / "in.jsonl")], capsys)
    times = [t for row in res["char_times"] for t in row[1:] if t is not None]
    assert (res["id"], res["start_s"], res["end_s"]) == ("turn", 0.5, seconds) and times
    assert all(0.5 <= t <= seconds + 0.05 for t in times)
