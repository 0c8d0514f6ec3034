"""The installed environment: nothing installed under an import name that a package of ours shadows."""
import importlib.metadata
from pathlib import Path

import pytest

import kernels

REPO = Path(__file__).resolve().parent.parent


def test_no_installed_distribution_is_shadowed_by_our_kernels_package():
    """Hugging Face's `kernels` (required by transformers >= 5.25, hence the pin in pyproject.toml) is
    imported by transformers as `kernels`; run from the repository root, Python finds this project's
    kernels/ first and transformers fails to import its models. Installed, it would break harvest,
    eval and every test that builds a Gemma 2 model, with an ImportError far from the cause."""
    assert Path(kernels.__file__).resolve().is_relative_to(REPO)       # ours is what `kernels` names here
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    pytest.fail(f"the distribution {dist.metadata['Name']} {dist.version} is installed under the import name "
                "'kernels', which this project's kernels/ shadows (transformers >= 5.25 requires it); "
                "reinstall with the pins of pyproject.toml (make install)")
