# Sourced from the repository root by scripts/run_default.sh and scripts/test.sh: moecpt's own virtual
# environment, .venv in this checkout, so that nothing is installed into the system's Python.
#
# `moecpt_env EXTRA` makes .venv when it is missing (with `uv` when uv is on PATH, else `python3 -m venv`;
# Python 3.10 or newer, or the interpreter named by $MOECPT_PYTHON), installs moecpt with EXTRA into it
# (editable, so edits to src/ need no reinstall), and puts .venv/bin first on PATH. Torch: when the Python
# that makes .venv can already import torch, .venv sees that Python's packages (--system-site-packages) and
# keeps its torch; otherwise torch 2.13.0 is installed into .venv. What was installed is stamped in
# .venv/.moecpt-EXTRA (a hash of pyproject.toml and the extra): a rerun with nothing changed installs nothing.

MOECPT_VENV=.venv

_moecpt_say() { echo "moecpt: $*"; }

_moecpt_python() {  # prints the interpreter that makes .venv
    local c
    for c in ${MOECPT_PYTHON:-} python3 python; do
        if command -v "$c" >/dev/null 2>&1 \
            && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
            command -v "$c"
            return 0
        fi
    done
    echo "moecpt: needs Python 3.10 or newer as python3 on PATH (or MOECPT_PYTHON=/path/to/python3)" >&2
    return 1
}

_moecpt_make_venv() {
    local py inherit="" made=0
    py=$(_moecpt_python) || return 1
    if "$py" -c "import torch" >/dev/null 2>&1; then
        inherit=--system-site-packages
    fi
    # shellcheck disable=SC2086  # $inherit is one flag or nothing
    if command -v uv >/dev/null 2>&1; then
        # uv's own installer ignores the inherited packages (it would fetch a second torch): with them, .venv
        # gets pip (--seed) and pip installs
        _moecpt_say "creating $MOECPT_VENV with uv and $py${inherit:+ ($inherit: keeps its torch)}"
        uv venv -q --python "$py" ${inherit:+--seed $inherit} "$MOECPT_VENV" && made=1
    else
        _moecpt_say "creating $MOECPT_VENV with $py -m venv${inherit:+ ($inherit: keeps its torch)}"
        "$py" -m venv $inherit "$MOECPT_VENV" && made=1
    fi
    if [ "$made" = 0 ]; then
        rm -rf "$MOECPT_VENV"  # made just now: a half-made one would only fail later
        echo "moecpt: could not create $MOECPT_VENV (on Debian/Ubuntu: apt install python3-venv)" >&2
        return 1
    fi
}

_moecpt_pip() {  # pip inside .venv (uv's when .venv was made by uv without pip)
    if [ -x "$MOECPT_VENV/bin/pip" ] || ! command -v uv >/dev/null 2>&1; then
        "$MOECPT_VENV/bin/python" -m pip "$@"
    else
        uv pip "$@" --python "$MOECPT_VENV/bin/python"
    fi
}

_moecpt_want() {  # what the stamp of EXTRA must hold; empty when .venv's moecpt is not this checkout's
    "$MOECPT_VENV/bin/python" - "$1" <<'EOF'
import hashlib, importlib.util, os, sys
spec = importlib.util.find_spec("moecpt")
mine = spec is not None and os.path.realpath(spec.origin).startswith(os.path.realpath("src") + os.sep)
with open("pyproject.toml", "rb") as f:
    print(f"{hashlib.sha256(f.read()).hexdigest()} {sys.argv[1]}" if mine else "")
EOF
}

moecpt_env() {
    local extra=$1 stamp want
    if [ ! -e "$MOECPT_VENV" ]; then
        _moecpt_make_venv || return 1
    elif ! "$MOECPT_VENV/bin/python" -c "" >/dev/null 2>&1; then
        echo "moecpt: $PWD/$MOECPT_VENV does not run (its Python moved?): remove it and rerun" >&2
        return 1
    fi
    stamp=$MOECPT_VENV/.moecpt-$extra
    want=$(_moecpt_want "$extra")
    if [ -n "$want" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        _moecpt_say "reusing $MOECPT_VENV (moecpt[$extra] is installed and pyproject.toml has not changed)"
    else
        if ! "$MOECPT_VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
            _moecpt_say "installing torch 2.13.0 into $MOECPT_VENV"
            _moecpt_pip install -q "torch==2.13.0"
        fi
        _moecpt_say "installing moecpt[$extra] into $MOECPT_VENV"
        _moecpt_pip install -q -e ".[$extra]"
        _moecpt_want "$extra" >"$stamp"
    fi
    VIRTUAL_ENV=$PWD/$MOECPT_VENV
    PATH=$VIRTUAL_ENV/bin:$PATH
    export VIRTUAL_ENV PATH
    hash -r
}

moecpt_env_hint() {  # the one line on using the environment afterwards
    _moecpt_say "the environment is $PWD/$MOECPT_VENV: '. $PWD/$MOECPT_VENV/bin/activate', then 'moecpt --help'"
}
