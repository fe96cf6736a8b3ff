"""recognize.py on long recordings (#18): cut into pieces at pauses, decoded in batches, stitched into one result,
read piece by piece (memory does not grow with the recording). The model is the tiny random one of test_decode.py:
what it says is noise, but the same noise whether a piece is decoded alone or inside a long recording."""
import json
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import audio  # noqa: E402
import files  # noqa: E402
import recognize  # noqa: E402
from test_decode import tiny  # noqa: E402,F401  (the fixture)
from test_segment import speech_with_pauses  # noqa: E402

WAVS_DIR = ROOT / "tests" / "fixtures" / "wavs"


def write_pcm(path, x):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.round(np.clip(np.asarray(x), -1, 1) * 32767).astype("<i2").tobytes())
    return str(path)


@pytest.fixture
def says(monkeypatch, tiny):
    """The search replaced by one that says `sentence` (bracketed) for every row, so that each piece has entities;
    their times still come from aligning it against the model's own phone CTC head."""
    import search
    vocab = recognize.data.Featurizer(tiny[1]).vocab

    def fake(sentence):
        ids = vocab.encode(sentence)
        monkeypatch.setattr(recognize, "beam_search", lambda model, enc, options, **kw: [
            [search.Hypothesis(ids, -1.0, [-0.1] * (len(ids) + 1))] for _ in range(enc.hidden.shape[0])])
    return fake


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory):
    """~30 s: the four fixture utterances, twice, between pauses of 0.3-1.5 s; their speech spans."""
    x, spans = speech_with_pauses([1.5, 0.3, 1.0, 0.6, 1.2, 0.4, 0.8, 1.5])
    return write_pcm(tmp_path_factory.mktemp("long") / "long.wav", x), spans, len(x) / 16000


def test_a_long_recording_is_the_stitch_of_its_pieces_decoded_alone(tiny, long_wav, says):
    path, spans, seconds = long_wav
    says("[张伟]在(北京)<大学>读书")
    rec = recognize.Recognizer(tiny, device="cpu", beam=2, max_len=12, max_piece_seconds=8.0, vad="energy",
                               timestamps="chars")
    (res,) = rec.run([recognize.Request(wav=path, id="long")], batch_size=3)
    pieces = [(p["start_s"], p["end_s"]) for p in res["pieces"]]
    assert len(pieces) >= 4 and all(b - a <= 8.0 + 1e-9 for a, b in pieces)
    for a, b in spans:                                                  # no utterance is cut
        assert any(p <= a and b <= q for p, q in pieces)
    alone = rec.run([recognize.Request(wav=path, id="long", span=p) for p in pieces], batch_size=1)
    assert res["text"] == "".join(r["text"] for r in alone)             # pause cuts: the texts end to end
    shift = np.cumsum([0] + [len(r["text"]) for r in alone])
    expect = [(e["start"] + shift[k], e["end"] + shift[k], e["type"], e["start_s"], k)   # a stretch's times are
              for k, r in enumerate(alone) for e in r["entities"] if e["start_s"] is not None]  # the recording's
    got = [(e["start"], e["end"], e["type"], e["start_s"], e["piece"]) for e in res["entities"]
           if e["start_s"] is not None]
    assert got == expect and len(res["entities"]) == 3 * len(pieces) and len(res["char_times"]) == len(res["text"])
    assert len(got) >= 2 * len(pieces)    # the energy detector splits one utterance: its short pieces may align
                                          # too little speech to time all three entities (they stay, untimed)
    assert res["output"].replace("[", "").replace("]", "").replace("(", "").replace(")", "").replace(
        "<", "").replace(">", "") == res["text"]


