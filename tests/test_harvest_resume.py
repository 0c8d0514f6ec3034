"""A harvest killed at any point (SIGKILL, or a full disk) resumes with the same command and ends
byte-identical to an uninterrupted one."""
from __future__ import annotations

import errno
import re
import subprocess
import sys

import numpy as np
import pytest
import zarr

from harvest import chunk_writer
from harvest.chunk_writer import HarvestWriteError
from tests.harvest_util import REPO, SMALL, harvest_cli, harvest_env, harvest_inprocess, tree_digest


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache = tmp_path_factory.mktemp("reference") / "cache"
    harvest_inprocess(cache)
    return tree_digest(cache)


# Runs the real CLI with the writer patched to SIGKILL its own process part-way through chunk
# number KILL_AT (1-based): after writing `tokens`, half of one activation chunk file, and the
# temporary file of its `complete` flag (not yet renamed).
KILLER = """
import os, signal, sys
import numpy as np
from harvest import chunk_writer
original = chunk_writer.ChunkWriter._write
seen = [0]
def write_then_die(self, buf):
    seen[0] += 1
    if seen[0] == KILL_AT:
        c = buf.index
        self.tokens.write((c,), buf.tokens)
        site = self.layout.sites[0]
        files = self.arrays[site]
        blob = files.encode(buf.acts[site].numpy().view(np.uint16))
        path = files.folder / files.metadata.encode_chunk_key((c, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(blob)[: len(blob) // 2])
        flag = self.complete.folder / (self.complete.metadata.encode_chunk_key((c,)) + ".partial")
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.write_bytes(b"\\x01")
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, buf)
chunk_writer.ChunkWriter._write = write_then_die
sys.argv = ["harvest", *ARGS]
from harvest.__main__ import main
main()
"""


@pytest.mark.parametrize("kill_at", [1, 4])
def test_sigkill_then_resume_is_byte_identical(reference, tmp_path, kill_at):
    cache = tmp_path / "cache"
    args = [f"cache={cache}", *SMALL]
    script = KILLER.replace("KILL_AT", str(kill_at)).replace("ARGS", repr(args))
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=harvest_env(),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    complete = zarr.open_group(str(cache), mode="r")["complete"][:]
    assert complete.sum() == kill_at - 1          # the half-written chunk is not marked complete
    assert list(cache.rglob("*.partial"))
    resumed = harvest_cli(cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{kill_at - 1} chunks already complete" in resumed.stdout
    assert tree_digest(cache) == reference


def test_disk_full_mid_run_then_resume(reference, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    original = chunk_writer.ChunkWriter._write
    calls = [0]

    def write_until_full(self, buf):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, buf)

    monkeypatch.setattr(chunk_writer.ChunkWriter, "_write", write_until_full)
    with pytest.raises(HarvestWriteError, match="disk full.*run the same command again"):
        harvest_inprocess(cache)
    monkeypatch.setattr(chunk_writer.ChunkWriter, "_write", original)
    assert zarr.open_group(str(cache), mode="r")["complete"][:].sum() == 2
    harvest_inprocess(cache)
    assert tree_digest(cache) == reference


def test_finished_harvest_run_again_changes_nothing(reference, tmp_path):
    cache = tmp_path / "cache"
    harvest_inprocess(cache)
    harvest_inprocess(cache)
    assert tree_digest(cache) == reference


@pytest.mark.parametrize("durable", [True, False])
def test_chunk_files_reach_the_disk_before_their_complete_flag(tmp_path, monkeypatch, durable):
    """durable=true (the default): every file of a chunk is fdatasync'ed before its `complete` flag
    is renamed into place, so a power loss cannot leave a flag over data the disk never got."""
    import os
    from harvest import chunk_files
    events = []
    real_sync, real_replace = os.fdatasync, os.replace

    def record_sync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if str(cache) in path:
            events.append(("sync", path))
        real_sync(fd)

    def record_replace(src, dst):
        if re.search(r"/complete/c/\d+$", str(dst)):     # a chunk's flag, not zarr's metadata
            events.append(("flag", str(dst)))
        real_replace(src, dst)

    cache = tmp_path / "cache"
    monkeypatch.setattr(chunk_files.os, "fdatasync", record_sync)
    monkeypatch.setattr(chunk_files.os, "replace", record_replace)
    harvest_inprocess(cache, [f"durable={str(durable).lower()}"])
    flags = [i for i, (kind, _) in enumerate(events) if kind == "flag"]
    assert len(flags) == 8                                          # SMALL: 8 chunks
    synced = [p for kind, p in events if kind == "sync"]
    if not durable:
        assert synced == []
        return
    group = zarr.open_group(str(cache), mode="r")
    per_chunk = 1 + 2 * len(group.attrs["sites"])                  # tokens, activations, chunk_stats
    start = 0
    for i in flags:
        chunk = events[start:i]
        assert len(chunk) == per_chunk and all(kind == "sync" for kind, _ in chunk), chunk
        c = events[i][1].rsplit("/", 1)[-1]
        assert all(p.rstrip("/").split("/c/")[-1].split("/")[0] == c for _, p in chunk)   # this chunk's files
        start = i + 1


def test_several_writer_threads_write_the_same_bytes(reference, tmp_path):
    cache = tmp_path / "cache"
    harvest_inprocess(cache, ["write_threads=4"])
    assert tree_digest(cache) == reference


def test_verify_finds_damaged_chunks_and_repair_lets_the_harvest_rewrite_them(reference, tmp_path, capsys):
    from harvest.chunk_files import ChunkFiles
    from harvest.verify import main as verify_main, verify_cache
    cache = tmp_path / "cache"
    harvest_inprocess(cache)
    assert verify_cache(cache, deep=True) == {}
    group = zarr.open_group(str(cache), mode="r")
    sites = group.attrs["sites"]
    ChunkFiles(group[sites[3]]).path((2, 0)).unlink()                              # a lost file
    short = ChunkFiles(group["tokens"]).path((5,))
    short.write_bytes(short.read_bytes()[:10])                                     # a truncated one
    damaged = verify_cache(cache)
    assert sorted(damaged) == [2, 5]
    assert damaged[2] == [f"{sites[3]}: file missing"] and "bytes, expected" in damaged[5][0]
    assert verify_main([str(cache), "--repair"]) == 1
    assert "2 damaged chunk(s)" in capsys.readouterr().out
    assert list(np.flatnonzero(~zarr.open_group(str(cache), mode="r")["complete"][:])) == [2, 5]
    harvest_inprocess(cache)                                                       # the same command
    assert verify_main([str(cache), "--deep"]) == 0
    assert tree_digest(cache) == reference


def test_deep_verify_catches_a_corrupted_compressed_chunk(tmp_path):
    from harvest.chunk_files import ChunkFiles
    from harvest.verify import verify_cache
    cache = tmp_path / "cache"
    harvest_inprocess(cache, ["codec=zstd", "checksum=true"])
    group = zarr.open_group(str(cache), mode="r")
    f = ChunkFiles(group[group.attrs["sites"][0]]).path((4, 0))
    blob = bytearray(f.read_bytes())
    blob[len(blob) // 2] ^= 0xFF                                   # one flipped byte, same size
    f.write_bytes(bytes(blob))
    assert verify_cache(cache) == {}                               # sizes alone cannot tell
    damaged = verify_cache(cache, deep=True)
    assert list(damaged) == [4] and "does not decode" in damaged[4][0]
