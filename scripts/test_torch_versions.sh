#!/usr/bin/env bash
# Run the test suite under other torch versions, each in a venv of its own.
#
#   scripts/test_torch_versions.sh 2.11.0 [2.12.1 ...]
#
# For each version: a venv under $VENV_ROOT (default /tmp/argonne_dt-torch), that torch from the
# package index (on Linux PyPI's torch is the CUDA build: about 4.5 GB with its nvidia-* packages;
# the tests run on the CPU all the same) and argonne_dt; every other package is the calling python's
# (run it with the python of the README's install), so torch is the one difference. Then the quick and the
# distributed tests (`pytest -m "not e2e"`; the e2e tests drive the command-line tools end to end).
# PYTEST_ARGS replaces that selection, e.g. PYTEST_ARGS="-q" for the whole suite. One line per
# version ends the output: "torch VERSION: passed" or "torch VERSION: FAILED (exit N)", and a log
# of each run is kept beside its venv.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then
    sed -n '2,12p' "$0"
    exit 2
fi
root="${VENV_ROOT:-/tmp/argonne_dt-torch}"
mkdir -p "$root"
summary=()
status=0
for version in "$@"; do
    venv="$root/$version"
    log="$root/$version.log"
    started=$(date +%s)
    {
        # The venv sees this python's packages: torch (installed in the venv, so found first) is the
        # one difference. PIP_CONSTRAINT: a machine's pip constraint file may cap torch.
        [ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
        PIP_CONSTRAINT=/dev/null "$venv/bin/pip" install -q "torch==$version" &&
        "$venv/bin/pip" install -q --no-deps -e . &&
        "$venv/bin/python" -c "import torch; print('torch', torch.__version__)" &&
        "$venv/bin/python" -m pytest ${PYTEST_ARGS:--q -m "not e2e"}
    } 2>&1 | tee "$log"
    code=${PIPESTATUS[0]}
    minutes=$(( ($(date +%s) - started) / 60 ))
    if [ "$code" -eq 0 ]; then
        summary+=("torch $version: passed ($minutes min, log $log)")
    else
        summary+=("torch $version: FAILED (exit $code, $minutes min, log $log)")
        status=1
    fi
done
printf '%s\n' "${summary[@]}"
exit $status
