"""The loader's CUDA path (pinned windows, side-stream uploads, batches sliced on the device) serves
exactly the CPU path's batches. Skipped without a CUDA device; CPU tests cover the bookkeeping with
the CUDA calls stubbed out (test_train_loader.py)."""
import numpy as np
import pytest
import torch

from tests.cache_factory import write_cache
from train.cache_reader import heldout_sequences, open_activations
from train.loader import ChunkLoader

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CTX, ROWS, N_CHUNKS = 16, 64, 20


@pytest.mark.parametrize("storage_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("batch,buffer", [(48, 3 * ROWS), (200, ROWS)])
def test_cuda_loader_serves_the_cpu_loaders_batches(tmp_path, storage_dtype, batch, buffer):
    acts = np.random.default_rng(0).standard_normal((ROWS * N_CHUNKS, 24)).astype(np.float32)
    path = write_cache(tmp_path / "c", {(0, "mlp_out"): acts}, context_length=CTX, chunk_rows=ROWS,
                       storage_dtype=storage_dtype, incomplete=[3])
    source = open_activations(path, 0, "mlp_out")
    held = heldout_sequences(source.n_sequences, 0.1, 0)
    chunks = np.flatnonzero(source.complete)
    cpu = ChunkLoader(source, chunks, held, batch, buffer, seed=4, num_readers=2, device="cpu")
    cuda = ChunkLoader(source, chunks, held, batch, buffer, seed=4, num_readers=2, device="cuda")
    for _ in range(3 * cpu.rows_per_epoch // batch):         # three epochs, window-spanning batches
        want = cpu.next_batch().clone()
        got = cuda.next_batch()
        assert got.device.type == "cuda" and got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.cpu(), want)
        assert cuda.position == cpu.position
    cpu.close()
    cuda.close()
