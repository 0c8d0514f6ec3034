"""Our `kernels` package versus Hugging Face's PyPI package of the same import name."""
import importlib.metadata
import subprocess
import sys
import textwrap

from tests.harvest_util import REPO


def test_ours_is_imported_and_transformers_does_not_mistake_it_for_hf_kernels():
    """Hugging Face's `kernels` distribution (required by transformers >= 5.25, hence the pin in
    pyproject.toml), installed, makes transformers import `kernels` for its models and find ours first
    from the repository root: harvest, eval and every Gemma 2 test fail far from the cause."""
    import kernels
    from transformers.utils import import_utils
    kernels.require_ours()
    assert hasattr(kernels, "jumprelu_sae")
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    assert dist is None, (f"the distribution {dist.metadata['Name']} {dist.version} is installed under the "
                          "import name 'kernels', which this project's kernels/ shadows (transformers >= 5.25 "
                          "requires it); reinstall with the pins of pyproject.toml (make install)")
    assert not import_utils.is_kernels_available()


def test_a_shadowing_kernels_package_fails_loudly(tmp_path):
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("def get_kernel(*a): pass\n")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        sys.path.insert(1, {str(REPO)!r})
        import train.loop
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    assert "not this project's kernels/ package" in result.stderr or "jumprelu_sae" in result.stderr
