#!/usr/bin/env bash
# setup.sh: everything this project needs on a fresh machine, Python packages in a virtual environment (.venv).
#
#   bash setup.sh          python3 with venv, espeak-ng and sox (system packages), then torch + requirements.txt
#   bash setup.sh --test   the same plus requirements-test.txt, and Debian's chromium where apt-get can install it
#
# System packages: apt-get on Debian/Ubuntu (as root, or through sudo; `apt-get update` is run when an install
# fails on a fresh image), Homebrew on macOS. Elsewhere install python3 (>= 3.10), espeak-ng and sox yourself:
# only the demo corpus needs espeak-ng and sox (tests that need them skip without them).
# The system Python is left alone (Debian 12 and Ubuntu 24.04 refuse pip there: "externally managed").
# Knobs (environment): VENV (default .venv) and TORCH (default torch==2.13.0: the CPU wheel where the package index
# serves one, as on this project's machines; PyPI's Linux wheel carries CUDA, so for a CPU-only install from the
# internet set TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu", and on a GPU machine the
# build for your driver, e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cu124").
set -euo pipefail
cd "$(dirname "$0")"
TORCH=${TORCH:-torch==2.13.0}
VENV=${VENV:-.venv}
case "${1:-}" in
  "") tests=0 ;;
  --test) tests=1 ;;
  *) echo "usage: bash setup.sh [--test]" >&2; exit 2 ;;
esac
say() { echo "setup.sh: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else return 1
  fi
}

missing_system_packages() {  # Debian package names of what is not there yet
  if ! command -v python3 >/dev/null 2>&1; then echo python3 python3-venv
  elif ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then echo python3-venv
  fi
  command -v espeak-ng >/dev/null 2>&1 || echo espeak-ng
  command -v sox >/dev/null 2>&1 || echo sox
}

missing=$(missing_system_packages | xargs)
if [ -n "$missing" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    say "installing system packages: $missing"
    export DEBIAN_FRONTEND=noninteractive
    apt_install() { as_root apt-get install -y -q --no-install-recommends $missing >/dev/null; }
    if ! { [ "$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1; }; then
      say "not root and no sudo: ask an administrator to run: apt-get install $missing"; exit 1
    fi
    apt_install || { as_root apt-get update -q >/dev/null && apt_install; } \
      || { say "apt-get could not install: $missing (as root, or as a user whom sudo lets in, run: apt-get install $missing)"; exit 1; }
  elif command -v brew >/dev/null 2>&1; then
    formulae=$(echo "$missing" | sed 's/python3-venv//; s/python3/python/' | xargs)
    if [ -n "$formulae" ]; then say "installing with Homebrew: $formulae"; brew install $formulae; fi
  else
    say "install these first (no apt-get or brew here): $missing"; exit 1
  fi
fi

# --test: headless Chromium for the HTML report's browser test (tests/test_report.py skips, saying why, without it)
if [ "$tests" = 1 ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1; then
    say "installing chromium (the report's browser test)"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
      || { as_root apt-get update -q >/dev/null 2>&1 && as_root apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } \
      || say "could not install chromium: the report's browser test will be skipped"
  else
    say "no chromium and no root or sudo: the report's browser test will be skipped"
  fi
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { say "python3 is older than 3.10 (train.py uses keyword-only dataclasses)"; exit 1; }
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
say "installing Python packages into $VENV ($TORCH)"
"$VENV/bin/python" -m pip install -q $TORCH
"$VENV/bin/python" -m pip install -q -r requirements.txt
if [ "$tests" = 1 ]; then "$VENV/bin/python" -m pip install -q -r requirements-test.txt; fi
say "ready: $VENV/bin/python train.py --dataset demo"
