"""`python -m pushd`: the `pushctl` commands, for when the console script is not on PATH."""

from pushd.cli import main

main()
