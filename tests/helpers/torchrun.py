"""Running `wmtp` under torchrun in tests, with one known fault tolerated.

On this 2-core machine under load, a gloo rank sometimes aborts in process teardown after the command has
completed on every rank ("terminate called without an active exception", SIGABRT at interpreter exit): seen in
about 1 of 10 two-rank FSDP2 runs while other test suites shared the cores, never in the results. `wmtp train`
prints its summary only after a barrier that every rank reaches when its work is done
(`runtime.distributed.finish_together`), and `wmtp eval` its `results:` line after everything is written, so a run
whose rank 0 printed that line and whose only failure is this abort has finished: the test then checks its
outputs as usual. Any other failure fails the test. The abort itself is an open bug (issue notes)."""

from __future__ import annotations

import re
import subprocess

TEARDOWN_ABORT = "terminate called without an active exception"
COMPLETED = re.compile(r"^(run .*: (finished|stopped) at step \d+/\d+|results: )", re.M)


def run_torchrun(command: list[str], *, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`command` (a torchrun invocation of `wmtp`) run to completion; a teardown abort after the command's
    completion line is reported as success (the stderr keeps the abort and says so)."""
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0 and TEARDOWN_ABORT in proc.stderr and COMPLETED.search(proc.stdout):
        return subprocess.CompletedProcess(proc.args, 0, proc.stdout,
                                           proc.stderr + "\n[helpers.torchrun: a rank aborted in teardown after the "
                                           "command completed; tolerated]\n")
    return proc
