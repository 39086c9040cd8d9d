"""A local stand-in for the few Hugging Face Hub HTTP endpoints that `stages.export_hub.push` uses.

`HubStandin` is an `http.server.ThreadingHTTPServer` on 127.0.0.1 (a free port) served from a daemon
thread. Point `HF_ENDPOINT` at `standin.url` and `huggingface_hub` 2.x talks to it instead of the Hub:

    with HubStandin() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        ...
        assert hub.commits[0].files["README.md"] == expected_bytes

It records every request (method, path, query, headers, body) and what the uploads did: repos created
(with their visibility), commits (each file's path and bytes) and pull requests. `refuse_token=True`
makes /api/whoami-v2 answer 401, as the Hub does for a revoked or mistyped token.

Endpoints, as `huggingface_hub` 2.4 calls them (see hf_api.py and _commit_api.py):

- GET  /api/whoami-v2                                 HfApi.whoami
- POST /api/repos/create                              HfApi.create_repo (409 when the repo exists)
- GET  /api/{type}s/{owner}/{name}                    HfApi.repo_info (its `private` flag)
- POST /api/validate-yaml                             README.md front matter check before an upload
- POST /api/{type}s/{owner}/{name}/preupload/{rev}    upload modes: always "regular", so every file goes
                                                      base64-encoded inside the commit itself and no LFS
                                                      or Xet transfer is ever started
- POST /api/{type}s/{owner}/{name}/discussions        open a pull request (the hf_xet upload pipeline
                                                      opens one this way before committing to it)
- GET  /api/{type}s/{owner}/{name}/discussions/{num}  pull request details
- POST /api/{type}s/{owner}/{name}/commit/{rev}       the ndjson commit; `?create_pr=1` (the path
                                                      without hf_xet) opens a pull request for it

Anything else gets a 404 and lands in `unhandled`, so a test can tell that the library asked for more.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

INFO_ROUTE = re.compile(r"^/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)(?:/revision/[^/]+)?$")
REPO_ROUTE = re.compile(r"^/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)/(?P<rest>.+)$")
CREATED_AT = "2024-01-01T00:00:00.000Z"


@dataclass
class Request:
    method: str
    path: str  # percent-decoded, without the query string
    query: dict[str, str]
    headers: dict[str, str] = field(repr=False)  # lower-cased names
    body: bytes = field(repr=False)

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool | None  # None: the client did not say (the Hub then applies the account default)
    files: dict[str, bytes] = field(default_factory=dict, repr=False)  # main branch content


@dataclass
class PullRequest:
    repo_id: str
    num: int
    title: str

    @property
    def ref(self) -> str:
        return f"refs/pr/{self.num}"


@dataclass
class Commit:
    repo_id: str
    revision: str  # "main" or "refs/pr/N"
    summary: str
    pull_request: int | None  # the PR number when the commit went to a pull request
    oid: str
    files: dict[str, bytes] = field(repr=False)  # path in repo -> bytes, decoded from the ndjson payload


class HubStandin:
    """The stand-in server; a context manager that starts it on enter and stops it on exit."""

    def __init__(self, user: str = "standin-user", refuse_token: bool = False) -> None:
        self.user = user
        self.refuse_token = refuse_token
        self.requests: list[Request] = []
        self.unhandled: list[Request] = []
        self.repos: dict[str, Repo] = {}
        self.commits: list[Commit] = []
        self.pull_requests: list[PullRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        assert self._server is not None, "stand-in not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubStandin:
        standin = self

        class Handler(_Handler):
            hub = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="hub-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubStandin:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ------------------------------------------------------------------ queries for tests

    def paths_requested(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.requests]

    # ------------------------------------------------------------------ routing

    def handle(self, request: Request) -> tuple[int, dict, dict[str, str]]:
        """Answer one request: (status, JSON body, extra headers)."""
        with self._lock:
            self.requests.append(request)
            if request.method == "GET" and request.path == "/api/whoami-v2":
                return self._whoami()
            if request.method == "POST" and request.path == "/api/repos/create":
                return self._create_repo(json.loads(request.body))
            if request.method == "POST" and request.path == "/api/validate-yaml":
                return 200, {"errors": [], "warnings": []}, {}
            info = INFO_ROUTE.match(request.path)
            if info and request.method == "GET":
                return self._repo_info(info["repo"])
            route = REPO_ROUTE.match(request.path)
            if route:
                repo_id, rest = route["repo"], route["rest"]
                if repo_id not in self.repos:
                    return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
                if request.method == "POST" and rest.startswith("preupload/"):
                    return self._preupload(json.loads(request.body))
                if request.method == "POST" and rest == "discussions":
                    return self._open_pull_request(repo_id, json.loads(request.body))
                if request.method == "GET" and rest.startswith("discussions/"):
                    return self._pull_request_details(repo_id, rest.removeprefix("discussions/"))
                if request.method == "POST" and rest.startswith("commit/"):
                    revision = rest.removeprefix("commit/")
                    return self._commit(repo_id, revision, request.query.get("create_pr") == "1", request.body)
            self.unhandled.append(request)
            return 404, {"error": f"the stand-in does not implement {request.method} {request.path}"}, {}

    def _whoami(self):
        if self.refuse_token:
            return (
                401,
                {"error": "Invalid credentials in Authorization header"},
                {"X-Error-Message": "Invalid credentials in Authorization header"},
            )
        body = {
            "type": "user",
            "name": self.user,
            "fullname": "Stand-in User",
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "stand-in", "role": "write"}},
        }
        return 200, body, {}

    def _create_repo(self, payload: dict):
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}, {}
        visibility = payload.get("visibility")
        private = payload.get("private") if visibility is None else visibility == "private"
        self.repos[repo_id] = Repo(repo_id=repo_id, repo_type=payload.get("type") or "model", private=private)
        return 200, {"url": url, "name": repo_id}, {}

    def _repo_info(self, repo_id: str):
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        siblings = [{"rfilename": name} for name in repo.files]
        return 200, {"id": repo_id, "private": bool(repo.private), "sha": "0" * 40, "siblings": siblings}, {}

    def _preupload(self, payload: dict):
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload["files"]]
        return 200, {"files": files, "commitOid": "0" * 40}, {}

    def _new_pull_request(self, repo_id: str, title: str) -> PullRequest:
        pr = PullRequest(repo_id=repo_id, num=len(self.pull_requests) + 1, title=title)
        self.pull_requests.append(pr)
        return pr

    def _pr_url(self, pr: PullRequest) -> str:
        return f"{self.url}/{pr.repo_id}/discussions/{pr.num}"

    def _open_pull_request(self, repo_id: str, payload: dict):
        if not payload.get("pullRequest"):
            return 400, {"error": "the stand-in opens pull requests only"}, {}
        pr = self._new_pull_request(repo_id, payload.get("title", ""))
        return 200, {"num": pr.num, "url": self._pr_url(pr), "pullRequest": True}, {}

    def _pull_request_details(self, repo_id: str, num: str):
        pr = next((p for p in self.pull_requests if p.repo_id == repo_id and str(p.num) == num), None)
        if pr is None:
            return 404, {"error": "Discussion not found"}, {}
        body = {
            "num": pr.num,
            "title": pr.title,
            "author": {"name": self.user},
            "createdAt": CREATED_AT,
            "status": "draft",
            "repo": {"name": repo_id, "type": self.repos[repo_id].repo_type},
            "isPullRequest": True,
            "events": [],
            "changes": {"base": "refs/heads/main"},
            "filesWithConflicts": [],
            "diff": "",
        }
        return 200, body, {}

    def _commit(self, repo_id: str, revision: str, create_pr: bool, body: bytes):
        summary, files = "", {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item["key"] == "header":
                summary = item["value"]["summary"]
            elif item["key"] == "file" and item["value"].get("encoding") == "base64":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            else:  # lfsFile, deletions, copies: never needed while every upload mode is "regular"
                return 422, {"error": f"the stand-in does not implement commit operation {item['key']!r}"}, {}
        pr = None
        if create_pr:
            pr = self._new_pull_request(repo_id, summary)
        elif revision.startswith("refs/pr/"):
            pr = next((p for p in self.pull_requests if p.repo_id == repo_id and p.ref == revision), None)
            if pr is None:
                return 404, {"error": f"no pull request at {revision}"}, {"X-Error-Code": "RevisionNotFound"}
        elif revision != "main":
            return 404, {"error": f"no branch {revision}"}, {"X-Error-Code": "RevisionNotFound"}
        oid = hashlib.sha1(body + str(len(self.commits)).encode()).hexdigest()
        commit = Commit(
            repo_id=repo_id,
            revision=pr.ref if pr else "main",
            summary=summary,
            files=files,
            pull_request=pr.num if pr else None,
            oid=oid,
        )
        self.commits.append(commit)
        if pr is None:
            self.repos[repo_id].files.update(files)
        answer = {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}"}
        if pr is not None:
            answer["pullRequestUrl"] = self._pr_url(pr)
        return 200, answer, {}


class _Handler(BaseHTTPRequestHandler):
    """Reads a request, passes it to `hub.handle`, writes the JSON answer (HTTP/1.0: one request per connection)."""

    hub: HubStandin

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        request = Request(
            method=self.command,
            path=unquote(parts.path),
            query=dict(parse_qsl(parts.query)),
            headers={name.lower(): value for name, value in self.headers.items()},
            body=self.rfile.read(length) if length else b"",
        )
        try:
            status, body, headers = self.hub.handle(request)
        except Exception as exc:  # a stand-in bug: answer 400 (never retried by the client) and say what broke
            status, body, headers = 400, {"error": f"stand-in error: {exc.__class__.__name__}: {exc}"}, {}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass
