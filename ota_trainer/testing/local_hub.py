"""A Hugging Face Hub-compatible HTTP server on loopback, storing repos on disk.

For tests and the offline demo: the real ``huggingface_hub`` client (and ``transformers``,
``ModelCard``...) talks to it through ``HF_ENDPOINT``, so code tested against it runs
unchanged against huggingface.co. It serves the routes listed in
``docs/hub-protocol.md``: repo creation and deletion, preupload, NDJSON commits, optional
Git LFS uploads, ``resolve`` downloads (with ``Range``), repo info, tree listing, refs,
commits, paths-info and model-card YAML validation.

In a test (see :mod:`ota_trainer.testing.pytest_fixtures` for the ``local_hub`` fixture)::

    >>> with LocalHub(tmp_path / "hub") as hub:
    ...     api = HfApi(endpoint=hub.url)
    ...     api.create_repo("me/tiny")

From a shell (prints the URL, serves until Ctrl-C)::

    python -m ota_trainer.testing.local_hub --root /tmp/hub --port 8900 --token secret --lfs
    HF_ENDPOINT=http://127.0.0.1:8900 HF_TOKEN=secret HF_HUB_DISABLE_XET=1 python train.py

Set ``HF_ENDPOINT`` before ``huggingface_hub`` is imported: the client copies it into
module constants at import time. With ``lfs=True`` also set ``HF_HUB_DISABLE_XET=1``
(otherwise the client uploads LFS files with Xet, which this server does not speak).

Storage under ``root`` (git-like; blobs are shared by all repos)::

    objects/sha256/ab/cdef...                    immutable file contents, by sha256
    repos/{models|datasets|spaces}/{ns}/{name}/
        repo.json                                id, type, private, creation date
        refs.json                                {"branches": {name: sha}, "tags": {name: sha}}
        commits/{sha}.json                       parents, title, message, date, tree {path: entry}

A tree entry is ``{"sha256", "size", "oid", "lfs"}`` where ``oid`` is the git blob id the
Hub reports (of the content for regular files, of the LFS pointer for LFS files).

Auth: with ``token=None`` every request is allowed (private repos included). With a token,
writes need ``authorization: Bearer <token>``, private repos are invisible without it
(401 ``RepoNotFound``, which the client raises as ``RepositoryNotFoundError``), and a wrong
token is refused everywhere, as on the Hub. LFS upload URLs carry their own signature.
These checks come before a request body is read, and bodies are capped (``max_json_size``,
``max_commit_size``, ``max_lfs_size``: 413 beyond).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["LocalHub", "Fault", "main"]

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
DEFAULT_BRANCH = "main"
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores files from 10 MB in LFS
# Request body caps (LocalHub arguments; a larger body is answered 413 without being read).
MAX_JSON_SIZE = 8 * 1024 * 1024  # JSON API bodies: preupload/LFS batches are <= 256 files, ~250 KB
MAX_COMMIT_SIZE = 256 * 1024 * 1024  # a regular-mode NDJSON commit (base64 content: ~190 MB of files)
MAX_LFS_SIZE = 5 * 1024**3  # one LFS object (the demo's SmolLM2 checkpoints are 540 MB)
_CHUNK = 1024 * 1024
# An unread request body of up to this many bytes (a request answered without its body:
# auth error, injected fault...) is read and discarded so the connection stays usable;
# a larger or unknown-length one ends the connection (answered with "Connection: close").
_DRAIN_LIMIT = 1024 * 1024
# Closing a socket with unread input makes TCP send a reset, which can destroy the response
# before the client reads it (RFC 9112, 9.6). So a connection closed with its request body
# unread is half-closed after the response and its input discarded until the client closes,
# the declared body has arrived, nothing came for _LINGER_IDLE s, or _LINGER_SECONDS passed.
_LINGER_SECONDS = 10.0
_LINGER_IDLE = 2.0
_SHA1 = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT = re.compile(rb'"content"\s*:\s*"')
_INITIAL_GITATTRIBUTES = b"".join(
    f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n".encode()
    for ext in ("bin", "ckpt", "gguf", "h5", "npy", "npz", "onnx", "pt", "pth", "safetensors", "tar.gz", "zip")
)
_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_id(data: bytes) -> str:
    """``sha1(b"blob <size>\\0" + data)``, the id git (and the Hub) gives a file's content."""
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _front_matter(text: str) -> dict | None:
    """The YAML front matter of a model card as a dict (``None`` if absent or not a mapping).

    Raises:
        ValueError: the front matter is not valid YAML.
    """
    import yaml

    m = re.match(r"\A---[ \t]*\r?\n(.*?)(?:\r?\n)?^---[ \t]*$", text, re.S | re.M)
    if m is None:
        return None
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        raise ValueError(f"invalid YAML front matter: {e}") from e
    return data if isinstance(data, dict) else None


