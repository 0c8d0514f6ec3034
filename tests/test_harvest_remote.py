"""Harvests into an object store, against a real S3 server started here (moto, tests/s3_server.py):
the objects equal a local harvest's files byte for byte; a SIGKILL, a cut network or two machines
writing at once change nothing; bad credentials, a missing bucket, a read-only prefix and a prefix
of other objects are refused with a clear message and nothing written."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import zarr

from harvest.cache_layout import ForeignCacheLocation, _array_names
from harvest.chunk_writer import ChunkWriter, HarvestWriteError
from harvest.store import CacheLocation, ObjectStoreError
from tests.harvest_util import REPO, SMALL, harvest_cli, harvest_env, harvest_inprocess, tree_digest
from tests.s3_server import BUCKET, CuttableProxy, free_port, s3_fixture

s3 = s3_fixture()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache = tmp_path_factory.mktemp("reference") / "cache"
    harvest_inprocess(cache)
    return cache


@pytest.fixture(autouse=True)
def writer_credentials(s3, monkeypatch):
    """Every test talks to the server as `writer` unless it says otherwise (never to a real AWS)."""
    use_store(monkeypatch, s3)


def env_for(s3, user="writer", **extra) -> dict:
    return {**harvest_env(), **s3.env(user), **extra}


def use_store(monkeypatch, s3, user="writer", endpoint=None):
    for k, v in s3.env(user, endpoint).items():
        monkeypatch.setenv(k, v)


# The real CLI, its writer patched to SIGKILL the process in chunk KILL_AT (1-based), after the
# PUTs of that chunk's tokens and first activation array and before the rest and its flag.
KILLER = """
import os, signal, sys
import numpy as np
from harvest import chunk_writer
original = chunk_writer.ChunkWriter._write
seen = [0]
def write_then_die(self, buf):
    seen[0] += 1
    if seen[0] == KILL_AT:
        self.tokens.write((buf.index,), buf.tokens)
        site = self.layout.sites[0]
        self.arrays[site].write((buf.index, 0), buf.acts[site].numpy().view(np.uint16))
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, buf)
chunk_writer.ChunkWriter._write = write_then_die
sys.argv = ["harvest", *ARGS]
from harvest.__main__ import main
main()
"""


def test_sigkilled_harvest_resumes_byte_identical_and_reads_back_as_the_local_cache(s3, reference):
    url = f"s3://{BUCKET}/killed"
    script = KILLER.replace("KILL_AT", "3").replace("ARGS", repr([f"cache={url}", *SMALL]))
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env_for(s3), capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = s3.list_keys("killed")
    assert [k for k in left if k.startswith("complete/c/")] == ["complete/c/0", "complete/c/1"]
    assert "tokens/c/2" in left                         # chunk 2 was half written: no flag over it

    assert harvest_inprocess(url)["chunks_written"] == 6        # the same command, resumed
    assert s3.digest("killed") == tree_digest(reference)        # keys are the files' relative paths

    # the same arrays and attributes through zarr, read locally and from the store
    local, remote = zarr.open_group(str(reference), mode="r"), CacheLocation.parse(url).open_group("r")
    assert dict(remote.attrs) == dict(local.attrs)
    names = _array_names(local)
    assert sorted(_array_names(remote)) == sorted(names) and len(names) == 2 + 2 * len(local.attrs["sites"])
    for name in names:
        assert np.array_equal(remote[name][:], local[name][:]), name
        assert dict(remote[name].attrs) == dict(local[name].attrs), name


def test_two_machines_write_one_cache(s3, reference):
    """`accelerate launch --num_machines 2 --machine_rank R --main_process_ip ...`: here two launches
    on one machine, one process each, writing one cache in the store."""
    url, port = f"s3://{BUCKET}/two_machines", free_port()
    launches = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
         "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "harvest", f"cache={url}", *SMALL],
        cwd=REPO, env=env_for(s3), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=600) for p in launches]
    assert [p.returncode for p in launches] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "2 process(es)" in outs[0][0]
    assert s3.digest("two_machines") == tree_digest(reference)


def test_network_cut_mid_harvest_is_reported_and_the_harvest_resumes(s3, reference, monkeypatch):
    proxy = CuttableProxy(int(s3.endpoint.rsplit(":", 1)[1]))
    use_store(monkeypatch, s3, endpoint=proxy.endpoint)
    monkeypatch.setenv("JUMPSCOPE_STORE_RETRY_SECONDS", "1")
    url, original, calls = f"s3://{BUCKET}/cut", ChunkWriter._write, [0]

    def cut_at_third(self, buf):
        calls[0] += 1
        if calls[0] == 3:
            proxy.cut()
        original(self, buf)
    monkeypatch.setattr(ChunkWriter, "_write", cut_at_third)
    with pytest.raises(HarvestWriteError, match="(?s)could not reach the object store.*run the same command"):
        harvest_inprocess(url)
    assert [k for k in s3.list_keys("cut") if k.startswith("complete/c/")] == ["complete/c/0", "complete/c/1"]
    proxy.restore()
    monkeypatch.setattr(ChunkWriter, "_write", original)
    harvest_inprocess(url)
    assert s3.digest("cut") == tree_digest(reference)


@pytest.mark.parametrize("user, prefix, message", [
    ("nobody", "creds", "rejected the credentials"),
    ("writer", None, "bucket 'no-such-bucket' does not exist"),
    ("reader", "shared/read_only", "permission denied.*may not write under this prefix"),
])
def test_bad_store_input_is_refused_with_nothing_written(s3, monkeypatch, user, prefix, message):
    use_store(monkeypatch, s3, user)
    url = f"s3://{BUCKET}/{prefix}" if prefix else "s3://no-such-bucket/cache"
    with pytest.raises(ObjectStoreError, match=message):
        harvest_inprocess(url)
    if prefix:
        assert s3.list_keys(prefix) == []


def test_cli_reports_store_errors_in_one_line(s3):
    result = harvest_cli(f"s3://{BUCKET}/creds", env=env_for(s3, "nobody"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: listing s3://jumpscope-tests/creds: the object store rejected the credentials" in result.stderr


def test_prefix_of_other_objects_is_refused_and_left_untouched(s3, monkeypatch):
    use_store(monkeypatch, s3)
    client = s3.client()
    for key in ("papers/notes.txt", "papers/data/a.csv"):
        client.put_object(Bucket=BUCKET, Key=key, Body=b"mine")
    with pytest.raises(ForeignCacheLocation, match=r"holds 2 entries and no cache \(data/, notes\.txt\)"):
        harvest_inprocess(f"s3://{BUCKET}/papers")
    assert s3.objects("papers") == {"notes.txt": b"mine", "data/a.csv": b"mine"}


def test_verify_and_repair_a_remote_cache(s3, reference):
    from harvest.verify import verify_cache
    url = s3.upload(reference, "verified")
    assert verify_cache(url, deep=True) == {}
    s3.client().delete_object(Bucket=BUCKET, Key="verified/layer_1/mlp_out/c/4/0")
    assert verify_cache(url) == {4: ["layer_1/mlp_out: file missing"]}
    verify_cache(url, repair=True)               # the harvest then rewrites chunk 4 (as test_harvest_resume checks)
    flags = [k for k in s3.list_keys("verified") if k.startswith("complete/c/")]
    assert flags == [f"complete/c/{c}" for c in range(8) if c != 4]


@pytest.mark.parametrize("cache, message", [
    ("az://account/container", "az:// is not supported"),
    ("s3:/bucket/cache", "did you mean s3://bucket/cache"),
    ("s3:///cache", "names no bucket"),
])
def test_malformed_urls_are_refused(cache, message):
    with pytest.raises(ObjectStoreError, match=message):
        CacheLocation.parse(cache)


def test_without_the_extra_the_message_says_what_to_install(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_obstore(name, *a, **k):
        if name.startswith("obstore"):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_obstore)
    with pytest.raises(ObjectStoreError, match=r"pip install -e '\.\[s3\]'"):
        CacheLocation.parse("s3://bucket/cache").object_store
