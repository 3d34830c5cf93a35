"""The sandbox against hostile programs: each is contained, reported as a failure of its sample, and the
evaluator (this process) is unharmed afterwards."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from wmtp.execution.sandbox import Limits, Sandbox, SandboxError, available_isolation

ISOLATION = available_isolation()
needs_isolation = pytest.mark.skipif(ISOLATION is None and not os.environ.get("CI"),
                                     reason="neither bubblewrap nor unshare works here")
LIMITS = Limits(timeout_s=5, cpu_s=5, memory_mb=512, file_size_mb=1, processes=16, output_bytes=4096)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    if ISOLATION is None:  # in CI isolation must exist: .ci/run installs bubblewrap
        pytest.fail("no sandbox isolation available (bubblewrap or unshare)")
    return Sandbox(LIMITS, isolation=ISOLATION)


def evaluator_healthy() -> None:
    out = subprocess.run(["true"], timeout=10)
    assert out.returncode == 0
    threading.Thread(target=lambda: None).start()


def test_isolation_in_ci_is_bubblewrap():
    if os.environ.get("CI"):
        assert ISOLATION == "bwrap", "CI must run the sandbox under bubblewrap (.ci/run installs it)"


@needs_isolation
def test_a_correct_program_passes_and_a_failing_assert_fails(sandbox):
    ok = sandbox.run("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('fine')\n")
    assert ok.passed and ok.reason == "passed" and ok.stdout.strip() == "fine"
    bad = sandbox.run("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n")
    assert not bad.passed and bad.reason == "exit code 1" and "AssertionError" in bad.stderr


@needs_isolation
def test_stdin_reaches_the_program(sandbox):
    out = sandbox.run("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))\n", stdin="1 2 3\n")
    assert out.passed and out.stdout.strip() == "6"


@needs_isolation
def test_infinite_loop_times_out(sandbox):
    out = sandbox.run("while True:\n    pass\n")
    assert not out.passed and ("timeout" in out.reason or "SIGKILL" in out.reason or "SIGXCPU" in out.reason)
    assert out.seconds < LIMITS.timeout_s + 5
    evaluator_healthy()


@needs_isolation
def test_fork_bomb_is_contained(sandbox):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    out = sandbox.run(bomb)
    assert not out.passed
    evaluator_healthy()
    deadline = time.monotonic() + 10  # the killed namespace is torn down asynchronously
    while _survivors_of("WMTP_NONCE") and time.monotonic() < deadline:  # the runner's code names it
        time.sleep(0.1)
    assert _survivors_of("WMTP_NONCE") == []


def _survivors_of(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(entry)
            except OSError:
                continue
    return found


@needs_isolation
def test_memory_hog_fails(sandbox):
    out = sandbox.run("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))\n")
    assert not out.passed and ("MemoryError" in out.stderr or "signal" in out.reason)
    evaluator_healthy()


@needs_isolation
def test_network_is_unreachable(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        out = sandbox.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                          "socket.create_connection(('1.1.1.1', 80), timeout=2)\n")
    finally:
        server.close()
    assert not out.passed and ("OSError" in out.stderr or "Error" in out.stderr)


@needs_isolation
def test_writing_outside_the_scratch_directory_fails(sandbox, tmp_path):
    target = tmp_path / "owned.txt"
    os.chmod(tmp_path, 0o777)  # even a world-writable host directory is out of reach
    out = sandbox.run(f"open({str(target)!r}, 'w').write('owned')\n")
    assert not out.passed and not target.exists()
    home = sandbox.run("import os\nopen(os.path.expanduser('~/../../etc/owned'), 'w').write('x')\n")
    assert not home.passed


@needs_isolation
def test_environment_secrets_do_not_reach_the_program(sandbox, monkeypatch):
    monkeypatch.setenv("WMTP_TEST_SECRET", "hunter2-secret")
    monkeypatch.setenv("HF_TOKEN", "hf_should_not_leak")
    out = sandbox.run("import os\nprint(dict(os.environ))\n"
                      "assert 'WMTP_TEST_SECRET' not in os.environ and 'HF_TOKEN' not in os.environ\n")
    assert out.passed, out.stderr  # the assertion inside ran: the program saw neither
    assert "hunter2" not in out.stdout and "hf_should" not in out.stdout
    leak = sandbox.run("import os\nassert 'HF_TOKEN' in os.environ\n")
    assert not leak.passed


@needs_isolation
@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"])
def test_exiting_early_with_success_is_a_failure(sandbox, exit_call):
    out = sandbox.run(f"{exit_call}\nassert False, 'the tests never ran'\n")
    assert not out.passed


@needs_isolation
def test_killing_the_parent_leaves_the_evaluator_unharmed(sandbox):
    out = sandbox.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\n"
                      f"os.kill({os.getpid()}, signal.SIGKILL)\n")
    assert not out.passed
    evaluator_healthy()


@needs_isolation
def test_output_is_capped(sandbox):
    out = sandbox.run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n")
    assert not out.passed
    assert len(out.stdout) <= LIMITS.output_bytes + 40


@needs_isolation
def test_concurrent_runs_are_independent(sandbox):
    programs = [f"import time\ntime.sleep(0.2)\nassert {i} % 2 == 0\n" for i in range(6)]
    results = [None] * len(programs)

    def work(i):
        results[i] = sandbox.run(programs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(programs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.passed for r in results] == [i % 2 == 0 for i in range(6)]


def test_no_isolation_needs_an_explicit_opt_in():
    with pytest.raises(SandboxError, match="explicit opt-in"):
        Sandbox(isolation="none")
    assert Sandbox(isolation="none", allow_unisolated=True).isolation == "none"


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare missing")
def test_unshare_fallback_cuts_the_network():
    sandbox = Sandbox(LIMITS, isolation="unshare")
    if not sandbox.run("pass").passed:
        pytest.skip("unshare namespaces are not permitted here")
    out = sandbox.run("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n")
    assert not out.passed
