"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, enough for ``HfApi.create_repo`` and ``upload_folder``.

It answers the endpoints ``huggingface_hub`` calls for them (``/api/repos/create``, ``/api/validate-yaml``,
``/api/models/{repo}/preupload/{rev}`` with every file "regular", so contents travel inline, and
``/api/models/{repo}/commit/{rev}``), refuses requests without ``Bearer <token>`` with 401, and keeps what it was sent:
``repos`` (name → settings) and ``files`` (repo → path → bytes). Never the network.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, token: str = "hf_fake_token"):
        self.token = token
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append(f"GET {self.path}")
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._send(401, {"error": "Invalid credentials"})
                return self._send(404, {"error": "not here"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                hub.requests.append(f"POST {path}")
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._send(401, {"error": "Invalid username or password."})
                if path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo = f"{payload['organization']}/{payload['name']}"
                    if repo in hub.repos:
                        return self._send(409, {"error": "You already created this model repo"})
                    hub.repos[repo] = payload
                    hub.files.setdefault(repo, {})
                    return self._send(200, {"url": f"http://{self.headers['Host']}/{repo}"})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
                if match is None or match.group(1) not in hub.repos:
                    return self._send(404, {"error": "Repository not found"})
                repo, action = match.group(1), match.group(2)
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(
                        200,
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                    )
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        hub.files[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                host = self.headers["Host"]
                return self._send(200, {"commitUrl": f"http://{host}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
