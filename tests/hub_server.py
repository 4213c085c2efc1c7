"""In-memory, Hub-compatible HTTP server for tests (stdlib only).

It implements the endpoints that ``huggingface_hub`` 2.4's real HTTP client calls, so tests can push and pull
for real without internet::

    with HubServer(tokens={"hf_test_token": "testuser"}) as hub:
        patch_hub_endpoint(monkeypatch, hub.url)
        HfApi().create_repo("testuser/tiny", private=True, token="hf_test_token")
        HfApi().upload_folder(repo_id="testuser/tiny", folder_path=path, token="hf_test_token")
        hf_hub_download("testuser/tiny", "config.json", cache_dir=tmp_path, token="hf_test_token")

Endpoints (``{type}`` = models|datasets|spaces, ``{repo}`` = ``namespace/name``, revision = branch, tag or sha)::

    GET  /api/whoami-v2                       POST /api/repos/create
    POST /api/validate-yaml                   GET  /api/{type}/{repo}[/revision/{rev}]   (?blobs=1 adds size/blobId)
    GET  /api/{type}/{repo}/tree/{rev}[/{path}]   (?recursive=true)
    GET  /api/{type}/{repo}/refs              GET  /api/{type}/{repo}/commits/{rev}
    POST /api/{type}/{repo}/preupload/{rev}   (always answers uploadMode "regular": no LFS, no Xet)
    POST /api/{type}/{repo}/commit/{branch}   (NDJSON: header / file (base64) / deletedFile / deletedFolder)
    POST /api/{type}/{repo}/tag/{rev}         POST /api/{type}/{repo}/branch/{name}
    HEAD|GET /[datasets/|spaces/]{repo}/resolve/{rev}/{path}   (ETag = git blob sha1, X-Repo-Commit, Range)

Errors carry the ``X-Error-Code`` header (RepoNotFound / RevisionNotFound / EntryNotFound) that
``hf_raise_for_status`` maps to its exceptions. This is required, not cosmetic: its fallback that turns a bare 401
into ``RepositoryNotFoundError`` only matches ``https://`` URLs. Private (and missing) repos answer 401 without a
valid token and 404 with another user's token, like the real Hub; an unknown token answers 401 "Invalid credentials
in Authorization header" everywhere.

Pointing the libraries at the server, inside a pytest process: ``HF_ENDPOINT`` is read once at import time, so
setting the env var is not enough. ``patch_hub_endpoint`` also patches ``huggingface_hub.constants.ENDPOINT`` and
``HUGGINGFACE_CO_URL_TEMPLATE`` (used by ``hf_hub_url``), the module-level ``HfApi`` singleton in
``huggingface_hub.hf_api`` (``huggingface_hub.upload_folder``, ``model_info``... are its bound methods and captured
the endpoint at import), transformers' cached ``HfApi`` (``transformers.utils.hub._hf_api``), and the host
allow-lists used for redirects. It also disables telemetry (otherwise the first request fetches
``{ENDPOINT}/api/agent-harnesses`` to build the user agent), hides any real token, and turns offline mode off.

Offline mode: both libraries only look at ``huggingface_hub.constants.HF_HUB_OFFLINE`` (read from ``HF_HUB_OFFLINE``
or ``TRANSFORMERS_OFFLINE`` at import); ``is_offline_mode()`` returns it at call time and transformers imports that
very function. ``set_offline`` patches the constant (and the env vars, for subprocesses).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# New repos start with one commit holding a .gitattributes file, like on the real Hub.
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha(data: bytes) -> str:
    """Git blob id: the Hub's ETag and ``oid`` for regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, bytes]


@dataclass
class Repo:
    type: str
    id: str
    private: bool
    created: str = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str:
        """Branch, tag, full sha or unambiguous sha prefix (>= 7 chars) -> commit sha."""
        sha = self.branches.get(rev) or self.tags.get(rev)
        if sha is None and re.fullmatch(r"[0-9a-f]{7,40}", rev):
            matches = [s for s in self.commits if s.startswith(rev)]
            sha = matches[0] if len(matches) == 1 else None
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra


