#!/bin/sh
# Installs the gpufleet wheel with one extra into a fresh virtual environment; the container images run
# this, and so does tests/test_helm_images.py, so both install the same wheel the same way.
#   install-wheel.sh EXTRA PREFIX WHEEL_DIR [RULES_DIR]
#   EXTRA      agent | collector
#   PREFIX     the virtual environment to create (e.g. /opt/gpufleet)
#   WHEEL_DIR  folder holding gpufleet-*.whl (pip wheel --no-deps -w dist .)
#   RULES_DIR  collector only: where to copy the built-in rule pack (the chart passes it with --rules)
# PYTHON (default python3) is the interpreter the environment is made from.
set -eu
extra=$1 prefix=$2 wheel_dir=$3 rules_dir=${4:-}
case "$extra" in agent|collector) ;; *) echo "install-wheel.sh: EXTRA must be agent or collector, not '$extra'" >&2; exit 2;; esac
set -- "$wheel_dir"/gpufleet-*.whl
if [ "$#" -ne 1 ] || [ ! -f "$1" ]; then
    echo "install-wheel.sh: expected exactly one gpufleet-*.whl in $wheel_dir; build it with: pip wheel --no-deps -w dist ." >&2
    exit 2
fi
"${PYTHON:-python3}" -m venv "$prefix"
"$prefix/bin/pip" install --no-cache-dir --quiet --disable-pip-version-check "gpufleet[$extra] @ file://$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
if [ -n "$rules_dir" ]; then
    mkdir -p "$rules_dir"
    pack=$("$prefix/bin/python" -I -c 'from gpufleet.collector.rules.model import default_rules_path; print(default_rules_path())')
    cp "$pack"/*.yaml "$rules_dir"/
fi
