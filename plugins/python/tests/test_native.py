"""The common API and the native module, without a framework: exceptions, the life cycle of
the process-global instance, the handle table, bad arguments."""

import textwrap

import pytest

import bps
from bps import _native
from conftest import single


def test_exception_classes():
    assert issubclass(bps.BpsError, RuntimeError)
    for cls in (bps.NotInitializedError, bps.ShutDownError, bps.InvalidArgumentError, bps.ConfigError,
                bps.MismatchError, bps.PeerError, bps.BpsTimeoutError, bps.UnsupportedError, bps.DtypeError):
        assert issubclass(cls, bps.BpsError), cls
    assert issubclass(bps.MismatchError, ValueError)
    assert issubclass(bps.InvalidArgumentError, ValueError)
    assert issubclass(bps.ConfigError, ValueError)
    assert issubclass(bps.PeerError, ConnectionError)
    assert issubclass(bps.BpsTimeoutError, TimeoutError)
    assert issubclass(bps.UnsupportedError, NotImplementedError)
    assert issubclass(bps.DtypeError, TypeError)
    assert bps.BpsError.__module__ == "bps"


def test_calls_before_init_raise_clearly():
    # this test process never calls init
    for fn in (bps.rank, bps.size, bps.local_rank, bps.local_size, bps.barrier,
               lambda: bps.declare("x"), lambda: _native.push_pull_async("x", 0, 1, 1, 4),
               lambda: _native.broadcast_async("x", 0, 1, 4, 0),
               lambda: _native.push_pull_device_async("x", 1, 0, 4, 0, 0),
               lambda: _native.broadcast_device_async("x", 1, 0, 4, 0, 0), bps.gpus):
        try:
            fn()
        except bps.NotInitializedError as e:
            assert "call bps.init() first" in str(e)
        else:
            raise AssertionError("no error before init")
    assert not bps.is_initialized()
    bps.shutdown()  # nothing to shut down: no error
    assert _native.FLOAT32 == 0 and _native.UINT8 == 6
    assert [_native.dtype_size(c) for c in range(7)] == [4, 8, 2, 2, 4, 8, 1]
    assert _native.dtype_name(3) == "bf16"
    # the default build has the CUDA path (it starts without a GPU, see below)
    assert bps.cuda_built() is _native.cuda_built() and isinstance(bps.cuda_built(), bool)
    assert bps.UnsupportedError is _native.UnsupportedError


LIFECYCLE = textwrap.dedent(
    r"""
    import array, ctypes
    import bps
    from bps import _native as n

    def addr(a):
        return a.buffer_info()[0]

    bps.init()
    bps.init()  # a second init is a no-op
    assert bps.is_initialized()
    assert (bps.rank(), bps.size(), bps.local_rank(), bps.local_size()) == (0, 1, 0, 1)
    assert bps.declare("a") == 0 and bps.declare("b") == 1 and bps.declare("a") == 0

    src = array.array("d", range(100))
    out = array.array("d", [0.0] * 100)
    h = n.push_pull_async("pp", n.FLOAT64, addr(src), addr(out), 800, True, 3, keep=(src, out))
    n.wait(h, timeout=10)
    assert list(out) == list(src)
    try:
        n.wait(h)
    except bps.InvalidArgumentError as e:
        assert "no operation with handle" in str(e)
    else:
        raise AssertionError("waited twice")

    # poll, then release a finished operation without waiting
    h = n.push_pull_async("pp", n.FLOAT64, addr(src), addr(out), 800, False, 0, keep=(src, out))
    while not n.poll(h):
        pass
    n.release(h)
    assert n.pending_count() == 0

    # synchronous forms
    n.push_pull("sync", n.FLOAT64, addr(src), addr(out), 800, True, 0)
    n.broadcast("bc", n.FLOAT64, addr(out), 800, 0, 0)
    assert list(out) == list(src)

    # bad arguments
    for call, needle, cls in [
        (lambda: n.push_pull_async("x", 9, addr(src), addr(src), 8), "not a dtype code", bps.InvalidArgumentError),
        (lambda: n.push_pull_async("x", n.FLOAT64, addr(src), addr(src), 7), "whole number", bps.InvalidArgumentError),
        (lambda: n.push_pull_async("x", n.FLOAT64, 0, 0, 8), "null", bps.InvalidArgumentError),
        (lambda: n.push_pull_async("", n.FLOAT64, addr(src), addr(src), 8), "name", bps.InvalidArgumentError),
        (lambda: n.broadcast_async("x", n.FLOAT64, addr(src), 8, 3), "root", bps.InvalidArgumentError),
        (lambda: n.wait(123456789), "no operation", bps.InvalidArgumentError),
    ]:
        try:
            call()
        except cls as e:
            assert needle in str(e), (needle, str(e))
        else:
            raise AssertionError("no error: " + needle)

    h = n.push_pull_async("pp", n.FLOAT64, addr(src), addr(out), 800, True, 0, keep=(src, out))
    try:
        n.wait(h, timeout=-1)
    except bps.InvalidArgumentError as e:
        assert "timeout must be" in str(e)
    else:
        raise AssertionError("negative timeout accepted")
    n.wait(h)

    # the same name with another size in this process
    a4 = array.array("f", [1.0] * 4)
    a5 = array.array("f", [1.0] * 5)
    n.push_pull("mm", n.FLOAT32, addr(a4), addr(a4), 16)
    try:
        n.push_pull("mm", n.FLOAT32, addr(a5), addr(a5), 20)
    except bps.MismatchError as e:
        assert "mm" in str(e) and "16 bytes" in str(e), str(e)
    else:
        raise AssertionError("no mismatch")

    bps.barrier()
    bps.shutdown()
    bps.shutdown()  # idempotent
    assert not bps.is_initialized()
    for call in (bps.rank, lambda: n.push_pull("x", 0, addr(a4), addr(a4), 16)):
        try:
            call()
        except bps.ShutDownError as e:
            assert "shut down" in str(e)
        else:
            raise AssertionError("no error after shutdown")
    print("LIFECYCLE OK")
    """
)


