#!/usr/bin/env bash
# The type checker and import-linter read packages from folders, not through setuptools' package-dir
# mapping, so they get the installed layout as a tree of links: .lint/gpufleet/ holds gpufleet/'s modules and
# agent/, collector/, alerts/, dashboards/ under their installed names.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .lint
mkdir -p .lint/gpufleet
for entry in gpufleet/*; do
  case "$(basename "$entry")" in __pycache__) continue;; esac
  ln -s "../../$entry" ".lint/gpufleet/$(basename "$entry")"
done
for part in agent collector alerts dashboards; do
  ln -s "../../$part" ".lint/gpufleet/$part"
done
