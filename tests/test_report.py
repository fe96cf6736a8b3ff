"""Tests for report.py and `evaluate.py report`: the HTML page of a hand-made predictions file, its structure
counted against literals, and the page opened in headless Chromium (skipped with the reason when none is
installed; setup.sh --test installs Debian's chromium where it can)."""
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import report  # noqa: E402
from test_data import write, write_wav  # noqa: E402

TRAIN = "T1 <(北京)大学>在(北京)\nT2 [张三]去了(上海)\n"
DEV = [{"sentence": "北京大学的张三在京", "audio": "D1",
        "entity": [[0, 4, "北京大学", "ORG"], [0, 2, "北京", "LOC"], [5, 7, "张三", "PER"], [8, 9, "京", "LOC"]]},
       {"sentence": "李四在上海", "audio": "D2", "entity": [[0, 2, "李四", "PER"], [3, 5, "上海", "LOC"]]},
       {"sentence": "张三丰", "audio": "D3", "entity": [[0, 3, "张三丰", "PER"]]}]
# SNER records: D1 heard 张三 as 张山 (misheard), tags 大学的 LOC across 北京大学 (a boundary error that crosses);
# D2 calls 上海 an ORG (wrong type); D3 hears a 啊 that is not there and tags it (spurious, no place in the gold)
HEARD = [("D1", "北京大学的张山在京", [(0, 4, "ORG", None), (5, 7, "PER", (0.5, 0.9)), (2, 5, "LOC", None)]),
         ("D2", "李四在上海", [(0, 2, "PER", (0.1, 0.4)), (3, 5, "ORG", (0.6, 0.9))]),
         ("D3", "张三丰啊", [(0, 3, "PER", None), (3, 4, "LOC", None)])]


