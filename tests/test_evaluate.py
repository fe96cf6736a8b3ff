"""Tests for scoring.py, evaluate.py and diagnose.py: our evaluator and the official one, CER, score tables, error
breakdown, gazetteer, entity times, confidence, playback, long recordings."""
import io
import json
import math
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import diagnose  # noqa: E402
import entitylist  # noqa: E402
import evaluate  # noqa: E402
import scoring  # noqa: E402
import search  # noqa: E402
import segment  # noqa: E402
import text  # noqa: E402
from data import Sample  # noqa: E402
from test_data import CNERTA, E, need_cnerta, write, write_wav  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# scorers: ours, the official one, CER

def result(output, text, spans):
    return {"output": output, "text": text,
            "entities": [{"type": t, "start": s, "end": e, "text": text[s:e] if s is not None else None}
                         for s, e, t in spans]}


def test_evaluators_tner_last_character_and_nested_entities():
    golds = [data.Sample("1", "郭涛去了合肥", [data.Entity(0, 2, "PER"), data.Entity(4, 6, "LOC")]),
             data.Sample("2", "搜狐科技公司", [data.Entity(0, 4, "ORG"), data.Entity(0, 2, "ORG")])]
    preds = [result("[郭涛]去了[合肥]", "郭涛去了合肥", [(0, 2, "PER"), (4, 6, "PER")]),   # wrong type at the end
             result("<<搜狐>科技>公司", "搜狐科技公司", [(0, 4, "ORG"), (0, 2, "ORG")])]  # nested, same type
    sc = scoring.score_predictions("TNER", golds, preds)
    ours, official = sc["ours"], sc["official"]
    assert (ours["tp"], ours["pred"], ours["gold"]) == (3, 4, 4) and ours["f1"] == pytest.approx(75.0)
    assert ours["per_type"]["PER"]["p"] == pytest.approx(50.0) and ours["per_type"]["PER"]["r"] == 100.0
    assert ours["per_type"]["LOC"]["r"] == 0.0 and ours["per_type"]["ORG"]["f1"] == pytest.approx(100.0)
    # the official parser never sees an entity that ends at the last character, on either side: 3/3/3.
    # Its gold string for 搜狐科技 is the lossy '<搜狐>科技>公司' and still yields both ORG spans.
    assert data.linearize_official(golds[1].text, golds[1].entities) == "<搜狐>科技>公司"
    assert (official["tp"], official["pred"], official["gold"]) == (3, 3, 3) and official["f1"] == 100.0
    assert sc["cer"] == 0.0


def test_official_keys_pairing_rules():
    assert scoring.official_keys("TNER", "[张[三]李四") == [("PER", 0, 2), ("PER", 1, 2)]   # nearest pairing, union
    assert scoring.official_keys("TNER", "[张三") == [] and scoring.official_keys("TNER", "张三]") == []
    assert scoring.official_keys("TNER", "(<北京)大学>x") == [("LOC", 0, 2), ("ORG", 0, 4)]
    assert scoring.official_keys("TNER", "去(合肥)") == []                                   # last character
    assert scoring.official_keys("TNER", "去 (合肥) 了") == [("LOC", 1, 3)]                  # spaces removed
    assert scoring.our_keys("TNER", "去合肥了", [(1, 3, "LOC"), (None, None, "PER")]) == [
        ("LOC", 1, 3), ("PER", "unaligned", 1)]


def test_evaluators_sner_text_multiset_vs_official_pinyin_set():
    pron = text.Phonemizer(text.read_phone_dict()).pronounce
    golds = [data.Sample("1", "张三和张三去了北京", [data.Entity(0, 2, "PER"), data.Entity(3, 5, "PER"),
                                                    data.Entity(7, 9, "LOC")])]
    preds = [result("[章三]和[张三]去了(北京)", "章三和张三去了北京", [(0, 2, "PER"), (3, 5, "PER"), (7, 9, "LOC")])]
    sc = scoring.score_predictions("SNER", golds, preds, phones_of=pron)
    # ours: (type, text) multisets: 章三 is wrong, one 张三 and 北京 are right
    assert (sc["ours"]["tp"], sc["ours"]["pred"], sc["ours"]["gold"]) == (2, 3, 3)
    # official: (type, pinyin) sets: 章三 sounds like 张三, the two collapse to one, 北京 (last char) is lost
    assert pron("章三") == pron("张三")
    assert (sc["official"]["tp"], sc["official"]["pred"], sc["official"]["gold"]) == (1, 1, 1)
    assert sc["cer"] == pytest.approx(100 / 9)


def test_edit_distance():
    assert scoring.edit_distance("kitten", "sitting") == 3 and scoring.edit_distance("", "ab") == 2


def test_scores_table():
    sc = {"TNER": scoring.score_predictions("TNER", [], [])}
    assert "official" in scoring.format_scores(sc)


