"""Running model-written programs: each in its own process, isolated, limited, and judged by a completion marker.

Isolation, best first (`isolation="auto"` picks the first available):
- `bwrap` (bubblewrap): new network, PID, IPC and UTS namespaces; a read-only view of /usr and of the Python
  installation and nothing else of the host (no /home, /root, /etc, repository, ...); a fresh /tmp; the scratch
  directory as the only writable host path; a scrubbed environment; killed with its parent.
- `unshare` (util-linux): new network and PID namespaces only; the host's files stay visible (and writable
  where the sandbox user may write). A weaker fallback for machines without bubblewrap.
- `none`: no isolation at all. Refused unless the caller passes `allow_unisolated=True` explicitly.
In every mode the program runs as an unprivileged user (nobody when the evaluator is root, because root is
exempt from the process-count limit), in its own session, with rlimits (set by util-linux `prlimit` before the
sandbox starts) on CPU time, address space, file size,
process count and core dumps, a wall-clock timeout that kills the whole process tree, a scratch working
directory that is deleted afterwards, and stdout/stderr capped (the file-size limit also caps them).

A sample passes when the program exits 0 *and* the runner wrote the run's nonce after the program's last
statement, so `sys.exit(0)` / `os._exit(0)` before the tests finish is a failure. A program written to forge the
marker (by introspecting the runner) could; that is outside what this guards against.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
_RUNNER = r"""
import os, sys
nonce = os.environ.pop("WMTP_NONCE")
marker = int(os.environ.pop("WMTP_MARKER_FD"))
with open("program.py") as f:
    source = f.read()
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit as exc:
    sys.stderr.write(f"wmtp-sandbox: the program called exit({exc.code!r}) before its last statement\n")
    sys.stderr.flush()
    os._exit(3)
sys.stdout.flush()
os.write(marker, nonce.encode())
"""


class SandboxError(RuntimeError):
    """The sandbox cannot run anything (no isolation available, or a broken installation)."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 2048
    file_size_mb: int = 16
    processes: int = 64
    output_bytes: int = 65536


@dataclass
class Execution:
    passed: bool
    reason: str  # "passed", "timeout", "exit code 1", "signal SIGKILL", "no completion marker", ...
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    def as_dict(self) -> dict:
        return {"passed": self.passed, "reason": self.reason, "returncode": self.returncode,
                "stdout": self.stdout, "stderr": self.stderr, "seconds": round(self.seconds, 3)}


def available_isolation() -> str | None:
    """The best isolation this machine offers: "bwrap", "unshare", or None."""
    for mode, tool in (("bwrap", "bwrap"), ("unshare", "unshare")):
        if shutil.which(tool) and _probe(mode):
            return mode
    return None


def _probe(mode: str) -> bool:
    """Whether `mode` actually works here (namespaces may be forbidden in containers)."""
    try:
        sandbox = Sandbox(Limits(timeout_s=30), isolation=mode)
        return sandbox.run("pass").passed
    except (SandboxError, OSError):
        return False