@pytest.fixture
def corpus(tmp_path):
    write(tmp_path / "train.txt", TRAIN)
    write(tmp_path / "valid.json", "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DEV))
    lines = []
    for sid, text, ents in HEARD:
        wav = write_wav(tmp_path / "wav" / f"{sid}.wav", seconds=1.0)
        lines.append({"id": sid, "task": "SNER", "wav": str(wav), "text": text, "output": "", "entities": [
            {"type": t, "text": text[s:e], "start": s, "end": e, "confidence": 0.5,
             "start_s": when[0] if when else None, "end_s": when[1] if when else None} for s, e, t, when in ents]})
    write(tmp_path / "preds.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    return tmp_path


def make_report(corpus, *extra):
    out = corpus / "out" / "report.html"
    out.parent.mkdir(exist_ok=True)
    evaluate.main(["report", "--predictions", str(corpus / "preds.jsonl"), "--task", "SNER", "--dataset", "cnerta",
                   "--data-dir", str(corpus), "--train-dataset", "image4imner", "--train-dir", str(corpus),
                   "--out", str(out), *extra])
    return out


class Spans(HTMLParser):
    """Counts what the page's rows hold: entity spans by kind and type, continuation pieces, rows, audio."""

    def __init__(self):
        super().__init__()
        self.entities, self.pieces, self.rows, self.timed, self.sources, self.hidden = [], 0, [], 0, [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "div" and "s" in classes:
            self.rows.append(a["data-m"])
            self.sources.append(a.get("data-src"))
            self.hidden += "hidden" in a
        if tag == "span" and "e" in classes:
            self.entities.append((classes[1], classes[2], "unplaced" in classes))
            self.timed += "data-t0" in a
        if tag == "span" and "ec" in classes:
            self.pieces += 1


def test_report_structure_against_counts(corpus, capsys):
    out = make_report(corpus)
    assert "3 sentences" in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<link" not in page   # self-contained
    spans = Spans()
    spans.feed(page)
    assert len(spans.rows) == 3 and len(spans.entities) == 14                        # 7 gold + 7 predicted
    kinds = sorted(k for _, k, _ in spans.entities)
    assert {k: kinds.count(k) for k in set(kinds)} == {"correct": 6, "misheard": 2, "overlap": 2, "wrong_type": 2,
                                                       "missed": 1, "spurious": 1}
    assert sorted(t for t, _, _ in spans.entities).count("LOC") == 5          # gold 北京 京 上海, heard 大学的 啊
    assert spans.pieces == 1                                  # 大学的 crosses 北京大学: closed and reopened once
    assert [u for _, _, u in spans.entities].count(True) == 0  # SNER spans always sit in the transcription
    assert spans.timed == 3                                   # the predicted entities with times
    assert spans.sources == ["../wav/D1.wav", "../wav/D2.wav", "../wav/D3.wav"]  # linked relative to the page
    # each row lists kind.type.seen of its entities: 京 LOC (not in the training text) missed, 北京 LOC (in it)
    assert {"missed.LOC.unseen", "overlap.LOC.seen", "misheard.PER.seen", "misheard.PER.unseen"} <= set(
        spans.rows[0].split())
    # the error table: one of each kind on each side, each count a filter
    for kind in ("wrong_type", "misheard", "overlap", "missed", "spurious"):
        assert page.count(f'<td class="pick" data-kind="{kind}">1</td>') == (2 if kind in ("wrong_type", "misheard",
                                                                                           "overlap") else 1)
    assert "<b>42.86</b>" in page                             # F1 of 3 right out of 7 and 7
    assert "seen/unseen against image4imner train" in page


def test_report_audio_modes_and_errors(corpus, capsys):
    page = make_report(corpus, "--audio", "embed").read_text(encoding="utf-8")
    assert page.count('data-src="data:audio/wav;base64,') == 3
    page = make_report(corpus, "--audio", "none").read_text(encoding="utf-8")
    assert 'data-src="' not in page and 'id="player"' not in page
    with pytest.raises(SystemExit, match="no MNER records"):
        evaluate.main(["report", "--predictions", str(corpus / "preds.jsonl"), "--task", "MNER", "--dataset",
                       "cnerta", "--data-dir", str(corpus), "--out", str(corpus / "r.html")])
    (corpus / "ro").mkdir()
    (corpus / "ro" / "r.html").mkdir()                       # a folder where the page should go
    with pytest.raises(SystemExit, match="--out"):
        evaluate.main(["report", "--predictions", str(corpus / "preds.jsonl"), "--task", "SNER", "--dataset",
                       "cnerta", "--data-dir", str(corpus), "--out", str(corpus / "ro" / "r.html")])
    with pytest.raises(ValueError, match="audio"):
        report.render([], {}, {}, "x.html", audio="inline")


def browser():
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(browser() is None, reason="no headless Chromium here (setup.sh --test installs Debian's "
                                              "chromium as root or through sudo)")
@pytest.mark.parametrize("fragment, shown", [("", 3), ("#kind=missed", 1), ("#type=ORG&kind=wrong_type", 1),
                                             ("#kind=error&type=LOC", 3), ("#q=李四", 1), ("#seen=seen&kind=correct", 1)])
def test_report_in_headless_chromium(corpus, fragment, shown):
    out = make_report(corpus)
    dom = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions",
                          "--no-first-run", "--dump-dom", out.resolve().as_uri() + fragment],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom and 'data-script-error="' not in dom                # the script ran, no error
    spans = Spans()
    spans.feed(dom)
    assert len(spans.entities) == 14 and len(spans.rows) == 3
    assert f">{shown} of 3 sentences<" in dom
    assert spans.hidden == 3 - shown


PROBE = """<script>window.addEventListener('load',function(){var p=document.getElementById('player');
document.querySelector('[data-t0]').click();document.body.setAttribute('data-probe',
[p.getAttribute('src'),p.getAttribute('data-interval')].join('|'));});</script></body>"""


@pytest.mark.skipif(browser() is None, reason="no headless Chromium here (setup.sh --test installs Debian's "
                                              "chromium as root or through sudo)")
def test_clicking_an_entity_asks_the_player_for_its_interval(corpus, tmp_path):
    """The first timed entity (D1's 张山, 0.5-0.9 s): a click gives the shared player D1's wav and asks it for
    0.5-0.9 s (a script added to the page clicks and writes the player's source and interval into the DOM; the
    browser's own seeking and playing is not part of the test: headless Chromium plays no audio reliably)."""
    page = make_report(corpus).read_text(encoding="utf-8")
    probe = corpus / "out" / "probe.html"
    probe.write_text(page.replace("</body>", PROBE), encoding="utf-8")
    dom = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--autoplay-policy=no-user-gesture-required", "--dump-dom",
                          probe.resolve().as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-probe="../wav/D1.wav|0.5-0.9"' in dom


def test_tner_report_without_training_split_or_audio(corpus):
    """TNER: no audio, no play button, no times; an unplaced prediction is listed after its sentence; without a
    training split there is no seen filter."""
    records = [{"id": "D1", "task": "TNER", "input_text": DEV[0]["sentence"], "text": DEV[0]["sentence"],
                "output": "", "entities": [{"type": "ORG", "start": 0, "end": 4}, {"type": "PER", "start": None,
                                                                                  "end": None}]},
               {"id": "D2", "task": "TNER", "input_text": "李四在上海", "text": "李四在上海", "output": "",
                "entities": [{"type": "PER", "start": 0, "end": 2}]}]
    write(corpus / "tner.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    out = corpus / "tner.html"
    evaluate.main(["report", "--predictions", str(corpus / "tner.jsonl"), "--task", "TNER", "--dataset", "cnerta",
                   "--data-dir", str(corpus), "--out", str(out)])
    page = out.read_text(encoding="utf-8")
    spans = Spans()
    spans.feed(page)
    assert len(spans.rows) == 2 and spans.sources == [None, None] and spans.timed == 0
    assert len(spans.entities) == 6 + 3                          # D1 4 + D2 2 gold; 3 predicted
    assert [(t, k) for t, k, u in spans.entities if u] == [("PER", "spurious")]
    assert 'id="seen"' not in page and 'id="player"' not in page
    assert "1 of the split without a prediction" in page          # D3