class _HTTPError(Exception):
    """An error answered to the client as JSON, with the Hub's ``X-Error-Code`` header."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}


def _repo_not_found(repo: str, status: int = 404) -> _HTTPError:
    return _HTTPError(status, f"Repository not found: {repo}", code="RepoNotFound")


@dataclass
class Fault:
    """A fault injected into the next ``times`` matching requests (see :meth:`LocalHub.inject_faults`)."""

    status: int | None
    drop_after_bytes: int | None
    times: int
    path_contains: str
    method: str | None

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and self.path_contains in path and self.method in (None, method)


@dataclass(frozen=True)
class _Repo:
    type: str  # model | dataset | space
    namespace: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def url_path(self) -> str:
        return f"{URL_PREFIXES[self.type]}{self.id}"


class _Store:
    """Repos, commits, refs and blobs on disk. Writes are serialised by one lock; files are
    replaced atomically, so reads need no lock."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.RLock()
        (root / "objects" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    # -- low level --------------------------------------------------------------------
    def repo_dir(self, repo: _Repo) -> Path:
        return self.root / "repos" / f"{repo.type}s" / repo.namespace / repo.name

    def blob_path(self, sha256: str) -> Path:
        return self.root / "objects" / "sha256" / sha256[:2] / sha256[2:]

    def _write_json(self, path: Path, data: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "tmp" / f"{secrets.token_hex(8)}.json"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)

    def tmp_file(self) -> Path:
        return self.root / "tmp" / f"{secrets.token_hex(8)}.part"

    def put_bytes(self, data: bytes) -> str:
        """Store ``data`` as a blob; returns its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha)
        if not path.is_file():
            tmp = self.tmp_file()
            tmp.write_bytes(data)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.replace(path)
        return sha

    def put_file(self, tmp: Path, sha256: str) -> None:
        """Move an uploaded file (already checked against ``sha256``) into the blob store."""
        path = self.blob_path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.replace(path)

    def has_blob(self, sha256: str, size: int) -> bool:
        if not _SHA256.fullmatch(sha256):
            return False
        path = self.blob_path(sha256)
        return path.is_file() and path.stat().st_size == size

    # -- repos ------------------------------------------------------------------------
    def meta(self, repo: _Repo) -> dict | None:
        path = self.repo_dir(repo) / "repo.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def refs(self, repo: _Repo) -> dict:
        return json.loads((self.repo_dir(repo) / "refs.json").read_text())

    def create(self, repo: _Repo, *, private: bool, author: str) -> bool:
        """Create ``repo`` with an initial commit holding ``.gitattributes``; ``False`` if it exists."""
        with self.lock:
            if self.meta(repo) is not None:
                return False
            meta = {
                "id": repo.id,
                "type": repo.type,
                "private": private,
                "createdAt": _now(),
                "_id": secrets.token_hex(12),
            }
            self._write_json(self.repo_dir(repo) / "refs.json", {"branches": {}, "tags": {}})
            sha = self.new_commit(
                repo,
                None,
                {},
                [("file", ".gitattributes", _INITIAL_GITATTRIBUTES)],
                title="initial commit",
                message="",
                author=author,
            )
            self._write_json(self.repo_dir(repo) / "refs.json", {"branches": {DEFAULT_BRANCH: sha}, "tags": {}})
            self._write_json(self.repo_dir(repo) / "repo.json", meta)  # last: the repo exists once complete
            return True

    def delete(self, repo: _Repo) -> bool:
        with self.lock:
            if self.meta(repo) is None:
                return False
            shutil.rmtree(self.repo_dir(repo))
            return True

    def update_meta(self, repo: _Repo, **changes: Any) -> None:
        with self.lock:
            meta = self.meta(repo)
            meta.update(changes)
            self._write_json(self.repo_dir(repo) / "repo.json", meta)

    def set_ref(self, repo: _Repo, kind: str, name: str, sha: str | None) -> None:
        with self.lock:
            refs = self.refs(repo)
            if sha is None:
                refs[kind].pop(name, None)
            else:
                refs[kind][name] = sha
            self._write_json(self.repo_dir(repo) / "refs.json", refs)

    # -- commits ----------------------------------------------------------------------
    def commit(self, repo: _Repo, sha: str) -> dict | None:
        path = self.repo_dir(repo) / "commits" / f"{sha}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def resolve(self, repo: _Repo, rev: str) -> str | None:
        """A branch, tag (optionally as ``refs/heads/...``/``refs/tags/...``) or full commit sha -> commit sha."""
        refs = self.refs(repo)
        for kind, prefix in (("branches", "refs/heads/"), ("tags", "refs/tags/")):
            name = rev[len(prefix) :] if rev.startswith(prefix) else rev
            if name in refs[kind]:
                return refs[kind][name]
        if _SHA1.fullmatch(rev) and self.commit(repo, rev) is not None:
            return rev
        return None

    def history(self, repo: _Repo, sha: str) -> Iterator[dict]:
        """Commits from ``sha`` back to the first one (first parents)."""
        commit = self.commit(repo, sha)
        while commit is not None:
            yield commit
            commit = self.commit(repo, commit["parents"][0]) if commit["parents"] else None

    def new_commit(
        self, repo: _Repo, parent: str | None, tree: dict, ops: list[tuple], *, title: str, message: str, author: str
    ) -> str:
        """Apply ``ops`` to ``tree`` and write the commit object (refs are not touched).

        ``ops``: ``("file", path, bytes)``, ``("lfsFile", path, sha256, size)``,
        ``("deletedFile", path)``, ``("deletedFolder", path)``.
        """
        tree = dict(tree)
        for op in ops:
            kind, path = op[0], op[1]
            if kind == "file":
                data = op[2]
                tree[path] = {
                    "sha256": self.put_bytes(data),
                    "size": len(data),
                    "oid": _git_blob_id(data),
                    "lfs": False,
                }
            elif kind == "lfsFile":
                sha256, size = op[2], op[3]
                if not self.has_blob(sha256, size):
                    raise _HTTPError(422, f"LFS object {sha256} ({size} bytes) for {path!r} was not uploaded")
                pointer = _lfs_pointer(sha256, size)
                tree[path] = {"sha256": sha256, "size": size, "oid": _git_blob_id(pointer), "lfs": True}
            elif kind == "deletedFile":
                if tree.pop(path, None) is None:
                    raise _HTTPError(404, f"cannot delete {path!r}: no such file", code="EntryNotFound")
            elif kind == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in tree if p.startswith(prefix)]
                if not doomed:
                    raise _HTTPError(404, f"cannot delete folder {path!r}: no such folder", code="EntryNotFound")
                for p in doomed:
                    del tree[p]
        for path in tree:  # a path cannot be both a file and a folder
            parts = path.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in tree:
                    raise _HTTPError(400, f"{path!r} conflicts with the file {'/'.join(parts[:i])!r}")
        date = _now()
        body = {
            "parents": [parent] if parent else [],
            "title": title,
            "message": message,
            "authors": [author],
            "date": date,
            "tree": dict(sorted(tree.items())),
        }
        unique = json.dumps([body, time.time_ns(), secrets.token_hex(4)], sort_keys=True)
        sha = hashlib.sha1(unique.encode()).hexdigest()
        self._write_json(self.repo_dir(repo) / "commits" / f"{sha}.json", {"id": sha, **body})
        return sha


def _valid_name(part: str) -> bool:
    """A namespace or repo name as the Hub allows them (which also keeps paths inside ``root``)."""
    return bool(re.fullmatch(r"\w[\w.-]*", part)) and ".." not in part and len(part) <= 96


def _check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise _HTTPError(400, f"invalid path in repo: {path!r}")
    return path


def _b64decode(data: memoryview) -> bytes:
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except TypeError:  # Python 3.10: no strict mode
        return binascii.a2b_base64(data)


def _parse_ndjson(body: bytes) -> list[dict]:
    """Parse a commit payload. A line's base64 ``content`` is decoded straight from the body
    (``value["content"]`` becomes bytes), so an 800 MB line is never copied or made a ``str``."""
    items, view, pos = [], memoryview(body), 0
    while pos < len(body):
        end = body.find(b"\n", pos)
        end = len(body) if end < 0 else end
        line_start, pos = pos, end + 1
        m = _CONTENT.search(body, line_start, end)
        content = None
        try:
            if m is not None:
                close = body.index(b'"', m.end(), end)
                content = _b64decode(view[m.end() : close])
                line = body[line_start : m.end()] + body[close:end]
            else:
                line = body[line_start:end]
            if not line.strip():
                continue
            item = json.loads(line)
            if content is not None:
                item["value"]["content"] = content
        except (ValueError, TypeError, KeyError, binascii.Error) as e:
            raise _HTTPError(400, f"malformed NDJSON commit payload: {type(e).__name__}: {e}") from e
        items.append(item)
    view.release()
    return items


class _Handler(BaseHTTPRequestHandler):
    """One HTTP/1.1 connection (keep-alive). Every response has a Content-Length.

    Request bodies: a route checks access first (token, repo, write permission, LFS URL
    signature) and only then reads its body, through :meth:`_read_body` / :meth:`_iter_body`,
    which refuse a body over the route's cap with 413 before reading it (or, for chunked
    bodies, as soon as the cap is passed). ``Expect: 100-continue`` is answered only when the
    body is actually wanted. A body left unread is discarded after the response if it is
    small (the connection is reused); otherwise the response says ``Connection: close`` and
    the connection is closed gracefully (see ``_LINGER_SECONDS``).
    """

    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1"
    timeout = 120  # idle keep-alive connections end eventually
    hub: LocalHub  # set on the per-hub subclass

    _ROUTES: list[tuple[tuple[str, ...], re.Pattern, str]] = []

    # -- plumbing ---------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (BaseHTTPRequestHandler's signature)
        logger.debug("%s %s", self.address_string(), format % args)

    def parse_request(self) -> bool:
        # per-request state (set before the base class may answer an error or call handle_expect_100)
        self._body_state = "none"  # none | unread | partial | done | bad | gone
        self._length: int | None = None  # declared Content-Length (None: chunked or no body)
        self._chunked = False
        self._consumed = 0  # body bytes read so far (Content-Length bodies)
        self._expect_pending = False  # "Expect: 100-continue" not answered yet
        self._force_close = False
        self._connection_header_sent = False
        return super().parse_request()

    def handle_expect_100(self) -> bool:
        # Do not invite the body before the route has checked access: "100 Continue" is sent
        # by _read_body; a request answered without it ends the connection.
        self._expect_pending = True
        return True

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() == "connection":
            self._connection_header_sent = True
        super().send_header(keyword, value)

    def end_headers(self) -> None:
        # last moment to decide whether this connection can serve another request
        state = getattr(self, "_body_state", None)
        if state is not None and not self._connection_header_sent and (self.close_connection or not self._reusable()):
            self.send_header("Connection", "close")
        super().end_headers()

    def _reusable(self) -> bool:
        """Whether the connection can take another request once this response is sent."""
        if self._force_close:
            return False
        if self._body_state in ("none", "done"):
            return True
        return (
            self._body_state == "unread"
            and not self._expect_pending
            and self._length is not None
            and self._length - self._consumed <= _DRAIN_LIMIT
        )

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        raw_path, self.query = split.path, parse_qs(split.query)
        self.hub._log_request(self.command, unquote(raw_path))
        try:
            self._parse_framing()
            fault = self.hub._take_fault(self.command, unquote(raw_path), download=False)
            if fault is not None:
                raise _HTTPError(fault.status, f"injected fault: HTTP {fault.status} (LocalHub.inject_faults)")
            for methods, pattern, name in self._ROUTES:
                m = pattern.fullmatch(raw_path)
                if m and self.command in methods:
                    args = {k: unquote(v) if v is not None else None for k, v in m.groupdict().items()}
                    getattr(self, name)(**args)
                    break
            else:
                raise _HTTPError(404, f"LocalHub does not serve {self.command} {raw_path}")
        except _HTTPError as e:
            if e.status == 413:
                self._force_close = True  # a body refused for its size is not drained, however small
            self._send_json(
                e.status,
                {"error": e.message, **e.extra},
                headers={
                    **({"X-Error-Code": e.code} if e.code else {}),
                    "X-Error-Message": e.message.encode("ascii", "replace").decode().replace("\n", " "),
                    **e.headers,
                },
            )
        except (ConnectionError, TimeoutError):
            self._body_state = "gone"
            self.close_connection = True
            return
        except Exception as e:  # a server bug: answer 500 (the client shows it) and keep serving
            logger.exception("LocalHub: %s %s failed", self.command, self.path)
            self.close_connection = True  # headers may already be out: do not reuse the connection
            self._send_json(500, {"error": f"LocalHub internal error: {type(e).__name__}: {e}"})
        self._finish_body()

    # -- request bodies ---------------------------------------------------------------
    def _parse_framing(self) -> None:
        """Read how the body is delimited (RFC 9112, 6.3) from the headers; read nothing.

        Raises:
            _HTTPError: 400 for a Content-Length or Transfer-Encoding the server cannot
                delimit a body with (the connection is then closed).
        """
        te = [c.strip().lower() for v in self.headers.get_all("Transfer-Encoding", []) for c in v.split(",")]
        te = [c for c in te if c]
        lengths = [v.strip() for h in self.headers.get_all("Content-Length", []) for v in h.split(",")]
        if te:
            if te[-1] != "chunked":
                self._body_state = "bad"
                raise _HTTPError(
                    400, f"unsupported Transfer-Encoding {', '.join(te)!r}: send Content-Length or chunked"
                )
            self._chunked, self._body_state = True, "unread"
            self._force_close = bool(lengths)  # both: chunked wins, and the connection must not be reused
        elif lengths:
            if len(set(lengths)) != 1 or not re.fullmatch(r"[0-9]{1,18}", lengths[0]):
                self._body_state = "bad"
                raise _HTTPError(400, f"invalid Content-Length {', '.join(lengths)!r}")
            self._length = int(lengths[0])
            self._body_state = "unread" if self._length else "none"
        if self._body_state == "none":
            self._expect_pending = False  # nothing to invite

    def _start_body(self, limit: int, what: str) -> bool:
        """Checks before reading a body of at most ``limit`` bytes; ``False``: there is none.

        Raises:
            _HTTPError: 411 without Content-Length or chunked encoding; 413 when the declared
                length is over ``limit`` (nothing is read).
        """
        if self._body_state == "none":
            return False
        if self._body_state != "unread":
            raise RuntimeError(f"LocalHub: request body read twice ({self._body_state})")
        if self._length is not None and self._length > limit:
            raise _HTTPError(413, f"{what} of {self._length} bytes is over LocalHub's limit of {limit} bytes")
        if self._expect_pending:  # the client waits for this before sending the body
            self._expect_pending = False
            self.wfile.write(f"{self.protocol_version} 100 Continue\r\n\r\n".encode())
        self._body_state = "partial"
        return True

    def _iter_body(
        self, limit: int, what: str = "request body", *, required: bool = True, chunk: int = _CHUNK
    ) -> Iterator[bytes]:
        """The request body in pieces, never more than ``limit`` bytes in total.

        Raises:
            _HTTPError: 411 (``required`` and no body framing), 413 (over ``limit``), 400
                (malformed chunked encoding).
            ConnectionError: the client closed the connection mid-body.
        """
        if not self._start_body(limit, what):
            if required and self._length is None and not self._chunked:
                raise _HTTPError(411, f"{what} required: send it with a Content-Length (or chunked)")
            return
        if self._chunked:
            total = 0
            while True:
                line = self.rfile.readline(1026)
                if not line:
                    raise ConnectionError("client closed the connection mid-body")
                size = line.split(b";", 1)[0].strip()
                if not line.endswith(b"\n") or not re.fullmatch(rb"[0-9a-fA-F]{1,15}", size):
                    raise _HTTPError(400, "malformed chunked request body")
                size = int(size, 16)
                if size == 0:
                    for _ in range(100):  # trailers, up to the empty line
                        line = self.rfile.readline(8192)
                        if line in (b"\r\n", b"\n"):
                            break
                        if not line:
                            raise ConnectionError("client closed the connection mid-body")
                    else:
                        raise _HTTPError(400, "too many trailer fields in chunked request body")
                    self._body_state = "done"
                    return
                total += size
                if total > limit:
                    raise _HTTPError(413, f"{what} is over LocalHub's limit of {limit} bytes")
                yield from self._read_exact(size, chunk)
                if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                    raise _HTTPError(400, "malformed chunked request body")
        else:
            yield from self._read_exact(self._length, chunk)
            self._body_state = "done"

    def _read_exact(self, n: int, chunk: int) -> Iterator[bytes]:
        while n > 0:
            data = self.rfile.read(min(n, chunk))
            if not data:
                raise ConnectionError("client closed the connection mid-body")
            n -= len(data)
            if not self._chunked:
                self._consumed += len(data)
            yield data

    def _read_body(self, limit: int, what: str = "request body", *, required: bool = True) -> bytes:
        """The whole request body (at most ``limit`` bytes; see :meth:`_iter_body`)."""
        if self._body_state == "unread" and not self._chunked:  # one read, no copy
            return b"".join(self._iter_body(limit, what, required=required, chunk=max(1, self._length or 0)))
        buf = bytearray()
        for data in self._iter_body(limit, what, required=required):
            buf += data
        return bytes(buf)

    def _json(self, *, required: bool = True) -> dict:
        """The request body as a JSON object (``{}`` when empty), at most ``hub.max_json_size`` bytes."""
        body = self._read_body(self.hub.max_json_size, "JSON request body", required=required)
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError as e:
            raise _HTTPError(400, f"request body is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise _HTTPError(400, "request body must be a JSON object")
        return data

    def _finish_body(self) -> None:
        """After the response: make the connection ready for the next request, or close it."""
        if self._body_state in ("none", "done", "gone"):
            return
        if not self.close_connection and self._reusable():  # small unread body: discard it
            try:
                for _ in self._read_exact(self._length - self._consumed, _CHUNK):
                    pass
                self._body_state = "done"
                return
            except (OSError, ValueError):
                self.close_connection = True
                return
        self.close_connection = True
        self._linger()

    def _linger(self) -> None:
        """Half-close, then discard input for a bounded time before the socket is closed, so
        the client can finish sending and read the response (RFC 9112, 9.6)."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            return
        left = self._length - self._consumed if self._length is not None else None
        deadline = time.monotonic() + _LINGER_SECONDS
        try:
            while left is None or left > 0:
                wait = min(_LINGER_IDLE, deadline - time.monotonic())
                if wait <= 0:
                    break
                self.connection.settimeout(wait)
                data = self.rfile.read1(_CHUNK if left is None else min(_CHUNK, left))
                if not data:
                    break
                if left is not None:
                    left -= len(data)
        except (OSError, ValueError):
            pass
        self._body_state = "gone"

    def _send_json(
        self, status: int, data: Any, *, headers: dict[str, str] | None = None, content_type: str = "application/json"
    ) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _base_url(self) -> str:
        return f"http://{self.headers.get('Host') or self.hub.url.split('://', 1)[1]}"

    # -- auth -------------------------------------------------------------------------
    def _authorized(self) -> bool:
        """``True`` with the right token (or when the hub has none), ``False`` without one.

        Raises:
            _HTTPError: 401 for a wrong token, as the Hub does.
        """
        if self.hub.token is None:
            return True
        auth = self.headers.get("Authorization", "")
        if not auth:
            return False
        scheme, _, tok = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(tok.strip().encode(), self.hub.token.encode()):
            raise _HTTPError(401, _INVALID_CREDENTIALS)
        return True

    def _require_write(self) -> None:
        if not self._authorized():
            raise _HTTPError(401, "Authorization required: send a token with write access (set HF_TOKEN)")

    def _repo(self, t: str | None, ns: str, name: str, *, write: bool = False) -> _Repo:
        """The repo named in the URL, after the access checks."""
        repo = _Repo(REPO_TYPES.get(t or "models", "model"), ns, name)
        if not (_valid_name(ns) and _valid_name(name)):
            raise _repo_not_found(repo.id)
        if write:
            self._require_write()
        meta = self.hub._store.meta(repo)
        if meta is None:
            self._authorized()  # a wrong token is reported as such
            raise _repo_not_found(repo.id)
        if meta["private"] and not self._authorized():
            raise _repo_not_found(repo.id, status=401)
        return repo

    def _sha(self, repo: _Repo, rev: str | None) -> str:
        sha = self.hub._store.resolve(repo, rev or DEFAULT_BRANCH)
        if sha is None:
            raise _HTTPError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return sha

    def _branch(self, repo: _Repo, rev: str | None) -> str:
        """A branch name (writes go to branches only)."""
        rev = rev or DEFAULT_BRANCH
        rev = rev[len("refs/heads/") :] if rev.startswith("refs/heads/") else rev
        if rev not in self.hub._store.refs(repo)["branches"]:
            raise _HTTPError(404, f"Invalid rev id: {rev} (not a branch)", code="RevisionNotFound")
        return rev

    # -- routes: repos ----------------------------------------------------------------
    def create_repo(self) -> None:
        self._require_write()
        data = self._json()
        rtype = data.get("type") or "model"
        if rtype not in URL_PREFIXES:
            raise _HTTPError(400, f"unsupported repo type {rtype!r}; LocalHub serves {sorted(URL_PREFIXES)}")
        name, ns = data.get("name"), data.get("organization") or self.hub.user
        if not (_valid_name(str(name)) and _valid_name(str(ns))):
            raise _HTTPError(400, f"invalid repo id {ns}/{name}: use letters, digits, '-', '_' and '.'")
        private = data.get("visibility") == "private" if "visibility" in data else bool(data.get("private"))
        repo = _Repo(rtype, ns, name)
        url = f"{self._base_url()}/{repo.url_path}"
        if not self.hub._store.create(repo, private=private, author=self.hub.user):
            # the body still carries the URL: create_repo(exist_ok=True) reads it
            raise _HTTPError(409, "You already created this repo", extra={"url": url})
        logger.info("LocalHub: created %s %s%s", rtype, repo.id, " (private)" if private else "")
        self._send_json(200, {"url": url, "name": repo.id, "id": self.hub._store.meta(repo)["_id"]})

    def delete_repo(self) -> None:
        self._require_write()
        data = self._json()
        repo = _Repo(data.get("type") or "model", data.get("organization") or self.hub.user, data.get("name") or "")
        valid = repo.type in URL_PREFIXES and _valid_name(repo.namespace) and _valid_name(repo.name)
        if not valid or not self.hub._store.delete(repo):
            raise _repo_not_found(repo.id)
        self._send_json(200, {})

    def repo_settings(self, t: str, ns: str, name: str) -> None:
        repo = self._repo(t, ns, name, write=True)
        data = self._json()
        if "visibility" in data:
            self.hub._store.update_meta(repo, private=data["visibility"] == "private")
        elif "private" in data:
            self.hub._store.update_meta(repo, private=bool(data["private"]))
        self._send_json(200, {})

    def repo_info(self, t: str, ns: str, name: str, rev: str | None = None) -> None:
        repo = self._repo(t, ns, name)
        store = self.hub._store
        sha = self._sha(repo, rev)
        meta, commit = store.meta(repo), store.commit(repo, sha)
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, e in commit["tree"].items():
            s: dict[str, Any] = {"rfilename": path}
            if blobs:
                s.update(size=e["size"], blobId=e["oid"])
                if e["lfs"]:
                    s["lfs"] = {
                        "sha256": e["sha256"],
                        "size": e["size"],
                        "pointerSize": len(_lfs_pointer(e["sha256"], e["size"])),
                    }
            siblings.append(s)
        card = None
        if "README.md" in commit["tree"]:
            try:
                card = _front_matter(store.blob_path(commit["tree"]["README.md"]["sha256"]).read_text(errors="replace"))
            except ValueError:
                card = None
        tags = (card or {}).get("tags") or []
        tags = [tags] if isinstance(tags, str) else [str(x) for x in tags if x is not None]
        info = {
            "_id": meta["_id"],
            "id": repo.id,
            "author": repo.namespace,
            "sha": sha,
            "lastModified": commit["date"],
            "createdAt": meta["createdAt"],
            "private": meta["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "siblings": siblings,
            "usedStorage": sum(e["size"] for e in commit["tree"].values()),
        }
        if repo.type == "model":
            info["modelId"] = repo.id
        for key in ("library_name", "pipeline_tag"):
            if card and isinstance(card.get(key), str):
                info[key] = card[key]
        if card is not None:
            info["cardData"] = card
        self._send_json(200, info)

    def whoami(self) -> None:
        if not self._authorized():
            raise _HTTPError(401, _INVALID_CREDENTIALS)
        user = self.hub.user
        self._send_json(
            200,
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": None,
                "emailVerified": False,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            },
        )

    def validate_yaml(self) -> None:
        data = self._json()
        try:
            _front_matter(str(data.get("content", "")))
        except ValueError as e:
            self._send_json(400, {"errors": [{"message": str(e)}], "warnings": []})
            return
        self._send_json(200, {"errors": [], "warnings": []})

    # -- routes: refs and history -----------------------------------------------------
    def list_refs(self, t: str, ns: str, name: str) -> None:
        repo = self._repo(t, ns, name)
        refs = self.hub._store.refs(repo)
        prs = self.query.get("include_prs", ["0"])[0] in ("1", "true")
        branches = [
            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
            for b, s in refs["branches"].items()
            if not b.startswith("refs/pr/")
        ]
        out = {
            "branches": branches,
            "converts": [],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in refs["tags"].items()],
        }
        if prs:
            out["pullRequests"] = [
                {"name": b, "ref": b, "targetCommit": s}
                for b, s in refs["branches"].items()
                if b.startswith("refs/pr/")
            ]
        self._send_json(200, out)

    def list_commits(self, t: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(t, ns, name)
        commits = self.hub._store.history(repo, self._sha(repo, rev))
        self._send_json(
            200,
            [
                {
                    "id": c["id"],
                    "title": c["title"],
                    "message": c["message"],
                    "date": c["date"],
                    "authors": [{"user": a} for a in c["authors"]],
                }
                for c in commits
            ],
        )

    def branch(self, t: str, ns: str, name: str, branch: str) -> None:
        repo = self._repo(t, ns, name, write=True)
        data = self._json(required=False) if self.command == "POST" else {}  # no body: from main
        store = self.hub._store
        with store.lock:
            exists = branch in store.refs(repo)["branches"]
            if self.command == "DELETE":
                if not exists:
                    raise _HTTPError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
                store.set_ref(repo, "branches", branch, None)
            else:
                if exists:
                    raise _HTTPError(409, f"Reference already exists: refs/heads/{branch}")
                store.set_ref(repo, "branches", branch, self._sha(repo, data.get("startingPoint")))
        self._send_json(200, {})

    def tag(self, t: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(t, ns, name, write=True)
        data = self._json() if self.command == "POST" else {}
        store = self.hub._store
        with store.lock:
            if self.command == "DELETE":  # DELETE .../tag/{tag}
                if rev not in store.refs(repo)["tags"]:
                    raise _HTTPError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
                store.set_ref(repo, "tags", rev, None)
            else:  # POST .../tag/{revision} {"tag": name}
                tag = data.get("tag")
                if not tag:
                    raise _HTTPError(400, "missing 'tag' in the request body")
                if tag in store.refs(repo)["tags"]:
                    raise _HTTPError(409, f"Tag already exists: {tag}")
                store.set_ref(repo, "tags", tag, self._sha(repo, rev))
        self._send_json(200, {})

    # -- routes: files ----------------------------------------------------------------
    def _entries(self, repo: _Repo, commit: dict, prefix: str, *, recursive: bool, expand: bool) -> list[dict]:
        """Tree entries (files and folders) under ``prefix`` in the Hub's ``tree`` format."""
        tree = commit["tree"]
        base = prefix.strip("/")
        under = {p: e for p, e in tree.items() if not base or p.startswith(base + "/")}
        if base and not under:
            raise _HTTPError(
                404,
                f"{base!r} is not a folder in {repo.id}@{commit['id']}",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit["id"]},
            )
        files, folders = [], {}
        for path, e in under.items():
            parts = (path[len(base) + 1 :] if base else path).split("/")
            for i in range(1, len(parts) if recursive else min(2, len(parts))):
                folder = "/".join(([base] if base else []) + parts[:i])
                # a folder's id: a hash of every file below it
                folders.setdefault(folder, hashlib.sha1()).update(f"{path}\0{e['oid']}\n".encode())
            if recursive or len(parts) == 1:
                files.append(path)
        last = self._last_commits(repo, commit, files + list(folders)) if expand else {}
        out = []
        for folder, h in sorted(folders.items()):
            out.append({"type": "directory", "oid": h.hexdigest(), "size": 0, "path": folder, **last.get(folder, {})})
        for path in sorted(files):
            e = tree[path]
            item = {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}
            if e["lfs"]:
                item["lfs"] = {
                    "oid": e["sha256"],
                    "size": e["size"],
                    "pointerSize": len(_lfs_pointer(e["sha256"], e["size"])),
                }
            if expand:
                item["securityFileStatus"] = {
                    "status": "safe",
                    "avScan": {"virusFound": False, "virusNames": None},
                    "pickleImportScan": None,
                }
            out.append({**item, **last.get(path, {})})
        return out

    def _last_commits(self, repo: _Repo, commit: dict, paths: list[str]) -> dict[str, dict]:
        """``{path: {"lastCommit": ...}}``: the oldest commit since which each path is unchanged."""

        def view(c: dict, path: str) -> Any:
            if path in c["tree"]:
                return c["tree"][path]["oid"]
            return sorted((p, e["oid"]) for p, e in c["tree"].items() if p.startswith(path + "/")) or None

        pending, found = set(paths), {}
        history = list(self.hub._store.history(repo, commit["id"]))
        for cur, parent in zip(history, history[1:] + [None]):
            for path in list(pending):
                if parent is None or view(parent, path) != view(cur, path):
                    found[path] = {"lastCommit": {"id": cur["id"], "title": cur["title"], "date": cur["date"]}}
                    pending.discard(path)
            if not pending:
                break
        return found

    def tree(self, t: str, ns: str, name: str, rev: str, path: str | None = None) -> None:
        repo = self._repo(t, ns, name)
        commit = self.hub._store.commit(repo, self._sha(repo, rev))
        recursive, expand = (self.query.get(k, ["false"])[0].lower() in ("1", "true") for k in ("recursive", "expand"))
        self._send_json(200, self._entries(repo, commit, path or "", recursive=recursive, expand=expand))

    def paths_info(self, t: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(t, ns, name)
        commit = self.hub._store.commit(repo, self._sha(repo, rev))
        if self.headers.get("Content-Type", "").startswith("application/json"):
            data = self._json()
            paths, expand = data.get("paths", []), bool(data.get("expand"))
        else:
            body = self._read_body(self.hub.max_json_size, "paths-info request body")
            form = parse_qs(body.decode(errors="replace"))
            paths, expand = form.get("paths", []), form.get("expand", ["False"])[0].lower() in ("1", "true")
        out = []
        for p in [paths] if isinstance(paths, str) else paths:
            p = p.strip("/")
            parent = p.rsplit("/", 1)[0] if "/" in p else ""
            try:
                siblings = self._entries(repo, commit, parent, recursive=False, expand=expand)
            except _HTTPError:
                continue
            out += [e for e in siblings if e["path"] == p]
        self._send_json(200, out)

    def resolve(self, t: str | None, ns: str, name: str, rev: str, path: str) -> None:
        repo = self._repo(t, ns, name)
        store = self.hub._store
        sha = self._sha(repo, rev)
        entry = store.commit(repo, sha)["tree"].get(path)
        if entry is None:
            raise _HTTPError(
                404, f"Entry not found: {path} in {repo.id}@{sha}", code="EntryNotFound", headers={"X-Repo-Commit": sha}
            )
        size = entry["size"]
        etag = entry["sha256"] if entry["lfs"] else entry["oid"]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
        start, end, status = 0, size, 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m is None or not (m.group(1) or m.group(2)):
                raise _HTTPError(416, f"unsupported Range {rng!r}", headers={"Content-Range": f"bytes */{size}"})
            if m.group(1):
                start, end = int(m.group(1)), min(size, int(m.group(2)) + 1 if m.group(2) else size)
            else:  # suffix range: the last N bytes
                start = max(0, size - int(m.group(2)))
            if start >= size or start >= end:
                raise _HTTPError(
                    416, f"Range {rng!r} outside the file ({size} bytes)", headers={"Content-Range": f"bytes */{size}"}
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        fault = self.hub._take_fault(self.command, unquote(urlsplit(self.path).path), download=True)
        limit = end - start if fault is None else min(end - start, fault.drop_after_bytes)
        with open(store.blob_path(entry["sha256"]), "rb") as f:
            f.seek(start)
            while limit > 0:
                data = f.read(min(_CHUNK, limit))
                if not data:
                    break
                self.wfile.write(data)
                limit -= len(data)
        if fault is not None:
            logger.info(
                "LocalHub: dropping the connection after %d bytes of %s (injected fault)", fault.drop_after_bytes, path
            )
            self.wfile.flush()
            self.close_connection = True

    # -- routes: uploads --------------------------------------------------------------
    def preupload(self, t: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(t, ns, name, write=True)
        branch = self._branch(repo, rev)
        data = self._json()
        sha = self.hub._store.refs(repo)["branches"][branch]
        tree = self.hub._store.commit(repo, sha)["tree"]
        files = []
        for f in data.get("files", []):
            try:
                sample = base64.b64decode(f.get("sample") or "")
            except (binascii.Error, ValueError):
                sample = b""
            size = f.get("size", 0)
            lfs = self.hub.lfs and size > 0 and (size >= self.hub.lfs_min_size or b"\0" in sample)  # NUL: binary
            mode = "lfs" if lfs else "regular"
            e = tree.get(f.get("path"))
            oid = None if e is None or e["lfs"] != lfs else (e["sha256"] if lfs else e["oid"])
            files.append({"path": f.get("path"), "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json(200, {"files": files, "commitOid": sha})

    def commit(self, t: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(t, ns, name, write=True)
        self._branch(repo, rev)  # checked again under the lock, once the payload is parsed
        store = self.hub._store
        hint = "" if self.hub.lfs else " (start the hub with lfs=True / --lfs so large files go through Git LFS)"
        body = self._read_body(self.hub.max_commit_size, f"commit payload{hint}")
        items = _parse_ndjson(body)
        del body  # the decoded contents are all we keep
        header, ops = {}, []
        for item in items:
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64" or not isinstance(value.get("content"), bytes):
                    raise _HTTPError(400, f"file {value.get('path')!r}: expected base64 'content'")
                ops.append(("file", _check_path(value.get("path", "")), value["content"]))
            elif key == "lfsFile":
                if value.get("algo", "sha256") != "sha256" or not _SHA256.fullmatch(str(value.get("oid"))):
                    raise _HTTPError(400, f"lfsFile {value.get('path')!r} needs a sha256 oid")
                ops.append(("lfsFile", _check_path(value.get("path", "")), value["oid"], int(value.get("size", -1))))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append((key, _check_path(value.get("path", "").rstrip("/"))))
            else:
                raise _HTTPError(400, f"unknown commit operation {key!r}")
        del items
        create_pr = self.query.get("create_pr", ["0"])[0] in ("1", "true")
        with store.lock:
            branch = self._branch(repo, rev)
            head = store.refs(repo)["branches"][branch]
            parent = header.get("parentCommit")
            if parent and parent != head:
                raise _HTTPError(412, f"parentCommit {parent} is not the head of {branch} ({head}): the branch moved")
            pr_url = None
            if create_pr:
                nums = [int(b.rsplit("/", 1)[1]) for b in store.refs(repo)["branches"] if b.startswith("refs/pr/")]
                num = max(nums, default=0) + 1
                branch = f"refs/pr/{num}"
                pr_url = f"{self._base_url()}/{repo.url_path}/discussions/{num}"
            sha = store.new_commit(
                repo,
                head,
                store.commit(repo, head)["tree"],
                ops,
                author=self.hub.user,
                title=header.get("summary") or "Upload files",
                message=header.get("description") or "",
            )
            store.set_ref(repo, "branches", branch, sha)
        logger.info("LocalHub: %s@%s -> %s (%d operations)", repo.id, branch, sha[:8], len(ops))
        self._send_json(
            200,
            {
                "commitOid": sha,
                "commitUrl": f"{self._base_url()}/{repo.url_path}/commit/{sha}",
                "pullRequestUrl": pr_url,
                "success": True,
            },
        )

    def lfs_batch(self, t: str | None, ns: str, name: str) -> None:
        repo = self._repo(t, ns, name, write=True)
        data = self._json()
        if data.get("operation", "upload") != "upload":
            raise _HTTPError(400, "LocalHub's LFS endpoint only accepts uploads; download with /resolve")
        objects = []
        for obj in data.get("objects", []):
            oid, size = str(obj.get("oid")), obj.get("size")
            if not _SHA256.fullmatch(oid) or not isinstance(size, int) or size < 0:
                error = {"code": 422, "message": "invalid oid or size"}
                objects.append({"oid": oid, "size": size if isinstance(size, int) else 0, "error": error})
                continue
            if size > self.hub.max_lfs_size:
                error = {
                    "code": 413,
                    "message": f"{size} bytes is over LocalHub's LFS object limit of "
                    f"{self.hub.max_lfs_size} bytes (LocalHub(max_lfs_size=...))",
                }
                objects.append({"oid": oid, "size": size, "error": error})
                continue
            out = {"oid": oid, "size": size, "authenticated": True}
            if not self.hub._store.has_blob(oid, size):
                sig = self.hub._sign(oid, size)
                out["actions"] = {
                    "upload": {"href": f"{self._base_url()}/_lfs/{oid}?size={size}&sig={sig}", "header": {}},
                    "verify": {"href": f"{self._base_url()}/{repo.url_path}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(out)
        self._send_json(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def lfs_put(self, oid: str) -> None:
        size = self.query.get("size", ["-1"])[0]
        size = int(size) if size.isdigit() else -1
        if not hmac.compare_digest(self.query.get("sig", [""])[0], self.hub._sign(oid, size)):
            raise _HTTPError(403, "invalid or missing LFS upload signature (ask the batch endpoint for an upload URL)")
        if size > self.hub.max_lfs_size:  # signed before the limit was lowered
            raise _HTTPError(
                413, f"LFS object of {size} bytes is over LocalHub's limit of {self.hub.max_lfs_size} bytes"
            )
        if self._length is not None and self._length != size:
            raise _HTTPError(400, f"Content-Length {self._length} is not the size of the LFS object ({size} bytes)")
        store = self.hub._store
        tmp = store.tmp_file()
        h, n = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as f:
                for data in self._iter_body(size, "LFS upload"):
                    h.update(data)
                    f.write(data)
                    n += len(data)
            if h.hexdigest() != oid or n != size:
                # e.g. the file changed on the client between hashing and upload (Trainer pushes in the background)
                logger.warning("LocalHub: LFS upload of %s refused: got sha256 %s (%d bytes)", oid, h.hexdigest(), n)
                raise _HTTPError(
                    400,
                    f"uploaded content does not match the LFS object: got sha256 {h.hexdigest()} "
                    f"({n} bytes), expected {oid} ({size} bytes)",
                )
            store.put_file(tmp, oid)
        finally:
            tmp.unlink(missing_ok=True)
        self._send_json(200, {})

    def lfs_verify(self, t: str | None, ns: str, name: str) -> None:
        self._repo(t, ns, name, write=True)
        data = self._json()
        if not self.hub._store.has_blob(str(data.get("oid")), data.get("size", -1)):
            raise _HTTPError(404, f"LFS object {data.get('oid')} ({data.get('size')} bytes) is not stored")
        self._send_json(200, {})


def _route(methods: str, pattern: str, name: str) -> tuple[tuple[str, ...], re.Pattern, str]:
    repo = r"/(?P<ns>[^/]+)/(?P<name>[^/]+)"
    pattern = pattern.replace("{api}", r"/api/(?P<t>models|datasets|spaces)" + repo)
    pattern = pattern.replace("{repo}", r"(?:/(?P<t>datasets|spaces))?" + repo)
    return tuple(methods.split("|")), re.compile(pattern), name


_Handler._ROUTES = [
    _route("POST", r"/api/repos/create", "create_repo"),
    _route("DELETE", r"/api/repos/delete", "delete_repo"),
    _route("POST", r"/api/validate-yaml", "validate_yaml"),
    _route("GET", r"/api/whoami-v2", "whoami"),
    _route("PUT", r"{api}/settings", "repo_settings"),
    _route("GET", r"{api}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    _route("POST", r"{api}/preupload/(?P<rev>[^/]+)", "preupload"),
    _route("POST", r"{api}/commit/(?P<rev>[^/]+)", "commit"),
    _route("GET", r"{api}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    _route("GET", r"{api}/refs", "list_refs"),
    _route("GET", r"{api}/commits/(?P<rev>[^/]+)", "list_commits"),
    _route("POST", r"{api}/paths-info/(?P<rev>[^/]+)", "paths_info"),
    _route("POST|DELETE", r"{api}/branch/(?P<branch>[^/]+)", "branch"),
    _route("POST|DELETE", r"{api}/tag/(?P<rev>[^/]+)", "tag"),
    _route("GET|HEAD", r"{repo}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    _route("POST", r"{repo}\.git/info/lfs/objects/batch", "lfs_batch"),
    _route("POST", r"{repo}\.git/info/lfs/objects/verify", "lfs_verify"),
    _route("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", "lfs_put"),
]


class LocalHub:
    """A Hub-compatible server on loopback, in a background thread, storing repos under ``root``.

    Args:
        root: storage folder (created if needed; reused across restarts).
        host: interface to bind (loopback by default).
        port: TCP port; 0 picks a free one (read it from :attr:`url`).
        token: when set, writes need ``authorization: Bearer <token>`` and private repos are
            hidden from requests without it. ``None``: everything is allowed.
        lfs: answer ``"lfs"`` at preupload for binary files and files of ``lfs_min_size``
            bytes or more, and serve the Git LFS batch/upload/verify endpoints. Uploads then
            stream to disk instead of travelling base64 inside the commit (the client needs
            ``HF_HUB_DISABLE_XET=1``). ``False``: every file is committed "regular".
        lfs_min_size: size from which files go to LFS in ``lfs`` mode (the Hub's 10 MB).
        user: the account name whoami reports; repos created without a namespace go there.
        max_json_size: largest JSON API request body (preupload, LFS batch, create repo,
            validate-yaml...), in bytes. Default 8 MiB.
        max_commit_size: largest NDJSON commit payload, in bytes. In regular mode file
            contents travel base64 inside it (4/3 of their size); default 256 MiB, i.e. about
            190 MiB of files per commit (the tests push commits of under 0.5 MB). Larger uploads belong in ``lfs`` mode.
        max_lfs_size: largest LFS object, in bytes (the batch endpoint refuses larger ones).
            Default 5 GiB. LFS uploads stream to disk, so this bounds disk use, not memory.

    Request bodies are read only after the access checks (so an unauthorized request is
    refused without its body being read) and a body over its cap is answered 413 without
    being read.

    Attributes:
        requests: ``(method, unquoted path)`` of every request received, in order.

    Example:
        >>> with LocalHub(tmp_path, token="tok", lfs=True) as hub:
        ...     HfApi(endpoint=hub.url, token="tok").create_repo("me/tiny", private=True)
        ...     hub.inject_faults(status=503, times=1, path_contains="/resolve/")
    """

    def __init__(
        self,
        root: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        *,
        lfs: bool = False,
        lfs_min_size: int = LFS_MIN_SIZE,
        user: str = "local-user",
        max_json_size: int = MAX_JSON_SIZE,
        max_commit_size: int = MAX_COMMIT_SIZE,
        max_lfs_size: int = MAX_LFS_SIZE,
    ):
        for arg, value in (
            ("max_json_size", max_json_size),
            ("max_commit_size", max_commit_size),
            ("max_lfs_size", max_lfs_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"LocalHub: {arg}={value!r} must be a positive number of bytes")
        self.max_json_size, self.max_commit_size, self.max_lfs_size = max_json_size, max_commit_size, max_lfs_size
        self.root = Path(root)
        self.host, self.port = host, port
        self.token = token
        self.lfs, self.lfs_min_size = lfs, lfs_min_size
        self.user = user
        self.requests: list[tuple[str, str]] = []
        self._store = _Store(self.root)
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._secret = secrets.token_bytes(16)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` (the value for ``HF_ENDPOINT``); available once started."""
        if self._server is None:
            raise ConfigError("LocalHub.url is known once the server is started: call start() first")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> LocalHub:
        """Bind the port and serve in a daemon thread. Returns ``self``."""
        if self._server is not None:
            return self
        handler = type("LocalHubHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer((self.host, self.port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name=f"LocalHub:{self.url}", daemon=True
        )
        self._thread.start()
        logger.info("LocalHub serving %s at %s", self.root, self.url)
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (repos stay on disk)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def inject_faults(
        self,
        *,
        status: int | None = None,
        drop_after_bytes: int | None = None,
        times: int = 1,
        path_contains: str = "",
        method: str | None = None,
    ) -> Fault:
        """Make the next ``times`` matching requests fail.

        Args:
            status: answer this HTTP status (e.g. 503) instead of serving the request; a
                request body up to 1 MiB is discarded and the connection stays usable, a
                larger one is not read and the connection is closed after the answer.
            drop_after_bytes: for file downloads (``GET .../resolve/...``): send the headers and
                this many bytes of the body, then close the connection (the client sees a
                truncated transfer and resumes with ``Range``).
            times: how many matching requests fail.
            path_contains: only requests whose unquoted path contains this string.
            method: only this HTTP method (``"GET"``, ``"HEAD"``...); default any.

        Returns:
            The :class:`Fault`; its ``times`` counts down as requests fail.

        Raises:
            ConfigError: not exactly one of ``status`` and ``drop_after_bytes``.

        Example:
            >>> hub.inject_faults(status=503, times=1, path_contains="/resolve/", method="HEAD")
            >>> hub.inject_faults(drop_after_bytes=1000, path_contains="model.safetensors")
        """
        if (status is None) == (drop_after_bytes is None):
            raise ConfigError(
                f"inject_faults: pass exactly one of status= or drop_after_bytes= "
                f"(got status={status!r}, drop_after_bytes={drop_after_bytes!r})"
            )
        if status is not None and not 400 <= status <= 599:
            raise ConfigError(f"inject_faults: status={status} is not an HTTP error status (400-599)")
        if drop_after_bytes is not None and drop_after_bytes < 0:
            raise ConfigError(f"inject_faults: drop_after_bytes={drop_after_bytes} must be >= 0")
        fault = Fault(status, drop_after_bytes, times, path_contains, method.upper() if method else None)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Forget faults not yet triggered."""
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str, *, download: bool) -> Fault | None:
        """The first pending fault for this request: status faults before serving, drop
        faults (``download=True``) once a file body is about to be sent."""
        with self._lock:
            for fault in self._faults:
                if (fault.drop_after_bytes is not None) == download and fault.matches(method, path):
                    fault.times -= 1
                    return fault
        return None

    def _log_request(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def _sign(self, oid: str, size: int) -> str:
        return hmac.new(self._secret, f"{oid}:{size}".encode(), hashlib.sha256).hexdigest()


def main(argv: list[str] | None = None) -> int:
    """``python -m ota_trainer.testing.local_hub --root DIR [--port PORT] [--token TOK] [--lfs]``"""
    p = argparse.ArgumentParser(prog="python -m ota_trainer.testing.local_hub", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="storage folder (created if needed)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    p.add_argument("--token", help="require this token for writes and private repos")
    p.add_argument(
        "--lfs",
        action="store_true",
        help="store binary and large files with Git LFS (clients need HF_HUB_DISABLE_XET=1)",
    )
    p.add_argument("--lfs-min-size", type=int, default=LFS_MIN_SIZE, help="LFS threshold in bytes (default: 10 MB)")
    p.add_argument("--user", default="local-user", help="account name reported by whoami")
    p.add_argument(
        "--max-json-size", type=int, default=MAX_JSON_SIZE, help="largest JSON request body in bytes (default: 8 MiB)"
    )
    p.add_argument(
        "--max-commit-size",
        type=int,
        default=MAX_COMMIT_SIZE,
        help="largest commit payload in bytes (default: 256 MiB; regular-mode files travel inside it)",
    )
    p.add_argument(
        "--max-lfs-size", type=int, default=MAX_LFS_SIZE, help="largest LFS object in bytes (default: 5 GiB)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    try:
        hub = LocalHub(
            args.root,
            args.host,
            args.port,
            args.token,
            lfs=args.lfs,
            lfs_min_size=args.lfs_min_size,
            user=args.user,
            max_json_size=args.max_json_size,
            max_commit_size=args.max_commit_size,
            max_lfs_size=args.max_lfs_size,
        )
    except ConfigError as e:
        p.error(str(e))
    hub.start()
    print(hub.url, flush=True)  # the banner: scripts read the URL from the first line
    env = f"HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1" + (" HF_TOKEN=<token>" if args.token else "")
    logger.info("clients: %s (Ctrl-C stops)", env)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