class HubServer:
    """Hub-compatible server on 127.0.0.1 (random port), in a background thread. ``tokens`` maps token -> user."""

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = dict(tokens or {})
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path without query), in arrival order
        self.url = ""
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HubServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        # Short poll interval: `stop()` waits for the serving loop to notice the shutdown request (0.5 s by default).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_repo(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model", private: bool = False) -> str:
        """Seed a repo (any namespace, no token needed), e.g. a public dataset under its real id; returns the commit."""
        with self._lock:
            repo = Repo(repo_type, repo_id, private=private)
            first = self._commit(repo, {".gitattributes": GITATTRIBUTES}, "initial commit")
            repo.branches["main"] = self._commit(repo, {".gitattributes": GITATTRIBUTES, **files}, "add files",
                                                 parent=first)
            self.repos[(repo_type, repo_id)] = repo
            return repo.branches["main"]

    # ------------------------------------------------------------------ helpers

    def _commit(self, repo: Repo, files: dict[str, bytes], title: str, message: str = "", parent=None) -> str:
        seed = f"{repo.id}\n{parent}\n{title}\n{next(self._counter)}\n" + "\n".join(
            f"{p} {git_blob_sha(d)}" for p, d in sorted(files.items())
        )
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = Commit(sha, parent, title, message, _now(), files)
        return sha

    def _repo(self, repo_type: str, repo_id: str, user: str | None, write: bool = False) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        owner = repo_id.split("/")[0]
        if repo is None or (repo.private and user != owner):  # never leak the existence of a private repo
            if user is None:
                raise HubError(401, "Invalid username or password.", "RepoNotFound")
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and user != owner:
            raise HubError(401 if user is None else 403, "You don't have the rights to write to this repo")
        return repo

    def _user(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        user = self.tokens.get(authorization.removeprefix("Bearer ").strip())
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    # ------------------------------------------------------------------ routing

    def handle(self, method: str, parts: list[str], query: dict, body: bytes, auth: str | None):
        """Returns (status, body: bytes | dict | list, headers). Runs under the server lock."""
        user = self._user(auth)
        if parts[0] == "api":
            if parts[1:] == ["whoami-v2"]:
                if user is None:
                    raise HubError(401, "Invalid credentials in Authorization header")
                return 200, {"type": "user", "name": user, "fullname": user, "orgs": [],
                             "auth": {"type": "access_token", "accessToken": {"role": "write"}}}, {}
            if parts[1:] == ["validate-yaml"]:
                return 200, {"errors": [], "warnings": []}, {}
            if parts[1:] == ["repos", "create"] and method == "POST":
                return self._create_repo(json.loads(body), user)
            if len(parts) >= 4 and parts[1] in REPO_TYPES:
                return self._api_repo(method, REPO_TYPES[parts[1]], "/".join(parts[2:4]), parts[4:], query, body, user)
        else:  # /[datasets/|spaces/]{ns}/{name}/resolve/{rev}/{path}
            repo_type = REPO_TYPES.get(parts[0]) if parts[0] in ("datasets", "spaces") else "model"
            parts = parts[1:] if parts[0] in ("datasets", "spaces") else parts
            if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(self._repo(repo_type, "/".join(parts[:2]), user), parts[3], "/".join(parts[4:]))
        raise HubError(404, f"Not handled by the test Hub server: {method} /{'/'.join(parts)}")

    def _create_repo(self, payload: dict, user: str | None):
        if user is None:
            raise HubError(401, "You must be authenticated to access this resource")
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if namespace != user:
            raise HubError(403, f"You don't have the rights to manage repos under the namespace {namespace}")
        url = f"{self.url}/{URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            raise HubError(409, f"You already created this {repo_type} repo", url=url)  # exist_ok reads "url"
        repo = Repo(repo_type, repo_id, private=payload.get("visibility") == "private")
        repo.branches["main"] = self._commit(repo, {".gitattributes": GITATTRIBUTES}, "initial commit")
        self.repos[(repo_type, repo_id)] = repo
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _api_repo(self, method, repo_type, repo_id, rest, query, body, user):
        action, args = (rest[0], rest[1:]) if rest else ("revision", ["main"])
        repo = self._repo(repo_type, repo_id, user, write=method == "POST")
        if action == "revision" and method == "GET":  # model_info / repo_info
            sha = repo.resolve(args[0])
            return 200, self._info(repo, sha, blobs=query.get("blobs", "").lower() in ("1", "true")), {}
        if action == "tree" and method == "GET":
            recursive = query.get("recursive", "").lower() in ("1", "true")
            files = repo.commits[repo.resolve(args[0])].files
            return 200, _tree(files, "/".join(args[1:]), recursive), {}
        if action == "refs" and method == "GET":
            def refs(kind: str, names: dict[str, str]) -> list[dict]:
                return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": s} for n, s in names.items()]

            return 200, {"branches": refs("heads", repo.branches), "tags": refs("tags", repo.tags),
                         "converts": [], "pullRequests": []}, {}
        if action == "commits" and method == "GET":
            history, sha = [], repo.resolve(args[0])
            while sha is not None:
                c = repo.commits[sha]
                history.append({"id": c.sha, "title": c.title, "message": c.message, "date": c.date,
                                "authors": [{"user": repo_id.split("/")[0]}]})
                sha = c.parent
            return 200, history, {}
        if action == "preupload" and method == "POST":
            head = repo.commits[repo.resolve(args[0])].files
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                      "oid": git_blob_sha(head[f["path"]]) if f["path"] in head else None}
                     for f in json.loads(body)["files"]]
            return 200, {"files": files, "commitOid": repo.resolve(args[0])}, {}
        if action == "commit" and method == "POST":
            return self._create_commit(repo, args[0], query, body)
        if action in ("tag", "branch") and method == "POST":
            payload = json.loads(body or b"{}")
            refs, name = (repo.tags, payload["tag"]) if action == "tag" else (repo.branches, args[0])
            start = args[0] if action == "tag" else payload.get("startingPoint") or "main"
            if name in refs:
                raise HubError(409, f"Reference already exists: {name}")
            refs[name] = repo.resolve(start)
            return 200, {}, {}
        raise HubError(404, f"Not handled by the test Hub server: {method} {action}")

    def _info(self, repo: Repo, sha: str, blobs: bool) -> dict:
        commit = repo.commits[sha]
        siblings = [
            {"rfilename": p, **({"size": len(d), "blobId": git_blob_sha(d)} if blobs else {})}
            for p, d in sorted(commit.files.items())
        ]
        return {"_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24], "id": repo.id, "modelId": repo.id,
                "author": repo.id.split("/")[0], "sha": sha, "private": repo.private, "gated": False,
                "disabled": False, "lastModified": commit.date, "createdAt": repo.created, "tags": [],
                "downloads": 0, "likes": 0, "siblings": siblings}

    def _create_commit(self, repo: Repo, branch: str, query: dict, body: bytes):
        if query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by the test Hub server")
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"] if lines and lines[0]["key"] == "header" else {}
        parent = repo.branches[branch]
        if header.get("parentCommit") and not parent.startswith(header["parentCommit"]):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[parent].files)
        for op in lines[1:]:
            key, value = op["key"], op["value"]
            path = value["path"].strip("/")
            if key == "file":
                raw = value["content"]
                files[path] = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
            elif key in ("deletedFile", "deletedFolder"):
                doomed = [p for p in files if p == path or (key == "deletedFolder" and p.startswith(path + "/"))]
                if not doomed:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:  # lfsFile: never happens since preupload always answers "regular"
                raise HubError(400, f"Unsupported commit operation: {key}")
        sha = self._commit(repo, files, header.get("summary", ""), header.get("description", ""), parent)
        repo.branches[branch] = sha
        commit_url = f"{self.url}/{URL_PREFIX[repo.type]}{repo.id}/commit/{sha}"
        return 200, {"success": True, "commitOid": sha, "commitUrl": commit_url, "hookOutput": "",
                     "pullRequestUrl": None}, {}

    def _resolve(self, repo: Repo, rev: str, path: str):
        sha = repo.resolve(rev)
        data = repo.commits[sha].files.get(path)
        if data is None:  # X-Repo-Commit lets the client cache the non-existence (.no_exist)
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        name = path.rsplit("/", 1)[-1]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream",
                   "Content-Disposition": f'inline; filename="{name}";'}
        return 200, data, headers


