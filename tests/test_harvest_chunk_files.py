"""Our direct chunk-file writer produces exactly the files zarr-python writes itself."""
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from harvest.chunk_files import ChunkFiles, remove_partial_files
from tests.harvest_util import tree_digest

CHAINS = {
    "none": [],
    "zstd+crc32c": [ZstdCodec(level=1), Crc32cCodec()],
    "blosc": [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle, typesize=2)],
    "crc32c": [Crc32cCodec()],
}


@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("dtype", ["uint16", "float32", "int32", "bool"])
def test_chunk_files_equal_zarrs_own(tmp_path, chain, dtype):
    rng = np.random.default_rng(0)
    data = (rng.integers(0, 2, (48, 5)) if dtype == "bool" else rng.normal(size=(48, 5)) * 1000).astype(dtype)
    trees = []
    for name in ("zarr", "ours"):
        group = zarr.create_group(store=str(tmp_path / name), zarr_format=3)
        arr = group.create_array(name="layer_0/x", shape=data.shape, chunks=(16, 5), dtype=dtype,
                                 fill_value=0, compressors=CHAINS[chain], config={"write_empty_chunks": True})
        if name == "zarr":
            arr[:] = data
        else:
            files = ChunkFiles(arr)
            for c in range(3):
                files.write((c, 0), data[16 * c:16 * (c + 1)], atomic=c == 1)
        trees.append(tree_digest(tmp_path / name))
        np.testing.assert_array_equal(zarr.open_group(str(tmp_path / name), mode="r")["layer_0/x"][:], data)
    assert trees[0] == trees[1]


def test_wrong_chunk_shape_is_refused(tmp_path):
    arr = zarr.create_group(store=str(tmp_path), zarr_format=3).create_array(
        name="a", shape=(32,), chunks=(16,), dtype="int32", fill_value=0)
    with pytest.raises(ValueError, match="expected"):
        ChunkFiles(arr).write((0,), np.zeros(8, dtype=np.int32))


def test_partial_files_are_removed(tmp_path):
    (tmp_path / "a" / "c").mkdir(parents=True)
    (tmp_path / "a" / "c" / "3.partial").write_bytes(b"\x01")
    (tmp_path / "a" / "c" / "2").write_bytes(b"\x01")
    assert remove_partial_files(tmp_path) == 1
    assert [p.name for p in (tmp_path / "a" / "c").iterdir()] == ["2"]
