"""files.py: how the project touches the user's files: clear errors, checks before work, atomic writes.

No project imports: every module that reads or writes a user's file uses these.

- InputError: a bad input, flag or output location, described for the user. Entry points print it as one line
  (`decode.py: <message>`) under `cli_errors`; anything else is a bug and keeps its traceback.
- read_text / read_lines: UTF-8 (a BOM is accepted); other bytes name the file, line and column.
- check_output_file / check_output_dir: called at start-up, before any long work, so a run never dies at its
  first write.
- atomic_path / write_atomic: write a temp file beside the target, fsync, rename. A kill leaves the old file or
  the new one, never a torn one; SIGINT/SIGTERM remove the temp file, and after SIGKILL the next write to the
  same path removes temp files whose process is gone.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import uuid
from pathlib import Path


class InputError(ValueError):
    """A bad input, flag or output location; the message names it (file, line, key or flag)."""


# ----------------------------------------------------------------------------------------------------------------
# Reading


def read_text(path) -> str:
    """The file's text as UTF-8 (a leading BOM dropped). Non-UTF-8 bytes: `file:line: not UTF-8 (byte 0xff at
    column N)`, columns counted in bytes from 1."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise InputError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {column})") from None
    return text[1:] if text.startswith("\ufeff") else text


def read_lines(path) -> list[str]:
    """Lines as read_text reads them, split on '\n' only (a '\r' before it dropped), so line numbers match the
    error messages: str.splitlines() would also split at U+2028 or U+0085, which BERT's vocab.txt and some
    sentences hold."""
    lines = [line.rstrip("\r") for line in read_text(path).split("\n")]
    return lines[:-1] if lines[-1] == "" else lines


# ----------------------------------------------------------------------------------------------------------------
# Checking outputs before the work


def _probe_folder(folder: Path, what: str) -> None:
    probe = folder / f".write-probe-{uuid.uuid4().hex}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise InputError(f"{what}: cannot write in {folder} ({e.strerror})") from None


def check_output_file(path, what: str = "output") -> Path:
    """A file path that can be written atomically: not a directory, its folder exists and takes new files."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path}: is a directory, expected a file path")
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{what} {path}: folder {folder} does not exist" if not folder.exists()
                         else f"{what} {path}: {folder} is not a folder")
    _probe_folder(folder, f"{what} {path}")
    return path


def check_output_dir(path, what: str = "output folder") -> Path:
    """A folder that exists (created here, with its parents) and takes new files."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"{what} {path}: exists and is not a folder") from None
    except OSError as e:
        raise InputError(f"{what} {path}: cannot create it ({e.strerror})") from None
    _probe_folder(path, f"{what} {path}")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes

TEMP_MARK = ".tmp"  # temp files are `.NAME.tmpPID` beside the target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(path) -> list[Path]:
    """Removes the temp files of writes to path whose process is gone (killed with SIGKILL); returns them."""
    path = Path(path)
    removed = []
    prefix = f".{path.name}{TEMP_MARK}"
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.iterdir():
        pid = tmp.name[len(prefix):]
        if tmp.name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename itself is still atomic
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temp path beside `path`; when the block ends without an exception the temp file is fsynced, given
    ordinary permissions (0666 less the umask) and renamed onto path. On any exception (KeyboardInterrupt and the
    SystemExit of `exit_on_sigterm` included) it is removed."""
    path = Path(path)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        yield tmp
        _fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent, directory=True)


def write_atomic(path, data: str | bytes) -> None:
    """Writes text (UTF-8) or bytes to path atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def append_atomic(path, text: str) -> None:
    """Appends text (UTF-8) to a small file by rewriting it atomically: a kill leaves the old or the new file."""
    path = Path(path)
    write_atomic(path, (path.read_text(encoding="utf-8") if path.exists() else "") + text)


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit(143) instead of killing at once, so `finally` blocks and atomic_path clean up."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def cli_errors(prog: str):
    """Around an entry point's main: InputError -> `prog: message` on stderr and exit status 2, no traceback.
    Other exceptions are bugs and keep their traceback."""
    exit_on_sigterm()
    try:
        yield
    except InputError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def number_or_none(text):
    """'none' -> None, else a float (argparse type)."""
    return None if text.strip().lower() == "none" else float(text)


def seconds_or_word(text):
    """'auto' -> 'auto', 'none' -> None, else a float (argparse type)."""
    return "auto" if text.strip().lower() == "auto" else number_or_none(text)
