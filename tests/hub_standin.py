"""A local stand-in for the Hugging Face hub's file API, enough for huggingface_hub's hf_hub_download.

What huggingface_hub 2.4 needs (file_download.get_hf_file_metadata / _get_metadata_or_catch_error):
  HEAD {endpoint}/{repo_id}/resolve/{revision}/{filename}
    -> X-Repo-Commit (the commit the revision resolves to), an ETag or X-Linked-Etag (names the cache
       blob; for LFS files the sha256 of the content), and the size (X-Linked-Size, or Content-Length
       on a non-redirect answer). Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound).
  LFS files answer with a 302 whose Location is on another origin (the CDN); the library then GETs that
  URL directly, without the Authorization header. Small files (config.json) answer 200 directly.
This stand-in serves one repository at one commit, with a second listening socket as the "CDN".
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".bin", ".safetensors")


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class HubRepo:
    repo_id: str
    commit: str
    files: dict[str, bytes]
    # Bytes actually sent for a file, when they must differ from what the metadata advertises
    # (a transfer that corrupts data without changing its length).
    served_instead: dict[str, bytes] = field(default_factory=dict)
    # When set, every /resolve/ request must carry "Authorization: Bearer <token>".
    token: str | None = None
    branches: tuple[str, ...] = ("main",)


class HubStandIn:
    """Run as a context manager: `with HubStandIn(repo) as hub: ... hub.endpoint ...`."""

    def __init__(self, repo: HubRepo):
        self.repo = repo
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class(self._answer_hub))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class(self._answer_cdn))
        self._threads = [
            threading.Thread(target=server.serve_forever, daemon=True) for server in (self._hub, self._cdn)
        ]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_origin(self) -> str:
        # "localhost" rather than 127.0.0.1: a different origin, as the real CDN is.
        return f"http://localhost:{self._cdn.server_address[1]}"

    def __enter__(self) -> HubStandIn:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()

    def _handler_class(self, answer):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                standin._record(self)
                answer(self, send_body=False)

            def do_GET(self):
                standin._record(self)
                answer(self, send_body=True)

            def log_message(self, *args):
                pass

        return Handler

    def _record(self, request: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append((request.command, request.path, dict(request.headers)))

    @staticmethod
    def _reply(request, status: int, headers: dict[str, str], body: bytes = b"", send_body: bool = True) -> None:
        request.send_response(status)
        for name, value in headers.items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if send_body and body:
            request.wfile.write(body)

    def _answer_hub(self, request, send_body: bool) -> None:
        repo = self.repo
        prefix = f"/{repo.repo_id}/resolve/"
        path = unquote(urlsplit(request.path).path)
        if not path.startswith(prefix) or path.count("/") < 4:
            self._reply(request, 404, {"X-Error-Code": "RepoNotFound"}, b"Repository not found", send_body)
            return
        if repo.token is not None and request.headers.get("Authorization") != f"Bearer {repo.token}":
            # What the hub answers for a private repository without a valid token.
            self._reply(request, 401, {"X-Error-Code": "RepoNotFound"}, b"Invalid credentials", send_body)
            return
        revision, filename = path[len(prefix):].split("/", 1)
        if revision != repo.commit and revision not in repo.branches:
            self._reply(request, 404, {"X-Error-Code": "RevisionNotFound"}, b"Invalid rev id", send_body)
            return
        content = repo.files.get(filename)
        if content is None:
            self._reply(request, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit}, b"", send_body)
            return
        if filename.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(content).hexdigest()
            self._reply(
                request,
                302,
                {
                    "X-Repo-Commit": repo.commit,
                    "ETag": f'"{git_blob_sha1(content)}"',
                    "X-Linked-Etag": f'"{sha256}"',
                    "X-Linked-Size": str(len(content)),
                    "Location": f"{self.cdn_origin}/lfs/{sha256}",
                },
                send_body=send_body,
            )
            return
        body = repo.served_instead.get(filename, content)
        self._reply(
            request, 200, {"X-Repo-Commit": repo.commit, "ETag": f'"{git_blob_sha1(content)}"'}, body, send_body
        )

    def _answer_cdn(self, request, send_body: bool) -> None:
        sha256 = urlsplit(request.path).path.rsplit("/", 1)[-1]
        for filename, content in self.repo.files.items():
            if hashlib.sha256(content).hexdigest() == sha256:
                body = self.repo.served_instead.get(filename, content)
                self._reply(request, 200, {"Content-Type": "application/octet-stream"}, body, send_body)
                return
        self._reply(request, 404, {}, b"NoSuchKey", send_body)
