#!/usr/bin/env bash
# Install moecpt with its test extra into its own virtual environment, .venv (see scripts/env.sh), lint, run
# the tests (arguments go to pytest), and end with one line: how many tests were skipped, and why.
# Without ../shared/data beside the checkout the tests that need real text use moecpt's built-in corpora;
# only those that need a specific file of ../shared/data skip.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
moecpt_env test
python -m ruff check src tests bench
report=$(mktemp "${TMPDIR:-/tmp}/moecpt-junit.XXXXXX")
trap 'rm -f "$report"' EXIT
rc=0
# The whole suite runs on MOECPT_TEST_WORKERS (default 2) pytest-xdist workers: most tests wait on their own
# subprocesses (torchrun ranks, imports), so two workers overlap them on two cores. Named tests run in-process.
workers=()
if [ "$#" = 0 ] && [ "${MOECPT_TEST_WORKERS:-2}" != 1 ]; then
    workers=(-n "${MOECPT_TEST_WORKERS:-2}")
fi
python -m pytest -q "${workers[@]}" --junitxml="$report" "$@" || rc=$?
if [ "$rc" = 5 ]; then  # pytest's "no tests were collected" (e.g. a -k that matches nothing) is no failure
    echo "moecpt: no tests ran"
    rc=0
fi
moecpt_env_hint
python - "$report" <<'PY'
import collections, sys, xml.etree.ElementTree as ET
try:
    cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
except (OSError, ET.ParseError):
    sys.exit()  # pytest stopped before writing its report: its own output says why
why = collections.Counter(s.get("message", "").strip() or "no reason given"
                          for case in cases for s in case.findall("skipped"))
n = sum(why.values())
if len(why) == 1:
    print(f"{n} skipped: {next(iter(why))}")
else:  # e.g. "31 skipped: 28 for 'the shared evaluation data is not at ...', 3 for 'shared corpora not found ...'"
    print(f"{n} skipped" + (": " + ", ".join(f"{k} for '{m}'" for m, k in why.most_common()) if n else ""))
PY
exit "$rc"
