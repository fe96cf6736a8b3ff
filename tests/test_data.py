"""Tests for data.py: linearization, official rules, loaders, model inputs, batching, stats CLI."""
import collections
import io
import json
import random
import re
import sys
import wave
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import weights  # noqa: E402
import evaluate  # noqa: E402
import files  # noqa: E402
from data import Entity, Sample  # noqa: E402
from test_audio import fbank_excess  # noqa: E402
from text import BOS, EOS, PAD, SPECIALS, TYPES, UNK  # noqa: E402

SHARED = ROOT / ".." / "shared"
CNERTA = SHARED / "data" / "cnerta"
AISHELL_NER = SHARED / "data" / "aishell_ner"
need_cnerta = pytest.mark.skipif(not (CNERTA / "valid.json").is_file(), reason="../shared/data/cnerta absent")
need_aishell = pytest.mark.skipif(not (AISHELL_NER / "dev.bio.txt").is_file(), reason="../shared/data/aishell_ner absent")


def E(s, e, t):
    return Entity(s, e, t)


# ---------------------------------------------------------------------------------------------------------------
# linearization (ours)

def test_linearize_examples():
    assert data.linearize("央视和中超", [E(0, 2, "ORG"), E(3, 5, "ORG"), E(3, 4, "LOC")]) == "<央视>和<(中)超>"
    # same-type nesting sharing a boundary: no collapsing, innermost closes first
    assert data.linearize("搜狐科技", [E(0, 4, "ORG"), E(0, 2, "ORG")]) == "<<搜狐>科技>"
    assert data.linearize("一汽大众", [E(0, 4, "ORG"), E(0, 2, "ORG"), E(2, 4, "ORG")]) == "<<一汽><大众>>"
    # identical span, two types: ORG outside LOC outside PER; adjacent entities close before they open
    assert data.linearize("北京", [E(0, 2, "LOC"), E(0, 2, "ORG")]) == "<(北京)>"
    assert data.linearize("张三李四", [E(0, 2, "PER"), E(2, 4, "PER")]) == "[张三][李四]"
    assert data.linearize("张三", [E(0, 2, "PER"), E(0, 2, "PER")]) == "[张三]"  # duplicate merged


def test_crossing_spans_drop_the_shorter():
    kept, crossing, dup = data.nest([E(0, 4, "ORG"), E(2, 7, "LOC"), E(0, 4, "ORG")])
    assert kept == [E(2, 7, "LOC")] and crossing == [E(0, 4, "ORG")] and dup == 1
    assert data.linearize("abcdefgh", [E(0, 4, "ORG"), E(2, 7, "LOC")]) == "ab(cdefg)h"


def test_linearize_rejects_bad_input():
    with pytest.raises(ValueError, match="bracket"):
        data.linearize("a(b", [])
    for entity, why in [(E(1, 3, "PER"), "end 3 > sentence length 2"), (E(1, 1, "PER"), "start 1 >= end 1"),
                        (E(-1, 1, "PER"), "start -1 < 0"), (E(0, 1, "GPE"), "type 'GPE' is not PER, LOC or ORG")]:
        with pytest.raises(ValueError, match=re.escape(f"entity {tuple(entity)}: {why}")):
            data.linearize("ab", [entity])


def random_nested(rng, n):
    """A random properly nested entity set over a text of n characters (incl. same-span multi-type)."""
    ents = set()
    def fill(lo, hi, depth):
        pos = lo
        while pos < hi and depth < 4:
            if rng.random() < 0.5:
                pos += 1
                continue
            end = rng.randint(pos + 1, hi)
            for t in rng.sample(TYPES, rng.choice([1, 1, 1, 2])):
                ents.add(E(pos, end, t))
            fill(pos, end, depth + 1)
            pos = end
    fill(0, n, 0)
    return sorted(ents)


def test_round_trip_random_nested_sets():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 15)
        text = "".join(rng.choice("中国北京大学科技") for _ in range(n))
        ents = random_nested(rng, n)
        bracketed = data.linearize(text, ents)
        assert data.parse(bracketed, strict=True) == (text, ents), bracketed


