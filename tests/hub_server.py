"""A local HTTP server answering the Hugging Face Hub API calls that ``alive upload`` makes.

It keeps every repo's branches and pull requests in memory (``refs/pr/N`` are branches of their own), so a
test can check what the Hub would hold after an upload, and the order of the calls. Endpoints: repo info,
repo creation, tree listing, preupload (everything is a regular git blob; a file whose content is already
there is reported by its git oid and skipped by the client), NDJSON commits (to a branch or a new pull
request), the pull-request list and merge. hf_xet must be off (``constants.HF_HUB_DISABLE_XET``): the
xet upload path needs a CAS server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

_REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


SIZE_CATEGORIES = {"n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B",
                   "1B<n<10B", "10B<n<100B", "100B<n<1T", "n>1T", "other"}


def validate_card(content: str) -> list[str]:
    """The metadata rules of a dataset card this server checks (a subset of the Hub's)."""
    from huggingface_hub import DatasetCard

    from pipeline.write.card import HUB_LICENSES

    d = DatasetCard(content).data.to_dict()
    errors = []
    lic = d.get("license")
    for one in (lic if isinstance(lic, list) else [lic]) if lic is not None else []:
        if one != "other" and one not in HUB_LICENSES:
            errors.append(f'"license" must be a Hub licence identifier or "other", got {one!r}')
    if lic == "other":
        if not re.fullmatch(r"[a-z0-9.-]+", str(d.get("license_name", ""))):
            errors.append('"license_name" (lowercase letters, digits, "-" and ".") is required with license: other')
        if not d.get("license_link"):
            errors.append('"license_link" is required with license: other')
    for sc in d.get("size_categories") or []:
        if sc not in SIZE_CATEGORIES:
            errors.append(f'"size_categories" has an unknown value {sc!r}')
    return errors


class LocalHub:
    """Start with ``with LocalHub() as hub:``; point ``HfApi(endpoint=hub.url, token=...)`` at it."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> revision -> path -> bytes
        self.prs: dict[str, list[dict[str, Any]]] = {}
        self.calls: list[tuple[str, str]] = []  # (endpoint kind, revision or "")
        self.tokens: set[str] = set()
        self.fail_merges = 0  # answer this many merge requests with HTTP 500 (an interrupted upload)
        self._lock = threading.Lock()
        self._srv = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._srv.server_address[1]}"

    def __enter__(self) -> "LocalHub":
        threading.Thread(target=self._srv.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._srv.shutdown()
        self._srv.server_close()

    def files(self, repo: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo][revision])

    def _commit(self, repo: str, revision: str, lines: list[dict], create_pr: bool) -> dict[str, Any]:
        header = next(x["value"] for x in lines if x["key"] == "header")
        if create_pr:
            num = len(self.prs.setdefault(repo, [])) + 1
            self.prs[repo].append({"num": num, "title": header["summary"], "status": "open"})
            revision = f"refs/pr/{num}"
            self.repos[repo][revision] = dict(self.repos[repo]["main"])
        tree = self.repos[repo][revision]
        for x in lines:
            v = x["value"]
            if x["key"] == "file":
                tree[v["path"]] = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
            elif x["key"] == "deletedFile":
                tree.pop(v["path"], None)
            elif x["key"] != "header":
                raise ValueError(f"unsupported commit operation {x['key']}")
        oid = hashlib.sha1(json.dumps(sorted((p, git_oid(b)) for p, b in tree.items())).encode()).hexdigest()
        out = {"commitUrl": f"{self.url}/datasets/{repo}/commit/{oid}", "commitOid": oid}
        if create_pr:
            out["pullRequestUrl"] = f"{self.url}/datasets/{repo}/discussions/{num}"
        return out

    def _handler(hub: "LocalHub"):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, obj: Any = None, headers: dict[str, str] | None = None) -> None:
                body = json.dumps({} if obj is None else obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def _route(self, method: str) -> None:
                u = urlparse(self.path)
                path, q = unquote(u.path), parse_qs(u.query)
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                hub.tokens.add(self.headers.get("authorization", ""))
                with hub._lock:
                    self._dispatch(method, path, q, body)

            def _dispatch(self, method: str, path: str, q: dict, body: bytes) -> None:
                def missing() -> None:
                    self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})

                if method == "POST" and path == "/api/repos/create":
                    d = json.loads(body)
                    repo = f"{d['organization']}/{d['name']}"
                    hub.calls.append(("create_repo", ""))
                    if repo in hub.repos:
                        return self._send(409, {"error": "You already created this dataset repo",
                                                "url": f"{hub.url}/datasets/{repo}"})
                    hub.repos[repo] = {"main": {".gitattributes": b"*.parquet filter=lfs\n"}}
                    return self._send(200, {"url": f"{hub.url}/datasets/{repo}", "name": repo})
                if method == "POST" and path == "/api/validate-yaml":
                    hub.calls.append(("validate_yaml", ""))
                    errors = validate_card(json.loads(body)["content"])
                    return self._send(400 if errors else 200, {"errors": [{"message": e} for e in errors]})
                m = re.fullmatch(rf"/api/datasets/{_REPO}(?:/revision/(?P<rev>.+))?", path)
                if method == "GET" and m:
                    hub.calls.append(("repo_info", m["rev"] or ""))
                    if m["repo"] not in hub.repos:
                        return missing()
                    return self._send(200, {"id": m["repo"], "sha": "0" * 40, "private": True, "siblings": []})
                m = re.fullmatch(rf"/api/datasets/{_REPO}/tree/(?P<rev>.+)", path)
                if method == "GET" and m:
                    hub.calls.append(("list_tree", m["rev"]))
                    tree = hub.repos.get(m["repo"], {}).get(m["rev"])
                    if tree is None:
                        return missing()
                    return self._send(200, [{"type": "file", "path": p, "size": len(b), "oid": git_oid(b)}
                                            for p, b in sorted(tree.items())])
                m = re.fullmatch(rf"/api/datasets/{_REPO}/preupload/(?P<rev>.+)", path)
                if method == "POST" and m:
                    hub.calls.append(("preupload", m["rev"]))
                    tree = hub.repos.get(m["repo"], {}).get("main" if q.get("create_pr") else m["rev"], {})
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                         "oid": git_oid(tree[f["path"]]) if f["path"] in tree else None}
                        for f in json.loads(body)["files"]]})
                m = re.fullmatch(rf"/api/datasets/{_REPO}/commit/(?P<rev>.+)", path)
                if method == "POST" and m:
                    create_pr = bool(q.get("create_pr"))
                    hub.calls.append(("commit_new_pr" if create_pr else "commit", m["rev"]))
                    if m["repo"] not in hub.repos or m["rev"] not in hub.repos[m["repo"]]:
                        return missing()
                    lines = [json.loads(x) for x in body.splitlines() if x.strip()]
                    return self._send(200, hub._commit(m["repo"], m["rev"], lines, create_pr))
                m = re.fullmatch(rf"/api/datasets/{_REPO}/discussions", path)
                if method == "GET" and m:
                    hub.calls.append(("list_prs", ""))
                    prs = [p for p in hub.prs.get(m["repo"], []) if q.get("status", ["all"])[0] in ("all", p["status"])]
                    return self._send(200, {"count": len(prs), "start": 0, "numItemsPerPage": 50, "discussions": [
                        {"title": p["title"], "num": p["num"], "author": {"name": "alive"}, "status": p["status"],
                         "createdAt": "2026-01-01T00:00:00.000Z", "isPullRequest": True,
                         "repo": {"name": m["repo"], "type": "dataset"}} for p in prs]})
                m = re.fullmatch(rf"/api/datasets/{_REPO}/discussions/(?P<num>\d+)/merge", path)
                if method == "POST" and m:
                    hub.calls.append(("merge", f"refs/pr/{m['num']}"))
                    if hub.fail_merges:
                        hub.fail_merges -= 1
                        return self._send(500, {"error": "Internal Error"})
                    pr = hub.prs[m["repo"]][int(m["num"]) - 1]
                    hub.repos[m["repo"]]["main"] = dict(hub.repos[m["repo"]][f"refs/pr/{m['num']}"])
                    pr["status"] = "merged"
                    return self._send(200, {})
                self._send(404, {"error": f"no route for {method} {path}"})

        return Handler
