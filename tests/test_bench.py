"""bench.py: the memory probe, the --memory table, the ASR batch, the reference-side scripts (compiled, not run:
they need the reference venv) and one quick run of our side (no reference venv needed)."""
import dataclasses
import importlib.util
import inspect
import json
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import image  # noqa: E402
import workload  # noqa: E402
import cost  # noqa: E402
import measure  # noqa: E402
import recognize  # noqa: E402
import search  # noqa: E402
import text  # noqa: E402
import weights  # noqa: E402
from test_decode import SENTENCES, gold_samples  # noqa: E402


def test_peak_memory_sees_a_large_allocation():
    with measure.PeakMemory(torch.device("cpu")) as probe:
        x = torch.ones(40_000_000)                 # 160 MB, touched
        del x
    report = probe.report()
    if report["peak_mb"] is None:
        pytest.skip("/proc/self/clear_refs is not available here")
    assert report["growth_mb"] >= 140


def test_our_side_runs_and_writes_the_ratio_keys(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main(["--skip-reference", "--preset", "tiny", "--wav-dir", str(ROOT / "tests" / "fixtures" / "wavs"),
                         "--n-wavs", "2", "--batch", "2", "--train-batch", "2", "--beam", "2", "--max-len", "3",
                         "--repeat", "1", "--train-steps", "1", "--threads", "1", "--cache-dir", str(tmp_path),
                         "--json", str(out)])
    saved = json.loads(out.read_text(encoding="utf-8"))
    for key in bench.RATIO_KEYS:
        assert key in saved
    assert saved["decode_speedup_vs_reference"] is None and saved["train_step_time_ratio_vs_reference"] is None
    decode = saved["decode"]["ours"]
    assert decode["utterances_per_s"] > 0 and decode["rtf"] > 0
    assert decode["mean_output_tokens"] == 3 + 1                 # random weights: forced to max_len, + EOS
    train = saved["train"]["ours"]
    assert train["step"]["best_s"] > 0 and 0 < train["mfu"] < 1
    texts = [text for _, text, _ in workload.read_wav_index(ROOT / "tests" / "fixtures" / "wavs")[:2]]
    assert train["tokens"] == sum(len(t) + 1 for t in texts)     # one id per character + EOS
    fbank = saved["fbank"]
    assert fbank["frames"] > 0 and fbank["ours_per_utterance_1_thread"]["frames_per_s"] > 0
    try:
        import kaldi_native_fbank  # noqa: F401
        assert saved["fbank_speed_ratio_vs_kaldi_native_fbank"] > 0
    except ImportError:
        assert saved["fbank_speed_ratio_vs_kaldi_native_fbank"] is None
    assert set(saved["targets"]) == set(report["targets"])


def test_timestamps_section_times_both_settings_on_aligned_text(tmp_path):
    wavs = ROOT / "tests" / "fixtures" / "wavs"
    report = bench.main(["--skip-reference", "--preset", "tiny", "--wav-dir", str(wavs), "--n-wavs", "2",
                         "--batch", "2", "--beam", "2", "--repeat", "1", "--threads", "1", "--sections", "timestamps",
                         "--cache-dir", str(tmp_path)])
    t = report["timestamps"]
    seconds = [s for _, _, s in workload.read_wav_index(wavs)][:2]
    assert t["sner_forced_chars"] == round(4.5 * (2.95725 + 2.8994375) / 2) == 13 and seconds == [None, None]
    for task in ("SNER", "MNER"):
        assert t[task]["none_s"] > 0 and t[task]["entities_s"] > 0
        assert t[task]["results_without_times"] == 0                 # the forced text fits the audio: aligned
        assert len(t[task]["runs_none_s"]) == len(t[task]["runs_entities_s"]) == 1   # after one warm-up pass
    assert report["timestamp_cost"] == max(t["SNER"]["added"], t["MNER"]["added"])
    assert "decode" not in report and "train" not in report
    assets = workload.bench_assets(image.IMAGE(image.Config.tiny(vocab_size=cost.FULL_VOCAB)))
    assert len(assets["vocab"]) == cost.FULL_VOCAB and assets["vocab"][workload.CONSTRAINT[1] - 1] == chr(0x4E00 + 21134 - 10 - 1)


def test_long_section_times_recordings_and_says_where_the_time_goes(tmp_path):
    wavs = ROOT / "tests" / "fixtures" / "wavs"
    report = bench.main(["--skip-reference", "--preset", "tiny", "--wav-dir", str(wavs), "--beam", "2",
                         "--threads", "1", "--sections", "long", "--long-minutes", "0.2,0.4", "--long-piece", "5",
                         "--cache-dir", str(tmp_path)])
    rows = report["long"]["rows"]
    assert [r["minutes"] for r in rows] == [0.2, 0.4] and rows[1]["audio_s"] >= 24 and rows[1]["pieces"] >= 5
    for r in rows:
        assert r["rtf"] > 0 and r["forced_chars"] >= 9 and set(r["time_shares"]) == {
            "voice activity", "reading + features", "encoder", "search", "alignment"}
        assert sum(r["time_shares"].values()) <= 1.0 + 1e-6
    assert report["long_rtf_spread"] == pytest.approx(max(r["rtf"] for r in rows) / min(r["rtf"] for r in rows) - 1)
    if rows[0]["peak_mb"] is not None:                                  # Linux: the peak RSS, reset per recording
        peaks = [r["peak_mb"] for r in rows]
        assert report["long_peak_memory_spread"] == pytest.approx(max(peaks) / min(peaks) - 1)
        assert all(0 <= r["growth_mb"] <= r["peak_mb"] for r in rows)
    assert not list(tmp_path.glob("long_*"))                            # the recordings are removed
    assert recognize.beam_search is search.beam_search                  # the stopwatch is taken off


def test_bad_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench.get_args(["--sections", "decode,speed"])
    assert "--sections" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.get_args(["--max-len", "0"])


def test_asr_batch_is_the_hand_padded_modelscope_format_batch():
    """data.collate's batch equals what both sides fed before (and the reference driver still builds by hand):
    zero-padded fbank, BOS + ids / ids + EOS padded with PAD, in float32 and int64."""
    feats = [torch.randn(7, 80), torch.randn(4, 80)]
    batch = workload.asr_batch(feats, [[10, 11, 12], [20]])
    fbank = torch.zeros(2, 7, 80)
    fbank[0], fbank[1, :4] = feats[0], feats[1]
    B, P, E = text.BOS, text.PAD, text.EOS
    assert batch["fbank"].dtype == torch.float32 and torch.equal(batch["fbank"], fbank)
    assert batch["fbank_lengths"].tolist() == [7, 4]
    assert batch["decoder_input"].tolist() == [[B, 10, 11, 12], [B, 20, P, P]]
    assert batch["target"].tolist() == [[10, 11, 12, E], [20, E, P, P]]
    assert batch["decoder_input"].dtype == batch["target"].dtype == torch.long
    assert batch["phone_lengths"].tolist() == [0, 0] and not batch["text_present"].any()
    assert workload.asr_batch(feats)["decoder_input"].tolist() == [[B], [B]]          # decoding: BOS alone


def test_reference_driver_is_a_script_that_bench_runs(tmp_path):
    driver = ROOT / "reference" / "bench_modelscope.py"
    assert workload.REFERENCE_DRIVER == driver and driver.is_file()
    py_compile.compile(str(driver), cfile=str(tmp_path / "driver.pyc"), doraise=True)
    assert "REFERENCE_DRIVER" in inspect.getsource(workload.run_reference)
    assert "def main(" in driver.read_text(encoding="utf-8")


def test_reference_scripts_compile_and_write_the_fixtures(tmp_path):
    """The scripts that made tests/fixtures live in reference/ and still point at tests/fixtures."""
    scripts = sorted((ROOT / "reference").glob("*.py"))
    assert {p.name for p in scripts} >= {"bench_modelscope.py", "ref_make_fixtures.py", "ref_fbank_make.py",
                                         "ref_beam_toy_make.py"}
    for i, script in enumerate(scripts):
        py_compile.compile(str(script), cfile=str(tmp_path / f"{i}.pyc"), doraise=True)
    subprocess.run(["bash", "-n", str(ROOT / "reference" / "ref_beam_make.sh")], check=True)
    spec = importlib.util.spec_from_file_location("ref_fbank_make", ROOT / "reference" / "ref_fbank_make.py")
    fbank_make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fbank_make)                  # imports torch only; main() is not run
    assert fbank_make.REPO == ROOT and (fbank_make.REPO / "tests" / "fixtures" / "ms_tiny_a").is_dir()
    assert 'FIXTURES = os.path.normpath(os.path.join(HERE, "..", "tests", "fixtures"))' in (
        ROOT / "reference" / "ref_make_fixtures.py").read_text(encoding="utf-8")
    assert 'cd "$(dirname "$0")/../tests/fixtures"' in (ROOT / "reference" / "ref_beam_make.sh").read_text()


