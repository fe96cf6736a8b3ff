"""Tests for entitylist.py and the list bonus in the search: the SNER trie bonus against a slow reference computed
from the output string alone, beam search with the bonus against the slow beam search of test_decode.py, lists of
a batch kept apart, a listed string the model does not hear left out, the TNER/MNER bracket bonus, list files."""
import math
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import entitylist  # noqa: E402
import files  # noqa: E402
import recognize  # noqa: E402
import search  # noqa: E402
from options import DecodeOptions  # noqa: E402
from search import beam_search  # noqa: E402
from test_decode import TOY_CLOSE, TOY_OPEN, TOY_READINGS, FixedLogits, ToyEncoded, random_toy, slow_search  # noqa: E402
from test_decode import tiny  # noqa: E402,F401  (the fixture)
from text import EOS, MAX_DEPTH, TYPES  # noqa: E402

CHARS = [4, 5, 6, 7]
OPEN_TYPE = {v: t for t, v in TOY_OPEN.items()}
CLOSE_TYPE = {v: t for t, v in TOY_CLOSE.items()}


def tries_of(listed):
    """{type: [token lists]} -> tries as entitylist.tries_for makes them (None: an untyped entry)."""
    tries = {t: entitylist.Trie() for t in TYPES}
    for typ, strings in listed.items():
        for ids in strings:
            for t in ([typ] if typ else TYPES):
                tries[t].add(ids)
    return tries


def slow_gain(seq, listed, weight):
    """The bonus a token sequence holds, from its string alone: every bracket closed with its own type around a
    listed string of that type: weight x its length; every bracket still open whose content so far begins a listed
    string of its type: weight x the content's length; nothing for the rest, nor for what is open at EOS. A bracket
    earns nothing when a bracket of its type was already open at its place (a twin), nor when, while it is open,
    a bracket opens deeper than MAX_DEPTH or a close does not match the innermost open bracket or closes an empty
    one (malformed)."""
    def strings(t):
        return [s for typ, ss in listed.items() if typ in (t, None) for s in ss]
    stack, total, pos = [], 0.0, 0                           # stack: [type, content, start, spoiled]
    for tok in seq:
        if tok == EOS:
            return total
        if tok in OPEN_TYPE:
            t = OPEN_TYPE[tok]
            if len(stack) >= MAX_DEPTH:
                for frame in stack:
                    frame[3] = True
            twin = any(f[0] == t and f[2] == pos and not f[3] for f in stack)
            stack.append([t, [], pos, len(stack) >= MAX_DEPTH or twin])
        elif tok in CLOSE_TYPE:
            if stack:
                t, content, _, spoiled = stack.pop()
                if CLOSE_TYPE[tok] != t or not content:
                    for frame in stack:
                        frame[3] = True
                elif not spoiled and content in strings(t):
                    total += weight * len(content)
        else:
            pos += 1
            for frame in stack:
                frame[1].append(tok)
    return total + sum(weight * len(c) for t, c, _, spoiled in stack
                       if not spoiled and any(s[:len(c)] == c for s in strings(t)))


LISTED = {"PER": [[4, 5], [4, 5, 6]], "LOC": [[6, 7, 7]], None: [[7, 4]]}


