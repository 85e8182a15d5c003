"""Where the project lives: the one place that names the repository the Colab badges open, the notebooks'
set-up cell clones and a shared model's card links to. A fork sets its own owner/name (and branch) here and
runs ``python -m newllm_nb.notebook.links``; tests/test_notebooks.py checks that every link matches."""

REPOSITORY = "newllm-nb/newllm-nb"
BRANCH = "main"


def clone_url(repository: str = REPOSITORY) -> str:
    return f"https://github.com/{repository}"


def badge_url(notebook: str, repository: str = REPOSITORY, branch: str = BRANCH) -> str:
    """The Colab address that opens ``notebooks/<notebook>.ipynb`` of this repository."""
    return f"https://colab.research.google.com/github/{repository}/blob/{branch}/notebooks/{notebook}.ipynb"