# ----------------------------------------------------------------------------------------------------------
# the memory estimate


def test_memory_flag_prints_the_table_and_a_max_frames_that_fits(capsys):
    report = bench.main(["--memory", "--preset", "base", "--train-batch", "4", "--seconds", "10", "--card-gib", "16"])
    out = capsys.readouterr().out
    assert "GB = 1e9 bytes, GiB = 2**30 bytes" in out and "total_allocated" in out
    assert f"suggested --max-frames for a 16 GiB card with 3 GiB margin: {report['suggested_max_frames']}" in out
    assert report["estimate"]["shapes"]["batch"] == 4
    frames_per_row = report["estimate"]["shapes"]["frames"]
    fits = lambda frames: cost.memory_estimate("base", frames / frames_per_row, 10.0, "bf16")["total_with_context"]
    budget = 13 * cost.GiB
    assert fits(report["suggested_max_frames"]) <= budget < fits(report["suggested_max_frames"] + frames_per_row)
    budgeted = bench.main(["--memory", "--preset", "base", "--seconds", "10", "--max-frames", str(2 * frames_per_row)])
    assert budgeted["estimate"]["shapes"]["batch"] == 2
    with pytest.raises(SystemExit):
        bench.get_args(["--memory", "--margin-gib", "30"])


def test_entities_section_times_a_list_that_changes_no_output(tmp_path):
    """The entity-list section: a list of random names plus the texts' stretches (so MNER finds occurrences),
    timed against no list; the temporary list is removed."""
    wavs = ROOT / "tests" / "fixtures" / "wavs"
    report = bench.main(["--skip-reference", "--preset", "tiny", "--wav-dir", str(wavs), "--n-wavs", "2",
                         "--batch", "2", "--beam", "2", "--repeat", "1", "--threads", "1", "--sections", "entities",
                         "--entity-list-size", "300", "--cache-dir", str(tmp_path)])
    e = report["entities"]
    assert e["entries"] > 300                                           # the texts' stretches on top
    for task in ("SNER", "MNER"):
        assert e[task]["none_s"] > 0 and e[task]["list_s"] > 0
    assert report["entity_list_cost"] == max(e["SNER"]["added"], e["MNER"]["added"])
    assert not list(tmp_path.glob("entities_*"))


