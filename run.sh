#!/usr/bin/env bash
# One entry point for a fresh machine:
#   ./run.sh demo   set up .venv and run the end-to-end demo on the embedded default
#   ./run.sh test   set up .venv and run the whole test suite (what CI runs)
#   ./run.sh setup  only set up .venv and .venv-tools (checkov, for tests/deploy)
# Any further arguments are passed on (to `credproxy demo` or to pytest).
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
  # Python 3.12+ is required (mitmproxy 12). Prefer an explicit choice, then PATH, then pyenv.
  local candidates=()
  [ -n "${CREDPROXY_PYTHON:-}" ] && candidates+=("$CREDPROXY_PYTHON")
  candidates+=(python3.13 python3.12)
  if command -v pyenv >/dev/null 2>&1; then
    local root; root=$(pyenv root)
    for v in "$root"/versions/3.13* "$root"/versions/3.12*; do
      [ -x "$v/bin/python3" ] && candidates+=("$v/bin/python3")
    done
  fi
  for v in "$HOME"/.pyenv/versions/3.13* "$HOME"/.pyenv/versions/3.12*; do
    [ -x "$v/bin/python3" ] && candidates+=("$v/bin/python3")
  done
  candidates+=(python3)
  for c in "${candidates[@]}"; do
    if command -v "$c" >/dev/null 2>&1 &&
       "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  echo "credproxy needs Python 3.12 or newer and found none (tried: ${candidates[*]})." >&2
  echo "Install one (e.g. 'pyenv install 3.13') or set CREDPROXY_PYTHON=/path/to/python3." >&2
  return 1
}

setup() {
  local stamp=.venv/.installed
  if [ ! -x .venv/bin/python ]; then
    local py; py=$(find_python)
    echo "==> creating .venv with $py ($("$py" --version))" >&2
    "$py" -m venv .venv
  fi
  # Reinstall only when the pins or the project metadata changed.
  if [ ! -f "$stamp" ] || [ constraints.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "==> installing pinned dependencies (constraints.txt)" >&2
    # (This machine's pip config names local index folders that may not exist; pip warns
    # about each. The filter keeps real errors visible.)
    .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt \
      -e ".[dev]" 2> >(grep -v "is neither a file nor a directory" >&2)
    touch "$stamp"
  fi
}

setup_tools() {
  # Test tools whose pins clash with the project's (checkov needs packaging<24): their own
  # venv with their own pins, so constraints.txt stays what the proxy is tested with.
  local stamp=.venv-tools/.installed
  if [ ! -x .venv-tools/bin/python ]; then
    # The interpreter .venv was made with (setup runs first): no second search.
    local py; py=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')
    echo "==> creating .venv-tools with $py" >&2
    "$py" -m venv .venv-tools
  fi
  if [ ! -f "$stamp" ] || [ constraints-tools.txt -nt "$stamp" ]; then
    echo "==> installing pinned test tools (constraints-tools.txt)" >&2
    .venv-tools/bin/python -m pip install -q --disable-pip-version-check \
      -c constraints-tools.txt checkov 2> >(grep -v "is neither a file nor a directory" >&2)
    touch "$stamp"
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup; setup_tools ;;
  demo) setup; exec .venv/bin/credproxy demo "$@" ;;
  test)
    setup
    setup_tools
    .venv/bin/python -m ruff check proxy addons devstack tests bench
    .venv/bin/python -m mypy
    # Four workers (pytest-xdist), each running whole test files: the suite's servers and
    # module fixtures stay per file. Most integration tests wait on real processes and
    # timers, so four workers on two cores keep the suite under 10 minutes (3329 tests:
    # 568 s with four, 720 s with three, on the 2-core CI machine). Pass -n 0 to run
    # serially.
    exec .venv/bin/python -m pytest -n 4 --dist loadfile "$@"
    ;;
  *) echo "usage: ./run.sh demo|test|setup [args...]" >&2; exit 2 ;;
esac
