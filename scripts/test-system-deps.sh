#!/usr/bin/env bash
# What the test suite needs from the system, besides the Python packages `make test` installs into .venv:
#   * Debian's `prometheus` package: the real Prometheus (remote-write, dashboard PromQL) and promtool
#     (exposition and rule checks);
#   * Debian's `chromium` package: the fleet page's end-to-end test in a headless browser;
#   * Debian's `tmux` package: `gpufleet top` driven in a real terminal;
#   * a PostgreSQL server on 127.0.0.1:5432 with trust authentication (the production store is tested on
#     the real thing); started here when a local cluster exists and is stopped.
# As root, missing packages are installed with apt-get. Otherwise this prints the one command that installs
# them and exits non-zero: the suite fails rather than skips what it cannot run.
set -euo pipefail

missing=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian packages the tests need: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "the tests need Debian packages that are not installed: run  sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  if [ "$(id -u)" -eq 0 ] && command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    version=$(ls /etc/postgresql | sort -V | tail -1)
    echo "starting PostgreSQL $version (cluster main)" >&2
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
  fi
fi
if ! { command -v pg_isready >/dev/null 2>&1 && pg_isready -h 127.0.0.1 -p 5432 -q; }; then
  echo "the tests need PostgreSQL on 127.0.0.1:5432 with trust authentication for local connections" \
       "(Debian: sudo apt-get install postgresql)" >&2
  exit 1
fi