def test_shards_section_times_one_and_two_processes(tmp_path):
    """The shards section on a 4-utterance corpus: decode.py as 1 process and under torchrun with 2, SNER and
    TNER, the same output both ways."""
    corpus = tmp_path / "corpus"
    (corpus / "wav").mkdir(parents=True)
    lines = []
    for s in gold_samples():
        (corpus / "wav" / f"{s.id}.wav").write_bytes(Path(s.audio).read_bytes())
        lines.append({"sentence": s.text, "audio": s.id,
                      "entity": [[e.start, e.end, s.text[e.start:e.end], e.type] for e in s.entities]})
    (corpus / "test.json").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines),
                                      encoding="utf-8")
    ckpt, assets = tmp_path / "tiny.pt", weights.assets_for_scratch(gold_samples())
    assets["decoding"]["max_len_b"] = 24
    torch.manual_seed(0)
    model = image.IMAGE(image.Config.tiny(vocab_size=len(assets["vocab"]), dropout=0.0)).eval()
    torch.save({"format": "image-checkpoint", "version": 1, "config": dataclasses.asdict(model.config),
                "model": model.state_dict(), "assets": assets, "source": {"kind": "test"}}, ckpt)
    report = bench.main(["--skip-reference", "--sections", "shards", "--shards-ckpt", str(ckpt), "--shards-dataset",
                         "cnerta", "--shards-data-dir", str(corpus), "--shards-split", "test", "--repeat", "1",
                         "--batch", "2", "--beam", "2", "--cache-dir", str(tmp_path / "cache")])
    d = report["shards"]
    assert d["processes"] == 2 and len(SENTENCES) == 4
    for task in ("SNER", "TNER"):
        assert d[task][1]["sentences"] == d[task][2]["sentences"] == 4 and d[task]["same_output"]
        assert d[task]["speedup"] > 0
