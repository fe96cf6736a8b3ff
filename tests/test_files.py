"""files.py: input errors, output checks, UTF-8 reading and atomic writes."""
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import files

ROOT = Path(__file__).resolve().parents[1]


def test_read_text_accepts_a_bom_and_names_line_and_column_of_a_bad_byte(tmp_path):
    good = tmp_path / "good.txt"
    good.write_bytes("\ufeff张三\n李四\n".encode("utf-8"))
    assert files.read_text(good) == "张三\n李四\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "a"}\n{"text": "b\xffc"}\n')
    with pytest.raises(files.InputError, match=r"bad\.jsonl:2: not UTF-8 \(byte 0xff at column 12\)"):
        files.read_text(bad)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "is a directory"),
])
def test_read_text_missing_or_directory(tmp_path, make, message):
    path = tmp_path / "x"
    make(path)
    with pytest.raises(files.InputError, match=message):
        files.read_text(path)


def test_read_lines_splits_on_newline_only(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("a\r\nb\u2028c\n\nd", encoding="utf-8")  # U+2028 is a vocabulary token, not a line end
    assert files.read_lines(path) == ["a", "b\u2028c", "", "d"]


def test_output_checks(tmp_path):
    (tmp_path / "plain").write_text("x")
    assert files.check_output_file(tmp_path / "out.jsonl") == tmp_path / "out.jsonl"
    with pytest.raises(files.InputError, match="is a directory"):
        files.check_output_file(tmp_path)
    with pytest.raises(files.InputError, match="does not exist"):
        files.check_output_file(tmp_path / "missing" / "out.jsonl")
    with pytest.raises(files.InputError, match="is not a folder"):
        files.check_output_file(tmp_path / "plain" / "out.jsonl")
    assert files.check_output_dir(tmp_path / "new" / "run").is_dir()
    with pytest.raises(files.InputError, match="exists and is not a folder|cannot create"):
        files.check_output_dir(tmp_path / "plain")
    with pytest.raises(files.InputError, match="cannot create"):
        files.check_output_dir(tmp_path / "plain" / "run")


def test_write_atomic_gives_ordinary_permissions_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.txt"
    old = os.umask(0o022)
    try:
        files.write_atomic(path, "一\n")
    finally:
        os.umask(old)
    assert path.read_text(encoding="utf-8") == "一\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["out.txt"]


def test_atomic_path_removes_its_temp_on_error_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temps_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    path = tmp_path / "last.pt"
    dead = tmp_path / f".last.pt.tmp{_dead_pid()}"
    live = tmp_path / f".last.pt.tmp{os.getppid()}"  # a live process (pytest's parent)
    other = tmp_path / f".best.pt.tmp{_dead_pid()}"  # another target: left to its own writes
    for p in (dead, live, other):
        p.write_text("torn")
    files.write_atomic(path, b"new")
    assert not dead.exists() and live.exists() and other.exists()


WRITER = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal (a background job ignores SIGINT)
    sys.path.insert(0, {root!r})
    import files
    files.exit_on_sigterm()
    with files.atomic_path({path!r}) as tmp:
        tmp.write_bytes(b"x" * 1000)
        print("writing", flush=True)
        time.sleep(30)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_write_leaves_no_temp_file(tmp_path, sig):
    path = tmp_path / "out.bin"
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), path=str(path))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert any(p.name.startswith(".out.bin.tmp") for p in tmp_path.iterdir())
    proc.send_signal(sig)
    proc.wait(timeout=20)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_prints_input_errors_in_one_line_and_keeps_bug_tracebacks(capsys):
    with pytest.raises(SystemExit) as exit_info:
        with files.cli_errors("tool.py"):
            raise files.InputError("a.jsonl:3: \"text\" is empty")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == 'tool.py: a.jsonl:3: "text" is empty\n'
    with pytest.raises(RuntimeError):  # a bug is not an input error: it propagates with its traceback
        with files.cli_errors("tool.py"):
            raise RuntimeError("bug")