def test_pieces_keep_the_pause_asked_for_around_their_speech(tiny, long_wav):
    """--piece-pad-seconds: each piece keeps that much of its pauses (at most half of each), no more, no less (pads
    that meet make pieces touch, which --join-piece-seconds joins: not here)."""
    path, spans, seconds = long_wav
    plans = {}
    for pad in (0.0, 0.1, 0.3):
        rec = recognize.Recognizer(tiny, device="cpu", max_piece_seconds=8.0, vad="energy", piece_pad_seconds=pad,
                                   join_piece_seconds=None)
        plans[pad] = rec._pieces(recognize.Request(wav=path, id="long"), "SNER")
    assert len(plans[0.0]) == len(plans[0.1]) == len(plans[0.3]) >= 4
    checked = 0
    for k, (tight, p1, p3) in enumerate(zip(plans[0.0], plans[0.1], plans[0.3])):
        pause_before = tight.start_s - (plans[0.0][k - 1].end_s if k else 0.0)
        if pause_before >= 0.6:                                      # room for the whole pad on this side
            assert tight.start_s - p1.start_s == pytest.approx(0.1, abs=1e-6)
            assert tight.start_s - p3.start_s == pytest.approx(0.3, abs=1e-6)
            checked += 1
    assert checked >= 2
    with pytest.raises(files.InputError, match="piece_pad_seconds must be in"):
        recognize.Recognizer(tiny, device="cpu", piece_pad_seconds=0.8)
    # --vad-threshold: a stricter threshold starts each stretch no earlier, and some later
    strict = recognize.Recognizer(tiny, device="cpu", max_piece_seconds=8.0, vad="energy", piece_pad_seconds=0.0,
                                  vad_threshold=0.95, join_piece_seconds=None)._pieces(
        recognize.Request(wav=path, id="long"), "SNER")
    assert len(strict) == len(plans[0.0])
    assert all(s.start_s >= p.start_s - 1e-9 for s, p in zip(strict, plans[0.0]))
    assert any(s.start_s > p.start_s + 0.01 for s, p in zip(strict, plans[0.0]))


def test_sner_pieces_start_where_the_phone_ctc_head_first_hears_a_phone(tiny, long_wav, says, monkeypatch):
    """--onset-lead-seconds: one pass of the phone CTC head over the planned pieces, then each decodes from its first
    heard phone less the lead (segment.snap_onsets); times stay in the recording's clock. None: no such pass."""
    path, spans, seconds = long_wav
    says("[张伟]在(北京)<大学>读书")
    passes, decoded, real, real_batch = [], [], recognize.Recognizer._heard, recognize.Recognizer._batch

    def heard(self, reqs, batch_size=8, edges=True):
        passes.append([r.span for r in reqs])
        out = real(self, reqs, batch_size, edges)
        return out[0], out[1], [(5, 30)] * len(reqs)                # the first phone at frame 5: 0.2 s in

    def batch(self, reqs, task, pieces=None):
        decoded.extend(r.span for r in reqs)
        return real_batch(self, reqs, task, pieces)
    monkeypatch.setattr(recognize.Recognizer, "_heard", heard)
    monkeypatch.setattr(recognize.Recognizer, "_batch", batch)
    kw = dict(device="cpu", beam=2, max_len=12, max_piece_seconds=8.0, vad="energy", timestamps="chars")
    plain = recognize.Recognizer(tiny, onset_lead_seconds=None, **kw)
    (before,) = plain.run([recognize.Request(wav=path, id="long")])
    assert passes == []
    snapping = recognize.Recognizer(tiny, onset_lead_seconds=0.05, **kw)
    decoded.clear()
    (after,) = snapping.run([recognize.Request(wav=path, id="long")])
    assert sorted(decoded) == sorted((q["start_s"], q["end_s"]) for q in after["pieces"])   # the audio decoded
    assert passes == [[(p["start_s"], p["end_s"]) for p in before["pieces"]]]   # the planned pieces, once
    moved = 0
    for p, q in zip(before["pieces"], after["pieces"]):
        keeps = p["end_s"] - (p["start_s"] + 0.15) < 1.0                # under a second left: stays as planned
        assert q["start_s"] == pytest.approx(p["start_s"] + (0 if keeps else 0.15), abs=1e-6)
        assert q["end_s"] == p["end_s"]
        moved += not keeps
    assert moved >= 4
    timed = [e for e in after["entities"] if e["start_s"] is not None]
    assert len(timed) >= 4
    for e in timed:                                                  # times in the recording, inside its piece
        piece = after["pieces"][e["piece"]]
        assert piece["start_s"] - 1e-6 <= e["start_s"] < e["end_s"] <= piece["end_s"] + 1e-6


