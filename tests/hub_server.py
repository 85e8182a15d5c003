"""A local stand-in for the Hugging Face Hub on 127.0.0.1, for ``HF_ENDPOINT``: it serves folders as model repos
the way the hub serves files (``/<repo>/resolve/<revision>/<file>``, HEAD and GET, with ``X-Repo-Commit`` and
``ETag``) and answers the model-info API (``/api/models/<repo>[/revision/<revision>]``). A missing repo,
revision or file gets the hub's 404 with its ``X-Error-Code``, so huggingface_hub raises what it raises there.

``HubServer({"alice/model": {"main": folder, "v1": other_folder}})``: each revision is a folder; its commit
hash is a SHA-1 of the revision's name and files, so another folder is another commit.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class HubServer:
    def __init__(self, repos: dict[str, dict[str, Path]]) -> None:
        self.repos = {repo: {rev: Path(folder) for rev, folder in revs.items()} for repo, revs in repos.items()}
        self.requests: list[str] = []  # "METHOD path", in order
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                server._answer(self, body=False)

            def do_GET(self) -> None:
                server._answer(self, body=True)

            def log_message(self, *args) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- the hub's answers ----------------------------------------------------------------------------
    def commit(self, repo: str, rev: str) -> str:
        folder = self.repos[repo][rev]
        names = sorted(p.name for p in folder.iterdir() if p.is_file())
        return hashlib.sha1(f"{repo}@{rev}:{names}:{[(folder / n).stat().st_size for n in names]}".encode()).hexdigest()

    def _resolve(self, repo: str, rev: str):
        """(commit, folder) for a branch/tag name or a commit hash, None when the repo has no such revision."""
        for name in self.repos[repo]:
            if rev in (name, self.commit(repo, name)):
                return self.commit(repo, name), self.repos[repo][name]
        return None

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append(f"{h.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = "/".join(parts[2:4])
            rev = parts[5] if len(parts) >= 6 and parts[4] == "revision" else "main"
            return self._model_info(h, repo, rev, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            return self._file(h, repo, rev, name, body)
        self._error(h, 404, None, body)

    def _found(self, h, repo: str, rev: str, body: bool):
        """(commit, folder) of the repo at ``rev``, or None once the hub's 404 for it is sent."""
        if repo not in self.repos:
            return self._error(h, 404, "RepoNotFound", body)
        found = self._resolve(repo, rev)
        if found is None:
            return self._error(h, 404, "RevisionNotFound", body)
        return found

    def _file(self, h, repo: str, rev: str, name: str, body: bool) -> None:
        found = self._found(h, repo, rev, body)
        if found is None:
            return
        commit, folder = found
        f = folder / name
        if not f.is_file():
            return self._error(h, 404, "EntryNotFound", body, commit)
        data = f.read_bytes()
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("X-Repo-Commit", commit)
        h.end_headers()
        if body:
            h.wfile.write(data)

    def _model_info(self, h, repo: str, rev: str, body: bool) -> None:
        found = self._found(h, repo, rev, body)
        if found is None:
            return
        commit, folder = found
        info = {"_id": commit[:24], "id": repo, "modelId": repo, "sha": commit, "private": False, "disabled": False,
                "gated": False, "downloads": 0, "likes": 0, "tags": [], "library_name": "newllm-nb",
                "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": p.name} for p in sorted(folder.iterdir()) if p.is_file()]}
        data = json.dumps(info).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    @staticmethod
    def _error(h, status: int, code, body: bool, commit: str = "") -> None:
        data = json.dumps({"error": code or "Not Found"}).encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
            h.send_header("X-Error-Message", code)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)