def test_the_trie_bonus_equals_the_slow_reference_for_every_next_token():
    """At every step of random token sequences (brackets nested, mismatched and left open included), the bonus
    the boost adds to each possible next token is the slow reference's gain after it minus before it."""
    rng = random.Random(0)
    boost = entitylist.SpellingBoost([tries_of(LISTED)], TOY_OPEN, TOY_CLOSE, weight=0.7, eos=EOS)
    tokens = CHARS + list(TOY_OPEN.values()) + list(TOY_CLOSE.values())
    for _ in range(300):
        seq = [rng.choice(tokens) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.5:                                # often spell a listed string inside its bracket
            t = rng.choice(["PER", "LOC"])
            seq = [TOY_OPEN[t], *rng.choice(LISTED[t]), TOY_CLOSE[t], *seq]
        boost.start()
        for k in range(len(seq) + 1):
            before = slow_gain(seq[:k], LISTED, 0.7)
            bonus = boost.bias(torch.zeros(1, 14))[0]
            for v in tokens + [EOS]:
                assert bonus[v].item() == pytest.approx(slow_gain(seq[:k] + [v], LISTED, 0.7) - before, abs=1e-5), \
                    (seq[:k], v)
            if k < len(seq):
                boost.select([0], [seq[k]])


@pytest.mark.parametrize("seed", [6, 10])                   # toys whose results the lists change
def test_beam_search_with_the_boost_equals_the_slow_search_and_keeps_each_inputs_list(seed):
    """A batch of toy inputs, each with its own list (one with none): beam search with the boost returns what the
    slow beam search returns with the slow reference's gains added to each input's log-probabilities."""
    toy, enc = random_toy(seed, batch=3)
    lists = [LISTED, {"ORG": [[5, 5, 4]], "PER": [[6]]}, None]
    cfg = DecodeOptions(beam=3, max_len=10, no_repeat_ngram_size=0, constraint_range=None)
    boost = entitylist.SpellingBoost([tries_of(x) if x else None for x in lists], TOY_OPEN, TOY_CLOSE, 2.0, EOS)
    hyps = beam_search(toy, enc, cfg, boost=boost)
    changed = False
    for i, listed in enumerate(lists):
        def joint(prefix, lp, listed=listed):
            if not listed:
                return lp
            base = slow_gain(prefix, listed, 2.0)
            return lp + torch.tensor([slow_gain(prefix + [v], listed, 2.0) - base for v in range(14)])
        slow = slow_search(toy, enc.hidden[i, 0], cfg, 10, joint_fn=joint)
        assert [h.tokens for h in hyps[i]] == [s[0] for s in slow]
        assert [h.score for h in hyps[i]] == pytest.approx([s[1] for s in slow], abs=1e-4)
        plain = slow_search(toy, enc.hidden[i, 0], cfg, 10)
        changed |= [s[0] for s in slow] != [s[0] for s in plain]
        if listed is None:                                    # no list: exactly the plain search
            assert [h.tokens for h in hyps[i]] == [s[0] for s in plain]
        for h in hyps[i]:                                     # what the list added to each token, kept apart
            seq = h.tokens + [EOS]
            added = [slow_gain(seq[:k + 1], listed, 2.0) - slow_gain(seq[:k], listed, 2.0) if listed else 0.0
                     for k in range(len(seq))]
            assert h.positional_gains == pytest.approx(added, abs=1e-5)
            assert h.unbiased_scores() == pytest.approx([lp - g for lp, g in zip(h.positional_scores, added)])
    assert changed                                            # the lists did change some results


def scripted(rule):
    """A toy decoder whose next-token log-probs after a row's tokens `said` (BOS dropped) are rule(said): {token:
    log-prob}, every other token -30."""
    class Scripted(FixedLogits):
        def decode_step(self, tokens, cache, vocab_limit=None):
            history = cache.history = torch.cat([cache.history, tokens[:, None]], 1)
            rows = []
            for h in history.tolist():
                x = torch.full((14,), -30.0)
                for tok, lp in rule(h[1:]).items():
                    x[tok] = lp
                rows.append(x)
            return torch.stack(rows)
    return Scripted(None)


def test_a_listed_string_the_model_does_not_hear_is_not_forced_into_the_output():
    """After an opening PER bracket the model is sure of 4 (log-prob 0) and gives 6 a log-prob of -12: a listed
    6 7 gains 1 a character and cannot win; a close second (-0.5) does."""
    for second, listed_wins in ((-12.0, False), (-0.5, True)):
        def rule(said, second=second):
            if not said:
                return {TOY_OPEN["PER"]: 0.0}
            if said == [TOY_OPEN["PER"]]:
                return {4: 0.0, 6: second}
            if said[-1] in (4, 6) and len(said) == 2:
                return {5 if said[-1] == 4 else 7: 0.0}
            return {TOY_CLOSE["PER"]: 0.0} if len(said) == 3 else {EOS: 0.0}

        cfg = DecodeOptions(beam=2, max_len=8, no_repeat_ngram_size=0, constraint_range=None)
        boost = entitylist.SpellingBoost([tries_of({"PER": [[6, 7]]})], TOY_OPEN, TOY_CLOSE, 1.0, EOS)
        best = beam_search(scripted(rule), ToyEncoded(torch.zeros(1, 1, 14)), cfg, boost=boost)[0][0].tokens
        assert best == ([TOY_OPEN["PER"], 6, 7, TOY_CLOSE["PER"]] if listed_wins else
                        [TOY_OPEN["PER"], 4, 5, TOY_CLOSE["PER"]])


def test_a_list_cannot_crowd_the_heard_character_out_of_the_ctc_preselection():
    """Joint CTC with one candidate a step: after '[' the decoder prefers 5 (log-prob -0.5) to 4 (-1.0) and the
    audio clearly says CTC class 2 (character 5). A list holding 4 4 makes 4 the best biased character; the
    model's own best is a candidate too, the CTC scores 5, and the search keeps the heard [5 5]. With only the
    biased best scored (the bonus alone choosing the candidates), 5 would never be written."""
    def rule(said):
        if not said:
            return {TOY_OPEN["PER"]: 0.0}
        if len(said) < 3:
            return {4: -1.0, 5: -0.5}
        return {TOY_CLOSE["PER"]: 0.0} if len(said) == 3 else {EOS: 0.0}

    logp = torch.full((1, 6, 3), 1e-4).log()                 # frames: blank, 2, blank, 2, blank, blank
    for t in range(6):
        logp[0, t, 2 if t in (1, 3) else 0] = math.log(0.99)
    logp = logp.log_softmax(-1)
    silent = list(TOY_OPEN.values()) + list(TOY_CLOSE.values())
    cfg = DecodeOptions(beam=2, max_len=6, no_repeat_ngram_size=0, constraint_range=None)
    tries = [tries_of({"PER": [[4, 4]]})]
    scorer = search.CTCPrefixScorer(logp, torch.tensor([6]), lambda tok: TOY_READINGS.get(tok, []), silent, 1.0, 1)
    boost = entitylist.SpellingBoost(tries, TOY_OPEN, TOY_CLOSE, 3.0, EOS)
    best = beam_search(scripted(rule), ToyEncoded(torch.zeros(1, 1, 14)), cfg, scorer=scorer, boost=boost)[0][0]
    assert best.tokens == [TOY_OPEN["PER"], 5, 5, TOY_CLOSE["PER"]]

    scorer.start()                                           # the pre-selection itself, one row after '['
    lprobs = torch.full((1, 14), -30.0)
    lprobs[0, 4], lprobs[0, 5] = -1.0, -0.5
    gained = torch.zeros(1, 14)
    gained[0, 4] = 3.0                                       # 4 begins a listed string
    biased = lprobs + gained
    only_biased = scorer.score(biased.clone())
    dropped = -1e30                                          # characters the CTC does not score: dropped
    assert only_biased[0, 4] > dropped and only_biased[0, 5] < dropped
    both = scorer.score(biased.clone(), gained)
    assert both[0, 5] > both[0, 4] > dropped                 # 5 is scored, and the audio prefers it


def test_the_bracket_bonus_gains_at_the_opening_and_keeps_it_only_at_an_occurrences_end():
    """TNER/MNER: text 4 5 6 with 4 5 listed as LOC. Without the list the model tags nothing; with it the search
    brackets exactly (4 5) once its gain pays for the two brackets; the bias itself: +w x 2 on the LOC opening at
    0, on its close -w x 2 after one character and 0 after two; no second gain for a LOC opened inside it."""
    probs = torch.full((14,), 1e-9)
    probs[4:8] = 0.6 / 4
    probs[[*TOY_OPEN.values(), *TOY_CLOSE.values()]] = 0.4 / 6
    model, enc = FixedLogits(probs.log()), ToyEncoded(torch.zeros(1, 1, 14))
    cfg = DecodeOptions(beam=2, max_len=99, no_repeat_ngram_size=0, constraint_range=None)
    listed = [{0: {"LOC": (2,)}}]
    plain = beam_search(model, enc, cfg, search.BracketConstraint([[4, 5, 6]], TOY_OPEN, TOY_CLOSE), max_lens=[12])
    with_list = beam_search(model, enc, cfg, search.BracketConstraint([[4, 5, 6]], TOY_OPEN, TOY_CLOSE,
                                                                       listed=listed, list_weight=3.0), max_lens=[12])
    assert plain[0][0].tokens == [4, 5, 6]
    assert with_list[0][0].tokens == [TOY_OPEN["LOC"], 4, 5, TOY_CLOSE["LOC"], 6]
    # the gain kept apart from the model's scores (confidences take it off): +6 at the opening, nothing else
    assert plain[0][0].positional_gains is None
    assert with_list[0][0].positional_gains == pytest.approx([6.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    c = search.BracketConstraint([[4, 5, 6]], TOY_OPEN, TOY_CLOSE, listed=listed, list_weight=3.0)
    c.start()
    assert c.bias(torch.zeros(1, 14))[0, TOY_OPEN["LOC"]].item() == pytest.approx(6.0)
    assert c.bias(torch.zeros(1, 14))[0, TOY_OPEN["PER"]].item() == 0.0
    for tok, close_bonus in ((TOY_OPEN["LOC"], None), (4, -6.0), (5, 0.0)):
        c.advance([tok])
        if close_bonus is not None:
            assert c.bias(torch.zeros(1, 14))[0, TOY_CLOSE["LOC"]].item() == pytest.approx(close_bonus)
        else:
            assert c.bias(torch.zeros(1, 14))[0, TOY_OPEN["LOC"]].item() == 0.0   # a second ( at 0: no gain


def test_occurrences_find_every_listed_string_with_its_types():
    entries = [entitylist.Entry("北京", "LOC", "l:1"), entitylist.Entry("北京大学", "ORG", "l:2"),
               entitylist.Entry("京", None, "l:3")]
    assert entitylist.occurrences("在北京大学", entries) == {1: {"LOC": (3,), "ORG": (5,)},
                                                             2: {t: (3,) for t in TYPES}}
    assert entitylist.occurrences("上海", entries) == {}


def test_list_files_say_where_a_line_is_wrong(tmp_path):
    good = tmp_path / "names.txt"
    good.write_text("# staff\n张三 PER\n\n北京\n", encoding="utf-8")
    assert entitylist.read_entity_list(good) == [entitylist.Entry("张三", "PER", f"{good}:2"),
                                                 entitylist.Entry("北京", None, f"{good}:4")]
    for text, line, words in (("张三 PER\n李四 PERSON\n", 2, "STRING TYPE"), ("a b c\n", 1, "STRING TYPE"),
                              ("[张三]\n", 1, "bracket")):
        bad = tmp_path / "bad.txt"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(files.InputError, match=f"bad.txt:{line}: .*{words}"):
            entitylist.read_entity_list(bad)
    with pytest.raises(files.InputError, match="no such file"):
        entitylist.read_entity_list(tmp_path / "missing.txt")
    with pytest.raises(files.InputError, match="input 3: \"entities\" must be a list"):
        entitylist.entries_of("张三", "input 3")


def test_an_sner_list_the_decoder_cannot_write_is_refused_with_its_line(tiny, tmp_path):
    model, assets = tiny
    vocab = recognize.data.Featurizer(assets).vocab
    known = next(t for t in vocab.tokens[10:] if len(t) == 1)
    names = tmp_path / "names.txt"
    names.write_text(f"{known} PER\n{known}龘 ORG\n", encoding="utf-8")
    rec = recognize.Recognizer(tiny, device="cpu", beam=2, max_len=8, entities=str(names))
    wav = str(ROOT / "tests" / "fixtures" / "wavs" / "utt002.wav")
    with pytest.raises(files.InputError, match=r"names.txt:2: .*'龘'.*cannot write"):
        rec.run([recognize.Request(wav=wav)])
    rec.run([recognize.Request(text=f"{known}龘")])           # TNER: matched as written, accepted


def test_per_input_lists_of_a_batch_do_not_leak_into_each_other(tiny):
    """TNER through the Recognizer: an input with its own list brackets the listed string; the same text in the
    same batch without a list decodes exactly as with no list anywhere."""
    model, assets = tiny
    vocab = recognize.data.Featurizer(assets).vocab
    chars = [t for t in vocab.tokens[10:] if len(t) == 1][:5]
    text = "".join(chars)
    rec = recognize.Recognizer(tiny, device="cpu", beam=2, max_len=16, entity_weight=20.0)
    alone = rec.run([recognize.Request(text=text, id="a")])[0]
    listed, other = rec.run([recognize.Request(text=text, id="l", entities=[f"{chars[1]}{chars[2]} ORG"]),
                             recognize.Request(text=text, id="o")], batch_size=2)
    assert {(e["start"], e["end"], e["type"]) for e in listed["entities"]} >= {(1, 3, "ORG")}
    assert other["output"] == alone["output"] and other["entities"] == alone["entities"]
    with pytest.raises(files.InputError, match="entities must be a list"):   # a bare string: not 5 one-char names
        rec.run([recognize.Request(text=text, entities=f"{chars[1]}{chars[2]} ORG")])


def test_listed_entities_keep_their_confidence(tiny):
    """TNER with --entity-bias and a list of the entities the model finds anyway: the same entities, with the
    same confidences as without the list (the gains and the bias are taken off; with them every listed entity
    read as sure, log-probability + weight x its length > 0)."""
    texts = ["张伟在北京大学读书", "北京市气象台发布暴雨预警"]
    plain = recognize.Recognizer(tiny, device="cpu", beam=2, entity_bias=6.0).run(
        [recognize.Request(text=t, id=str(i)) for i, t in enumerate(texts)])
    found = [f"{e['text']} {e['type']}" for r in plain for e in r["entities"]]
    assert found
    listed = recognize.Recognizer(tiny, device="cpu", beam=2, entity_bias=6.0, entity_weight=2.0).run(
        [recognize.Request(text=t, id=str(i), entities=found) for i, t in enumerate(texts)])
    for a, b in zip(plain, listed):
        assert [(e["start"], e["end"], e["type"]) for e in a["entities"]] == [
            (e["start"], e["end"], e["type"]) for e in b["entities"]]
        assert [e["confidence"] for e in b["entities"]] == pytest.approx([e["confidence"] for e in a["entities"]],
                                                                          abs=2e-4)
    assert any(e["confidence"] < 0.99 for r in listed for e in r["entities"])


def slow_bracket_gain(tokens, listed, weight):
    """The list bonus a finished constrained output holds, from the output alone: for each (type, start) its
    outermost bracket, if it closes at the end of an occurrence of that type: weight x its length."""
    spans, stack, pos = [], [], 0
    for tok in tokens:
        if tok in OPEN_TYPE:
            stack.append((OPEN_TYPE[tok], pos, len(stack)))
        elif tok in CLOSE_TYPE:
            t, start, depth = stack.pop()
            spans.append((t, start, pos, depth))
        elif tok != EOS:
            pos += 1
    total = 0.0
    for t, start in {(t, a) for t, a, _, _ in spans}:
        _, _, end, _ = min((x for x in spans if (x[0], x[1]) == (t, start)), key=lambda x: x[3])   # outermost
        if end in listed.get(start, {}).get(t, ()):
            total += weight * (end - start)
    return total


def test_the_bracket_bonus_of_a_finished_output_equals_the_slow_reference():
    """Random constrained walks over a text with nested and overlapping listed occurrences: the bonus summed over
    the chosen tokens equals what the output string alone says it should keep."""
    rng = random.Random(3)
    text = [4, 5, 6, 7, 4, 5]
    listed = {0: {"LOC": (1, 2), "PER": (3,)}, 1: {"ORG": (3,)}, 4: {"LOC": (6,)}, 2: {t: (4,) for t in TYPES}}
    for _ in range(300):
        c = search.BracketConstraint([text], TOY_OPEN, TOY_CLOSE, max_depth=3, listed=[listed], list_weight=1.3)
        c.start()
        tokens, total = [], 0.0
        for step in range(24):
            rows, cols = c.allowed_pairs(step, [24])
            tok = rng.choice([tk for tk in cols if tk not in TOY_OPEN.values()] if len(tokens) > 16 else cols)
            total += c.bias(torch.zeros(1, 14))[0, tok].item()
            tokens.append(tok)
            if tok == EOS:
                break
            c.advance([tok])
        assert tokens[-1] == EOS
        assert total == pytest.approx(slow_bracket_gain(tokens, listed, 1.3), abs=1e-5), tokens
