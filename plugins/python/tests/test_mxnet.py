"""bps.mxnet on real MXNet 1.x NDArrays across bps-launch jobs. Each job is bounded by a
timeout."""

import textwrap

import pytest

mx = pytest.importorskip("mxnet")

from conftest import EXAMPLES, SCRIPTS, WORKERS, single  # noqa: E402

WORKER = WORKERS / "mx_worker.py"
ALL = ["kvstore", "dtypes", "gluon", "trainer", "baduse", "mismatch"]


def _checks_passed(r, workers, checks):
    for c in checks:
        got = len(r.lines("CHECK %s ok" % c))
        assert got == workers, "check %s passed on %d of %d workers:\n%s" % (c, got, workers, r.out[-8000:])


def test_two_workers_everything(job):
    r = job(2, WORKER, *ALL)
    _checks_passed(r, 2, ALL)


def test_four_workers_two_servers(job):
    # "mismatch" is left out with more than 2 workers (see test_torch.py)
    checks = [c for c in ALL if c != "mismatch"]
    r = job(4, WORKER, *checks, servers=2)
    _checks_passed(r, 4, checks)


def test_kvstore_registered_and_before_init():
    code = textwrap.dedent(
        """
        import mxnet as mx
        import bps.mxnet as bps
        from mxnet.kvstore.base import KVStoreBase
        assert KVStoreBase.kv_registry["bps"] is bps.BPS
        assert KVStoreBase.kv_registry["dist_sync_bps"] is bps.Dist_Sync_Bps
        try:
            bps.byteps_push_pull(mx.nd.ones(3), name="x")
        except bps.NotInitializedError as e:
            assert "call bps.init() first" in str(e), str(e)
        else:
            raise AssertionError("no error before init")
        kv = mx.kv.create("bps")  # a lone worker: init() from the kvstore
        a = mx.nd.ones((2, 2)) * 3
        kv.pushpull(0, a)
        assert (a.asnumpy() == 3).all() and kv.num_workers == 1
        print("KV OK")
        """
    )
    r = single(code)
    assert r.rc == 0 and "KV OK" in r.out, r.out


def test_byteps_alias_under_bps_launch(job):
    r = job(2, SCRIPTS / "byteps_mxnet_gluon.py")
    assert len(r.lines("OK")) == 2, r.out


def test_example_mxnet_gluon(job):
    for extra in ([], ["--kvstore"]):
        r = job(2, EXAMPLES / "mxnet_gluon.py", "--epochs", "2", "--samples", "2048", *extra)
        first = float(r.lines("epoch 0: loss")[0].split("loss")[1].split()[0])
        last = float(r.lines("epoch 1: loss")[0].split("loss")[1].split()[0])
        assert last < first, r.out
