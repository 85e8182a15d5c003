"""Hub ids and a shared model's files: ``owner/name`` (optionally ``@revision``) -> a local folder.

A shared model is a folder (on disk, or a repository on the Hugging Face Hub) holding ``model.safetensors``
(the weights, in the checkpoint format, with the run's record and its SHA-256), ``config.json``,
``tokenizer.json`` and ``README.md`` (the model card). ``fetch`` downloads the first three into the
Hugging Face cache, all from one commit, and returns the folder; ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and
the cache work as everywhere in ``huggingface_hub``. Every failure is a ``HubError`` of one line.

``huggingface_hub`` is imported only when a hub id is used: training and local checkpoints never need it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
CARD_FILE = "README.md"
SHARED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_-])?"
_HUB_ID = re.compile(rf"({_NAME})/({_NAME})(?:@([^\s@]+))?")
LOGIN_HELP = ("log in with huggingface_hub.login() (or `hf auth login`), or set HF_TOKEN; in Colab add HF_TOKEN "
              "under Secrets (the key icon) and allow this notebook to read it")


class HubError(ValueError):
    """A hub id that is malformed, not there, not reachable, or not a newllm_nb model: one line saying which."""


def parse_hub_id(source: str) -> Optional[tuple[str, Optional[str]]]:
    """``(repo_id, revision)`` for ``owner/name`` or ``owner/name@revision``, else None."""
    m = _HUB_ID.fullmatch(str(source).strip())
    if not m or ".." in m.group(0) or "--" in m.group(1) + m.group(2):
        return None
    return f"{m.group(1)}/{m.group(2)}", m.group(3)


def check_repo_id(repo: str) -> str:
    """``repo`` if it is a valid ``OWNER/NAME`` (no revision), else HubError naming what is wrong."""
    parsed = parse_hub_id(repo) if isinstance(repo, str) else None
    if parsed is None or parsed[1] is not None or len(parsed[0].split("/")[1]) > 96:
        raise HubError(f"malformed repo id {repo!r}: give OWNER/NAME, e.g. alice/newllm-wikitext (letters, digits, "
                       "'-', '_' and '.'; no '--' or '..'; a name of at most 96 characters)")
    return parsed[0]


def locate(source: Union[str, Path], revision: Optional[str] = None, cache_dir: Optional[str] = None) -> Path:
    """A local file or folder as given; a hub id (``owner/name[@revision]``) fetched into the cache.

    A path that exists always wins over a hub id of the same spelling. Anything else is returned as a path,
    so the checkpoint loader reports it as not found."""
    p = Path(source)
    if p.exists():
        if revision:
            raise HubError(f"revision {revision!r} applies to hub ids; {p} is a local path")
        return p
    parsed = parse_hub_id(str(source)) if isinstance(source, str) else None
    if parsed is None:
        if isinstance(source, str) and re.fullmatch(r"[^/\s.~][^/\s]*/[^/\s]+", source.strip()):
            raise HubError(f"{source}: no such file or folder here, and not a valid hub id (OWNER/NAME[@REVISION]: "
                           "letters, digits, '-', '_' and '.'; no '--' or '..')")
        return p
    repo, rev = parsed
    if rev and revision and rev != revision:
        raise HubError(f"{source}: two revisions given ({rev!r} in the id, {revision!r} as an argument)")
    return fetch(repo, rev or revision, cache_dir=cache_dir, not_local=True)


def fetch(repo_id: str, revision: Optional[str] = None, *, cache_dir: Optional[str] = None,
          token: Union[str, bool, None] = None, force_download: bool = False, local_files_only: bool = False,
          not_local: bool = False) -> Path:
    """Download the shared files of ``repo_id`` at ``revision`` (default: main) into the Hugging Face cache
    and return their folder. ``config.json`` names the commit; the other files come from that same commit."""
    from huggingface_hub import hf_hub_download

    check_repo_id(repo_id)
    kw = dict(cache_dir=cache_dir, token=token, force_download=force_download, local_files_only=local_files_only)
    with hub_errors(repo_id, revision, not_local=not_local):
        config = Path(hf_hub_download(repo_id, CONFIG_FILE, revision=revision, **kw))
        commit = config.parent.name  # the cache keeps every commit's files in snapshots/<commit hash>/
        for name in (WEIGHTS_FILE, TOKENIZER_FILE):
            hf_hub_download(repo_id, name, revision=commit, **kw)
    return config.parent


def hub_offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: Optional[str] = None, not_local: bool = False) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one HubError line naming the repo and what to do."""
    from huggingface_hub import errors

    where = f"{repo_id}{f'@{revision}' if revision else ''}"
    here = "no such file or folder here, and " if not_local else ""
    try:
        yield
    except errors.RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision!r} on the Hugging Face Hub") from None
    except errors.GatedRepoError:
        raise HubError(f"{repo_id} is gated: accept its terms on the hub, then {LOGIN_HELP}") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{where}: {here}no model {repo_id} on the Hugging Face Hub ({hub_endpoint()}); if it is "
                       f"private, {LOGIN_HELP}") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        # raised when the hub cannot be asked and the cache does not hold the files
        why = ("the hub is offline (HF_HUB_OFFLINE=1; unset it to download)" if hub_offline()
               else f"the Hugging Face Hub at {hub_endpoint()} cannot be reached (no network?)")
        raise HubError(f"{where}: {here}not in the local Hugging Face cache, and {why}") from None
    except errors.EntryNotFoundError as e:
        name = next((f for f in (*SHARED_FILES, CARD_FILE) if f in str(e)), "the shared files")
        raise HubError(f"{where} on the Hugging Face Hub holds no {name}: not a model shared by newllm_nb") from None
    except errors.HFValidationError as e:
        raise HubError(f"malformed repo id or revision {where!r}: {str(e).splitlines()[0]}") from None
    except errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise HubError(f"{where}: the Hugging Face Hub answered HTTP {status}: "
                       f"{(getattr(e, 'server_message', None) or str(e)).splitlines()[0]}") from None
    except OSError as e:  # a connection that breaks mid-download, a full disk
        raise HubError(f"{where}: {type(e).__name__}: {e}") from None
    except Exception as e:
        if type(e).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3"):  # the HTTP client's own
            raise HubError(f"{where}: the Hugging Face Hub at {hub_endpoint()} cannot be reached "
                           f"({type(e).__name__}: {e})") from None
        raise
