"""No top-level folder of the checkout shadows an installed package, from the repository root.

kernels/, store/, proto/ and clients/ are installed as memsvc.kernels, memsvc.store, ... (pyproject's
package-dir). Hugging Face's `kernels` package, which transformers imports when a model module loads, has
the same top-level name as our kernels/ folder: when that folder was a regular package (it had an
`__init__.py`), any process whose import path held the repository root (`python -m pytest`, `python -c`,
`python -m memsvc` from the root) imported our folder as `kernels` and transformers failed
(`cannot import name 'CUDAProperties' from 'kernels'`). Now the folders are namespace portions, which
lose to an installed regular package wherever they are on the path.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = ("kernels", "store", "proto", "clients")


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", code] if code else [sys.executable, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_mapped_folders_are_not_regular_packages():
    for name in MAPPED:
        assert (ROOT / name).is_dir()
        assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py makes {name}/ shadow `{name}`"


def test_kernels_resolves_to_the_installed_package_in_this_process():
    # pytest runs with the root on sys.path (python -m pytest, pythonpath = ["."])
    assert str(ROOT) in [str(Path(p).resolve()) for p in sys.path if p]
    import transformers.integrations.hub_kernels  # noqa: F401  (imports `kernels` itself)
    import transformers.models.llama.modeling_llama  # noqa: F401
    import kernels

    assert kernels.__file__ is not None and not Path(kernels.__file__).resolve().is_relative_to(ROOT / "kernels")
    assert hasattr(kernels, "CUDAProperties")


def test_python_c_from_the_root_gets_the_installed_kernels():
    done = _run("import transformers.integrations.hub_kernels, transformers.models.llama.modeling_llama\n"
                "import kernels, memsvc.kernels.codec\n"
                "print(kernels.__file__); print(memsvc.kernels.codec.__file__)")
    assert done.returncode == 0, done.stderr[-2000:]
    theirs, ours = done.stdout.split()
    assert not Path(theirs).resolve().is_relative_to(ROOT / "kernels")
    assert Path(ours).resolve() == ROOT / "kernels" / "codec.py"


def test_python_m_memsvc_from_the_root():
    done = _run("", "-m", "memsvc", "serve", "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--data-dir" in done.stdout


def test_without_the_installed_kernels_no_code_of_ours_is_imported_as_kernels(tmp_path):
    """Hugging Face's package hidden (its site-packages entries left out of the path): `import kernels` from the
    root then finds only our folder as an empty namespace portion (Python's rule for a folder without
    `__init__.py`), which runs none of our modules and which transformers reports as unavailable (it checks
    the distribution's metadata)."""
    import kernels
    import transformers

    site = Path(transformers.__file__).resolve().parents[1]
    if Path(kernels.__file__).resolve().parents[1] != site:
        pytest.skip("kernels is not installed beside transformers")
    view = tmp_path / "site"
    view.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith("kernels"):
            (view / entry.name).symlink_to(entry)
    code = (f"import sys; sys.path[:] = [''] + [p for p in sys.path if p and 'site-packages' not in p] + [{str(view)!r}]\n"
            "import transformers.integrations.hub_kernels as hk\n"
            "from transformers.utils import is_kernels_available\n"
            "import kernels\n"
            "print(is_kernels_available(), kernels.__file__, len(vars(kernels)) <= 8, "
            "any(m.startswith('kernels.') for m in sys.modules))")
    done = _run(code, "-S")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "None", "True", "False"]
