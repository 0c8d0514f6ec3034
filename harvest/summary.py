"""A human-readable summary of a cache: `python -m harvest.summary CACHE`."""
from __future__ import annotations

import sys
from pathlib import Path

from .store import CacheLocation


def print_summary(path: str | Path) -> None:
    """`path`: a local folder or an object-store URL."""
    location = CacheLocation.parse(path)
    group = location.call("reading", location.open_group, "r")
    a = dict(group.attrs)
    complete = group["complete"][:]
    print(f"cache {path}: format v{a['format_version']}, model {a['model']}, "
          f"{a['n_tokens']:,} tokens ({a['n_tokens'] // a['context_length']:,} sequences of "
          f"{a['context_length']}), {int(complete.sum())}/{len(complete)} chunks complete, "
          f"{location.bytes_stored() / 1e6:,.1f} MB {'stored' if location.remote else 'on disk'}, {a['storage_dtype']}, codec {a['codec']}")
    print(f"  {'site':<24}{'width':>7}{'E||x||^2':>14}{'variance':>14}{'||E x||':>12}")
    for key in a["sites"]:
        arr = group[key]
        s = dict(arr.attrs)
        if "mean_squared_norm" in s:
            print(f"  {key:<24}{arr.shape[1]:>7}{s['mean_squared_norm']:>14.4g}{s['variance']:>14.4g}"
                  f"{s['mean_norm']:>12.4g}")
        else:
            print(f"  {key:<24}{arr.shape[1]:>7}{'(statistics not final)':>40}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m harvest.summary CACHE")
    from .store import ObjectStoreError
    try:
        print_summary(sys.argv[1])
    except ObjectStoreError as e:
        sys.exit(f"error: {e}")