def test_lifecycle_lone_worker():
    r = single(LIFECYCLE)
    assert r.rc == 0 and "LIFECYCLE OK" in r.out, r.out


DEVICE = textwrap.dedent(
    r"""
    import array
    import bps
    from bps import _native as n

    bps.init()
    try:
        gpus = bps.gpus()
    except bps.UnsupportedError as e:
        why = str(e)
        assert why.startswith("bps.gpus: no usable GPU: "), why
        reason = why[len("bps.gpus: no usable GPU: "):]
        assert len(reason) > 10, why
    else:
        print("GPUS PRESENT", gpus)
        raise SystemExit(0)

    # host memory that is never used as device memory: every call fails before
    a = array.array("f", [1.0] * 16)
    addr = a.buffer_info()[0]
    for call in (lambda: n.push_pull_device_async("g", addr, 0, 64, n.FLOAT32, 0, True, 0, keep=a),
                 lambda: n.broadcast_device_async("b", addr, 0, 64, n.FLOAT32, 0, 0, 0, keep=a)):
        try:
            call()
        except bps.UnsupportedError as e:
            assert isinstance(e, NotImplementedError)
            msg = str(e)
            assert "unsupported" in msg, msg
            if bps.cuda_built():
                assert reason in msg, (reason, msg)  # the same reason, e.g. no driver
            else:
                assert "cuda" in msg, msg
        else:
            raise AssertionError("a device call without a GPU did not fail")
    assert n.pending_count() == 0 and list(a) == [1.0] * 16

    # arguments are checked first
    for call, needle in [
        (lambda: n.push_pull_device_async("g", addr, -1, 64, n.FLOAT32, 0), "device -1"),
        (lambda: n.push_pull_device_async("g", addr, 0, 64, 9, 0), "not a dtype code"),
        (lambda: n.push_pull_device_async("g", 0, 0, 64, n.FLOAT32, 0), "null device pointer"),
        (lambda: n.push_pull_device_async("g", addr, 0, 6, n.FLOAT32, 0), "whole number"),
        (lambda: n.broadcast_device_async("b", addr, 0, 64, n.FLOAT32, 0, 5), "root"),
    ]:
        try:
            call()
        except bps.InvalidArgumentError as e:
            assert needle in str(e), (needle, str(e))
        else:
            raise AssertionError("no error: " + needle)

    # the job goes on
    n.push_pull("after", n.FLOAT32, addr, addr, 64)
    assert list(a) == [1.0] * 16
    bps.shutdown()
    print("DEVICE OK")
    """
)


def test_device_calls_without_a_gpu():
    r = single(DEVICE)
    if "GPUS PRESENT" in r.out:
        pytest.skip("this machine has a usable GPU: tests/gpu/ covers the device path")
    assert r.rc == 0 and "DEVICE OK" in r.out, r.out


def test_bad_environment_is_a_config_error():
    code = textwrap.dedent(
        """
        import bps
        try:
            bps.init()
        except bps.ConfigError as e:
            assert "DMLC_NUM_WORKER" in str(e) and "zero" in str(e), str(e)
            print("CONFIG OK")
        """
    )
    r = single(code, {"DMLC_NUM_WORKER": "zero"})
    assert r.rc == 0 and "CONFIG OK" in r.out, r.out


def test_unreachable_scheduler_fails_within_timeout():
    # a worker of a 2-worker job whose scheduler never comes: an error, not a hang
    code = textwrap.dedent(
        """
        import time, bps
        t = time.monotonic()
        try:
            bps.init()
        except bps.BpsError as e:
            print("INIT FAILED after %.1f s: %s" % (time.monotonic() - t, e))
        """
    )
    r = single(code, {"DMLC_NUM_WORKER": "2", "DMLC_WORKER_ID": "1", "BPS_TIMEOUT": "2s"}, timeout=60)
    assert r.rc == 0 and "INIT FAILED" in r.out, r.out
