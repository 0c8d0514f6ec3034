"""Harvested activations equal, bit for bit in the stored dtype, an independent eager forward of the
same model, whose hooks are written here (not harvest.sites) and which uses output_hidden_states
where that applies."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from harvest.model import checkpoint_location
from tests.harvest_util import harvest_cli, harvest_config, harvest_inprocess, tree_digest

SUBLAYERS = ("resid_pre", "attn_z", "attn_out", "resid_mid", "mlp_out", "resid_post")


@pytest.fixture(scope="module")
def one_process_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("harvest") / "cache"
    harvest_inprocess(cache)
    return cache


def oracle_activations(tokens: np.ndarray, ctx: int, batch: int, overrides=()) -> dict[str, np.ndarray]:
    """Every sublayer of every layer from a plain transformers forward, as float32."""
    from transformers import Gemma2ForCausalLM
    cfg = harvest_config(list(overrides)).model
    model = Gemma2ForCausalLM.from_pretrained(checkpoint_location(cfg),
                                              attn_implementation="eager", dtype=torch.float32).eval()
    n_layers = model.config.num_hidden_layers
    out: dict[str, list] = {}
    hooked: dict[str, torch.Tensor] = {}
    handles = []
    for L, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, L=L: hooked.__setitem__(f"layer_{L}/attn_z", a[0])))
        handles.append(layer.post_attention_layernorm.register_forward_hook(
            lambda m, a, o, L=L: hooked.__setitem__(f"layer_{L}/attn_out", o)))
        handles.append(layer.post_feedforward_layernorm.register_forward_hook(
            lambda m, a, o, L=L: hooked.__setitem__(f"layer_{L}/mlp_out", o)))
        handles.append(layer.register_forward_hook(
            lambda m, a, o, L=L: hooked.__setitem__(f"layer_{L}/layer_output", o[0] if isinstance(o, tuple) else o)))
    seqs = torch.from_numpy(tokens.reshape(-1, ctx).astype(np.int64))
    with torch.no_grad():
        for b in range(0, len(seqs), batch):
            res = model(input_ids=seqs[b:b + batch], output_hidden_states=True, use_cache=False)
            hs = res.hidden_states   # [embeddings, after layer 0, ..., after the final norm]
            for L in range(n_layers):
                acts = {
                    "resid_pre": hs[L],
                    "attn_z": hooked[f"layer_{L}/attn_z"],
                    "attn_out": hooked[f"layer_{L}/attn_out"],
                    "resid_mid": hs[L] + hooked[f"layer_{L}/attn_out"],
                    "mlp_out": hooked[f"layer_{L}/mlp_out"],
                    # the last hidden state is taken after the final norm: use the layer's output there
                    "resid_post": hs[L + 1] if L + 1 < n_layers else hooked[f"layer_{L}/layer_output"],
                }
                for name, a in acts.items():
                    out.setdefault(f"layer_{L}/{name}", []).append(a.reshape(-1, a.shape[-1]))
    for h in handles:
        h.remove()
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def bf16_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def assert_matches_oracle(cache, overrides=()):
    group = zarr.open_group(str(cache), mode="r")
    attrs = dict(group.attrs)
    assert group["complete"][:].all()
    tokens = group["tokens"][:]
    ctx = attrs["context_length"]
    assert (tokens.reshape(-1, ctx)[:, 0] == attrs["bos_token_id"]).all()
    assert (tokens.reshape(-1, ctx)[:, 1:] != attrs["bos_token_id"]).all()
    oracle = oracle_activations(tokens, ctx, attrs["harvest_config"]["batch_tokens"] // ctx, overrides)
    checked = 0
    for L in range(4):
        for sub in SUBLAYERS:
            key = f"layer_{L - 1}/resid_post" if (sub == "resid_pre" and L > 0) else f"layer_{L}/{sub}"
            stored = group[key]
            assert dict(stored.attrs)["storage_dtype"] == "bfloat16" and stored.dtype == np.uint16
            np.testing.assert_array_equal(stored[:], bf16_bits(oracle[f"layer_{L}/{sub}"]), err_msg=key)
            checked += 1
    assert checked == 24


def test_activations_equal_eager_forward_one_process(one_process_cache):
    assert_matches_oracle(one_process_cache)


def test_attention_width_unlike_the_residual_width(tmp_path):
    """attn_z is heads x head_dim wide (2048 against 2304 in Gemma 2 2B); the embedded models have
    them equal, so a random-weight variant with head_dim 8 (attn_z 32 wide, residual 64) checks every
    site's width and values."""
    overrides = ["model=tiny-random", "model.architecture.head_dim=8", "model.architecture.query_pre_attn_scalar=8"]
    cache = tmp_path / "cache"
    harvest_inprocess(cache, overrides)
    group = zarr.open_group(str(cache), mode="r")
    assert group["layer_0/attn_z"].shape[1] == 32 and group["layer_0/attn_out"].shape[1] == 64
    assert_matches_oracle(cache, overrides)