def test_quiet_pieces_are_mners_only_and_the_threshold_is_the_options(tiny, long_wav, monkeypatch):
    """--vad-threshold (default 0.5), --pause-level (0.25) and the joins of touching pieces (2 s, 6.5 s) plan the
    pieces of both speech tasks; quiet pieces are MNER's only (its transcript decides whether they hold anything);
    --quiet-threshold none: none."""
    seen = []
    real = recognize.segment.plan_pieces
    monkeypatch.setattr(recognize.segment, "plan_pieces", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    req = recognize.Request(wav=long_wav[0], id="long")
    rec = recognize.Recognizer(tiny, device="cpu", max_piece_seconds=8.0, vad="energy")
    rec._pieces(req, "SNER"), rec._pieces(req, "MNER")
    knobs = ("threshold", "quiet_threshold", "pause_level", "short_s", "join_s", "gap_s")
    assert [tuple(kw[k] for k in knobs) for kw in seen] == [(0.5, None, 0.25, 2.0, 6.5, None),
                                                           (0.5, 0.1, 0.25, 2.0, 6.5, 2.5)]
    seen.clear()
    rec = recognize.Recognizer(tiny, device="cpu", max_piece_seconds=8.0, vad="energy", vad_threshold=0.6,
                               quiet_threshold=None, pause_level=None, short_piece_seconds=1.0,
                               join_piece_seconds=None, gap_piece_seconds=None)
    rec._pieces(req, "SNER"), rec._pieces(req, "MNER")
    assert [tuple(kw[k] for k in knobs) for kw in seen] == [(0.6, None, None, 1.0, None, None)] * 2
    with pytest.raises(files.InputError, match="quiet_threshold must be in"):
        recognize.Recognizer(tiny, device="cpu", quiet_threshold=1.0)
    with pytest.raises(files.InputError, match="pause_level must be in"):
        recognize.Recognizer(tiny, device="cpu", pause_level=0.0)


def test_a_recording_up_to_the_piece_length_decodes_whole_as_before(tiny):
    wav = str(ROOT / "tests" / "fixtures" / "wavs" / "utt002.wav")
    rec = recognize.Recognizer(tiny, device="cpu", beam=2, max_len=12, max_piece_seconds=5.0, vad="energy")
    before = recognize.Recognizer(tiny, device="cpu", beam=2, max_len=12)
    (res,), (old,) = rec.run([recognize.Request(wav=wav)]), before.run([recognize.Request(wav=wav)])
    assert res == old and "pieces" not in res


def test_a_long_recording_with_its_transcript_shares_the_text_among_the_pieces(tiny, long_wav):
    """MNER on a long recording: every character of the transcript goes to exactly one piece, in order, so the
    stitched text is the transcript and every entity's offsets point into it; each piece says its share."""
    texts = [json.loads(line)["text"] for line in (WAVS_DIR / "index.jsonl").read_text(encoding="utf-8").splitlines()]
    transcript = "".join(texts[k % 4] for k in range(8))
    rec = recognize.Recognizer(tiny, device="cpu", beam=2, max_piece_seconds=8.0, vad="energy", entity_bias=8.0)
    (res,) = rec.run([recognize.Request(wav=long_wav[0], text=transcript, id="m")], batch_size=4)
    assert res["task"] == "MNER" and res["text"] == res["input_text"] == transcript
    shares = [p["chars"] for p in res["pieces"]]
    assert shares[0][0] == 0 and shares[-1][1] == len(transcript) and len(shares) >= 4
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert res["entities"] and all(transcript[e["start"]:e["end"]] == e["text"] for e in res["entities"])
    for e in res["entities"]:                                           # found in the piece that holds its text
        assert shares[e["piece"]][0] <= e["start"] and e["end"] <= shares[e["piece"]][1]
    with pytest.raises(recognize.files.InputError, match="max.piece.seconds"):
        recognize.Recognizer(tiny, device="cpu", max_piece_seconds=2.0)


def test_realigning_moves_the_shares_and_the_pieces_to_the_pause_found_between_them(tiny, long_wav, monkeypatch):
    """--realign-margin-seconds: each pair of neighbouring pieces with shares is aligned over their joint audio
    (a character without a reading, here a comma, takes no frames: None) and segment.pause_between's answer (on the
    joint audio's clock) moves the boundary and, through segment.recut, the pieces' ends (in the recording's time),
    which are what gets decoded; none: the pieces and shares of the detector and the split."""
    texts = [json.loads(line)["text"] for line in (WAVS_DIR / "index.jsonl").read_text(encoding="utf-8").splitlines()]
    transcript = "，".join(texts[k % 4] for k in range(8))
    req = recognize.Request(wav=long_wav[0], text=transcript, id="m")
    kw = dict(device="cpu", beam=1, max_len=4, max_piece_seconds=8.0, vad="energy")
    (plain,) = recognize.Recognizer(tiny, realign_margin_seconds=None, **kw).run([req], batch_size=4)
    asked = []

    def answer(spans, lo, bound, hi, margin_s, min_confidence):
        asked.append((lo, bound, hi, margin_s, min_confidence))
        assert [s is None for s in spans] == [c == "，" for c in transcript[lo:hi]]
        firsts = [s[0] for s in spans if s is not None]
        assert firsts == sorted(firsts) and all(0 <= s[0] <= s[1] and 0 <= s[2] <= 1 for s in spans if s)
        return (bound - 1, 0.25, 0.75) if len(asked) == 1 else None  # the first pair only: one char to the right
    monkeypatch.setattr(recognize.segment, "pause_between", answer)
    decoded = []
    real_batch = recognize.Recognizer._batch
    monkeypatch.setattr(recognize.Recognizer, "_batch", lambda self, reqs, task, pieces=None: decoded.extend(
        (r.span, r.text) for r in reqs) or real_batch(self, reqs, task, pieces))
    (moved,) = recognize.Recognizer(tiny, **kw).run([req], batch_size=4)
    before, after = plain["pieces"], moved["pieces"]
    assert asked and all(m == 0.2 and c == recognize.audio.MIN_ALIGN_CONFIDENCE for *_, m, c in asked)
    lo, bound, hi = asked[0][:3]                                        # pieces k, k + 1 of the first pair asked
    k = next(k for k in range(len(before) - 1) if before[k]["chars"] == [lo, bound] and before[k + 1]["chars"] ==
             [bound, hi] and before[k + 1]["end_s"] - before[k]["start_s"] <= 8.0)
    assert after[k]["chars"] == [lo, bound - 1] and after[k + 1]["chars"] == [bound - 1, hi]
    start = before[k]["start_s"]                                        # the joint audio starts with piece k
    assert after[k]["end_s"] == pytest.approx(min(start + 0.75, max(before[k]["end_s"], start + 0.45)))
    assert after[k + 1]["start_s"] == pytest.approx(max(start + 0.25, min(before[k + 1]["start_s"], start + 0.55)))
    assert after[:k] == before[:k] and after[k + 2:] == before[k + 2:]
    shared = {((p["start_s"], p["end_s"]), transcript[p["chars"][0]:p["chars"][1]]) for p in after
              if transcript[p["chars"][0]:p["chars"][1]].strip()}
    assert shared == {(tuple(round(t, 4) for t in span), text) for span, text in decoded}   # decoded as reported
    with pytest.raises(recognize.files.InputError, match="realign_margin_seconds must be"):
        recognize.Recognizer(tiny, device="cpu", realign_margin_seconds=-1.0)


def test_a_long_gap_is_room_for_the_characters_nobody_heard_and_joins_the_piece_it_finishes(tiny, tmp_path,
                                                                                              monkeypatch):
    """--gap-piece-seconds (MNER): a 4 s silence between utterances is a gap piece, given to split_text as room
    (12 phones a second; the others none); a gap given a share joins the neighbour its speech runs into when both
    fit in the joins' length (forced by a split that gives every piece a share), and what is decoded is what the
    pieces report; none: no gap pieces."""
    x, _ = speech_with_pauses([0.5, 0.4, 4.0, 0.5])
    path = write_pcm(tmp_path / "gap.wav", x)
    texts = [json.loads(line)["text"] for line in (WAVS_DIR / "index.jsonl").read_text(encoding="utf-8").splitlines()]
    transcript = "".join(texts[k % 4] for k in range(4))
    req = recognize.Request(wav=path, text=transcript, id="g")
    kw = dict(device="cpu", beam=1, max_len=8, max_piece_seconds=8.0, vad="energy", join_piece_seconds=None,
              realign_margin_seconds=None)
    rooms, real_split = [], recognize.segment.split_text              # the first call: the split (share_failed
                                                                      # calls it again without room)

    def split(char_phones, heard, max_distance=0.5, room=None):
        rooms.append(room)
        return real_split(char_phones, heard, max_distance, room)
    monkeypatch.setattr(recognize.segment, "split_text", split)
    (res,) = recognize.Recognizer(tiny, **kw).run([req])
    gaps = [p for p in res["pieces"] if p.get("gap")]
    assert len(gaps) == 1 and gaps[0]["end_s"] - gaps[0]["start_s"] >= 2.5
    assert rooms[0] == [round(12 * (p["end_s"] - p["start_s"])) if p.get("gap") else 0 for p in res["pieces"]]
    k = res["pieces"].index(gaps[0])

    def forced(char_phones, heard, max_distance=0.5, room=None):    # every piece, the gap too, gets a share
        bounds, distances, failures = real_split(char_phones, heard, max_distance, room)
        if room is not None:                                            # the split, not share_failed's
            bounds = [round(i * len(char_phones) / len(heard)) for i in range(len(heard) + 1)]
        return bounds, distances, failures
    monkeypatch.setattr(recognize.segment, "split_text", forced)
    decoded, real_batch = [], recognize.Recognizer._batch
    monkeypatch.setattr(recognize.Recognizer, "_batch", lambda self, reqs, task, pieces=None: decoded.extend(
        (r.span, r.text) for r in reqs) or real_batch(self, reqs, task, pieces))
    (joined,) = recognize.Recognizer(tiny, **dict(kw, join_piece_seconds=8.0)).run([req])
    before, after = res["pieces"][k - 1], res["pieces"][k + 1]
    assert len(joined["pieces"]) == len(res["pieces"]) - 1 and not any(p.get("gap") for p in joined["pieces"])
    spans = {(p["start_s"], p["end_s"]) for p in joined["pieces"]}
    assert (before["start_s"], gaps[0]["end_s"]) in spans or (gaps[0]["start_s"], after["end_s"]) in spans
    shared = {((p["start_s"], p["end_s"]), transcript[p["chars"][0]:p["chars"][1]]) for p in joined["pieces"]
              if p["chars"][1] > p["chars"][0]}
    assert shared == {(tuple(round(t, 4) for t in span), text) for span, text in decoded}
    monkeypatch.setattr(recognize.segment, "split_text", split)
    rooms.clear()
    (none,) = recognize.Recognizer(tiny, **dict(kw, gap_piece_seconds=None)).run([req])
    assert not any(p.get("gap") for p in none["pieces"]) and rooms[0] == [0] * len(none["pieces"])
    with pytest.raises(recognize.files.InputError, match="gap_piece_seconds must be"):
        recognize.Recognizer(tiny, device="cpu", gap_piece_seconds=0.5)


def test_a_long_recording_is_read_a_block_or_a_piece_at_a_time(tiny, tmp_path, monkeypatch):
    """Memory follows the block and piece sizes, not the recording: a 6-minute recording (written a block at a
    time) is never read whole, every read is at most a 30 s VAD block or a piece, and each part is read about
    twice (once for voice activity, once for its piece)."""
    base, _ = speech_with_pauses([0.5, 0.3, 0.7, 0.4])                 # ~15 s
    path = str(tmp_path / "six.wav")
    with wave.open(path, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        for _ in range(round(6 * 60 * 16000 / len(base))):
            w.writeframes(np.round(base * 32767).astype("<i2").tobytes())
    reads, read_frames = [], audio.read_wav_frames

    def spy(p, first, count=None):
        samples, rate = read_frames(p, first, count)
        reads.append(len(samples))
        return samples, rate

    monkeypatch.setattr(audio, "read_wav_frames", spy)
    rec = recognize.Recognizer(tiny, device="cpu", beam=1, max_len=4, max_piece_seconds=10.0, vad="energy")
    (res,) = rec.run([recognize.Request(wav=path)])
    frames = audio.wav_info(path).frames
    assert res["pieces"][-1]["end_s"] > 6 * 60 - 16 and len(res["pieces"]) >= 36
    assert max(reads) <= 30 * 16000 and sum(reads) < 2.1 * frames


def test_the_cli_decodes_and_redacts_a_long_recording(tiny, long_wav, tmp_path, capsys, says):
    """decode.py --wav long.wav: one JSON result with its pieces; --redact replaces each entity at its time in the
    recording (the stitched times) and keeps the recording's format."""
    import dataclasses
    import json

    import decode
    import torch
    model, assets = tiny
    ckpt = tmp_path / "tiny.pt"
    torch.save({"format": "image-checkpoint", "version": 1, "config": dataclasses.asdict(model.config),
                "model": model.state_dict(), "assets": assets, "source": {"kind": "test"}}, ckpt)
    out = tmp_path / "red.wav"
    says("郭涛的[公司]搬到了(合肥)")
    decode.main(["--ckpt", str(ckpt), "--wav", long_wav[0], "--max-piece-seconds", "8", "--vad", "energy",
                 "--beam", "2", "--max-len", "12", "--json", "--redact", str(out), "--pad-ms", "0",
                 "--min-align-confidence", "0"])
    (res,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(res["pieces"]) >= 4 and audio.wav_info(out) == audio.wav_info(long_wav[0])
    replaced = json.loads((tmp_path / "red.wav.json").read_text(encoding="utf-8"))["replaced"]
    timed = [e for e in res["entities"] if e["start_s"] is not None]
    assert len(res["entities"]) == 2 * len(res["pieces"]) and len(timed) >= len(res["entities"]) - 2
    assert res["output"].startswith("郭涛的[公司]搬到了(合肥)郭涛的")
    assert [(r["from_s"], r["to_s"]) for r in replaced if r["why"] == "aligned"] == [
        (round(e["start_s"], 3), round(e["end_s"], 3)) for e in timed]
    assert all(r["why"].startswith("no time") for r in replaced if r["why"] != "aligned")   # fail closed


def test_a_stretch_of_a_recording_decodes_as_that_audio_cut_out_with_times_in_the_recording(tiny, long_wav, tmp_path,
                                                                                            says):
    """Request(span=...) / a jsonl line's start_s, end_s: the stretch decodes as the same samples written to a wav
    of their own (a short stretch whole, a long one cut into pieces within it), every time moved into the
    recording's."""
    path, spans, seconds = long_wav
    says("[张伟]在(北京)<大学>读书")
    samples, _ = audio.read_wav(path)
    rec = recognize.Recognizer(tiny, device="cpu", beam=2, max_len=12, max_piece_seconds=8.0, vad="energy",
                               timestamps="chars")
    for a, b in [(spans[1][0] - 0.25, spans[1][1] + 0.25), (spans[1][0] - 0.25, spans[4][1] + 0.25)]:
        cut = write_pcm(tmp_path / "cut.wav", samples[int(a * 16000): int(np.ceil(b * 16000))].numpy())
        (alone,) = rec.run([recognize.Request(wav=cut)])
        (res,) = rec.run([recognize.Request(wav=path, span=(a, b))])
        assert (res["start_s"], res["end_s"]) == (a, b) and res["output"] == alone["output"]
        assert ("pieces" in res) == ("pieces" in alone) == (b - a > 8.0)
        def times(r):                                                   # every time of a result, in order
            return ([t for e in r["entities"] for t in (e["start_s"], e["end_s"])] +
                    [t for row in r["char_times"] for t in row[1:]] +
                    [t for p in r.get("pieces", []) for t in (p["start_s"], p["end_s"])])
        assert sum(t is not None for t in times(alone)) > 10
        assert [t is None for t in times(res)] == [t is None for t in times(alone)]
        assert [t for t in times(res) if t is not None] == pytest.approx(
            [t + a for t in times(alone) if t is not None], abs=2e-4)
    a, b = spans[1][0] - 0.25, spans[1][1] + 0.25                      # a short stretch: --timestamps as for a file
    cut = write_pcm(tmp_path / "cut.wav", samples[int(a * 16000): int(np.ceil(b * 16000))].numpy())
    for timestamps in ("none", "entities"):
        rec = recognize.Recognizer(tiny, device="cpu", beam=2, max_len=12, vad="energy", timestamps=timestamps)
        (alone,), (res,) = rec.run([recognize.Request(wav=cut)]), rec.run([recognize.Request(wav=path, span=(a, b))])
        assert set(res) - set(alone) == {"start_s", "end_s"} and set(alone) <= set(res)
        assert [sorted(e) for e in res["entities"]] == [sorted(e) for e in alone["entities"]]
        assert [e["confidence"] for e in res["entities"]] == pytest.approx([e["confidence"] for e in alone["entities"]])
    (whole,) = rec.run([recognize.Request(waveform=samples, span=(a, b))])   # a waveform's stretch: the same
    assert whole["entities"] == res["entities"]
    with pytest.raises(files.InputError, match=r"input 0: expected a mono waveform \(N,\), got shape \(1, "):
        rec.run([recognize.Request(waveform=samples[None], span=(a, b))])
    with pytest.raises(files.InputError, match="input 0: start_s/end_s choose a stretch of speech, but task TNER"):
        rec.run([recognize.Request(wav=path, text="张伟", span=(a, b))], task="TNER")
    with pytest.raises(files.InputError, match="input x: start_s 29, end_s 99 is not a stretch of its"):
        rec.run([recognize.Request(wav=path, id="x", span=(29.0, 99.0))])
    with pytest.raises(files.InputError, match="input 0: 50 ms from start_s to end_s is too short"):
        rec.run([recognize.Request(wav=path, span=(1.0, 1.05))])
    asr = recognize.Recognizer(tiny, device="cpu", asr=True, max_audio_seconds=5.0)
    with pytest.raises(files.InputError, match="is over the 5 s limit of --asr"):
        asr.run([recognize.Request(wav=path, span=(0.0, 10.0))])
