"""The CLI in a real child process without paying its imports each time: compress/forkrun.py (which `compress batch`
runs its entries with too). Kill/SIGTERM tests that need a fresh interpreter still start `python -m compress`."""
from compress.forkrun import run, spawn, start  # noqa: F401