class Sandbox:
    """Runs programs one at a time; safe to use from several threads (each run has its own directories)."""

    def __init__(self, limits: Limits = Limits(), *, isolation: str = "auto", allow_unisolated: bool = False,
                 python: str | None = None) -> None:
        self.limits = limits
        if isolation == "auto":
            isolation = available_isolation() or "none"
        if isolation not in ("bwrap", "unshare", "none"):
            raise SandboxError(f"unknown isolation `{isolation}` (bwrap, unshare, none or auto)")
        if isolation == "none" and not allow_unisolated:
            raise SandboxError("no isolation is available (install bubblewrap: apt-get install bubblewrap); "
                               "running model-written code unisolated needs an explicit opt-in")
        self.isolation = isolation
        self.python = python or os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        self.prefix = os.path.realpath(sys.base_prefix)
        self.as_root = os.geteuid() == 0

    # ------------------------------------------------------------------------------------------- command
    def _command(self, scratch: str) -> list[str]:
        python = [self.python, "-I", "-c", _RUNNER]
        drop = (["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if self.as_root else [])
        if self.isolation == "bwrap":
            cmd = ["bwrap", "--die-with-parent", "--new-session", "--unshare-net", "--unshare-pid", "--unshare-ipc",
                   "--unshare-uts", "--unshare-cgroup-try"]
            if self.as_root:  # no user namespace: keep only what setpriv needs to become nobody
                cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
            else:
                cmd += ["--unshare-user"]
            cmd += ["--ro-bind", "/usr", "/usr"]
            for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
                if os.path.islink(top):
                    cmd += ["--symlink", os.readlink(top), top]
                elif os.path.isdir(top):
                    cmd += ["--ro-bind", top, top]
            if not self.prefix.startswith("/usr/"):
                cmd += ["--ro-bind", self.prefix, self.prefix]
            cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--bind", scratch, "/sandbox",
                    "--chdir", "/sandbox", "--setenv", "HOME", "/sandbox"]
            return cmd + ["--"] + drop + python
        if self.isolation == "unshare":
            cmd = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
            if not self.as_root:
                cmd.insert(1, "--map-root-user")
            return cmd + ["--"] + drop + python
        return drop + python

    def _environment(self, scratch: str, nonce: str, marker_fd: int) -> dict[str, str]:
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "WMTP_NONCE": nonce, "WMTP_MARKER_FD": str(marker_fd)}
        if self.isolation != "bwrap":
            env["HOME"] = scratch
        return env

    def _limits(self, nproc: int) -> list[str]:
        """`prlimit` in front of the command: rlimits set before the sandbox starts, inherited by everything the
        program starts. (Not a preexec_fn: Python code between fork and exec can deadlock or crash in a process with
        other threads, e.g. a training process holding a gloo process group.)"""
        lim = self.limits
        memory, size = lim.memory_mb * 2**20, lim.file_size_mb * 2**20
        return ["prlimit", f"--cpu={lim.cpu_s}:{lim.cpu_s + 1}", f"--as={memory}:{memory}", f"--fsize={size}:{size}",
                "--core=0:0", f"--nproc={nproc}:{nproc}", "--"]

    # ----------------------------------------------------------------------------------------------- run
    def run(self, program: str, stdin: str = "") -> Execution:
        """Run `program` (Python source) with `stdin`; it passes when it runs to its end and exits 0."""
        lim = self.limits
        with tempfile.TemporaryDirectory(prefix="wmtp-sandbox-") as work:
            scratch = os.path.join(work, "scratch")
            os.mkdir(scratch)
            Path(scratch, "program.py").write_text(program)
            if self.as_root:
                for path in (scratch, os.path.join(scratch, "program.py")):
                    os.chown(path, NOBODY, NOBODY)
                if self.isolation != "bwrap":
                    os.chmod(work, 0o755)
            nonce = secrets.token_hex(16)
            marker_r, marker_w = os.pipe()
            os.set_inheritable(marker_w, True)
            stdout_path, stderr_path = os.path.join(work, "stdout"), os.path.join(work, "stderr")
            started = time.monotonic()
            timed_out = False
            try:
                with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
                    proc = self._start(scratch, nonce, marker_w, out, err)
                    os.close(marker_w)
                    marker_w = -1
                    try:
                        proc.communicate(stdin.encode(), timeout=lim.timeout_s)
                    except subprocess.TimeoutExpired:
                        timed_out = True
                        _kill_group(proc.pid)
                        proc.wait()
                    except BrokenPipeError:  # the program exited without reading its input
                        proc.wait(timeout=lim.timeout_s)
                    _kill_group(proc.pid)  # whatever it left behind in its session
                seconds = time.monotonic() - started
                marker = _read_available(marker_r)
            finally:
                os.close(marker_r)
                if marker_w >= 0:
                    os.close(marker_w)
            stdout = _head(stdout_path, lim.output_bytes)
            stderr = _head(stderr_path, lim.output_bytes)
        code = proc.returncode
        if timed_out:
            return Execution(False, f"timeout after {lim.timeout_s:g}s", None, stdout, stderr, seconds)
        if code is not None and code < 0:
            reason = f"signal {signal.Signals(-code).name}"
        elif code != 0:
            reason = f"exit code {code}"
        elif marker != nonce.encode():
            reason = "no completion marker (the program exited before its last statement)"
        else:
            reason = "passed"
        return Execution(reason == "passed", reason, code, stdout, stderr, seconds)

    def _start(self, scratch: str, nonce: str, marker_w: int, out, err) -> subprocess.Popen:
        # The process count is per user across the machine: what the sandbox user runs already plus the budget.
        nproc = _processes_of(NOBODY if self.as_root else os.getuid()) + self.limits.processes
        try:
            return subprocess.Popen(self._limits(nproc) + self._command(scratch), stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, cwd=scratch, env=self._environment(scratch, nonce, marker_w),
                                    pass_fds=(marker_w,), start_new_session=True)
        except FileNotFoundError as exc:
            raise SandboxError(f"sandbox ({self.isolation}): {exc.filename} not found") from exc


def _processes_of(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += 1
            except OSError:
                continue
    return count


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_available(fd: int) -> bytes:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        return os.read(fd, 256)
    except BlockingIOError:
        return b""


def _head(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + "\n[output truncated]" if len(data) > limit else text
