"""Errors about what the user pointed evaluation at (missing files, sites, widths): the command line
prints their message alone, without a traceback."""
from __future__ import annotations

import sys
from contextlib import contextmanager


class EvalInputError(ValueError):
    pass


def _user_errors() -> tuple:
    from harvest.model import ModelLoadError
    from harvest.sites import SiteError
    from train.cache_reader import CacheError
    return (EvalInputError, CacheError, ModelLoadError, SiteError, FileNotFoundError)


@contextmanager
def clear_errors():
    """Turn the errors above into `error: <message>` on stderr and exit status 1."""
    try:
        yield
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
