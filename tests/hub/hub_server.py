"""A small Hugging Face Hub-compatible HTTP server for tests, on 127.0.0.1, storing repositories on disk.

It implements only what `huggingface_hub` (`create_repo`, `create_branch`, `upload_folder`/`create_commit`,
`repo_info`, `list_repo_tree`, `hf_hub_download`, `snapshot_download`, `HfFileSystem`) and `datasets`
(`Dataset.push_to_hub`, `load_dataset`) call when pointed at it with `HF_ENDPOINT`:

    POST /api/repos/create                          create a repo (409 if it exists)
    POST /api/validate-yaml                         card metadata check (YAML front matter, model-index)
    GET  /api/whoami-v2                             the token's user
    GET  /api/{type}s/{repo}[/revision/{rev}]       repo info: sha, siblings, private
    POST /api/{type}s/{repo}/preupload/{rev}        "lfs" for binary formats, else "regular"; oid of the stored version
    POST /{[datasets/]repo}.git/info/lfs/objects/batch  legacy LFS upload actions (PUT /lfs-upload/<sha256>)
    POST /api/{type}s/{repo}/commit/{rev}           NDJSON header/file/lfsFile/deletedFile/deletedFolder operations
    POST /api/{type}s/{repo}/branch/{branch}        create a branch (409 if it exists)
    GET  /api/{type}s/{repo}/refs                   branches
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]    directory listing (recursive=1 supported)
    POST /api/{type}s/{repo}/paths-info/{rev}       info for given paths
    HEAD/GET /[datasets/]{repo}/resolve/{rev}/{path}  file content (Range supported), X-Repo-Commit and ETag

Layout on disk: `blobs/<sha256>` (file contents) and `repos.json` (per repo: privacy, branches, and commits as full
path -> [sha256, is_lfs] snapshots). Clients must run with `HF_HUB_DISABLE_XET=1`: LFS files then go through the legacy
LFS batch API, which this server speaks, instead of the Xet storage protocol, which it does not. Writes need
`Authorization: Bearer <token>`; private repos are invisible without it.
`fail(method, path_fragment, status, times)` makes matching requests fail, to test retries and reruns.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


USER = "tester"
_API_REPO = re.compile(
    r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(revision|preupload|commit|branch|refs|tree|paths-info)(?:/([^/]*)(/.*)?)?)?$"
)
_LFS_BATCH = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$")
# What the Hub's default .gitattributes sends to LFS; anything over 10 MB goes there too.
LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".arrow", ".pt", ".pth", ".png", ".jpg", ".gguf", ".npy")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def git_oid(content: bytes) -> str:
    """The git blob id of `content` (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class LocalHub:
    """The server's state, on disk under `root`; thread-safe."""

    def __init__(self, root: Path, token: str):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.token = token
        self.lock = threading.RLock()
        self.failures: list[dict] = []
        self.requests: list[tuple[str, str, dict]] = []
        path = self.root / "repos.json"
        self.repos = json.loads(path.read_text()) if path.exists() else {}

    # -- test controls ------------------------------------------------------------------------------------------------
    def fail(self, method: str, path_fragment: str, status: int = 500, times: int = 1) -> None:
        """The next `times` requests whose method and path match answer `status` (`times=-1`: until cleared)."""
        with self.lock:
            self.failures.append({"method": method, "fragment": path_fragment, "status": status, "times": times})

    def clear_failures(self) -> None:
        with self.lock:
            self.failures.clear()

    def files(self, repo_type: str, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision, as {path: content}."""
        with self.lock:
            repo = self._repo(repo_type, repo_id, authorized=True)
            return {p: self._blob(entry) for p, entry in self._snapshot(repo, revision)[1].items()}

    def repo(self, repo_type: str, repo_id: str) -> dict:
        with self.lock:
            return self._repo(repo_type, repo_id, authorized=True)

    # -- storage ------------------------------------------------------------------------------------------------------
    def _save(self) -> None:
        staging = self.root / "repos.json.incomplete"
        staging.write_text(json.dumps(self.repos))
        staging.replace(self.root / "repos.json")

    def _blob(self, entry) -> bytes:
        return (self.root / "blobs" / entry[0]).read_bytes()

    def _store(self, content: bytes, lfs: bool = False) -> list:
        sha256 = hashlib.sha256(content).hexdigest()
        (self.root / "blobs" / sha256).write_bytes(content)
        return [sha256, lfs]

    def _oid(self, entry) -> str:
        """What the Hub reports as a file's oid: the sha256 of an LFS file, the git blob id of a regular one."""
        return entry[0] if entry[1] else git_oid(self._blob(entry))

    def _repo(self, repo_type: str, repo_id: str, authorized: bool) -> dict:
        repo = self.repos.get(f"{repo_type}/{repo_id}")
        if repo is None or (repo["private"] and not authorized):
            raise HubError(401 if not authorized else 404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _snapshot(self, repo: dict, revision: str) -> tuple[str, dict[str, str]]:
        sha = repo["branches"].get(revision, revision if revision in repo["commits"] else None)
        if sha is None:
            raise HubError(404, f"Revision {revision} not found", "RevisionNotFound")
        return sha, repo["commits"][sha]["files"]

    def _commit(self, repo: dict, branch: str, files: dict[str, str], message: str, parent: str | None) -> str:
        record = {"parent": parent, "files": files, "message": message, "time": time.time()}
        sha = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
        repo["commits"][sha] = record
        repo["branches"][branch] = sha
        self._save()
        return sha

    # -- endpoints ----------------------------------------------------------------------------------------------------
    def create_repo(self, body: dict) -> tuple[int, dict]:
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        key = f"{repo_type}/{repo_id}"
        url = f"{self.endpoint}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        if key in self.repos:
            return 409, {"error": "You already created this repo", "url": url}
        private = body.get("visibility", "private" if body.get("private") else "public") != "public"
        repo = self.repos[key] = {"private": private, "branches": {}, "commits": {}}
        self._commit(
            repo,
            "main",
            {".gitattributes": self._store(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")},
            "initial commit",
            None,
        )
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def info(self, repo_type: str, repo_id: str, repo: dict, revision: str) -> dict:
        sha, files = self._snapshot(repo, revision)
        return {
            "id": repo_id,
            "modelId": repo_id,
            "sha": sha,
            "private": repo["private"],
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": "2026-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": p, "size": len(self._blob(e))} for p, e in sorted(files.items())],
        }

    def preupload(self, repo: dict, revision: str, body: dict) -> dict:
        files = self._snapshot(repo, revision)[1] if revision in repo["branches"] else {}
        answers = []
        for f in body["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f.get("size", 0) > 10 * 2**20
            stored = files.get(f["path"])
            answers.append(
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": self._oid(stored) if stored and stored[1] == lfs else None,
                }
            )
        return {"files": answers, "commitOid": repo["branches"].get(revision)}

    def lfs_batch(self, body: dict) -> dict:
        objects = []
        for obj in body.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if not (self.root / "blobs" / obj["oid"]).exists():
                entry["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def lfs_upload(self, sha256: str, content: bytes) -> None:
        if hashlib.sha256(content).hexdigest() != sha256:
            raise HubError(400, "LFS object content does not match its sha256")
        (self.root / "blobs" / sha256).write_bytes(content)

    def commit(self, repo_type: str, repo_id: str, repo: dict, revision: str, lines: list[dict]) -> dict:
        parent, files = self._snapshot(repo, revision)
        files = dict(files)
        header = {}
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                header = value
                if value.get("parentCommit") and value["parentCommit"] != parent:
                    raise HubError(412, "Parent commit is not the head of the branch")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "Only base64 file contents are supported")
                files[value["path"]] = self._store(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                if not (self.root / "blobs" / value["oid"]).exists():
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was not uploaded")
                files[value["path"]] = [value["oid"], True]
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: o for p, o in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"Unsupported commit operation {key!r} (this server asks for no LFS uploads)")
        sha = self._commit(repo, revision, files, header.get("summary", ""), parent)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return {
            "commitUrl": f"{self.endpoint}/{prefix}{repo_id}/commit/{sha}",
            "commitOid": sha,
            "pullRequestUrl": None,
        }

    def tree(self, repo: dict, revision: str, path: str, recursive: bool) -> list[dict]:
        files = self._snapshot(repo, revision)[1]
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubError(404, f"Path {path} not found", "EntryNotFound")
        entries, folders = [], set()
        for p, stored in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append(
                        {
                            "type": "directory",
                            "path": folder,
                            "oid": hashlib.sha1(folder.encode()).hexdigest(),
                            "size": 0,
                        }
                    )
            if recursive or len(parts) == 1:
                entries.append(self._file_entry(p, stored))
        return entries

    def _file_entry(self, path: str, stored) -> dict:
        size = len(self._blob(stored))
        entry = {"type": "file", "path": path, "oid": git_oid(self._blob(stored)), "size": size}
        if stored[1]:
            entry["lfs"] = {"oid": stored[0], "size": size, "pointerSize": 134}
        return entry

    def paths_info(self, repo: dict, revision: str, paths: list[str]) -> list[dict]:
        files = self._snapshot(repo, revision)[1]
        out = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                out.append(self._file_entry(path, files[path]))
            elif any(p.startswith(path + "/") for p in files):
                out.append(
                    {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0}
                )
        return out

    def validate_yaml(self, body: dict) -> tuple[int, dict]:
        import yaml
        from huggingface_hub.repocard_data import model_index_to_eval_results

        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", body.get("content", ""), re.S)
        if match is None:
            return 200, {}
        try:
            metadata = yaml.safe_load(match.group(1)) or {}
            if body.get("repoType", "model") == "model" and "model-index" in metadata:
                model_index_to_eval_results(metadata["model-index"])
        except Exception as error:  # a malformed card is the client's error, reported as the Hub does
            return 400, {"error": f"Invalid metadata in README.md: {error}"}
        return 200, {"errors": [], "warnings": []}


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet; requests are recorded in `hub.requests`
        pass

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return b""

    def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None, head=False):
        data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, error: HubError, head=False):
        headers = {"X-Error-Message": error.message}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send(error.status, {"error": error.message}, headers, head=head)

    def _handle(self, method: str):
        url = urlparse(self.path)
        body = self._body() if method in ("POST", "PUT") else b""
        self.hub.requests.append((method, url.path, {"authorization": self.headers.get("Authorization")}))
        with self.hub.lock:
            for failure in self.hub.failures:
                if failure["method"] == method and failure["fragment"] in url.path and failure["times"] != 0:
                    failure["times"] -= 1
                    return self._send(failure["status"], {"error": "injected failure"})
        try:
            with self.hub.lock:
                self._route(method, url, body)
        except HubError as error:
            self._error(error, head=method == "HEAD")

    def _route(self, method: str, url, body: bytes):
        hub, path, query = self.hub, url.path, parse_qs(url.query)
        authorized = self._authorized()
        if self.headers.get("Authorization") and not authorized:
            raise HubError(401, "Invalid credentials in Authorization header")
        if path == "/api/whoami-v2":
            if not authorized:
                raise HubError(401, "Invalid user token")
            return self._send(
                200, {"type": "user", "name": USER, "orgs": [], "auth": {"accessToken": {"role": "write"}}}
            )
        if path == "/api/validate-yaml" and method == "POST":
            return self._send(*hub.validate_yaml(json.loads(body or b"{}")))
        if path == "/api/repos/create" and method == "POST":
            if not authorized:
                raise HubError(401, "You must be logged in to create a repo")
            return self._send(*hub.create_repo(json.loads(body)))
        match = _RESOLVE.match(path)
        if match and method in ("GET", "HEAD"):
            kind, repo_id, revision, file_path = match.groups()
            repo = hub._repo((kind or "models")[:-1], repo_id, authorized)
            sha, files = hub._snapshot(repo, unquote(revision))
            file_path = unquote(file_path)
            if file_path not in files:
                raise HubError(404, f"Entry {file_path} not found", "EntryNotFound")
            content = hub._blob(files[file_path])
            headers = {"X-Repo-Commit": sha, "ETag": f'"{hub._oid(files[file_path])}"', "Accept-Ranges": "bytes"}
            ranged = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if ranged and method == "GET":
                start = int(ranged.group(1))
                end = int(ranged.group(2)) if ranged.group(2) else len(content) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
                return self._send(206, raw=content[start : end + 1], headers=headers)
            return self._send(200, raw=content, headers=headers, head=method == "HEAD")
        match = _LFS_BATCH.match(path)
        if match and method == "POST":
            kind, repo_id = match.groups()
            hub._repo((kind or "models")[:-1], repo_id, authorized)
            if not authorized:
                raise HubError(401, "You must be logged in to upload LFS objects")
            return self._send(200, hub.lfs_batch(json.loads(body)))
        if path.startswith("/lfs-upload/") and method == "PUT":
            hub.lfs_upload(path.rsplit("/", 1)[1], body)
            return self._send(200, {})
        match = _API_REPO.match(path)
        if match is None:
            raise HubError(404, f"{method} {path} is not implemented by the test Hub")
        kind, repo_id, action, revision, rest = match.groups()
        repo_type = kind[:-1]
        writes = action in ("preupload", "commit", "branch")
        repo = hub._repo(repo_type, repo_id, authorized)
        if writes and not authorized:
            raise HubError(401, "You must be logged in to write to this repo")
        revision = unquote(revision) if revision else "main"
        if action in (None, "revision"):
            return self._send(200, hub.info(repo_type, repo_id, repo, revision))
        if action == "preupload":
            return self._send(200, hub.preupload(repo, revision, json.loads(body)))
        if action == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            return self._send(200, hub.commit(repo_type, repo_id, repo, revision, lines))
        if action == "branch":
            if revision in repo["branches"]:
                return self._send(409, {"error": f"Branch {revision} already exists"})
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            repo["branches"][revision] = hub._snapshot(repo, start)[0]
            hub._save()
            return self._send(200, {})
        if action == "refs":
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in repo["branches"].items()]
            return self._send(200, {"branches": branches, "tags": [], "converts": []})
        if action == "tree":
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._send(200, hub.tree(repo, revision, unquote(rest or ""), recursive))
        if action == "paths-info":
            content_type = self.headers.get("Content-Type", "")
            if "json" in content_type:
                paths = json.loads(body).get("paths", [])
            else:
                paths = parse_qs(body.decode()).get("paths", [])
            return self._send(200, hub.paths_info(repo, revision, paths))
        raise HubError(404, f"{method} {path} is not implemented by the test Hub")

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")


class HubServer:
    """`LocalHub` served on 127.0.0.1 in a background thread: `with HubServer(root, token) as hub: hub.endpoint`."""

    def __init__(self, root: Path, token: str):
        self.hub = LocalHub(root, token)
        handler = type("Handler", (_Handler,), {"hub": self.hub})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.hub.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self.hub

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
