"""The command line's entry point as a test runs it: `python -m oel_ray.main`'s own code path inside the
test process (spares an interpreter's start and imports: 0.5-6 s a command), or the real command in
a process of its own."""

import contextlib
import io
import logging
import runpy
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Optional


def main_in_process(argv: list[str], cwd: Optional[Path] = None,
                    keep_roles: bool = False) -> subprocess.CompletedProcess:
    """What `python -m oel_ray.main *argv` does, executed here as `-m` executes it (the module run as
    __main__), its exit code, stdout and stderr captured. The logging it configures is undone after.
    Ray must be as connected after it as before: a command that runs stages joins the session
    cluster (cluster.address), which main leaves open as it found it. `keep_roles`: the run leaves
    its roles running for the next run in this process (session.keep_roles_between_runs)."""
    import ray

    from oel_ray import session

    connected = ray.is_initialized()
    root = logging.getLogger()
    handlers, level, argv0 = root.handlers[:], root.level, sys.argv
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [argv0[0], *argv]
    session.keep_roles_between_runs(keep_roles)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(), \
                contextlib.chdir(cwd or Path.cwd()):
            # runpy's note that the package was imported first: true of any second run in one process
            warnings.filterwarnings("ignore", "'oel_ray.main' found in sys.modules", RuntimeWarning)
            try:
                runpy.run_module("oel_ray.main", run_name="__main__", alter_sys=True)
            except SystemExit as exit_:  # as the interpreter reports sys.exit(None | int | message)
                code = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
                if not isinstance(exit_.code, (int, type(None))):
                    print(exit_.code, file=sys.stderr)
    finally:
        sys.argv = argv0
        session.keep_roles_between_runs(False)
        for handler in set(root.handlers) - set(handlers):  # the run's oel.log and console handlers
            handler.close()
        root.handlers[:], root.level = handlers, level
    assert ray.is_initialized() == connected, "the command started or stopped Ray: run it with main_in_subprocess"
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def main_in_subprocess(argv: list[str], cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oel_ray.main", *argv], capture_output=True, text=True, timeout=300,
                          cwd=cwd)