# ---------------------------------------------------------------------------------------------------------------
# analyses: gazetteer baseline, breakdown of predictions

TRAIN_BRACKETED = "T1 <(北京)大学>在(北京)\nT2 [张三]去了(上海)\nT3 <上海>队\nT4 (京)\n"
DEV_LINES = [  # 北京大学 ORG contains 北京 LOC; 京: seen but one character; 李四 and 张三丰: unseen
    {"sentence": "北京大学的张三在京", "audio": "D1",
     "entity": [[0, 4, "北京大学", "ORG"], [0, 2, "北京", "LOC"], [5, 7, "张三", "PER"], [8, 9, "京", "LOC"]]},
    {"sentence": "李四在上海", "audio": "D2", "entity": [[0, 2, "李四", "PER"], [3, 5, "上海", "LOC"]]},
    {"sentence": "张三丰", "audio": "D3", "entity": [[0, 3, "张三丰", "PER"]]},
]


@pytest.fixture
def tiny_split(tmp_path):
    write(tmp_path / "train.txt", TRAIN_BRACKETED)
    write(tmp_path / "valid.json", "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DEV_LINES))
    return tmp_path


def run_main(argv):
    out = io.StringIO()
    with redirect_stdout(out):
        evaluate.main(argv)
    return out.getvalue()


def test_gazetteer_rules():
    train = [Sample("a", "abcd", [E(0, 3, "ORG"), E(2, 4, "LOC")]), Sample("b", "ab", [E(0, 2, "PER")]),
             Sample("c", "ab", [E(0, 2, "LOC")]), Sample("d", "ab", [E(0, 2, "LOC")]), Sample("e", "x", [E(0, 1, "PER")])]
    gaz = evaluate.Gazetteer(train)
    assert gaz.tag("abcdx") == [E(0, 2, "LOC"), E(0, 3, "ORG"), E(2, 4, "LOC")]  # nested and crossing kept, no "x"
    assert evaluate.Gazetteer(train, crossing="longest").tag("abcd") == [E(0, 2, "LOC"), E(0, 3, "ORG")]
    assert evaluate.Gazetteer(train, types="all", min_chars=1).tag("abx") == [E(0, 2, "LOC"), E(0, 2, "PER"), E(2, 3, "PER")]
    tie = evaluate.Gazetteer([Sample("a", "ab", [E(0, 2, "ORG")]), Sample("b", "ab", [E(0, 2, "LOC")])])
    assert tie.tag("ab") == [E(0, 2, "ORG")]  # a tie goes to the type seen first
    assert ("ab", "PER") in gaz.seen and ("ab", "ORG") not in gaz.seen and ("x", "PER") in gaz.seen
    with pytest.raises(ValueError, match="crossing"):
        evaluate.Gazetteer(train, crossing="leftmost")


def test_gazetteer_cli_scores_and_breaks_down(tiny_split):
    d = str(tiny_split)
    r = json.loads(run_main(["gazetteer", "--train-dataset", "image4imner", "--train-dir", d, "--dataset", "cnerta",
                             "--data-dir", d, "--json"]))
    # tags 北京大学 ORG, 北京 LOC (nested), 张三 PER, 上海 LOC (LOC and ORG once each: LOC seen first), 张三 in 张三丰
    assert (r["tp"], r["pred"], r["gold"]) == (4, 5, 7) and r["train"]["strings"] == 5
    assert r["p"] == pytest.approx(80.0) and r["r"] == pytest.approx(400 / 7) and r["f1"] == pytest.approx(800 / 12)
    assert {t: (m["tp"], m["pred"], m["gold"]) for t, m in r["per_type"].items()} == {
        "LOC": (2, 2, 3), "ORG": (1, 1, 1), "PER": (1, 2, 3)}
    assert r["nesting"] == {"nested": {"gold": 2, "found": 2, "pred": 2, "correct": 2, "r": 100.0, "p": 100.0},
                            "flat": {"gold": 5, "found": 2, "pred": 3, "correct": 2, "r": 40.0, "p": pytest.approx(200 / 3)}}
    assert r["seen"]["seen"] == {"gold": 5, "found": 4, "pred": 5, "correct": 4, "r": 80.0, "p": 80.0}
    assert r["seen"]["unseen"] == {"gold": 2, "found": 0, "pred": 0, "correct": 0, "r": 0.0, "p": 0.0}
    table = run_main(["gazetteer", "--train-dataset", "image4imner", "--train-dir", d, "--dataset", "cnerta",
                      "--data-dir", d, "--min-chars", "1"])
    # 京 is tagged alone (right) and inside 北京 (wrong)
    assert "all         71.43  71.43  71.43      7      7      5" in table and "unseen" in table


def record(sid, text, ents, task="TNER"):
    return {"id": sid, "task": task, "input_text": text, "output": "", "text": text,
            "entities": [{"type": t, "text": None if s is None else text[s:e], "start": s, "end": e} for s, e, t in ents]}


def test_breakdown_of_a_predictions_file(tiny_split):
    d, preds = str(tiny_split), tiny_split / "preds.jsonl"
    records = [record("D1", "北京大学的张三在京", [(0, 4, "ORG"), (5, 7, "PER")]),
               record("D2", "李四在上海", [(0, 2, "PER"), (None, None, "LOC")]),  # unconstrained output, not placed
               record("D3", "张三丰", [(0, 3, "PER"), (0, 1, "LOC")]),
               record("D1", "北京大学的张三在京", [], task="MNER")]  # another task: ignored
    write(preds, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in records))
    args = ["breakdown", "--predictions", str(preds), "--dataset", "cnerta", "--data-dir", d, "--json"]
    r = json.loads(run_main(args + ["--train-dataset", "image4imner", "--train-dir", d]))
    assert (r["tp"], r["pred"], r["gold"], r["sentences"]) == (4, 6, 7, 3)
    assert r["f1"] == pytest.approx(800 / 13)
    # 北京大学 is nested in the gold set but flat among the predictions (北京 was missed)
    assert {c: (m["gold"], m["found"], m["pred"], m["correct"]) for c, m in r["nesting"].items()} == {
        "nested": (2, 1, 2, 1), "flat": (5, 3, 3, 3), "unaligned": (0, 0, 1, 0)}
    assert {c: (m["gold"], m["found"], m["pred"], m["correct"]) for c, m in r["seen"].items()} == {
        "seen": (5, 2, 2, 2), "unseen": (2, 2, 4, 2)}
    # missed: 北京 inside the predicted 北京大学, 京 and 上海 with nothing there; wrong: 张 inside 张三丰, the
    # unaligned LOC
    assert r["errors"] == {"gold": {"wrong_type": 0, "misheard": 0, "overlap": 1, "missed": 2},
                           "pred": {"wrong_type": 0, "misheard": 0, "overlap": 1, "spurious": 1}}
    mner = json.loads(run_main(args + ["--task", "MNER"]))
    assert (mner["sentences"], mner["sentences_without_prediction"], mner["gold"], mner["pred"]) == (1, 2, 4, 0)
    assert "seen" not in mner
    assert "nested" in run_main(args[:-1])  # the table