def _tree(files: dict[str, bytes], path: str, recursive: bool) -> list[dict]:
    """``/tree`` listing of ``path`` (a folder; "" = root): its files and folders, all descendants if recursive."""
    prefix = f"{path.strip('/')}/" if path.strip("/") else ""
    if prefix and not any(p.startswith(prefix) for p in files):
        raise HubError(404, f"{path} does not exist", "EntryNotFound")
    entries: dict[str, dict] = {}
    for p, data in sorted(files.items()):
        if not p.startswith(prefix):
            continue
        parts = p[len(prefix):].split("/")
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            folder = prefix + "/".join(parts[:depth])
            if folder not in entries:  # folder oid: any hash that changes with the folder's content
                content = "".join(f"{q}{git_blob_sha(d)}" for q, d in files.items() if q.startswith(folder + "/"))
                entries[folder] = {"type": "directory", "oid": hashlib.sha1(content.encode()).hexdigest(),
                                   "size": 0, "path": folder}
        if recursive or len(parts) == 1:
            entries[p] = {"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": p}
    return list(entries.values())


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one connection per request, so nothing keeps answering after `stop()`.
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        hub.requests.append((self.command, url.path))
        parts = [unquote(p) for p in url.path.split("/")[1:]]  # unquote after splitting: revisions may hold "%2F"
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        auth = self.headers.get("Authorization")
        try:
            with hub._lock:  # one request at a time: the state is plain dicts
                status, payload, headers = hub.handle(self.command, parts, query, body, auth)
        except HubError as e:
            status, payload = e.status, {"error": e.message, **e.extra}
            headers = {**e.headers, "X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {})}
        if not isinstance(payload, bytes):
            payload, headers = json.dumps(payload).encode(), {"Content-Type": "application/json", **headers}
        elif status == 200 and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")):
            start, end = int(m[1]), int(m[2] or len(payload) - 1)  # resumed download
            headers["Content-Range"] = f"bytes {start}-{end}/{len(payload)}"
            status, payload = 206, payload[start : end + 1]
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_HEAD = do_POST = do_GET

    def log_message(self, format, *args) -> None:  # keep pytest output clean
        pass


def set_offline(monkeypatch, offline: bool) -> None:
    """Switch offline mode at runtime for huggingface_hub *and* transformers (both read this one constant)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # for subprocesses; the libraries read them at import
        monkeypatch.setenv(var, "1" if offline else "0")


def patch_hub_endpoint(monkeypatch, url: str, *, token: str | None = None, cache_dir=None, xet: bool = False) -> None:
    """Point huggingface_hub / transformers (already imported or not) at ``url`` for the current test.

    ``token``: exported as HF_TOKEN (implicit auth, e.g. for ``from_pretrained``); by default no token at all is sent
    unless passed explicitly (HF_TOKEN and the token file are hidden). ``cache_dir``: default cache (HF_HUB_CACHE).
    ``xet``: hf_xet is installed, and then ``upload_folder`` takes its pipelined path, which starts a process-wide
    Rust XetSession (logs under HF_XET_CACHE, ~/.cache/huggingface/xet by default) even though this server never
    hands out Xet uploads. Disabled by default; the HTTP calls are the same either way (preupload + commit).
    """
    from huggingface_hub import constants
    from huggingface_hub import hf_api as hf_api_module
    from huggingface_hub.utils import _http

    url = url.rstrip("/")
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    host = urlsplit(url).hostname
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {host})
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(url)})
    monkeypatch.setattr(hf_api_module.api, "endpoint", url)  # singleton behind huggingface_hub.upload_folder & co
    if (transformers_hub := sys.modules.get("transformers.utils.hub")) is not None:
        monkeypatch.setattr(transformers_hub, "_hf_api", None)  # cached HfApi: rebuilt lazily with the new endpoint
    # No telemetry: skips the /api/agent-harnesses lookup (and its cache file in HF_HOME) when building user agents.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", os.path.join(os.sep, "nonexistent-hub-server", "token"))
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    if cache_dir is not None:
        monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    if any(os.environ.get(v) for v in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")):
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY") or os.environ.get("no_proxy"), host]))
        monkeypatch.setenv("NO_PROXY", no_proxy)
        monkeypatch.setenv("no_proxy", no_proxy)
        _http.close_session()  # the shared httpx client read the proxy env vars when it was created
    set_offline(monkeypatch, False)
