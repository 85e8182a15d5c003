"""One dependency list: pyproject.toml. requirements.txt repeats it for pip -r, and Colab's set-up reads it from
the installed package's metadata."""

from pathlib import Path

import pytest

from newllm_nb.notebook import colab

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + project["optional-dependencies"]["notebooks"]


def test_requirements_txt_is_pyprojects_list():
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(ln for ln in lines if ln) == sorted(r.split("#")[0].strip() for r in _pyproject())


def test_colab_installs_what_the_package_metadata_lists(monkeypatch):
    listed = ["torch>=2.4", "huggingface_hub>=1.0", 'ipywidgets>=7.7; extra == "notebooks"',
              'pytest>=7; extra == "dev"']
    monkeypatch.setattr(colab.importlib.metadata, "requires", lambda name: listed)
    assert colab.requirements() == [("torch>=2.4", "torch"), ("huggingface_hub>=1.0", "huggingface_hub"),
                                    ("ipywidgets>=7.7", "ipywidgets")]
