"""Bad inputs through the real entry points (subprocesses of train.py, decode.py, weights.py): each is refused at
start-up with one line `prog.py: message` (or argparse's `error:` line) naming the file or flag, a non-zero exit and
no traceback. Internal errors (bugs) keep their traceback."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import data  # noqa: E402
import decode  # noqa: E402
import files  # noqa: E402
import train  # noqa: E402
import weights  # noqa: E402
from test_train import write_corpus  # noqa: E402

MS_TINY = ROOT / "tests" / "fixtures" / "ms_tiny_a"


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """Everything the cases point at: a text-only corpus, broken variants, a checkpoint, odd files and folders."""
    root = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(root / "corpus", n_train=3, n_dev=1, n_test=1, audio=False)
    variants = {"empty_train": ("train.json", ""), "empty_dev": ("valid.json", ""),
                "malformed": ("train.json", "{\"sentence\": 3}\n"),
                "unknown_type": ("train.json", '{"sentence": "北京", "entity": [[0, 2, "北京", "CITY"]]}\n')}
    for name, (file, text) in variants.items():
        shutil.copytree(corpus, root / name)
        (root / name / file).write_text(text, encoding="utf-8")
    shutil.copytree(corpus, root / "no_dev")
    (root / "no_dev" / "valid.json").unlink()
    shutil.copytree(corpus, root / "latin1")
    (root / "latin1" / "train.json").write_bytes('{"sentence": "caf\u00e9", "entity": []}\n'.encode("latin-1"))
    write_corpus(root / "bad_wav", n_train=2, n_dev=1, n_test=1, audio=True)
    first = sorted((root / "bad_wav" / "wav").glob("Ttrain*.wav"))[0]
    first.write_bytes(first.read_bytes()[:30])  # header cut short
    (root / "in_bad.jsonl").write_text('{"text": 123}\n', encoding="utf-8")
    (root / "in_surrogate.jsonl").write_text('{"text": "a\\ud800"}\n', encoding="utf-8")  # decodes, not printable
    shutil.copytree(MS_TINY, root / "ms_yaml")
    (root / "ms_yaml" / "fbank_config.yaml").write_text("- utterance_cmvn\n", encoding="utf-8")
    weights.save_checkpoint(weights.convert(str(MS_TINY)), str(root / "model.pt"))
    (root / "file.txt").write_text("a regular file\n")
    (root / "text.pt").write_text("not a checkpoint\n")
    (root / "folder").mkdir()
    (root / "in.jsonl").write_text('{"text": "北京"}\n', encoding="utf-8")
    (root / "run_junk").mkdir()
    (root / "run_junk" / "last.pt").write_bytes(b"PK\x03\x04 torn")
    (root / "run_best").mkdir()  # a best.pt copied over last.pt: model, no optimizer state
    torch.save({"format": "image-checkpoint", "version": 1, "model": {}}, root / "run_best" / "last.pt")
    for name, edit in (("ms_list", lambda cfg: [cfg]), ("ms_string", lambda cfg: {**cfg, "d_model": "512"})):
        shutil.copytree(MS_TINY, root / name)
        config = root / name / "config.json"
        config.write_text(json.dumps(edit(json.loads(config.read_text()))))
    return root


def run(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def train_argv(corpus, out, *extra):
    return ["train.py", "--dataset", "cnerta", "--data-dir", corpus, "--preset", "tiny", "--device", "cpu",
            "--epochs", "1", "--batch-size", "1", "--greedy", "--out", out, *extra]


def decode_argv(*extra):
    return ["decode.py", "--ckpt", "{d}/model.pt", "--device", "cpu", *extra]


# (case, argv with {d} = the `place` folder, words the message must hold)
CASES = [
    # A. outputs checked before any work
    ("train --out under a regular file", train_argv("{d}/corpus", "{d}/file.txt/sub"), ["--out", "file.txt/sub"]),
    ("train --out where nothing can be written", train_argv("{d}/corpus", "/proc/self"), ["--out", "/proc/self"]),
    ("decode --out in a missing folder", decode_argv("--input", "{d}/in.jsonl", "--out", "{d}/nowhere/out.jsonl"),
     ["--out", "nowhere", "does not exist"]),
    ("decode --out onto a folder", decode_argv("--input", "{d}/in.jsonl", "--out", "{d}/folder"),
     ["--out", "folder", "is a directory"]),
    ("decode --predictions under a regular file",
     decode_argv("--dataset", "cnerta", "--data-dir", "{d}/corpus", "--eval", "--predictions", "{d}/file.txt/p.jsonl"),
     ["--predictions", "file.txt/p.jsonl"]),
    # B. empty splits
    ("train empty training split", train_argv("{d}/empty_train", "{d}/r"), ["train.json", "no sentences"]),
    ("train empty dev split", train_argv("{d}/empty_dev", "{d}/r"), ["valid.json", "no sentences"]),
    # C. data errors described without a traceback
    ("train malformed line", train_argv("{d}/malformed", "{d}/r"), ["train.json:1"]),
    ("train unknown entity type", train_argv("{d}/unknown_type", "{d}/r"), ["train.json:1", "CITY"]),
    ("train unreadable last.pt", train_argv("{d}/corpus", "{d}/run_junk", "--resume"), ["run_junk/last.pt"]),
    ("train missing dev split", train_argv("{d}/no_dev", "{d}/r"), ["valid.json", "no_dev"]),
    ("train non-UTF-8 training file", train_argv("{d}/latin1", "{d}/r"),
     ["train.json:1", "not UTF-8", "0xe9"]),
    ("train wav with a header cut short", train_argv("{d}/bad_wav", "{d}/r"), ["Ttrain0000.wav"]),
    ("decode --wav not a wav", decode_argv("--wav", "{d}/file.txt"), ["file.txt"]),
    ("decode --input value of the wrong type", decode_argv("--input", "{d}/in_bad.jsonl"),
     ["in_bad.jsonl:1", "text"]),
    ("decode --input lone surrogate", decode_argv("--input", "{d}/in_surrogate.jsonl"),
     ["in_surrogate.jsonl:1", "surrogate"]),
    ("weights fbank_config.yaml a list", ["weights.py", "{d}/ms_yaml", "{d}/w.pt"],
     ["fbank_config.yaml", "YAML mapping"]),
    ("train best.pt as last.pt", train_argv("{d}/corpus", "{d}/run_best", "--resume"),
     ["run_best/last.pt", "not a last.pt", "optimizer"]),
    # D. folders and foreign files as inputs
    ("train --init ModelScope folder", train_argv("{d}/corpus", "{d}/r", "--init", str(MS_TINY)),
     ["--init", "ModelScope directory", "weights.py"]),
    ("train --init text file", train_argv("{d}/corpus", "{d}/r", "--init", "{d}/text.pt"),
     ["--init", "text.pt", "not a PyTorch checkpoint"]),
    ("decode --input folder", decode_argv("--input", "{d}/folder"), ["--input", "folder", "is a directory"]),
    ("decode --wav folder", decode_argv("--wav", "{d}/folder"), ["--wav", "folder", "is a directory"]),
    ("decode --ckpt ModelScope folder", ["decode.py", "--ckpt", str(MS_TINY), "--text", "北京"],
     ["ms_tiny_a", "ModelScope directory", "python weights.py"]),
    ("decode --ckpt text file", ["decode.py", "--ckpt", "{d}/text.pt", "--text", "北京"],
     ["text.pt", "not a PyTorch checkpoint"]),
    # E. weights.py
    ("weights config.json a list", ["weights.py", "{d}/ms_list", "{d}/w.pt"], ["config.json", "JSON object"]),
    ("weights a string for a number", ["weights.py", "{d}/ms_string", "{d}/w.pt"],
     ["config.json", "d_model", "not a number"]),
    ("weights output onto a folder", ["weights.py", str(MS_TINY), "{d}/folder"], ["folder", "is a directory"]),
    # F. flags
    ("train --device gpu0", train_argv("{d}/corpus", "{d}/r", "--device", "gpu0"), ["--device", "gpu0"]),
    ("train --pseudo-len 0", train_argv("{d}/corpus", "{d}/r", "--pseudo-len", "0"), ["--pseudo-len"]),
    ("train --tasks ,,", train_argv("{d}/corpus", "{d}/r", "--tasks", ",,"), ["--tasks", "no task"]),
    ("train --eval-batch-size 0", train_argv("{d}/corpus", "{d}/r", "--eval-batch-size", "0"), ["--eval-batch-size"]),
    ("train --log-every 0", train_argv("{d}/corpus", "{d}/r", "--log-every", "0"), ["--log-every"]),
    ("train --workers -1", train_argv("{d}/corpus", "{d}/r", "--workers", "-1"), ["--workers"]),
    ("train --beta2 2", train_argv("{d}/corpus", "{d}/r", "--beta2", "2"), ["--beta2"]),
    ("decode --dataset unknown", decode_argv("--dataset", "nope"), ["--dataset", "nope"]),
    ("decode --split unknown", decode_argv("--dataset", "cnerta", "--data-dir", "{d}/corpus", "--split", "nope"),
     ["--split", "nope"]),
    ("decode --limit -1", decode_argv("--dataset", "cnerta", "--data-dir", "{d}/corpus", "--limit", "-1"),
     ["--limit"]),
    ("decode --threads -1", decode_argv("--text", "北京", "--threads", "-1"), ["--threads"]),
    ("decode --device gpu0", decode_argv("--text", "北京", "--device", "gpu0"), ["--device", "gpu0"]),
    ("decode --pseudo-len -3", decode_argv("--text", "北京", "--pseudo-len", "-3"), ["--pseudo-len"]),
    ("decode --max-audio-seconds nan", decode_argv("--text", "北京", "--max-audio-seconds", "nan"),
     ["--max-audio-seconds", "nan"]),
]
if not torch.cuda.is_available():
    CASES += [("train --device cuda without CUDA", train_argv("{d}/corpus", "{d}/r", "--device", "cuda"),
               ["--device", "CUDA is not available"]),
              ("decode --device cuda without CUDA", decode_argv("--text", "北京", "--device", "cuda"),
               ["--device", "CUDA is not available"])]


@pytest.mark.parametrize("argv, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_without_traceback(place, argv, words):
    r = run([a.replace("{d}", str(place)) for a in argv])
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{argv[0]}: "), r.stderr[-3000:]
    assert all(w in last for w in words), last
    assert not list(place.rglob(f"*{files.TEMP_MARK}*")), "a temp file was left"


def test_unwritable_out_fails_before_training_even_as_root(place, tmp_path):
    """Before: train.py trained the whole run into a folder it could not write and died at its first write."""
    r = run(train_argv(str(place / "corpus"), "/proc/self"))
    assert r.returncode == 2 and "config:" not in r.stdout and "train:" not in r.stderr, r.stdout + r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused(place, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    r = run(train_argv(str(place / "corpus"), str(out)))
    assert r.returncode == 2 and "--out" in r.stderr and "cannot write" in r.stderr and "Traceback" not in r.stderr


def test_a_bug_keeps_its_traceback(place, monkeypatch, tmp_path):
    """Only InputError becomes one line: an unexpected error propagates (in-process) and prints its traceback
    (subprocess)."""
    def boom(*args, **kwargs):
        raise RuntimeError("injected bug")
    monkeypatch.setattr(data, "load_split", boom)
    with pytest.raises(RuntimeError, match="injected bug"):
        train.main(train_argv(str(place / "corpus"), str(tmp_path / "r"))[1:])
    monkeypatch.setattr(weights, "load_checkpoint", boom)
    with pytest.raises(RuntimeError, match="injected bug"):
        decode.main(["--ckpt", str(place / "model.pt"), "--text", "北京"])
    script = ("import sys, data, train\n"
              "def boom(*a, **k): raise RuntimeError('injected bug')\n"
              "data.load_split = boom\n"
              "train.main(sys.argv[1:])\n")
    r = run(["-c", script, *train_argv(str(place / "corpus"), str(tmp_path / "r2"))[1:]])
    assert r.returncode == 1 and "Traceback" in r.stderr and "RuntimeError: injected bug" in r.stderr