def test_statistics_exclude_bos(one_process_cache):
    group = zarr.open_group(str(one_process_cache), mode="r")
    tokens = group["tokens"][:]
    keep = tokens != group.attrs["bos_token_id"]
    for key in ("layer_0/resid_pre", "layer_2/mlp_out", "layer_3/attn_z"):
        x = torch.from_numpy(group[key][:].view(np.int16)).view(torch.bfloat16).double().numpy()[keep]
        attrs = dict(group[key].attrs)
        # float32 sums within a sequence, float64 across: about 1e-7 relative (run.py)
        np.testing.assert_allclose(attrs["mean_squared_norm"], (x ** 2).sum(1).mean(), rtol=1e-6)
        np.testing.assert_allclose(attrs["variance"], ((x - x.mean(0)) ** 2).sum(1).mean(), rtol=1e-5)
        np.testing.assert_allclose(attrs["mean_norm"], np.linalg.norm(x.mean(0)), rtol=1e-6)
        assert attrs["statistics_rows"] == keep.sum()


def test_two_processes_write_the_same_bytes(one_process_cache, tmp_path):
    cache = tmp_path / "cache2"
    result = harvest_cli(cache, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert tree_digest(cache) == tree_digest(one_process_cache)
    assert_matches_oracle(cache)


def test_only_requested_sites_and_resid_pre_resolved(tmp_path):
    cache = tmp_path / "c"
    harvest_inprocess(cache, ["layers='1,2'", "sublayers='resid_pre,mlp_out'"])
    group = zarr.open_group(str(cache), mode="r")
    assert sorted(group.attrs["sites"]) == ["layer_0/resid_post", "layer_1/mlp_out",
                                             "layer_1/resid_post", "layer_2/mlp_out"]
    assert "layer_3" not in group


@pytest.mark.parametrize("codec, checksum", [("zstd", True), ("blosc", False)])
def test_codecs_store_the_same_values(one_process_cache, tmp_path, codec, checksum):
    cache = tmp_path / "c"
    harvest_inprocess(cache, [f"codec={codec}", f"checksum={str(checksum).lower()}", "layers=1"])
    plain = zarr.open_group(str(one_process_cache), mode="r")
    packed = zarr.open_group(str(cache), mode="r")
    for key in packed.attrs["sites"]:
        np.testing.assert_array_equal(packed[key][:], plain[key][:], err_msg=key)
        assert packed[key].attrs["mean_squared_norm"] == plain[key].attrs["mean_squared_norm"]
    np.testing.assert_array_equal(packed["tokens"][:], plain["tokens"][:])


def test_float32_storage_equals_eager_forward_exactly(tmp_path):
    cache = tmp_path / "c"
    harvest_inprocess(cache, ["storage_dtype=float32", "sublayers='attn_z,resid_mid'"])
    group = zarr.open_group(str(cache), mode="r")
    oracle = oracle_activations(group["tokens"][:], 64, 4)
    for L in range(4):
        for sub in ("attn_z", "resid_mid"):
            arr = group[f"layer_{L}/{sub}"]
            assert arr.dtype == np.float32 and arr.attrs["storage_dtype"] == "float32"
            np.testing.assert_array_equal(arr[:], oracle[f"layer_{L}/{sub}"])
