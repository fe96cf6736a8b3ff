"""Demo corpus: format, offsets, nesting, splits, determinism, AISHELL wav layout, caching/atomicity, errors."""
import json
import os
import re
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import demo  # noqa: E402
import entitylist  # noqa: E402
import synth  # noqa: E402

HAVE_TOOLS = shutil.which("espeak-ng") is not None and shutil.which("sox") is not None and synth.espeak_library()
try:
    import pypinyin  # noqa: F401
except ImportError:
    HAVE_TOOLS = False
needs_tools = pytest.mark.skipif(not HAVE_TOOLS, reason="espeak-ng, sox or pypinyin missing (apt-get install "
                                 "espeak-ng sox; pip install pypinyin)")
SMALL = dict(n_train=12, n_dev=4, n_test=4)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def is_nested(entities):
    return any(a is not b and b[0] <= a[0] and a[1] <= b[1] for a in entities for b in entities)


@pytest.fixture(scope="module")
def sentences():
    return demo.make_sentences(0, 2000, 200, 200)


def test_sentences_are_well_formed(sentences):
    for split, recs in sentences.items():
        for r in recs:
            text = r["sentence"]
            assert 8 <= len(text) <= 20 and re.fullmatch(r"[\u4e00-\u9fff]+", text), text
            assert r["entity"] == sorted(r["entity"], key=lambda e: (e[0], -e[1], e[3]))
            for start, end, ent_text, ent_type in r["entity"]:
                assert 0 <= start < end <= len(text) and text[start:end] == ent_text, (text, r["entity"])
                assert ent_type in ("PER", "LOC", "ORG")
            spans = [(e[0], e[1]) for e in r["entity"]]
            assert len(spans) == len(set(spans)), r  # one type per span
            # brackets must nest properly: two entities are disjoint or one contains the other
            for a in r["entity"]:
                for b in r["entity"]:
                    assert a[1] <= b[0] or b[1] <= a[0] or (a[0] <= b[0] and b[1] <= a[1]) or \
                        (b[0] <= a[0] and a[1] <= b[1]), r
            assert re.fullmatch(r"DEMO01S\d{4}W\d{4}", r["audio"]) and r["speaker_info"] in ("F", "M")


def test_corpus_statistics(sentences):
    train = sentences["train"]
    nested = sum(is_nested(r["entity"]) for r in train) / len(train)
    assert 0.15 <= nested <= 0.5, nested
    same_type = [r for r in train if any(a is not b and a[3] == b[3] and b[0] <= a[0] and a[1] <= b[1]
                                         for a in r["entity"] for b in r["entity"])]
    assert len(same_type) > 20  # e.g. <<(北京)大学>医学部>
    counts = [len(r["entity"]) for r in train]
    assert 0.02 < counts.count(0) / len(train) < 0.15  # some sentences without entities
    types = {e[3] for r in train for e in r["entity"]}
    assert types == {"PER", "LOC", "ORG"}
    assert len({r["sentence"][:4] for r in train}) > 500  # varied, not a handful of templates


def test_splits_disjoint_and_covered(sentences):
    texts = {split: [r["sentence"] for r in recs] for split, recs in sentences.items()}
    assert [len(texts[s]) for s in ("train", "dev", "test")] == [2000, 200, 200]
    all_texts = sum(texts.values(), [])
    assert len(all_texts) == len(set(all_texts))  # no duplicates within or across splits
    ids = [r["audio"] for recs in sentences.values() for r in recs]
    assert len(ids) == len(set(ids))
    train_chars = set("".join(texts["train"]))
    train_entities = {e[2] for r in sentences["train"] for e in r["entity"]}
    for split in ("dev", "test"):
        assert set("".join(texts[split])) <= train_chars  # no character unknown to a vocabulary built on train
        unseen = [e[2] for r in sentences[split] for e in r["entity"] if e[2] not in train_entities]
        assert len(unseen) > 20  # the test set checks generalisation to new names
    held_cities = set(demo.Pools(0).held["city"])
    assert held_cities and not any(e[2].rstrip("市") in held_cities
                                   for r in sentences["train"] for e in r["entity"] if e[3] == "LOC")


