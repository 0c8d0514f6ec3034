"""Where each sublayer (site) lives inside transformers' Gemma2DecoderLayer, and hooks to read or
replace it. Names follow TransformerLens; shared/DESIGN.md's "Sublayers" table is the definition.

One module serves every stage that touches sites: the harvester captures with it, evaluation splices
reconstructions in with it, and tests' independent oracles deliberately do not use it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

SUBLAYERS = ("resid_pre", "attn_z", "attn_out", "resid_mid", "mlp_out", "resid_post")


class SiteError(ValueError):
    pass


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    sublayer: str

    @property
    def key(self) -> str:
        """The array's path inside the cache group."""
        return f"layer_{self.layer}/{self.sublayer}"

    def stored(self) -> "Site":
        """resid_pre of layer L > 0 is resid_post of L - 1, and is stored only under that name."""
        if self.sublayer == "resid_pre" and self.layer > 0:
            return Site(self.layer - 1, "resid_post")
        return self


def site_width(config, sublayer: str) -> int:
    if sublayer == "attn_z":
        return config.num_attention_heads * config.head_dim
    return config.hidden_size


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """"all", "3", "0,3,12" or "0-12" (inclusive) -> sorted layer indices, each checked."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(n_layers))
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                layers.update(range(int(lo), int(hi) + 1))
            else:
                layers.add(int(part))
    except ValueError:
        raise SiteError(f"layers={spec!r}: expected 'all', a list like '0,3,12' or a range like '0-12'") from None
    bad = sorted(l for l in layers if not 0 <= l < n_layers)
    if bad or not layers:
        raise SiteError(f"layers={spec!r}: layer(s) {bad} out of range; this model has layers 0..{n_layers - 1}")
    return sorted(layers)


def parse_sublayers(spec: str) -> list[str]:
    spec = str(spec).strip()
    if spec == "all":
        return list(SUBLAYERS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in names if s not in SUBLAYERS]
    if unknown or not names:
        raise SiteError(f"unknown sublayer(s) {unknown}; choose from {', '.join(SUBLAYERS)} or 'all'")
    return [s for s in SUBLAYERS if s in names]


def stored_sites(layers: Iterable[int], sublayers: Iterable[str]) -> list[Site]:
    """The arrays a harvest of these layers and sublayers writes (resid_pre resolved, deduplicated)."""
    return sorted({Site(l, s).stored() for l in layers for s in sublayers})


def decoder_layers(model) -> torch.nn.ModuleList:
    inner = getattr(model, "model", model)
    return inner.layers


def _hook_point(model, site: Site) -> tuple[torch.nn.Module, str]:
    """(module, "input" | "output"): the module whose input or output is this site's activation."""
    layer = decoder_layers(model)[site.layer]
    return {
        "resid_pre": (layer, "input"),
        "attn_z": (layer.self_attn.o_proj, "input"),
        "attn_out": (layer.post_attention_layernorm, "output"),
        "resid_mid": (layer.pre_feedforward_layernorm, "input"),
        "mlp_out": (layer.post_feedforward_layernorm, "output"),
        "resid_post": (layer, "output"),
    }[site.sublayer]


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value, new):
    return (new, *value[1:]) if isinstance(value, tuple) else new


@contextmanager
def capture(model, sites: Iterable[Site | tuple[int, str]]) -> Iterator[dict[Site, torch.Tensor]]:
    """Under this context every forward stores each site's activation ([batch, seq, width]) in the
    yielded dict, keyed by Site (the last forward wins)."""
    store: dict[Site, torch.Tensor] = {}
    handles = []
    for s in sites:
        site = s if isinstance(s, Site) else Site(*s)
        module, where = _hook_point(model, site)
        if where == "input":
            def hook(mod, args, kwargs, site=site):
                store[site] = args[0] if args else kwargs["hidden_states"]
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            def hook(mod, args, output, site=site):
                store[site] = _first(output)
            handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def splice(model, layer: int, sublayer: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Under this context the forward replaces activation `a` of the site by `fn(a)`.

    resid_mid is not a tensor any module receives whole (the layer adds attention's output to its
    saved residual), so it is replaced through attn_out: attn_out' = fn(resid_pre + attn_out) - resid_pre.
    """
    site = Site(layer, sublayer)
    if sublayer not in SUBLAYERS:
        raise SiteError(f"unknown sublayer {sublayer!r}; choose from {', '.join(SUBLAYERS)}")
    handles = []
    if sublayer == "resid_mid":
        layer_mod = decoder_layers(model)[layer]
        saved = {}

        def save_input(mod, args, kwargs):
            saved["resid_pre"] = args[0] if args else kwargs["hidden_states"]

        def replace_mid(mod, args, output):
            resid_pre = saved["resid_pre"]
            return fn(resid_pre + output) - resid_pre

        handles.append(layer_mod.register_forward_pre_hook(save_input, with_kwargs=True))
        handles.append(layer_mod.post_attention_layernorm.register_forward_hook(replace_mid))
    else:
        module, where = _hook_point(model, site)
        if where == "input":
            def hook(mod, args, kwargs):
                if args:
                    return (fn(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            def hook(mod, args, output):
                return _replace_first(output, fn(_first(output)))
            handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _StopForward(Exception):
    pass


@torch.no_grad()
def forward_until(model, input_ids: torch.Tensor, last_layer: int) -> None:
    """Run the decoder stack on `input_ids` and stop right after layer `last_layer`: the deeper
    layers, the final norm and the unembedding never run. Pair with `capture`."""
    def stop(mod, args, output):
        raise _StopForward

    handle = decoder_layers(model)[last_layer].register_forward_hook(stop)
    try:
        getattr(model, "model", model)(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
