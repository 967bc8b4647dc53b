"""SIGTERM that lands while a module is being imported stops the run after the import, not inside it
(an exception thrown into an import left numpy half-initialised: RecursionError, exit 1)."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

MODULE = "import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.3)  # the signal arrives in here\nDONE = True\n"
MAIN = """
import sys, time
sys.path.insert(0, sys.argv[1])
from compress.core.errors import Terminated, terminate_like_interrupt
terminate_like_interrupt()
try:
    import slow_import
    print("imported", slow_import.DONE, flush=True)
    time.sleep(30)
except Terminated:
    print("terminated after the import")
    sys.exit(143)
"""


def test_sigterm_during_an_import_is_raised_once_the_import_is_done(tmp_path):
    (tmp_path / "slow_import.py").write_text(MODULE)
    res = subprocess.run([sys.executable, "-c", MAIN, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 143, res.stderr
    assert res.stdout.splitlines() == ["imported True", "terminated after the import"], res.stdout