def test_deterministic_and_seed_dependent():
    a = demo.make_sentences(3, 50, 10, 10)
    assert a == demo.make_sentences(3, 50, 10, 10)
    assert a != demo.make_sentences(4, 50, 10, 10)


def test_name_characters_are_distinguishable_by_ear():
    from pypinyin import Style, lazy_pinyin
    for chars in (demo.SURNAMES, demo.GIVEN):
        readings = [lazy_pinyin(c, style=Style.TONE3)[0] for c in chars]
        assert len(set(readings)) == len(chars), [c for c, p in zip(chars, readings) if readings.count(p) > 1]


def test_text_only_corpus_and_cli(tmp_path, capsys):
    demo.main(["--out", str(tmp_path / "c"), "--no-audio", "--n-train", "30", "--n-dev", "5", "--n-test", "5",
               "--quiet"])
    assert str(tmp_path / "c") in capsys.readouterr().out
    root = tmp_path / "c"
    want = demo.make_sentences(0, 30, 5, 5)
    for split, json_name, _ in demo.SPLITS:
        lines = read_jsonl(root / json_name)
        assert [list(line) for line in lines] == [["sentence", "audio", "entity", "speaker_info"]] * len(lines)
        assert [line["sentence"] for line in lines] == [r["sentence"] for r in want[split]]
    assert not (root / "wav").exists()
    meta = json.loads((root / "meta.json").read_text())
    assert meta["audio"] is False and meta["splits"]["dev"]["sentences"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # the temporary folder is gone


def test_cached_and_settings_checked(tmp_path):
    root = demo.ensure_demo_corpus(tmp_path / "c", progress=False, audio=False, **SMALL)
    stamp = (root / "meta.json").stat().st_mtime_ns
    assert demo.ensure_demo_corpus(tmp_path / "c", progress=False, audio=False, **SMALL) == root
    assert (root / "meta.json").stat().st_mtime_ns == stamp  # not rebuilt
    with pytest.raises(ValueError, match="other settings.*seed"):
        demo.ensure_demo_corpus(tmp_path / "c", seed=1, progress=False, audio=False, **SMALL)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "train.json").write_text("{}\n")
    with pytest.raises(FileExistsError, match="junk.*not a complete demo corpus"):
        demo.ensure_demo_corpus(tmp_path / "junk", progress=False, audio=False, **SMALL)


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGE_CACHE", str(tmp_path))
    assert demo.default_root() == tmp_path / f"{demo.VERSION}-seed0"
    assert demo.default_root(2, audio=False, n_train=10) == tmp_path / f"{demo.VERSION}-seed2-n10-400-400-text"


