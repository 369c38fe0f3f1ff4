"""``python -m gpufleet.cli``: the `gpufleet` command, for environments without its console script."""

from gpufleet.cli import main

main(prog_name="gpufleet")