@pytest.mark.parametrize("lines, why", [
    ([record("D9", "李四在上海", [])], "id 'D9' is not in cnerta dev"),
    ([record("D2", "李四在北京", [])], "is not the gold"),
    ([record("D2", "李四在上海", [], task="MNER")], "no TNER records"),
    ([{"id": "D2"}], "preds.jsonl:1: not a decode.py record"),
    ([{"id": "D2", "task": "TNER", "entities": [{"type": "PER", "start": 0, "end": None}]}], "both null or integers"),
    ([{"id": "D2", "task": "TNER", "entities": [{"type": "PER", "start": 3, "end": 1}]}], "0 <= start <= end"),
    ([record("D2", "李四在上海", [])] * 2, "a second TNER record"),
])
def test_breakdown_errors_are_clear(tiny_split, capsys, lines, why):
    d, preds = str(tiny_split), tiny_split / "preds.jsonl"
    write(preds, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["breakdown", "--predictions", str(preds), "--dataset", "cnerta", "--data-dir", d])
    assert why in str(e.value.code)


@need_cnerta
def test_gazetteer_on_cnerta_dev_reproduces_the_issue():
    """The issue: 'A gazetteer that tags every string seen as an entity in that training text (longest matches,
    nested allowed) scores P/R/F1 77.8 / 52.1 / 62.4 on CNERTA dev.' Dropping crossing matches gives 78.4."""
    if not (CNERTA / "image4imner_train_bracketed.txt").is_file():
        pytest.skip("../shared/data/cnerta/image4imner_train_bracketed.txt absent")
    r = evaluate.gazetteer("image4imner", CNERTA, "train", "cnerta", CNERTA, "dev")
    assert (r["tp"], r["pred"], r["gold"], r["train"]["strings"]) == (3069, 3946, 5889, 6578)
    assert [round(r[k], 1) for k in ("p", "r", "f1")] == [77.8, 52.1, 62.4]
    assert r["seen"]["unseen"]["found"] == 0 and r["seen"]["seen"]["gold"] == 3540


@pytest.mark.parametrize("entity", [{"type": "PER", "start": "a", "end": 2}, {"type": "GPE", "start": 0, "end": 2},
                                    {"type": "PER", "end": 2}, "张三", {"type": "PER", "start": True, "end": 2}])
