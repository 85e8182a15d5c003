"""The Colab badges and set-up clone lines of the notebooks and README, kept pointing at the repository that
``newllm_nb/repository.py`` names.

    python -m newllm_nb.notebook.links            # rewrite every badge and clone line to REPOSITORY / BRANCH
    python -m newllm_nb.notebook.links --check    # list the files that name another repository (exit 1 if any)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ..repository import BRANCH, REPOSITORY, badge_url, clone_url

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# What a badge / clone line looks like for any repository, so that another repository's links are rewritten too.
_BADGE = re.compile(r"https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/[\w./-]+?/notebooks/"
                    r"(?P<nb>[\w-]+)\.ipynb")
_CLONE = re.compile(r"git clone -q --depth 1 (?:-b [\w./-]+ )?https://github\.com/[\w.-]+/[\w.-]+ ")


def link_files(root: Path = PROJECT_ROOT) -> list[Path]:
    """The files that carry badges or clone lines: every notebook (both halves of each pair) and README."""
    nbs = sorted((root / "notebooks").glob("*.ipynb")) + sorted((root / "notebooks").glob("*.py"))
    return nbs + [root / "README.md"]


def relink_text(text: str, repository: str = REPOSITORY, branch: str = BRANCH) -> str:
    """``text`` with every Colab badge and set-up clone line pointing at ``repository`` / ``branch``."""
    text = _BADGE.sub(lambda m: badge_url(m["nb"], repository, branch), text)
    branch_flag = "" if branch == "main" else f"-b {branch} "
    return _CLONE.sub(f"git clone -q --depth 1 {branch_flag}{clone_url(repository)} ", text)


def stale_links(root: Path = PROJECT_ROOT) -> list[str]:
    """Files whose badges or clone lines name another repository than ``REPOSITORY`` (empty: all agree)."""
    return [str(p.relative_to(root)) for p in link_files(root) if relink_text(p.read_text()) != p.read_text()]


def relink(root: Path = PROJECT_ROOT) -> list[Path]:
    """Rewrite badges and clone lines to ``REPOSITORY`` / ``BRANCH``; returns the files changed."""
    changed = []
    for p in link_files(root):
        old = p.read_text()
        new = relink_text(old)
        if new != old:
            p.write_text(new)
            changed.append(p)
    return changed


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        stale = stale_links()
        print(", ".join(stale) if stale else f"every badge and clone line points at {clone_url()} ({BRANCH})")
        return 1 if stale else 0
    if argv:
        print("usage: python -m newllm_nb.notebook.links [--check]", file=sys.stderr)
        return 2
    files = relink()
    print(f"{clone_url()} ({BRANCH}):", ", ".join(str(p.relative_to(PROJECT_ROOT)) for p in files)
          if files else "every badge and clone line already points here")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
