#!/usr/bin/env bash
# Install napari-unet with its test dependencies, lint it and run the test suite.
#
# Works on a fresh headless Debian machine: the GUI tests run under Xvfb (started by
# pytest-xvfb), which needs a few Debian packages. They are installed with apt-get when
# missing (as root, or through sudo when available). torch is pinned here, in the
# command, so pip does not pull the newest CUDA build. The "all" extra brings a Qt binding (PyQt6,
# which the tests use). ruff (lint, then the format check) runs before pytest: a finding fails the
# command with ruff's exit code. Extra arguments go to pytest. Otherwise the exit code is pytest's
# (5, "no tests collected", counts as a failure).
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-xinput0)

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in "${DEBIAN_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$pkg")
        fi
    done
fi
if ((${#missing[@]})); then
    echo "run_tests: installing Debian packages: ${missing[*]}" >&2
    if [[ $(id -u) -eq 0 ]]; then
        sudo=()
    elif command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "run_tests: not root and no sudo: install ${missing[*]} yourself" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python -m pip install --quiet --root-user-action=ignore "torch==2.13.0" -e ".[all,test]"

python -m ruff check .
python -m ruff format --check .

exec python -m pytest "$@"