def test_malformed_prediction_entities_name_file_and_line(tmp_path, entity):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "a", "task": "TNER", "entities": []}) + "\n"
                    + json.dumps({"id": "b", "task": "TNER", "entities": [entity]}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    with pytest.raises(data.DataError, match=r"p\.jsonl:2: entity .* is not \{type"):
        scoring.read_predictions(path, "TNER")


# ---------------------------------------------------------------------------------------------------------------
# entity times and confidence (#17)

def test_ece_and_auroc_on_hand_counted_cases():
    """ECE: |accuracy - confidence| per 10 equal-width bins, weighted by share; AUROC: ties count half."""
    conf, right = [0.95, 0.95, 0.15, 0.15], [1, 0, 0, 0]
    assert diagnose.expected_calibration_error(conf, right) == pytest.approx(0.5 * 0.45 + 0.5 * 0.15)
    assert diagnose.expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0          # the ends fall in bins too
    assert diagnose.auroc([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]) == 1.0
    assert diagnose.auroc([0.9, 0.8, 0.3, 0.1], [0, 0, 1, 1]) == 0.0
    assert diagnose.auroc([0.5, 0.5, 0.5], [1, 0, 1]) == 0.5
    assert diagnose.auroc([0.9, 0.4, 0.6, 0.2], [1, 1, 0, 0]) == 0.75
    assert diagnose.auroc([0.9], [1]) is None


def test_a_fitted_temperature_recovers_the_one_that_made_the_data():
    """Entities right with probability exp(lc / 2): the log-loss fit finds T near 2 and lowers the ECE."""
    import random
    rng = random.Random(0)
    lcs = [-rng.random() * 3 for _ in range(4000)]
    right = [int(rng.random() < math.exp(lc / 2)) for lc in lcs]
    t = diagnose.fit_temperature(lcs, right)
    assert 1.8 < t < 2.2
    raw = diagnose.expected_calibration_error([math.exp(v) for v in lcs], right)
    fitted = diagnose.expected_calibration_error([math.exp(v / t) for v in lcs], right)
    assert fitted < 0.03 < raw


def test_a_fitted_platt_map_recovers_the_one_that_made_the_data():
    """Entities right with probability sigmoid(0.5 logit(c) - 1): an overconfident model that no temperature alone
    calibrates (it needs the shift b). The Newton fit finds (a, b) near (0.5, -1) and lowers the ECE below what
    the best temperature reaches."""
    import random
    rng = random.Random(1)
    lcs = [math.log(0.05 + 0.9 * rng.random()) for _ in range(4000)]
    right = [int(rng.random() < search.platt(lc, 0.5, -1.0)) for lc in lcs]
    a, b = diagnose.fit_platt(lcs, right)
    assert abs(a - 0.5) < 0.1 and abs(b + 1.0) < 0.15
    t = diagnose.fit_temperature(lcs, right)
    by_t = diagnose.expected_calibration_error([math.exp(v / t) for v in lcs], right)
    by_platt = diagnose.expected_calibration_error([search.platt(v, a, b) for v in lcs], right)
    assert by_platt < 0.03 < by_t
    assert search.platt(math.log(0.3), 1.0, 0.0) == pytest.approx(0.3)          # (1, 0) is the identity
    assert diagnose.fit_platt([math.log(0.9), math.log(0.1)], [1, 0])[0] > 1       # separable: sharpened, finite


def timed_sample(tmp_path, name, entities, times, seconds=2.0):
    wav = write_wav(tmp_path / f"{name}.wav", seconds)
    return Sample(name, "张三在北京大学读书", entities, str(wav), times)


def test_localization_frame_f1_errors_and_redaction_coverage(tmp_path):
    """Frame-F1 on 10 ms frames per type, start/end errors of the entities recognised right, and redaction
    coverage (audio.redaction_plan with pad 0) of those, of every gold entity and of the audio outside them."""
    gold = timed_sample(tmp_path, "u1", [data.Entity(0, 2, "PER"), data.Entity(3, 5, "LOC")],
                        [(0.10, 0.50), (1.00, 1.40)])
    ents = [{"type": "PER", "text": "张三", "start": 0, "end": 2, "start_s": 0.12, "end_s": 0.46,
             "align_confidence": 0.9},
            {"type": "ORG", "text": "北京", "start": 3, "end": 5, "start_s": 1.00, "end_s": 1.40,
             "align_confidence": 0.9}]
    res = {"wav": gold.audio, "entities": ents}
    out = diagnose.localization("MNER", [(gold, res)])
    per = out["frame_f1"]["PER"]
    assert (per["tp"], per["pred"], per["gold"]) == (34, 34, 40)
    assert out["frame_f1"]["LOC"]["tp"] == 0 and out["frame_f1"]["ORG"]["pred"] == 40
    assert (out["frame_f1"]["all"]["tp"], out["frame_f1"]["all"]["pred"], out["frame_f1"]["all"]["gold"]) == (34, 74, 80)
    assert out["errors_ms"]["start"]["n"] == 1 and out["errors_ms"]["start"]["median"] == pytest.approx(20)
    assert out["errors_ms"]["end_signed"]["median"] == pytest.approx(-40)
    red = out["redaction"]
    assert red["right"] == pytest.approx(34 / 40)             # the PER; the LOC was found as an ORG: not right
    assert red["all"] == pytest.approx(74 / 80)              # the ORG's stretch covers the LOC's audio
    assert red["outside"] == 0.0
    shifted = diagnose.localization("MNER", [(gold, res)], offset_s=-0.02)
    assert shifted["errors_ms"]["start"]["median"] == pytest.approx(0, abs=1e-9)
    sner = diagnose.localization("SNER", [(gold, {"wav": gold.audio, "entities": [dict(ents[0], start=5, end=7)]})])
    assert sner["errors_ms"]["start"]["n"] == 1              # SNER: the same (type, text) is right, anywhere


def test_calibration_reports_as_written_and_two_fold(tmp_path):
    """Right/wrong from the gold entities; the temperature fitted on one half is scored on the other."""
    pairs = []
    for i in range(8):
        gold = Sample(f"s{i}", "张三在北京", [data.Entity(0, 2, "PER")])
        pred = [{"type": "PER", "text": "张三", "start": 0, "end": 2, "confidence": 0.9},
                {"type": "LOC", "text": "北京", "start": 3, "end": 5, "confidence": 0.6}]
        pairs.append((gold, {"entities": pred}))
    out = diagnose.calibration("TNER", pairs)
    assert out["as_written"]["entities"] == 16 and out["as_written"]["accuracy"] == 0.5
    assert out["as_written"]["auroc"] == 1.0
    assert out["as_written"]["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * 0.6)
    assert len(out["two_fold"]) == 2 and all(f["entities"] == 8 for f in out["two_fold"])
    assert len(out["two_fold_platt"]) == 2 and all(f["entities"] == 8 for f in out["two_fold_platt"])
    assert out["two_fold_platt_mean"]["auroc"] == 1.0                 # a monotone map keeps the ranking


def test_playback_counts_leaks_and_the_cer_of_what_remains(tmp_path):
    """A gold entity half replaced or more counts as redacted (overlapping replacements merged first); found =
    the same (type, text) in the replayed record, heard = its text in the transcription; CER of the gold text
    without the redacted entities, beside the original records' CER on the whole text."""
    gold = Sample("u1", "张三在北京大学读书", [data.Entity(0, 2, "PER"), data.Entity(3, 7, "ORG"),
                                            data.Entity(3, 5, "LOC")], "u1.wav", [(0.1, 0.5), (0.7, 1.5), (0.7, 1.1)])
    wav = str(tmp_path / "u1.wav")
    replaced = [{"from_s": 0.0, "to_s": 0.25}, {"from_s": 0.2, "to_s": 0.3},   # merged: 0.2 of the PER's 0.4 s
                {"from_s": 0.7, "to_s": 1.0}]                                 # 0.3 of 0.8 s ORG, 0.3 of 0.4 s LOC
    write(tmp_path / "u1.wav.json", json.dumps({"replaced": replaced}))
    res = {"wav": wav, "text": "张三在大学读书", "entities": [{"type": "PER", "text": "张三"}]}
    orig = {"wav": "orig.wav", "text": "张三在北京大学读书", "entities": []}
    out = diagnose.playback([(gold, res)], [(gold, orig)])
    assert out["redacted_entities"] == 2                 # PER (exactly half) and LOC, not the ORG (3/8)
    assert out["still_found"] == 1 and out["still_heard"] == 1       # the PER; 北京 is gone
    assert out["cer_of_the_rest"] == pytest.approx(100 * 2 / 5)      # "在大学读书" vs "张三在大学读书": 2 insertions
    assert out["cer_original"] == 0.0
    with pytest.raises(data.DataError, match="no record of the original"):
        diagnose.playback([(gold, res)], [])


def test_frames_decide_a_boundary_on_a_centre_exactly():
    """[start, end): a frame whose centre is the start is in, one whose centre is the end is out, whatever float
    rounding does to 0.135 / 0.01."""
    assert sorted(diagnose._frames([(0.135, 0.155)])) == [13, 14]
    assert sorted(diagnose._frames([(0.1, 0.13)])) == [10, 11, 12] and diagnose._frames([(0.2, 0.2)]) == set()


def test_times_refuses_predictions_without_times(tmp_path):
    """evaluate.py times: a split without gold times, or records decoded with --timestamps none, are refused
    naming what is missing."""
    gold = {"sentence": "张三在北京", "audio": "u1", "entity": [[0, 2, "张三", "PER"]], "entity_times": [[0.1, 0.4]]}
    write(tmp_path / "valid.json", json.dumps(gold, ensure_ascii=False) + "\n")
    rec = {"id": "u1", "task": "MNER", "wav": "u1.wav", "output": "[张三]在北京", "text": "张三在北京",
           "entities": [{"type": "PER", "text": "张三", "start": 0, "end": 2, "confidence": 0.9}]}
    write(tmp_path / "p.jsonl", json.dumps(rec, ensure_ascii=False) + "\n")
    with pytest.raises(data.DataError, match="'u1' has no wav or no entity times"):
        scoring.prediction_pairs(tmp_path / "p.jsonl", "cnerta", tmp_path, "dev", "MNER", need_times=True)
    write(tmp_path / "valid.json", json.dumps({k: v for k, v in gold.items() if k != "entity_times"},
                                              ensure_ascii=False) + "\n")
    with pytest.raises(data.DataError, match="no gold entity times"):
        scoring.prediction_pairs(tmp_path / "p.jsonl", "cnerta", tmp_path, "dev", "MNER", need_times=True)


def test_long_form_scores_each_gold_utterance_of_a_stitched_recording(tmp_path):
    """A recording of two utterances (0.5-2.0 s, 2.6-4.0 s): its transcription's characters go to the utterance
    holding their start (a character in the pause to the nearer one) and are scored against the utterances' own
    lines, as the same audio cut at the gold boundaries would be."""
    utts = [{"sentence": "张三在北京", "audio": "U1", "entity": [[0, 2, "张三", "PER"], [3, 5, "北京", "LOC"]]},
            {"sentence": "李四来了", "audio": "U2", "entity": [[0, 2, "李四", "PER"]]}]
    write(tmp_path / "cut" / "test.json", "".join(json.dumps(u, ensure_ascii=False) + "\n" for u in utts))
    long_line = {"sentence": "张三在北京李四来了", "audio": "L1", "entity": [],
                 "utterances": [{"audio": "U1", "start_s": 0.5, "end_s": 2.0}, {"audio": "U2", "start_s": 2.6,
                                                                             "end_s": 4.0}]}
    write(tmp_path / "test.json", json.dumps(long_line, ensure_ascii=False) + "\n")
    text = "张三在北京李四来了"
    starts = [0.6, 0.8, 1.0, 1.2, 2.35, 2.7, 2.9, 3.1, 3.3]             # 京 at 2.35 s: nearer the second one
    rec = {"id": "L1", "task": "SNER", "wav": "L1.wav", "output": "", "text": text,
           "char_times": [[c, t, t + 0.2] for c, t in zip(text, starts)],
           "entities": [{"type": "PER", "text": "张三", "start": 0, "end": 2},
                        {"type": "LOC", "text": "北京", "start": 3, "end": 5},    # runs across: dropped
                        {"type": "PER", "text": "李四", "start": 5, "end": 7}]}
    write(tmp_path / "p.jsonl", json.dumps(rec, ensure_ascii=False) + "\n")
    out = diagnose.long_form(tmp_path / "p.jsonl", tmp_path, "SNER")
    assert out["recordings"] == 1 and out["sentences"] == 2
    assert (out["ours"]["tp"], out["ours"]["pred"], out["ours"]["gold"]) == (2, 2, 3)
    assert out["cer"] == pytest.approx(100 * 2 / 9)                  # 张三在北 + 京李四来了: one deletion, one insertion
    split = segment.unstitch(rec, long_line["utterances"])
    assert [r["text"] for r in split] == ["张三在北", "京李四来了"] and split[1]["output"] == "京[李四]来了"
    write(tmp_path / "q.jsonl", json.dumps(dict(rec, id="L9"), ensure_ascii=False) + "\n")
    with pytest.raises(data.DataError, match="'L9'.*not long recordings"):
        diagnose.long_form(tmp_path / "q.jsonl", tmp_path, "SNER")
    del rec["char_times"]
    with pytest.raises(ValueError, match="timestamps chars"):
        segment.unstitch(rec, long_line["utterances"])


def test_long_form_moves_entity_times_onto_each_utterance_and_counts_alignment_failures(tmp_path):
    """The stitched entity times minus the utterance's start are scored against the cut utterance's gold times; an
    MNER record's pieces that failed to align are counted."""
    utts = [{"sentence": "张三在北京", "audio": "U1", "entity": [[0, 2, "张三", "PER"], [3, 5, "北京", "LOC"]],
             "entity_times": [[0.1, 0.5], [0.7, 1.1]]},
            {"sentence": "李四来了", "audio": "U2", "entity": [[0, 2, "李四", "PER"]], "entity_times": [[0.1, 0.5]]}]
    write(tmp_path / "cut" / "test.json", "".join(json.dumps(u, ensure_ascii=False) + "\n" for u in utts))
    for u, seconds in (("U1", 1.5), ("U2", 1.4)):
        write_wav(tmp_path / "cut" / "wav" / "test" / f"{u}.wav", seconds)
    spans = [{"audio": "U1", "start_s": 0.5, "end_s": 2.0, "chars": [0, 5]},
             {"audio": "U2", "start_s": 2.6, "end_s": 4.0, "chars": [5, 9]}]
    write(tmp_path / "test.json", json.dumps({"sentence": "张三在北京李四来了", "audio": "L1", "entity": [],
                                              "utterances": spans}, ensure_ascii=False) + "\n")
    text = "张三在北京李四来了"
    starts = [0.6, 0.8, 1.0, 1.2, 1.4, 2.7, 2.9, 3.1, 3.3]
    rec = {"id": "L1", "task": "MNER", "wav": "L1.wav", "output": "", "text": text,
           "char_times": [[c, t, t + 0.2] for c, t in zip(text, starts)],
           "entities": [{"type": "PER", "text": "张三", "start": 0, "end": 2, "start_s": 0.6, "end_s": 1.0},
                        {"type": "LOC", "text": "北京", "start": 3, "end": 5, "start_s": 1.2, "end_s": 1.6},
                        {"type": "PER", "text": "李四", "start": 5, "end": 7, "start_s": 2.7, "end_s": 3.1}],
           "pieces": [{"start_s": 0.3, "end_s": 2.3, "chars": [0, 5]},
                      {"start_s": 2.3, "end_s": 4.2, "chars": [5, 9], "alignment_failed": True}]}
    for e in rec["entities"]:
        e["align_confidence"] = 0.9                                      # located: redaction does not fail closed
    write(tmp_path / "p.jsonl", json.dumps(rec, ensure_ascii=False) + "\n")
    out = diagnose.long_form(tmp_path / "p.jsonl", tmp_path, "MNER")
    assert (out["ours"]["tp"], out["pieces"], out["alignment_failures"]) == (3, 2, 1)
    assert out["shares"] == {"checked": 2, "wrong": 0, "unchecked": 0, "wrong_ids": []}
    split = segment.unstitch(rec, spans)
    assert [(e["start_s"], e["end_s"]) for r in split for e in r["entities"]] == [(0.1, 0.5), (0.7, 1.1), (0.1, 0.5)]
    times = out["times"]
    assert times["frame_f1"]["all"]["f1"] == pytest.approx(100.0)      # every predicted frame is a gold one
    assert times["errors_ms"]["start"]["median"] == pytest.approx(0.0, abs=1e-6)
    assert times["redaction"]["right"] == pytest.approx(1.0) and times["redaction"]["outside"] == 0.0


def test_pieces_are_counted_against_the_gold_utterances(tmp_path):
    """evaluate.py pieces: three utterances between clear pauses give three pieces, each holding one utterance
    whole; gold utterances placed wrongly (one over a pause, one where nothing is said) are counted as cut and
    missed."""
    from test_segment import speech_with_pauses, write_wav as write_pcm
    x, spans = speech_with_pauses([1.0, 0.6, 0.8])
    (tmp_path / "wav" / "test").mkdir(parents=True)
    write_pcm(tmp_path / "wav" / "test" / "L1.wav", x)
    utts = [{"audio": f"U{k}", "start_s": a, "end_s": b} for k, (a, b) in enumerate(spans)]
    write(tmp_path / "test.json", json.dumps({"sentence": "", "audio": "L1", "entity": [], "utterances": utts}) + "\n")
    out = diagnose.segmentation(tmp_path, "energy", max_piece_s=20.0)
    assert (out["utterances"], out["pieces"], out["pieces_with_several_utterances"]) == (3, 3, 0)
    assert (out["utterances_not_whole_in_a_piece"], out["utterances_missed"]) == (0, 0)
    assert 0 < out["time_outside_utterances"] < 0.25
    wrong = [{"audio": "A", "start_s": spans[0][1] - 0.5, "end_s": spans[1][0] + 0.5},      # over the first pause
             {"audio": "B", "start_s": 0.1, "end_s": 0.6}]                                   # in the leading silence
    write(tmp_path / "test.json", json.dumps({"sentence": "", "audio": "L1", "entity": [], "utterances": wrong}) + "\n")
    out = diagnose.segmentation(tmp_path, "energy", max_piece_s=20.0)
    assert (out["utterances_not_whole_in_a_piece"], out["utterances_missed"]) == (2, 1)
    write(tmp_path / "test.json", json.dumps({"sentence": "", "audio": "L1", "entity": []}) + "\n")
    with pytest.raises(data.DataError, match="not long recordings"):
        diagnose.segmentation(tmp_path, "energy")


def test_the_entity_list_of_a_split_is_what_decode_reads(tmp_path, capsys):
    samples = [Sample("a", "张三在北京", [E(0, 2, "PER"), E(3, 5, "LOC")]),
               Sample("b", "北京大学的张三", [E(0, 4, "ORG"), E(0, 2, "LOC"), E(5, 7, "PER")]),
               Sample("c", "北京队", [E(0, 2, "ORG")])]
    assert evaluate.entity_list(samples) == ["北京 LOC", "北京 ORG", "张三 PER", "北京大学 ORG"]
    assert evaluate.entity_list(samples, min_chars=3, types="majority") == ["北京大学 ORG"]
    write(tmp_path / "train.json", "".join(json.dumps(
        {"sentence": s.text, "audio": s.id, "entity": [[e.start, e.end, s.text[e.start:e.end], e.type]
                                                        for e in s.entities]}, ensure_ascii=False) + "\n"
        for s in samples))
    evaluate.main(["entities", "--dataset", "cnerta", "--data-dir", str(tmp_path), "--out", str(tmp_path / "l.txt")])
    assert "4 entries" in capsys.readouterr().out
    assert [(e.text, e.type) for e in entitylist.read_entity_list(tmp_path / "l.txt")] == [
        ("北京", "LOC"), ("北京", "ORG"), ("张三", "PER"), ("北京大学", "ORG")]


def test_choose_scores_a_setting_on_the_half_it_was_not_chosen_on(tiny_split):
    """Two settings over the 3-sentence split (halves: D1 D3 | D2). 'right' finds every gold entity, 'empty'
    none: 'right' is chosen both ways and scores 100 held out. 'even' is right on D1 and D3 only, 'odd' on D2 only:
    each wins the half it is right on, and is then scored on the other, where it finds nothing: 0 held out."""
    d, golds = tiny_split, {x["audio"]: x for x in DEV_LINES}

    def run(name, right_on):
        lines = [record(i, golds[i]["sentence"], [(s, e, t) for s, e, _, t in golds[i]["entity"]] if i in right_on
                        else []) for i in ("D1", "D2", "D3")]
        write(d / f"{name}.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
        return f"{name}={d / f'{name}.jsonl'}"
    args = ["--dataset", "cnerta", "--data-dir", str(d)]
    r = json.loads(run_main(["choose", run("right", {"D1", "D2", "D3"}), run("empty", set()), *args]))
    assert r["chosen"] == ["right", "right"] and r["held_out"]["f1"] == 100.0 and r["sentences"] == 3
    assert r["settings"]["empty"]["half_f1"] == [0.0, 0.0]
    r = json.loads(run_main(["choose", run("even", {"D1", "D3"}), run("odd", {"D2"}), *args]))
    assert r["chosen"] == ["even", "odd"] and r["held_out"]["tp"] == 0 and r["held_out"]["gold"] == 7
    with pytest.raises(SystemExit):
        evaluate.main(["choose", "only=x.jsonl", *args])


def test_share_check_counts_pieces_whose_share_is_not_their_utterances_text():
    """Each utterance belongs to the piece holding 3/4 of it; a piece's right share is its utterances' characters
    (none: empty); a piece holding part of an utterance that no piece holds 3/4 of is not checked."""
    utts = [{"start_s": 1.0, "end_s": 3.0, "chars": [0, 8]}, {"start_s": 3.5, "end_s": 6.0, "chars": [8, 18]},
            {"start_s": 8.0, "end_s": 12.0, "chars": [18, 30]}, {"start_s": 13.0, "end_s": 15.0, "chars": [30, 38]}]
    lines = {"L": {"utterances": utts}}
    pieces = [{"start_s": 0.8, "end_s": 3.2, "chars": [0, 9]},        # its utterance's 8 and the next one's first
              {"start_s": 3.2, "end_s": 6.2, "chars": [9, 18]},       # so this one is wrong too
              {"start_s": 6.5, "end_s": 7.5, "chars": [18, 18]},      # noise, no share: right
              {"start_s": 7.8, "end_s": 10.0, "chars": [18, 24]},     # half of utterance 3 each: not checked
              {"start_s": 10.0, "end_s": 12.2, "chars": [24, 30]},
              {"start_s": 12.6, "end_s": 14.0, "chars": [30, 38]}]    # 1 s of 2 (half): the last utterance is split
    out = diagnose.share_check([{"id": "L", "pieces": pieces}], lines)
    assert out == {"checked": 3, "wrong": 2, "unchecked": 3, "wrong_ids": ["L:0", "L:1"]}
    pieces[0]["chars"], pieces[1]["chars"] = [0, 8], [8, 18]
    pieces[5]["end_s"] = 15.2                                        # now it holds all of the last utterance
    out = diagnose.share_check([{"id": "L", "pieces": pieces}], lines)
    assert out == {"checked": 4, "wrong": 0, "unchecked": 2, "wrong_ids": []}
    pieces[2]["chars"], pieces[3]["chars"] = [18, 20], [20, 24]       # noise given text: wrong
    assert diagnose.share_check([{"id": "L", "pieces": pieces}], lines)["wrong_ids"] == ["L:2"]
