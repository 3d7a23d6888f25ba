"""Shared helpers of the bps Python tests: start jobs with bps-launch (or torchrun), each
bounded by a timeout, and report their output on failure.

bps-launch is found through $BPS_LAUNCH, else in $CARGO_TARGET_DIR/{release,debug}, else in the
workspace's target/{release,debug} (ci/python-tests builds it and sets $BPS_LAUNCH).
"""

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "workers"
SCRIPTS = HERE / "scripts"
REPO = HERE.parents[2]
EXAMPLES = REPO / "examples"

# BPS_TIMEOUT of the jobs: generous, since starting 4 Python processes that import torch on a
# loaded 2-core machine can take many seconds; failures that must be quick are asserted so.
JOB_BPS_TIMEOUT = os.environ.get("BPS_TEST_TIMEOUT", "60s")
# Wall-clock bound of one job (the test fails, and the job is killed, past it).
JOB_WALL_TIMEOUT = float(os.environ.get("BPS_TEST_WALL_TIMEOUT", "300"))

# Variables of an enclosing job that must not leak into the jobs the tests start.
_JOB_VARS = (
    "DMLC_ROLE", "DMLC_NUM_WORKER", "DMLC_NUM_SERVER", "DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT",
    "DMLC_WORKER_ID", "BYTEPS_LOCAL_RANK", "BYTEPS_LOCAL_SIZE", "BPS_RANK", "BPS_NUM_WORKER",
    "BPS_SCHEDULER_PORT", "BPS_EMBED_SCHEDULER", "RANK", "WORLD_SIZE", "LOCAL_RANK",
    "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "BPS_TIMEOUT",
)


def find_launcher():
    env = os.environ.get("BPS_LAUNCH")
    if env:
        return env
    dirs = []
    if os.environ.get("CARGO_TARGET_DIR"):
        dirs.append(Path(os.environ["CARGO_TARGET_DIR"]))
    dirs.append(REPO / "target")
    for d in dirs:
        for profile in ("release", "debug"):
            p = d / profile / "bps-launch"
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
    return None


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in _JOB_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("BPS_LOG", "warn")
    if extra:
        env.update(extra)
    return env


def _ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _is_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(pair=False):
    """A free TCP port on 127.0.0.1 (with pair=True, one whose successor is free too), taken
    below the kernel's ephemeral range, so that no outgoing connection made meanwhile (e.g.
    torchrun's store clients) can take it before the job binds it."""
    lo, _ = _ephemeral_range()
    if lo > 12000:
        rng = random.Random()
        for _ in range(200):
            port = rng.randrange(10000, lo - 2)
            if _is_free(port) and (not pair or _is_free(port + 1)):
                return port
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair or (port < 65534 and _is_free(port + 1)):
            return port
    raise RuntimeError("no free port")


class Result:
    def __init__(self, rc, out, seconds):
        self.rc, self.out, self.seconds = rc, out, seconds

    def lines(self, needle):
        return [line for line in self.out.splitlines() if needle in line]


def run(cmd, env=None, timeout=None, cwd=None):
    """Run ``cmd`` in its own process group; kill the whole group past ``timeout``."""
    timeout = timeout or JOB_WALL_TIMEOUT
    t0 = time.monotonic()
    p = subprocess.Popen(
        [str(c) for c in cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env or clean_env(),
        cwd=str(cwd or REPO),
        start_new_session=True,
        text=True,
    )
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            out, _ = p.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        pytest.fail("%s did not finish within %.0f s (hang?). Output:\n%s" % (cmd, timeout, out[-8000:]))
    return Result(p.returncode, out, time.monotonic() - t0)


@pytest.fixture(scope="session")
def launcher():
    path = find_launcher()
    if not path:
        pytest.skip("bps-launch not built (cargo build -p bps-launch, or set BPS_LAUNCH)")
    return path


@pytest.fixture(scope="session")
def job(launcher):
    """job(workers, script, *args, servers=0, local_size=None, python=sys.executable) -> Result,
    asserting a zero exit status."""

    def start(workers, script, *args, servers=0, local_size=None, python=None, expect_ok=True,
              bps_timeout=None, timeout=None, env=None):
        cmd = [launcher, "--workers", workers, "--servers", servers, "--timeout", bps_timeout or JOB_BPS_TIMEOUT]
        if local_size:
            cmd += ["--local-size", local_size]
        cmd += ["--", python or sys.executable, script, *args]
        r = run(cmd, env=clean_env(env), timeout=timeout)
        if expect_ok:
            assert r.rc == 0, "job %s exited with %d. Output:\n%s" % (cmd, r.rc, r.out[-12000:])
        return r

    return start


def single(code, extra_env=None, timeout=120):
    """Run ``code`` with this interpreter as a lone worker (its own scheduler on a free port)."""
    env = clean_env({"DMLC_PS_ROOT_PORT": str(free_port()), "BPS_TIMEOUT": "20s"})
    if extra_env:
        env.update(extra_env)
    return run([sys.executable, "-c", code], env=env, timeout=timeout)