def test_missing_espeak_is_a_clear_error(monkeypatch, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(RuntimeError, match=r"espeak-ng.*apt-get install espeak-ng sox"):
        demo.ensure_demo_corpus(tmp_path / "c", progress=False, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["bin"]


@needs_tools
def test_interrupted_build_leaves_nothing(monkeypatch, tmp_path):
    """A synthesis that fails in a worker process (here a `sox` that exits with 3) stops the build with that error
    and leaves no folder behind."""
    fake = tmp_path / "bin" / "sox"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    with pytest.raises(RuntimeError, match=r"`sox .*` failed \(3\)"):
        demo.ensure_demo_corpus(tmp_path / "c", progress=False, workers=2, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["bin"]


@needs_tools
def test_audio_corpus_layout_and_determinism(tmp_path):
    a = demo.ensure_demo_corpus(tmp_path / "a", seed=5, progress=False, **SMALL)
    b = demo.ensure_demo_corpus(tmp_path / "b", seed=5, progress=False, workers=1, **SMALL)
    n_wavs = 0
    for split, json_name, wav_dir in demo.SPLITS:
        assert (a / json_name).read_bytes() == (b / json_name).read_bytes()
        for line in read_jsonl(a / json_name):
            rel = Path("wav", wav_dir, line["audio"][6:11], line["audio"] + ".wav")  # AISHELL-1: wav/split/spk/id.wav
            with wave.open(str(a / rel)) as w:
                assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
                assert 1.0 < w.getnframes() / 16000 < 10.0, (rel, w.getnframes())
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel  # bit-exact repeatable
            n_wavs += 1
    assert n_wavs == sum(SMALL.values()) == len(list((a / "wav").rglob("*.wav")))
    assert (a / "index.jsonl").read_bytes() == (b / "index.jsonl").read_bytes()
    meta = json.loads((a / "meta.json").read_text())
    assert meta["audio"] is True and meta["tools"]["espeak-ng"] and meta["splits"]["train"]["audio_seconds"] > 10
    # voices differ between utterances: rate and pitch jitter
    index = read_jsonl(a / "index.jsonl")
    assert len({(r["rate"], r["pitch"]) for r in index}) > 10
    assert all(re.fullmatch(r"([a-z]+[1-5] )*[a-z]+[1-5]", r["pinyin"]) for r in index)


@needs_tools
def test_gold_entity_times_match_the_speech(tmp_path):
    """Every entity has [start_s, end_s] inside its recording; a nested entity lies inside its parent; an entity
    that starts (ends) the sentence starts (ends) where the wav's first (last) sample at -40 dB of its peak is, to
    the resampler's ringing (2 ms); the audio is the espeak-ng command's own, byte for byte."""
    import numpy as np
    root = demo.ensure_demo_corpus(tmp_path / "c", seed=1, progress=False, **SMALL)
    index = {r["id"]: r for r in read_jsonl(root / "index.jsonl")}
    checked_edges = 0
    for _, json_name, _ in demo.SPLITS:
        for line in read_jsonl(root / json_name):
            meta = index[line["audio"]]
            x = np.abs(wave_samples(root / meta["wav"]).astype(np.int32))
            loud = np.flatnonzero(x >= x.max() * 10 ** (synth.SILENCE_DB / 20))
            duration = len(x) / 16000
            assert len(line["entity_times"]) == len(line["entity"])
            for (s, e, _, _), (a, b) in zip(line["entity"], line["entity_times"]):
                assert 0 <= a < b <= duration
                if s == 0:
                    assert abs(a - loud[0] / 16000) < 0.002
                    checked_edges += 1
                if e == len(line["sentence"]):
                    assert abs(b - (loud[-1] + 1) / 16000) < 0.002
                    checked_edges += 1
            for (s1, e1, _, _), t1 in zip(line["entity"], line["entity_times"]):
                for (s2, e2, _, _), t2 in zip(line["entity"], line["entity_times"]):
                    if s2 <= s1 and e1 <= e2:
                        assert t2[0] <= t1[0] and t1[1] <= t2[1]
                    if e1 <= s2:                                   # earlier text, earlier speech
                        assert t1[1] <= t2[0]
    assert checked_edges >= 3
    r = next(iter(index.values()))
    speech = subprocess.run(["espeak-ng", "-v", r["voice"], "-s", str(r["rate"]), "-p", str(r["pitch"]), "--stdout",
                             r["pinyin"]], capture_output=True, check=True).stdout
    cli = subprocess.run(["sox", "-D", "-R", "-t", "wav", "-", "-r", "16000", "-c", "1", "-b", "16", "-e",
                          "signed-integer", str(tmp_path / "cli.wav"), "gain", "-1", "rate", "16000"], input=speech,
                         check=True)
    assert cli.returncode == 0 and (tmp_path / "cli.wav").read_bytes() == (root / r["wav"]).read_bytes()


def wave_samples(path):
    import numpy as np
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)


@needs_tools
def test_long_form_recordings_join_the_test_utterances_with_their_gold(tmp_path):
    """build_long_form: each recording at least its length, its text the utterances' joined, entity offsets and
    times moved by the utterance's place; the cut set is the recording's own samples at the gold boundaries; the
    pauses follow the recipe; the same seed writes the same bytes."""
    import numpy as np
    root = demo.ensure_demo_corpus(tmp_path / "c", seed=2, progress=False, n_train=4, n_dev=2, n_test=6)
    out = demo.build_long_form(root, tmp_path / "long", seed=0, minutes=(0.25, 0.5))
    originals = {r["audio"]: r for r in read_jsonl(root / "test.json")}
    cut = {r["audio"]: r for r in read_jsonl(tmp_path / "long" / "cut" / "test.json")}
    assert read_jsonl(tmp_path / "long" / "test.json") == out and len(out) == 2
    for rec, minutes in zip(out, (0.25, 0.5)):
        x = wave_samples(tmp_path / "long" / "wav" / "test" / f"{rec['audio']}.wav")
        assert len(x) / 16000 == pytest.approx(rec["seconds"], abs=1e-3) and rec["seconds"] >= minutes * 60
        assert 5 <= rec["snr_db"] <= 30
        text, k = "", 0
        for u in rec["utterances"]:
            orig = originals[u["audio"][:16]]
            assert cut[u["audio"]]["sentence"] == orig["sentence"] and rec["sentence"][slice(*u["chars"])] == \
                orig["sentence"] and -12 <= u["gain_db"] <= 12
            piece = wave_samples(tmp_path / "long" / "cut" / "wav" / "test" / f"{u['audio']}.wav")
            a = round(u["start_s"] * 16000)
            assert np.array_equal(piece, x[a: a + len(piece)])
            for (s, e, name, typ), (t0, t1) in zip(orig["entity"], orig["entity_times"]):
                assert rec["entity"][k] == [s + u["chars"][0], e + u["chars"][0], name, typ]
                assert rec["entity_times"][k] == pytest.approx([t0 + u["start_s"], t1 + u["start_s"]], abs=2e-4)
                k += 1
            text += orig["sentence"]
        assert rec["sentence"] == text and k == len(rec["entity"])
        starts = [u["start_s"] for u in rec["utterances"]]
        pauses = [b - a for a, b in zip([0.0] + [u["end_s"] for u in rec["utterances"]], starts)]
        assert all(0.1 - 1e-3 <= p <= 2.0 + 1e-3 for p in pauses)
    again = demo.build_long_form(root, tmp_path / "again", seed=0, minutes=(0.25, 0.5))
    assert again == out and (tmp_path / "again" / "wav" / "test" / "LONG0002.wav").read_bytes() == (
        tmp_path / "long" / "wav" / "test" / "LONG0002.wav").read_bytes()


@needs_tools
def test_the_long_form_set_has_a_valid_split_of_its_own_for_choosing_settings(tmp_path):
    """ensure_long_form: a valid split made of the valid utterances (its own ids, wavs and cut set); a set built
    before there was one gets it, its test split untouched; evaluate.py long-form --split valid scores it."""
    import diagnose
    root = demo.ensure_demo_corpus(tmp_path / "c", seed=2, progress=False, n_train=4, n_dev=3, n_test=3)
    out = demo.ensure_long_form(root, seed=0, minutes=(0.25,), valid_minutes=(0.25, 0.25))
    valid, test = read_jsonl(out / "valid.json"), read_jsonl(out / "test.json")
    dev_ids = {r["audio"] for r in read_jsonl(root / "valid.json")}
    assert [r["audio"] for r in valid] == ["VLONG0001", "VLONG0002"] and [r["audio"] for r in test] == ["LONG0001"]
    cut = read_jsonl(out / "cut" / "valid.json")
    assert [c["audio"] for c in cut] == [u["audio"] for r in valid for u in r["utterances"]]
    assert all(c["audio"][:16] in dev_ids and (out / "cut" / "wav" / "valid" / f"{c['audio']}.wav").is_file()
               for c in cut)
    assert all((out / "wav" / "valid" / f"{r['audio']}.wav").is_file() for r in valid)
    assert test == demo.build_long_form(root, tmp_path / "alone", seed=0, minutes=(0.25,))   # as without valid
    before = {p: p.read_bytes() for p in sorted((out / "wav" / "test").iterdir())}
    for part in ("wav/valid", "cut/wav/valid"):                    # a set from before the valid split
        shutil.rmtree(out / part)
    (out / "valid.json").unlink(), (out / "cut" / "valid.json").unlink()
    assert demo.ensure_long_form(root, seed=0, minutes=(0.25,), valid_minutes=(0.25, 0.25)) == out
    assert read_jsonl(out / "valid.json") == valid and read_jsonl(out / "cut" / "valid.json") == cut
    assert {p: p.read_bytes() for p in sorted((out / "wav" / "test").iterdir())} == before
    # gold text as the prediction: a perfect score on the valid split, none of its records taken for the test's
    perfect = [{"id": r["audio"], "task": "MNER", "text": r["sentence"], "pieces": [],
                "entities": [{"start": a, "end": b, "type": t, "text": x} for a, b, x, t in r["entity"]],
                "char_times": [[c, u["start_s"], u["end_s"]] for u in r["utterances"]
                               for c in r["sentence"][slice(*u["chars"])]]} for r in valid]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in perfect),
                                      encoding="utf-8")
    scores = diagnose.long_form(tmp_path / "p.jsonl", out, "MNER", split="valid")
    assert scores["recordings"] == 2 and scores["ours"]["f1"] == 100.0
    with pytest.raises(diagnose.DataError, match="not long recordings of .*test.json"):
        diagnose.long_form(tmp_path / "p.jsonl", out, "MNER", split="test")