def test_parse_model_output_is_lenient_strict_is_not():
    assert data.parse("[张三]]在(北京") == ("张三在北京", [E(0, 2, "PER")])
    assert data.parse("<(北京>)") == ("北京", [E(0, 2, "LOC"), E(0, 2, "ORG")])  # crossing closes still pair by type
    assert data.parse("[]张三") == ("张三", [])
    for bad, why in [("[张三", "unclosed"), ("张三]", "closes no open"), ("<(北京>)", "crosses"), ("[]张", "empty")]:
        with pytest.raises(ValueError, match=why):
            data.parse(bad, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# the official rules

def test_official_rule_examples():
    assert data.linearize_official("搜狐科技", [E(0, 4, "ORG"), E(0, 2, "ORG")]) == "<搜狐>科技>"
    # closes at one boundary are emitted outer-first (wrong nesting order), as in the released files
    text, ents = "三星大中华区移动", [E(0, 8, "ORG"), E(0, 6, "ORG"), E(2, 6, "LOC"), E(0, 2, "ORG")]
    assert data.linearize_official(text, ents) == "<三星>(大中华区>)移动>"


def test_official_parser_pairs_nearest_and_drops_last_character():
    assert data.parse_official("<搜狐>科技>") == ("搜狐科技", [E(0, 2, "ORG")])
    assert data.parse_official("<搜狐>科技>", last_char_bug=False) == ("搜狐科技", [E(0, 2, "ORG"), E(0, 4, "ORG")])
    assert data.parse_official("在[张三]") == ("在张三", [])
    assert data.parse_official("在[张三]", last_char_bug=False)[1] == [E(1, 3, "PER")]
    assert data.parse_official("[张三]说")[1] == [E(0, 2, "PER")]


@need_cnerta
def test_real_dev_round_trip_and_official_file_byte_for_byte():
    samples = data.load_split("cnerta", CNERTA, "dev")
    gold = sum(len(set(s.entities)) for s in samples)
    recovered = sum(len(set(s.entities) & set(data.parse(data.linearize(s.text, s.entities))[1])) for s in samples)
    assert gold == recovered == 5889  # every entity of valid.json survives our round trip
    lines = "".join(f"{s.id} {data.linearize_official(s.text, s.entities)}\n" for s in samples)
    assert lines == (CNERTA / "image4imner_valid_bracketed.txt").read_text(encoding="utf-8")
    rt = evaluate.round_trip(samples)  # IMAGE.md §1.6: the official parser recovers 5,611 (5,829 without the bug)
    assert (rt["official_rule_kept"], rt["official_rule_kept_without_last_char_bug"]) == (5611, 5829)


@need_aishell
def test_aishell_ner_dev_transcripts_agree_with_bio_file():
    trans = data.load_split("aishell_ner", AISHELL_NER, "dev")
    bio = data.load_split("msra", AISHELL_NER, "dev")  # dev.bio.txt: char-per-line BIO
    assert len(trans) == len(bio) == 14326
    assert [(s.text, sorted(s.entities)) for s in trans] == [(s.text, sorted(s.entities)) for s in bio]
    assert evaluate.round_trip(trans)["ours_recovered"] == sum(len(s.entities) for s in trans) == 7221


# ---------------------------------------------------------------------------------------------------------------
# loaders on tiny files

def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_wav(path, seconds=0.5, rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        g = torch.Generator().manual_seed(len(str(path)))
        w.writeframes((torch.randn(int(seconds * rate), generator=g) * 3000).short().numpy().tobytes())
    return path


CNERTA_LINES = [
    {"sentence": "搜狐科技报道", "audio": "BAC009S0002W0001", "entity": [[0, 4, "搜狐科技", "ORG"], [0, 2, "搜狐", "ORG"]]},
    {"sentence": "张三在北京", "audio": "BAC009S0003W0002", "entity": [[0, 2, "张三", "PER"], [3, 5, "北京", "LOC"]]},
]


def test_cnerta_loader_and_audio_in_aishell_layout(tmp_path):
    write(tmp_path / "c" / "valid.json", "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in CNERTA_LINES))
    write_wav(tmp_path / "wav" / "train" / "S0002" / "BAC009S0002W0001.wav")
    samples = data.load_split("cnerta", tmp_path / "c", "dev", audio_dir=tmp_path / "wav", verbose=False)
    assert [s.text for s in samples] == ["搜狐科技报道", "张三在北京"]
    assert samples[0].entities == [E(0, 4, "ORG"), E(0, 2, "ORG")]  # file order kept
    assert samples[0].audio.endswith("S0002/BAC009S0002W0001.wav") and samples[1].audio is None
    assert samples.report["audio_found"] == 1 and samples.report["audio_missing"] == 1


def test_flat_audio_folder_and_default_wav_dir(tmp_path):
    write(tmp_path / "test.json", json.dumps(CNERTA_LINES[1], ensure_ascii=False) + "\n")
    write_wav(tmp_path / "wav" / "BAC009S0003W0002.wav")
    samples = data.load_split("demo", tmp_path, "test", verbose=False)  # demo = cnerta layout, DATA_DIR/wav default
    assert samples[0].audio is not None and samples.report["audio_missing"] == 0


@pytest.mark.parametrize("line, why", [
    ('{"sentence": "张三", "entity": [[0, 3, "张三", "PER"]]}', "end 3 > sentence length 2"),
    ('{"sentence": "张三", "entity": [[1, 1, "", "PER"]]}', "start 1 >= end 1"),
    ('{"sentence": "张三", "entity": [[-1, 1, "张", "PER"]]}', "start -1 < 0"),
    ('{"sentence": "张三", "entity": [[0, 1, "三", "PER"]]}', "the sentence has '张' at \\[0, 1\\)"),
    ('{"sentence": "张三", "entity": [[0, 2, "张三", "GPE"]]}', "type 'GPE' is not PER, LOC or ORG"),
    ('{"sentence": "张三"}', '"entity"'),
    ('{"sentence": "张三", "entity": [[0, 2]]}', "is not \\[start, end, text, type\\]"),
    ("not json", "Expecting value"),
])
def test_cnerta_malformed_line_names_file_and_line(tmp_path, line, why):
    path = write(tmp_path / "train.json", json.dumps(CNERTA_LINES[1], ensure_ascii=False) + "\n" + line + "\n")
    with pytest.raises(data.DataError, match=f"train.json:2: .*{why}"):
        data.load_split("cnerta", tmp_path, "train")
    samples = data.load_split("cnerta", tmp_path, "train", errors="collect", verbose=False)
    assert len(samples) == 1 and samples.report["malformed_count"] == 1 and f"{path}:2:" in samples.report["malformed"][0]


def test_aishell_ner_loader(tmp_path):
    write(tmp_path / "aishell_ner_transcript.test.txt",
          "BAC009S0764W0127 <中原地产>首席分析师[张大伟]说\nBAC009S0764W0130 (北京)仅新增\n\nBAC009S0764W0131 没有实体\n")
    samples = data.load_split("aishell_ner", tmp_path, "test", verbose=False)
    assert [(s.id, s.text, s.entities) for s in samples] == [
        ("BAC009S0764W0127", "中原地产首席分析师张大伟说", [E(0, 4, "ORG"), E(9, 12, "PER")]),
        ("BAC009S0764W0130", "北京仅新增", [E(0, 2, "LOC")]), ("BAC009S0764W0131", "没有实体", [])]
    write(tmp_path / "aishell_ner_transcript.dev.txt", "ID1 (北京\nID2\n")
    with pytest.raises(data.DataError, match=r"transcript.dev.txt:1: .*unclosed"):
        data.load_split("aishell_ner", tmp_path, "dev")
    bad = data.load_split("aishell_ner", tmp_path, "dev", errors="collect", verbose=False).report["malformed"]
    assert ":1:" in bad[0] and ":2:" in bad[1] and "utterance id" in bad[1]


def test_image4imner_loader_reads_the_lossy_format(tmp_path):
    write(tmp_path / "valid.txt", "BAC009S0002W0001 <搜狐>科技>报道\nBAC009S0002W0002 在[张三]\n")
    samples = data.load_split("image4imner", tmp_path, "valid", verbose=False)
    assert samples[0].entities == [E(0, 2, "ORG"), E(0, 4, "ORG")]  # both recovered from the collapsed brackets
    assert samples[1].entities == [E(1, 3, "PER")]  # an entity ending the sentence is kept for training


def test_msra_loader_bio_and_bmes(tmp_path):
    write(tmp_path / "train.txt", "中\tB-ORG\n共\tI-ORG\n致\tO\n张\tB-PER\n三\tI-PER\n\n北 B-NS\n京 I-NS\n")
    samples = data.load_split("msra", tmp_path, "train")
    assert [(s.text, s.entities, s.audio) for s in samples] == [
        ("中共致张三", [E(0, 2, "ORG"), E(3, 5, "PER")], None), ("北京", [E(0, 2, "LOC")], None)]
    write(tmp_path / "test.char.bmes", "上 B-LOC\n海 E-LOC\n人 S-PER\n好 O\n市 M-LOC\n")
    assert data.load_split("msra", tmp_path, "test")[0].entities == [E(0, 2, "LOC"), E(2, 3, "PER"), E(4, 5, "LOC")]
    write(tmp_path / "dev.txt", "中 B-ORG\n共 I-ORG\n\n北 B-GPE\n京 I-GPE\n\n好 O X\n")
    with pytest.raises(data.DataError, match=r"dev.txt:4: .*GPE"):
        data.load_split("msra", tmp_path, "dev")
    collected = data.load_split("msra", tmp_path, "dev", errors="collect")
    assert len(collected) == 1 and collected.report["malformed_count"] == 2 and ":7:" in collected.report["malformed"][1]


def test_loader_errors_name_what_is_missing(tmp_path):
    with pytest.raises(data.DataError, match="valid.json"):
        data.load_split("cnerta", tmp_path, "dev")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_split("conll", tmp_path, "dev")
    with pytest.raises(ValueError, match="unknown split"):
        data.load_split("cnerta", tmp_path, "eval")
    write(tmp_path / "train.json", "")
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_split("cnerta", tmp_path, "train", audio_dir=tmp_path / "nowhere")


def test_literal_brackets_in_a_sentence_become_full_width(tmp_path):
    write(tmp_path / "train.txt", "a\tO\n(\tO\nb\tB-PER\n")
    samples = data.load_split("msra", tmp_path, "train")
    assert samples[0].text == "a（b" and samples.report["brackets_made_fullwidth"] == 1
    assert data.linearize(samples[0].text, samples[0].entities) == "a（[b]"


def test_read_lines_keeps_u2028(tmp_path):
    assert data.read_lines(write(tmp_path / "v.txt", "中\n\u2028\n国\n")) == ["中", "\u2028", "国"]  # U+2028: a token


# ---------------------------------------------------------------------------------------------------------------
# model inputs, collate, loader

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 samples, 9 with wavs of different lengths, 3 without."""
    root = tmp_path_factory.mktemp("corpus")
    texts = ["张三在北京大学读书", "搜狐科技报道", "郭涛去了合肥", "马超看海", "中国足协", "李四说", "北京", "上海市",
             "王五和赵六", "无音频一", "无音频二", "无音频三"]
    out = []
    for i, t in enumerate(texts):
        wav = str(write_wav(root / f"u{i}.wav", seconds=0.3 + 0.1 * i)) if i < 9 else None
        out.append(Sample(f"u{i}", t, [E(0, 2, "PER")] if i % 2 == 0 else [], wav))
    out[1].entities = [E(0, 4, "ORG"), E(0, 2, "ORG")]
    return out


@pytest.fixture(scope="module")
def featurizer(corpus):
    return data.Featurizer(weights.assets_for_scratch(corpus))


def test_assets_for_scratch(corpus):
    assets = weights.assets_for_scratch(corpus)
    assert assets["vocab"][:10] == list(SPECIALS) + list("[]()<>")
    assert len(assets["phones"]) == 141 and assets["lexicon"] == {}
    assert assets["decoding"]["constraint_range"] == [4, len(assets["vocab"])]
    assert assets["fbank"] == {"num_mel_bins": 80, "cmvn": "utterance"}


def test_inputs_per_task(corpus, featurizer):
    s = corpus[1]
    want_target = featurizer.vocab.encode("<<搜狐>科技>报道") + [EOS]
    rows = {t: featurizer.inputs(s, t) for t in data.TASKS + (data.NEITHER,)}
    for task, x in rows.items():
        assert x["fbank"].shape[1] == 80 and x["fbank_lengths"] == x["fbank"].shape[0]
        assert bool(x["speech_present"]) == (task in ("SNER", "MNER"))
        assert bool(x["text_present"]) == (task in ("TNER", "MNER"))
        assert x["decoder_input"][0] == BOS and torch.equal(x["decoder_input"][1:], x["target"][:-1])
        if task != data.NEITHER:
            assert x["target"].tolist() == want_target
    assert rows[data.NEITHER]["target"].tolist() == [UNK] * 50 + [EOS]
    pseudo = rows["SNER"]
    assert pseudo["phones"].tolist() == [featurizer.phone_id["#2"]] * 40 and pseudo["phone_chars"].tolist() == [3] * 40
    text = rows["TNER"]  # one phone run per character, each phone carrying its character's id
    units, which = featurizer.phonemizer(s.text)
    assert text["phones"].tolist() == [featurizer.phone_id[u] for u in units]
    assert text["phone_chars"].tolist() == [featurizer.vocab.encode(s.text)[i] for i in which]
    assert torch.equal(rows["TNER"]["fbank"], rows[data.NEITHER]["fbank"])  # the same pseudo speech
    assert rows["TNER"]["fbank"].shape[0] == 61
    loader = data.Loader([s], featurizer, 1, train=True, tasks=("SNER",))   # the frame budget's count: exact
    for speed in (0.9, 1.0, 1.1):
        assert loader.frames((0, "SNER", speed)) == featurizer.inputs(s, "SNER", speed)["fbank"].shape[0], speed
    with pytest.raises(ValueError, match="needs audio"):
        featurizer.inputs(corpus[10], "MNER")
    with pytest.raises(ValueError, match="pseudo phone '#1'"):
        data.Featurizer(weights.assets_for_scratch(corpus), pseudo_phone="#1")


def test_feature_cache_computes_once_per_utterance_and_speed(corpus, tmp_path):
    assets = weights.assets_for_scratch(corpus)
    f = data.Featurizer(assets, cache_dir=tmp_path / "cache")
    a = f.speech(corpus[0].audio, 1.0)
    assert f.speech(corpus[0].audio, 1.0) is a and f.computed == 1
    f.speech(corpus[0].audio, 0.9)
    assert f.computed == 2
    g = data.Featurizer(assets, cache_dir=tmp_path / "cache", memory_cache=0)  # another process, same disk cache
    assert torch.equal(g.speech(corpus[0].audio, 1.0), a) and g.computed == 0
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 2


def test_collate_pads_and_stacks(corpus, featurizer):
    rows = [featurizer.inputs(corpus[0], "MNER"), featurizer.inputs(corpus[5], "SNER"), featurizer.inputs(corpus[11], "TNER")]
    b = data.collate(rows)
    T, P, L = (max(len(r[k]) for r in rows) for k in ("fbank", "phones", "target"))
    assert b["fbank"].shape == (3, T, 80) and b["phones"].shape == b["phone_chars"].shape == (3, P)
    assert b["target"].shape == b["decoder_input"].shape == (3, L)
    assert b["fbank_lengths"].tolist() == [len(r["fbank"]) for r in rows]
    assert b["speech_present"].tolist() == [True, True, False] and b["text_present"].tolist() == [True, False, True]
    for i, r in enumerate(rows):
        n, m, k = len(r["fbank"]), len(r["phones"]), len(r["target"])
        assert (b["fbank"][i, n:] == 0).all() and (b["phones"][i, m:] == PAD).all()
        assert (b["target"][i, k:] == PAD).all() and b["phone_lengths"][i] == m


def fake_samples(n, with_audio, wav):
    return [Sample(str(i), "中国", [], wav if i < with_audio else None) for i in range(n)]


def test_uniform_mix_is_one_third_each_and_redrawn_per_epoch(tmp_path, featurizer):
    samples = fake_samples(300, 240, str(write_wav(tmp_path / "a.wav")))
    loader = data.Loader(samples, featurizer, 8, train=True, seed=3)
    plans = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        items = [it for b in loader.batch_plan() for it in b]
        assert sorted({i for i, _, _ in items}) == list(range(300))
        assert len(items) == 304 and all(len(b) == 8 for b in loader.batch_plan())  # the last step fills up
        tasks = {i: t for i, t, _ in items}
        counts = collections.Counter(tasks[i] for i in range(240))
        assert sorted(counts.values()) == [80, 80, 80], counts
        assert all(tasks[i] == "TNER" for i in range(240, 300))  # no audio -> text only
        assert all(s == 1.0 for _, t, s in items if t == "TNER") and {s for _, t, s in items if t != "TNER"} == {0.9, 1.0, 1.1}
        plans.append(tasks)
    assert plans[0] != plans[1]
    loader.set_epoch(0)
    assert {i: t for b in loader.batch_plan() for i, t, _ in b} == plans[0]  # deterministic per (seed, epoch)


def test_coin_mix_quarters_including_neither(tmp_path, featurizer):
    samples = fake_samples(4000, 4000, str(write_wav(tmp_path / "a.wav")))
    loader = data.Loader(samples, featurizer, 16, train=True, task_mix="coin")
    counts = collections.Counter(t for b in loader.batch_plan() for _, t, _ in b)
    assert set(counts) == {"TNER", "SNER", "MNER", data.NEITHER}
    assert all(abs(c / 4000 - 0.25) < 0.03 for c in counts.values()), counts
    with pytest.raises(ValueError, match="coin"):
        data.Loader(samples, featurizer, 16, train=True, task_mix="coin", tasks=("TNER",))


def test_bucketing_groups_similar_lengths(tmp_path, featurizer):
    wavs = [str(write_wav(tmp_path / f"{k}.wav", seconds=0.5 + 0.5 * k)) for k in range(8)]
    samples = [Sample(str(i), "中国", [], wavs[i % 8]) for i in range(400)]
    loader = data.Loader(samples, featurizer, 8, train=True, tasks=("SNER",), speeds=(1.0,))
    spread = lambda batches: sum(max(map(loader.frames, b)) - min(map(loader.frames, b)) for b in batches) / len(batches)
    items = [it for b in loader.batch_plan() for it in b]
    random.Random(0).shuffle(items)
    unbucketed = [items[k: k + 8] for k in range(0, len(items), 8)]
    assert spread(loader.batch_plan()) < 0.2 * spread(unbucketed)


def test_every_rank_and_split_takes_the_same_global_steps(tmp_path, featurizer):
    """The steps of an epoch do not depend on the world size, --grad-accum or --max-frames; each step's rows are
    dealt to the ranks (5 rows on 3 ranks: 2, 2, 1) and split into micro-batches, every row exactly once."""
    samples = fake_samples(50, 50, str(write_wav(tmp_path / "a.wav")))
    make = lambda **kw: data.Loader(samples, featurizer, 5, train=True, seed=1, **kw)
    steps = make().batch_plan()
    assert len(steps) == 10 and all(len(rows) == 5 for rows in steps)
    for kw in ({"world_size": 3, "grad_accum": 2}, {"world_size": 2, "max_frames": 100}, {"grad_accum": 9}):
        world = kw.get("world_size", 1)
        loaders = [make(rank=r, **kw) for r in range(world)]
        assert all(loader.batch_plan() == steps for loader in loaders)
        shares = [loader.rank_steps() for loader in loaders]                  # [rank][step][micro-batch][row]
        for k, rows in enumerate(steps):
            dealt = [row for share in shares for micro in share[k] for row in micro]
            assert sorted(dealt) == sorted(rows), kw                            # each row once, on one rank
            sizes = [sum(map(len, share[k])) for share in shares]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            assert all(micro for share in shares for micro in share[k])         # no empty micro-batch
    with pytest.raises(ValueError, match="each of 6 ranks"):
        make(world_size=6)
    # 2 ranks x 1 micro-batch and 1 rank x 2 micro-batches: the same micro-batches (4 rows a step divide evenly)
    four = lambda **kw: data.Loader(samples, featurizer, 4, train=True, seed=1, **kw)
    ranks = [four(world_size=2, rank=r).rank_steps() for r in range(2)]
    assert [ranks[0][k] + ranks[1][k] for k in range(len(ranks[0]))] == four(grad_accum=2).rank_steps()
    assert data.near_equal_parts(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert data.near_equal_parts([1], 3) == [[1], [], []]


def test_a_corpus_smaller_than_the_batch_still_fills_every_step(tmp_path, featurizer):
    """5 samples, global batch 12 on 12 ranks: the one step goes around the epoch again to 12 rows, one a rank."""
    samples = fake_samples(5, 5, str(write_wav(tmp_path / "a.wav")))
    loaders = [data.Loader(samples, featurizer, 12, train=True, seed=1, rank=r, world_size=12) for r in range(12)]
    assert [len(rows) for rows in loaders[0].batch_plan()] == [12]
    assert all([len(micro) for micro in loader.rank_steps()[0]] == [1] for loader in loaders)


def test_a_frame_budget_splits_a_step_into_more_micro_batches(tmp_path, featurizer):
    """rows x longest row's frames <= max_frames in every micro-batch (a row longer than the budget alone);
    without a budget, grad_accum parts of near-equal size."""
    short, long = write_wav(tmp_path / "s.wav", seconds=1.0), write_wav(tmp_path / "l.wav", seconds=3.0)
    samples = [Sample(str(i), "中国", [], str(short if i % 2 else long)) for i in range(24)]
    plain = data.Loader(samples, featurizer, 12, train=True, seed=2, grad_accum=3, tasks=("SNER",))
    assert all([len(m) for m in micro] == [4, 4, 4] for micro in plain.rank_steps())
    budget = 700                                                         # ~2.3 long rows at speed 0.9, ~7 short ones
    capped = data.Loader(samples, featurizer, 12, train=True, seed=2, max_frames=budget, tasks=("SNER",))
    for rows, micro in zip(capped.batch_plan(), capped.rank_steps()):
        assert [row for m in micro for row in m] == rows                 # the step's rows, in order
        assert len(micro) > 1
        assert all(len(m) == 1 or len(m) * max(map(capped.frames, m)) <= budget for m in micro)
    batches = next(iter(capped))                                          # the collated micro-batches of step 0
    assert [len(b["target"]) for b in batches] == [len(m) for m in capped.rank_steps()[0]]
    assert all(b["fbank"].shape[0] * b["fbank"].shape[1] <= budget or len(b["target"]) == 1 for b in batches)


def test_eval_batches_are_dealt_to_ranks_in_turn(tmp_path, featurizer):
    samples = fake_samples(50, 50, str(write_wav(tmp_path / "a.wav")))
    eval_plans = [data.Loader(samples, featurizer, 4, train=False, tasks=("TNER",), rank=r, world_size=3)
                  .batch_plan() for r in range(3)]
    assert sorted(i for p in eval_plans for b in p for i, _, _ in b) == list(range(50))  # eval: each sample once


def test_eval_loader_covers_every_task_it_can(corpus, featurizer):
    loader = data.Loader(corpus, featurizer, 5, train=False)
    items = [it for b in loader.batch_plan() for it in b]
    assert collections.Counter(t for _, t, _ in items) == {"TNER": 12, "SNER": 9, "MNER": 9}
    assert all(s == 1.0 for _, _, s in items)
    batches = [micro for step in loader for micro in step]                 # one micro-batch a step
    assert len(batches) == len(loader) and sum(len(b["target"]) for b in batches) == 30


def test_workers_give_the_same_batches(corpus):
    # fbank: workers run torch on 1 thread, so FFT and matmul sum in another order: within float32 rounding, by
    # tests/test_audio.py's rule (energies relative to the frame's loudest, n = 512). That rule reads the log
    # fbank, so CMVN is off here; it is numpy on one thread (the same in workers) and tested in test_audio.py.
    assets = weights.assets_for_scratch(corpus)
    raw = data.Featurizer({**assets, "fbank": {**assets["fbank"], "cmvn": "none"}})
    make = lambda w: data.Loader(corpus, raw, 4, train=True, seed=5, num_workers=w)
    plain, workers = make(0), make(2)
    for epoch in (0, 1):  # persistent workers follow set_epoch
        plain.set_epoch(epoch), workers.set_epoch(epoch)
        for a, b in zip((m for step in plain for m in step), (m for step in workers for m in step), strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a if k != "fbank")      # the same path: identical
            assert fbank_excess(b["fbank"], a["fbank"]) <= 1


# ---------------------------------------------------------------------------------------------------------------
# stats CLI

def test_stats_cli(tmp_path):
    lines = CNERTA_LINES + [{"sentence": "abcdefg", "audio": "X", "entity": [[0, 4, "abcd", "ORG"], [2, 6, "cdef", "LOC"]]}]
    write(tmp_path / "valid.json", "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in lines) + "{broken\n")
    write_wav(tmp_path / "wav" / "dev" / "S0003" / "BAC009S0003W0002.wav")
    out = io.StringIO()
    with redirect_stdout(out):
        evaluate.main(["stats", "--dataset", "cnerta", "--data-dir", str(tmp_path), "--split", "dev"])
    s = json.loads(out.getvalue())
    assert s["sentences"] == 3 and s["entities"] == {"PER": 1, "LOC": 2, "ORG": 3, "total": 6}
    assert s["nesting_depth"] == {"1": 2, "2": 1} and s["crossing_spans"] == 1
    assert s["round_trip"]["ours_recovered"] == 5 and s["round_trip"]["official_rule_kept"] == 5
    assert s["audio"]["audio_found"] == 1 and s["audio"]["audio_missing"] == 2
    assert s["malformed"]["count"] == 1 and "valid.json:4:" in s["malformed"]["first"][0]


# ---------------------------------------------------------------------------------------------------------------
# issue #14: valid input that used to crash, non-UTF-8 files, spans past the end

def test_featurizer_builds_text_inputs_for_characters_without_a_reading(corpus, featurizer):
    s = Sample("x", "𠮷野家在北京", [E(4, 6, "LOC")])
    x = featurizer.inputs(s, "TNER")
    unk = featurizer.phone_id["<unk>"]
    assert x["phones"][0] == unk and x["phone_chars"][0] == UNK  # 𠮷 is outside the corpus vocabulary too
    assert len(x["phones"]) == 12 and x["phone_lengths"] == 12  # 1 + 2 + 2 + 2 + 2 + 3
    assert x["target"].tolist() == featurizer.vocab.encode("𠮷野家在(北京)") + [EOS]


@pytest.mark.parametrize("dataset, good, bad, column", [
    ("cnerta", json.dumps(CNERTA_LINES[1], ensure_ascii=False).encode(), b'{"sentence": "\xff', 15),
    ("aishell_ner", "ID1 (北京)仅新增".encode(), b"ID2 \xe5\x8c", 5),  # a character cut short
    ("image4imner", "ID1 (北京)仅新增".encode(), "ID2 北京".encode("gbk"), 5),
    ("msra", "北 B-LOC\n京 I-LOC\n".encode(), b"\xff O", 1),
])
def test_corpus_files_must_be_utf8_and_may_start_with_a_bom(tmp_path, dataset, good, bad, column):
    path = tmp_path / "train.json" if dataset == "cnerta" else tmp_path / "train.txt"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n")
    samples = data.load_split(dataset, tmp_path, "train", verbose=False)
    assert len(samples) == 1 and samples[0].entities and samples[0].id != "\ufeffID1"
    path.write_bytes(good + b"\n" + bad + b"\n")
    line = good.count(b"\n") + 2
    for errors in ("raise", "collect"):  # a file in another encoding is refused whole, even when collecting
        with pytest.raises(data.DataError, match=re.escape(f"{path}:{line}: not UTF-8 (byte 0x{bad[column - 1]:02x} "
                                                           f"at column {column})")):
            data.load_split(dataset, tmp_path, "train", errors=errors, verbose=False)
    assert issubclass(data.DataError, files.InputError)  # entry points print it without a traceback


def test_json_lines_must_be_utf8(tmp_path):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes('\ufeff{"text": "甲\u2028乙"}\n\n{"text": "丙"}\n'.encode())  # BOM; U+2028 is no line end
    assert list(data.json_lines(jsonl)) == [(1, {"text": "甲\u2028乙"}), (3, {"text": "丙"})]
    jsonl.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(data.DataError, match=re.escape(f"{jsonl}:2: not UTF-8 (byte 0xff at column 11)")):
        list(data.json_lines(jsonl))
    jsonl.write_bytes('{"text": "甲\u2028乙"}\n{"text" 1}\n'.encode())
    with pytest.raises(data.DataError, match=re.escape(f"{jsonl}:2: not JSON")):
        list(data.json_lines(jsonl))


def test_cnerta_lines_may_carry_gold_entity_times(tmp_path):
    """"entity_times" (one [start_s, end_s] per entity, as the demo corpus writes) reaches Sample.times; a wrong
    count or a bad pair is an error naming file:line; without the key times is None."""
    timed = dict(CNERTA_LINES[1], entity_times=[[0.1, 0.5], [0.9, 1.3]])
    write(tmp_path / "test.json", json.dumps(timed, ensure_ascii=False) + "\n"
          + json.dumps(CNERTA_LINES[0], ensure_ascii=False) + "\n")
    a, b = data.load_split("cnerta", tmp_path, "test")
    assert a.times == [(0.1, 0.5), (0.9, 1.3)] and b.times is None
    for bad in ([[0.1, 0.5]], [[0.5, 0.1], [0.9, 1.3]], [[0.1, "x"], [0.9, 1.3]], {"a": 1}):
        write(tmp_path / "test.json", json.dumps(dict(CNERTA_LINES[1], entity_times=bad), ensure_ascii=False) + "\n")
        with pytest.raises(data.DataError, match=r"test.json:1: .*entity_times.* one \[start_s, end_s\] per entity"):
            data.load_split("cnerta", tmp_path, "test")
