"""The CLI in a real child process without paying its imports each time: compress/run/forkrun.py (which `compress batch`
runs its entries with too). Kill/SIGTERM tests that need a fresh interpreter still start `python -m compress`."""
from functools import partial

from compress.cli import main
from compress.run import forkrun
from compress.run.forkrun import start  # noqa: F401

run = partial(forkrun.run, main)
spawn = partial(forkrun.spawn, main)
