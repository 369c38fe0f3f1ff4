"""gpufleet's client for Grafana's HTTP API, on urllib3: exactly the calls the collector and
`gpufleet dashboards push` make (folder, data sources, dashboards, annotations) and nothing else.

A refusal or an unreachable Grafana becomes a :class:`GrafanaError` that says which call failed, what
Grafana answered and what to check; it never carries the token. The transport is a urllib3
``PoolManager`` passed in (tests point the client at a local Grafana double).
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import urllib3

JSON = dict[str, Any]

# What a status usually means for a service-account token pushing dashboards, as the error's next step.
_NEXT_STEP = {
    401: "check --grafana-token (GPUFLEET_GRAFANA_TOKEN): Grafana does not accept it",
    403: "give the service account the Editor role (or folder and data source write permissions)",
}


class GrafanaError(Exception):
    """A call to Grafana failed: ``status`` is Grafana's HTTP status, or None when no answer came (connection
    refused, timeout); ``message`` is Grafana's own message (or the transport's reason)."""

    def __init__(self, grafana: str, method: str, path: str, status: int | None, message: str) -> None:
        self.grafana = grafana
        self.method = method
        self.path = path
        self.status = status
        self.message = message
        if status is None:
            text = f"cannot reach Grafana at {grafana} ({method} {path}: {message})"
        else:
            text = f"Grafana at {grafana} answered {status} to {method} {path}: {message}"
        hint = _NEXT_STEP.get(status) if status is not None else None
        super().__init__(f"{text}; {hint}" if hint else text)


class GrafanaApi:
    """One Grafana (``http://host:3000``, its root URL), authenticated by a service-account token.

    ``get_*`` return None when Grafana has no such object (404); every other refusal raises
    :class:`GrafanaError`.
    """

    def __init__(
        self, url: str, token: str | None, *, timeout: float = 10.0, http: urllib3.PoolManager | None = None
    ) -> None:
        parts = urllib.parse.urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"--grafana-url {url!r} is not an http(s) URL; give Grafana's root URL, "
                "e.g. http://grafana:3000"
            )
        # user:password@ in the URL is Grafana's basic auth (a local admin); it never shows in messages.
        self.url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        self._headers = {"Accept": "application/json", "User-Agent": "gpufleet"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        elif parts.username:
            self._headers.update(
                urllib3.make_headers(
                    basic_auth=f"{urllib.parse.unquote(parts.username)}:"
                    f"{urllib.parse.unquote(parts.password or '')}"
                )
            )
        self._http = http if http is not None else urllib3.PoolManager()
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)

    # ---- folders ---------------------------------------------------------------------------------
    def get_folder(self, uid: str) -> JSON | None:
        return self._get(f"/folders/{_seg(uid)}")

    def create_folder(self, uid: str, title: str) -> JSON:
        return self._call("POST", "/folders", {"uid": uid, "title": title})

    def update_folder(self, uid: str, *, title: str, version: int | None, overwrite: bool) -> JSON:
        return self._call(
            "PUT", f"/folders/{_seg(uid)}", {"title": title, "version": version, "overwrite": overwrite}
        )

    # ---- data sources ----------------------------------------------------------------------------
    def get_datasource(self, uid: str) -> JSON | None:
        return self._get(f"/datasources/uid/{_seg(uid)}")

    def create_datasource(self, datasource: JSON) -> JSON:
        return self._call("POST", "/datasources", datasource)

    def update_datasource(self, datasource_id: int, datasource: JSON) -> JSON:
        return self._call("PUT", f"/datasources/{datasource_id}", datasource)

    # ---- dashboards ------------------------------------------------------------------------------
    def get_dashboard(self, uid: str) -> JSON | None:
        """``{"dashboard": …, "meta": {"folderUid": …, …}}``."""
        return self._get(f"/dashboards/uid/{_seg(uid)}")

    def save_dashboard(self, dashboard: JSON, *, folder_uid: str, overwrite: bool, message: str) -> JSON:
        """Create or update (each save is a new version in Grafana's history)."""
        return self._call(
            "POST",
            "/dashboards/db",
            {"dashboard": dashboard, "folderUid": folder_uid, "overwrite": overwrite, "message": message},
        )

    # ---- annotations -----------------------------------------------------------------------------
    def add_annotation(
        self, *, time_ms: int, tags: list[str], text: str, time_end_ms: int | None = None
    ) -> int:
        """An organisation-wide annotation (a region when ``time_end_ms`` is given); its id."""
        body: JSON = {"time": time_ms, "tags": tags, "text": text}
        if time_end_ms is not None:
            body["timeEnd"] = time_end_ms
        return int(self._call("POST", "/annotations", body)["id"])

    def patch_annotation(
        self,
        annotation_id: int,
        *,
        time_end_ms: int | None = None,
        tags: list[str] | None = None,
        text: str | None = None,
    ) -> None:
        """Change only the fields given; the others keep their values."""
        body: JSON = {
            k: v for k, v in (("timeEnd", time_end_ms), ("tags", tags), ("text", text)) if v is not None
        }
        self._call("PATCH", f"/annotations/{annotation_id}", body)

    # ---- plumbing --------------------------------------------------------------------------------
    def _get(self, path: str) -> JSON | None:
        try:
            return self._call("GET", path)
        except GrafanaError as exc:
            if exc.status == 404:
                return None
            raise

    def _call(self, method: str, path: str, body: JSON | None = None) -> Any:
        api_path = "/api" + path
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            resp = self._http.request(
                method,
                self.url + api_path,
                body=data,
                headers=headers,
                timeout=self._timeout,
                retries=False,
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise GrafanaError(self.url, method, api_path, None, _reason(exc)) from None
        if not 200 <= resp.status < 300:
            raise GrafanaError(self.url, method, api_path, resp.status, _message(resp))
        try:
            return json.loads(resp.data) if resp.data else {}
        except ValueError:
            raise GrafanaError(
                self.url,
                method,
                api_path,
                resp.status,
                f"the answer is not JSON ({resp.data[:80]!r}); is this Grafana's root URL?",
            ) from None


def _seg(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _message(resp: urllib3.BaseHTTPResponse) -> str:
    """Grafana's error message (``{"message": …}``), else the start of the body, else the reason phrase."""
    try:
        payload = json.loads(resp.data)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("message"), str):
        return payload["message"]
    if 300 <= resp.status < 400:
        return f"redirected to {resp.headers.get('Location')}; give Grafana's root URL"
    text = resp.data[:200].decode("utf-8", "replace").strip()
    return text or resp.reason or "no message"


def _reason(exc: urllib3.exceptions.HTTPError) -> str:
    # NewConnectionError and friends wrap the socket error; its text is the useful part.
    inner = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
    text = str(inner)
    return text.rpartition(": ")[2] if isinstance(inner, urllib3.exceptions.NewConnectionError) else text
