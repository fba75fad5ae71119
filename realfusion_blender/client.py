# SPDX-License-Identifier: GPL-3.0-or-later
"""HTTP client for the RealFusion engine's API v1, standard library only.

Blender's Python has no torch and no `requests`; the engine runs in its own process
(`realfusion serve`) and this module only speaks JSON over loopback. It never touches
`bpy`, so it runs in the add-on's follower process (follower.py) and in tests outside Blender.

Every failure becomes an `EngineError` with a `problem` a user can read and a `fix`
that says what to do; errors the engine reports (`{"error": {"problem", "fix"}}`) are
passed on verbatim.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8765"
TERMINAL_STATES = ("done", "failed", "cancelled", "interrupted")

START_FIX = ("Start the engine with `realfusion serve` in the engine's Python environment, or press "
             "Start engine in the RealFusion panel (set the engine's Python in the add-on's preferences first).")


class EngineError(Exception):
    """A failure the user can act on.

    kind: "offline" (nothing listens at the URL), "auth" (wrong or missing token),
    "engine" (the engine reported it), "protocol" (an answer we cannot read),
    "input" (the image or a setting on our side).
    """

    def __init__(self, problem: str, fix: str, kind: str = "engine", status: int | None = None):
        super().__init__(f"{problem} {fix}".strip())
        self.problem = problem
        self.fix = fix
        self.kind = kind
        self.status = status

    def as_dict(self) -> dict:
        return {"problem": self.problem, "fix": self.fix, "kind": self.kind}


def normalize_url(url: str) -> str:
    url = (url or DEFAULT_URL).strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


def host_port(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(normalize_url(url))
    return parts.hostname or "127.0.0.1", parts.port or 8765


class EngineClient:
    """One engine at `base_url`. Thread-safe: it keeps no state between requests."""

    def __init__(self, base_url: str = DEFAULT_URL, token: str = "", timeout: float = 10.0):
        self.base_url = normalize_url(base_url)
        self.token = (token or "").strip()
        self.timeout = timeout

    # -- API v1 -------------------------------------------------------------------------------

    def health(self) -> dict:
        return self._json("GET", "/health")

    def submit(self, image_png: bytes, filename: str, preset: str = "standard", method: str = "realfusion",
               seed: int = 0, model: str | None = None, overrides: list[str] | None = None,
               initializer: str | None = None) -> dict:
        """initializer: the word naming the object, textual inversion's starting point (omitted: the engine's)."""
        body = {
            "image_png_base64": base64.b64encode(image_png).decode("ascii"),
            "filename": filename,
            "preset": preset,
            "method": method,
            "seed": int(seed),
            "model": model or None,
            "overrides": list(overrides or []),
        }
        if initializer:
            body["initializer"] = initializer
        return self._json("POST", "/jobs", body, timeout=max(self.timeout, 30.0))

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/jobs/{urllib.parse.quote(job_id)}")

    def cancel(self, job_id: str) -> dict:
        return self._json("DELETE", f"/jobs/{urllib.parse.quote(job_id)}")

    def resume(self, job_id: str) -> dict:
        """Queue an interrupted, failed or cancelled job again; it goes on from its last checkpoint."""
        return self._json("POST", f"/jobs/{urllib.parse.quote(job_id)}/resume", {})

    def file(self, job_id: str, name: str) -> bytes:
        return self.get_bytes(f"/jobs/{urllib.parse.quote(job_id)}/files/{urllib.parse.quote(name)}")

    def get_bytes(self, url_or_path: str, timeout: float | None = None) -> bytes:
        """Bytes of a file the engine serves; takes the URLs the engine returns (absolute or relative)."""
        return self._request("GET", url_or_path, None, timeout or max(self.timeout, 60.0))

    # -- plumbing -------------------------------------------------------------------------------

    def url(self, url_or_path: str) -> str:
        if "://" in url_or_path:
            return url_or_path
        return self.base_url + "/" + url_or_path.lstrip("/")

    def _json(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        raw = self._request(method, path, body, timeout or self.timeout)
        try:
            data = json.loads(raw.decode("utf-8") or "{}")
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise EngineError(f"The server at {self.base_url} answered {method} {path} with something that is "
                              "not JSON.", "Check that the engine URL in the add-on's preferences points at "
                              "`realfusion serve`, not at another program.", kind="protocol") from None
        if not isinstance(data, dict):
            raise EngineError(f"The engine answered {method} {path} with an unexpected reply.",
                              "Update the add-on and the engine to the same version.", kind="protocol")
        return data

    def _request(self, method: str, path: str, body: dict | None, timeout: float) -> bytes:
        url = self.url(path)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc, method, path) from None
        except urllib.error.URLError as exc:
            raise self._connection_error(exc.reason) from None
        except (socket.timeout, TimeoutError):
            raise self._connection_error(TimeoutError()) from None
        except (ConnectionError, OSError, http.client.HTTPException) as exc:  # reset or cut mid-answer
            raise self._connection_error(exc) from None

    def _connection_error(self, reason) -> EngineError:
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return EngineError(f"The engine at {self.base_url} did not answer in time.",
                               "It may be busy loading a model; wait a moment and try again, or restart it "
                               "with `realfusion serve`.", kind="offline")
        if isinstance(reason, socket.gaierror):
            return EngineError(f"The engine's address {self.base_url} cannot be resolved.",
                               "Fix the engine URL in the add-on's preferences (default "
                               f"{DEFAULT_URL}).", kind="offline")
        return EngineError(f"The RealFusion engine is not running at {self.base_url} ({_reason_text(reason)}).",
                           START_FIX, kind="offline")

    def _http_error(self, exc: urllib.error.HTTPError, method: str, path: str) -> EngineError:
        try:
            payload = json.loads(exc.read().decode("utf-8"))
        except Exception:  # noqa: BLE001 - any unreadable body is handled below
            payload = None
        error = payload.get("error") if isinstance(payload, dict) else None
        if exc.code in (401, 403):
            problem = "The engine refused the add-on's token." if self.token else "The engine asks for a token."
            # the engine's own fix speaks of curl headers; here the token is set in the preferences
            fix = ("Set Token (or Engine Data Folder, where the engine keeps its token file) in the add-on's "
                   "preferences.")
            if isinstance(error, dict) and error.get("problem"):
                problem = error["problem"]
            return EngineError(problem, fix, kind="auth", status=exc.code)
        if isinstance(error, dict) and error.get("problem"):
            return EngineError(str(error["problem"]), str(error.get("fix") or ""), kind="engine", status=exc.code)
        if isinstance(error, str):
            return EngineError(error, "", kind="engine", status=exc.code)
        if exc.code == 404:
            return EngineError(f"The engine has no {path}.",
                               "The engine may have been restarted without its jobs folder, or it is an older "
                               "version: update the engine and the add-on together.", kind="engine", status=404)
        return EngineError(f"The engine answered {method} {path} with HTTP {exc.code} {exc.reason}.",
                           "See the engine's log for the cause.", kind="engine", status=exc.code)


def _reason_text(reason) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    return str(getattr(reason, "strerror", None) or reason)


# No proxies: the engine is on loopback, and a system proxy would swallow those requests.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def read_token_file(path: str) -> str:
    """The engine's token from its token file; '' when there is none."""
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""