@needs_tools
def test_the_unseen_names_split_has_no_training_name_and_lists_its_names_among_distractors(tmp_path):
    """build_unseen: PER and ORG names none of the training set's, only training characters, gold times; names.txt
    holds exactly its PER/ORG names, distractors.txt new names in no split, entities.txt both; decode.py reads it."""
    root = demo.ensure_demo_corpus(tmp_path / "c", seed=1, progress=False, n_train=300, n_dev=2, n_test=2,
                                   audio=False)
    out = tmp_path / "unseen"
    info = demo.build_unseen(root, out, seed=0, n_test=6, n_distractors=15, progress=False, workers=1)
    train = read_jsonl(root / "train.json")
    train_names = {e[2] for d in train for e in d["entity"]}
    every_name = {e[2] for name in ("train.json", "valid.json", "test.json") for d in read_jsonl(root / name)
                  for e in d["entity"]}
    chars = set("".join(d["sentence"] for d in train))
    lines = read_jsonl(out / "test.json")
    assert len(lines) == info["sentences"] == 6
    names = {(e[2], e[3]) for d in lines for e in d["entity"] if e[3] in ("PER", "ORG")}
    assert names and not {n for n, _ in names} & train_names
    assert all(set(d["sentence"]) <= chars and len(d["entity_times"]) == len(d["entity"]) for d in lines)
    assert all((out / "wav" / "test" / d["audio"][8:13] / f"{d['audio']}.wav").is_file() for d in lines)
    listed = {(e.text, e.type) for e in entitylist.read_entity_list(out / "names.txt")}
    distractors = {(e.text, e.type) for e in entitylist.read_entity_list(out / "distractors.txt")}
    assert listed == names and len(distractors) == 30 and not {n for n, _ in distractors} & (
        every_name | {n for n, _ in names})
    assert {(e.text, e.type) for e in entitylist.read_entity_list(out / "entities.txt")} == listed | distractors
