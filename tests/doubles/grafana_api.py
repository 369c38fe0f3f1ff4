"""A local Grafana HTTP API double that checks each request against gpufleet's own description of the
Grafana API it uses (``specs/grafana/grafana-api-gpufleet.json``, Swagger 2.0; see
``grafana-api-gpufleet.md``).

For every request it checks that the path and method are described (under the ``/api`` base path), that
every query parameter is one the operation declares (with its type), that a body is sent exactly when the
operation takes one and that it matches the body schema ($refs resolved: types, required fields, enums,
no properties the schema does not declare), and that a bearer token is sent. A request that fails a check
is answered 400 and recorded in ``problems``; tests assert ``problems == []``.

It behaves like Grafana for what gpufleet uses: folders, data sources, ``dashboards/db`` (each save is a
new version, kept in ``versions``), ``dashboards/uid`` and annotations. ``answer_next`` scripts errors
(a Grafana that is still starting answers 503).
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SPEC_FILE = Path(__file__).parent / "specs" / "grafana" / "grafana-api-gpufleet.json"
_TYPES = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


class SpecError(Exception):
    pass


class Spec:
    def __init__(self, path: Path = SPEC_FILE) -> None:
        self.raw = json.loads(path.read_text())
        self.base = self.raw.get("basePath", "")
        self.routes = []
        for template, ops in self.raw["paths"].items():
            pattern = (
                "^"
                + re.sub(r"\{[^}]+\}", "([^/]+)", re.escape(template).replace(r"\{", "{").replace(r"\}", "}"))
                + "$"
            )
            names = re.findall(r"\{([^}]+)\}", template)
            literal = len([s for s in template.split("/") if s and not s.startswith("{")])
            self.routes.append((literal, template, re.compile(pattern), names, ops))
        self.routes.sort(key=lambda r: -r[0])  # /datasources/uid/{uid} before /datasources/{id}

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            schema = self.raw["definitions"][name]
        return schema

    def match(self, method: str, path: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        if not path.startswith(self.base + "/"):
            raise SpecError(f"{path} is not under the API base path {self.base}")
        rel = path[len(self.base) :]
        known = False
        for _, template, rx, names, ops in self.routes:
            m = rx.match(rel)
            if m:
                known = True
                if method.lower() in ops:
                    return template, dict(zip(names, m.groups(), strict=True)), ops[method.lower()]
        raise SpecError(
            f"{method} {rel}: " + ("method not allowed by the spec" if known else "no such path in the spec")
        )

    def check(self, schema: dict[str, Any], value: Any, where: str) -> list[str]:
        schema = self.resolve(schema)
        if value is None:  # Grafana's Go decoder takes null for any field
            return []
        problems = []
        t = schema.get("type")
        if t:
            ok = isinstance(value, _TYPES[t]) and not (t in ("integer", "number") and isinstance(value, bool))
            if not ok:
                return [f"{where}: expected {t}, got {type(value).__name__} {value!r:.60}"]
        if "enum" in schema and value not in schema["enum"]:
            problems.append(f"{where}: {value!r} is not one of {schema['enum']}")
        if isinstance(value, dict):
            props = schema.get("properties")
            for req in schema.get("required", []):
                if req not in value:
                    problems.append(f"{where}: required field {req!r} is missing")
            for k, v in value.items():
                if props is not None and k in props:
                    problems += self.check(props[k], v, f"{where}.{k}")
                elif props is not None and "additionalProperties" in schema:
                    problems += self.check(schema["additionalProperties"], v, f"{where}.{k}")
                elif props is not None:
                    problems.append(f"{where}: field {k!r} is not in the spec ({sorted(props)})")
                elif isinstance(schema.get("additionalProperties"), dict):
                    problems += self.check(schema["additionalProperties"], v, f"{where}.{k}")
        if isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                problems += self.check(schema["items"], item, f"{where}[{i}]")
        return problems

    def check_request(
        self,
        op: dict[str, Any],
        path_params: dict[str, str],
        query: dict[str, list[str]],
        body: Any,
        has_body: bool,
    ) -> list[str]:
        problems = []
        params = op.get("parameters", [])
        declared = {p["name"]: p for p in params if p.get("in") == "query"}
        for name, values in query.items():
            p = declared.get(name)
            if p is None:
                problems.append(f"query parameter {name!r} is not declared ({sorted(declared)})")
                continue
            for v in values:
                if p.get("type") == "integer" and not re.fullmatch(r"-?\d+", v):
                    problems.append(f"query parameter {name}={v!r} is not an integer")
        for p in params:
            if p.get("in") == "path" and p.get("type") == "integer":
                v = path_params.get(p["name"], "")
                if not re.fullmatch(r"\d+", v):
                    problems.append(f"path parameter {p['name']}={v!r} is not an integer")
            if p.get("required") and p.get("in") == "query" and p["name"] not in query:
                problems.append(f"required query parameter {p['name']!r} is missing")
        body_params = [p for p in params if p.get("in") == "body"]
        if body_params:
            if not has_body:
                problems.append("the operation takes a JSON body and none was sent")
            else:
                problems += self.check(body_params[0].get("schema", {}), body, "body")
        elif has_body and body not in (None, {}, ""):
            problems.append("a body was sent to an operation that takes none")
        return problems


class GrafanaDouble:
    def __init__(self, token: str = "glsa_test_token") -> None:
        self.spec = Spec()
        self.token = token
        self.problems: list[str] = []
        self.calls: list[tuple[str, str]] = []  # (METHOD, path template)
        self.folders: dict[str, dict[str, Any]] = {}
        self.datasources: dict[int, dict[str, Any]] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}  # uid -> {"dashboard", "folderUid"}
        self.versions: dict[str, list[dict[str, Any]]] = {}  # uid -> every saved version, oldest first
        self.annotations: dict[int, dict[str, Any]] = {}
        self.scripted: list[int] = []  # statuses to answer the next requests with, before checking them
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def _any(self) -> None:
                double._handle(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> GrafanaDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def calls_of(self, method: str) -> list[str]:
        return [t for m, t in self.calls if m == method]

    def answer_next(self, status: int, *, times: int = 1) -> None:
        with self._lock:
            self.scripted += [status] * times

    # ---- plumbing --------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        parsed = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        method = h.command
        status, body = 200, None
        try:
            with self._lock:
                scripted = self.scripted.pop(0) if self.scripted else None
            if scripted is not None:
                status, body = scripted, {"message": f"scripted answer {scripted}"}
                raise _Answer
            if h.headers.get("Authorization", "") != f"Bearer {self.token}":
                status, body = 401, {"message": "Unauthorized"}
                raise _Answer
            template, params, op = self.spec.match(method, parsed.path)
            payload = None
            if raw:
                if "application/json" not in h.headers.get("Content-Type", ""):
                    raise SpecError(
                        f"{method} {template}: body sent as {h.headers.get('Content-Type')!r}, not JSON"
                    )
                payload = json.loads(raw)
            problems = self.spec.check_request(op, params, query, payload, bool(raw))
            if problems:
                raise SpecError(f"{method} {template}: " + "; ".join(problems))
            with self._lock:
                self.calls.append((method, template))
                status, body = self._serve(method, template, params, query, payload)
        except _Answer:
            pass
        except SpecError as exc:
            with self._lock:
                self.problems.append(str(exc))
            status, body = 400, {"message": str(exc)}
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _serve(
        self, method: str, template: str, p: dict[str, str], query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        route = getattr(
            self, "_" + method.lower() + re.sub(r"[^a-z]+", "_", template.lower()).rstrip("_"), None
        )
        if route is None:
            raise SpecError(f"{method} {template} is described but this double does not implement it")
        return route(p, query, body)

    # ---- folders ---------------------------------------------------------------------------------
    def _get_folders_folder_uid(self, p, q, body):
        f = self.folders.get(p["folder_uid"])
        return (200, f) if f else (404, {"message": "folder not found", "status": "not-found"})

    def _post_folders(self, p, q, body):
        uid = body.get("uid") or f"f{next(self._ids)}"
        if not body.get("title"):
            raise SpecError("POST /folders: Grafana refuses a folder without a title")
        if uid in self.folders:
            return 409, {"message": "a folder with the same uid already exists"}
        self.folders[uid] = {
            "id": next(self._ids),
            "uid": uid,
            "title": body["title"],
            "url": f"/dashboards/f/{uid}/",
            "version": 1,
        }
        return 200, self.folders[uid]

    def _put_folders_folder_uid(self, p, q, body):
        f = self.folders.get(p["folder_uid"])
        if f is None:
            return 404, {"message": "folder not found"}
        if not body.get("overwrite") and body.get("version") != f["version"]:
            return 412, {
                "message": "the folder has been changed by someone else",
                "status": "version-mismatch",
            }
        f.update(title=body.get("title", f["title"]), version=f["version"] + 1)
        return 200, f

    # ---- data sources ----------------------------------------------------------------------------
    def _public_ds(self, ds: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in ds.items() if k != "secureJsonData"}
        out["secureJsonFields"] = {k: True for k in ds.get("secureJsonData") or {}}
        return out

    def _get_datasources_uid_datasource_uid(self, p, q, body):
        for ds in self.datasources.values():
            if ds["uid"] == p["datasource_uid"]:
                return 200, self._public_ds(ds)
        return 404, {"message": "Data source not found"}

    def _post_datasources(self, p, q, body):
        if not body.get("name") or not body.get("type"):
            raise SpecError("POST /datasources: Grafana needs a name and a type")
        if any(d["name"] == body["name"] or d["uid"] == body.get("uid") for d in self.datasources.values()):
            return 409, {"message": "data source with the same name or uid already exists"}
        ds_id = next(self._ids)
        ds = {
            "id": ds_id,
            "orgId": 1,
            "uid": body.get("uid") or f"ds{ds_id}",
            "readOnly": False,
            "version": 1,
            "isDefault": False,
            "access": "proxy",
            "url": "",
            "user": "",
            "database": "",
            "basicAuth": False,
            "jsonData": {},
            **copy.deepcopy(body),
        }
        self.datasources[ds_id] = ds
        return 200, {
            "datasource": self._public_ds(ds),
            "id": ds_id,
            "message": "Datasource added",
            "name": ds["name"],
        }

    def _put_datasources_datasource_id(self, p, q, body):
        ds = self.datasources.get(_number(p["datasource_id"], "PUT /datasources/{datasource_id}"))
        if ds is None:
            return 404, {"message": "Data source not found"}
        ds.update(copy.deepcopy(body))
        ds["version"] += 1
        return 200, {
            "datasource": self._public_ds(ds),
            "id": ds["id"],
            "message": "Datasource updated",
            "name": ds["name"],
        }

    # ---- dashboards ------------------------------------------------------------------------------
    def _get_dashboards_uid_uid(self, p, q, body):
        d = self.dashboards.get(p["uid"])
        if d is None:
            return 404, {"message": "Dashboard not found"}
        dash = d["dashboard"]
        return 200, {
            "dashboard": copy.deepcopy(dash),
            "meta": {
                "type": "db",
                "slug": _slug(dash["title"]),
                "version": dash["version"],
                "folderUid": d["folderUid"],
                "url": f"/d/{dash['uid']}/{_slug(dash['title'])}",
                "provisioned": False,
            },
        }

    def _post_dashboards_db(self, p, q, body):
        dash = copy.deepcopy(body["dashboard"])
        if not dash.get("title"):
            raise SpecError("POST /dashboards/db: Grafana refuses a dashboard without a title")
        folder = body.get("folderUid") or ""
        if folder and folder not in self.folders:
            return 400, {"message": "folder not found", "status": "folder-not-found"}
        uid = dash.get("uid") or f"d{next(self._ids)}"
        existing = self.dashboards.get(uid)
        if existing and not body.get("overwrite") and dash.get("version") != existing["dashboard"]["version"]:
            return 412, {
                "message": "The dashboard has been changed by someone else",
                "status": "version-mismatch",
            }
        if existing is None and dash.get("id"):
            return 404, {"message": "Dashboard not found", "status": "not-found"}
        dash["uid"] = uid
        dash["id"] = existing["dashboard"]["id"] if existing else next(self._ids)
        dash["version"] = (
            existing["dashboard"]["version"] + 1 if existing else 1
        )  # every save is a new version
        self.dashboards[uid] = {"dashboard": dash, "folderUid": folder}
        self.versions.setdefault(uid, []).append(
            {"version": dash["version"], "message": body.get("message", ""), "data": copy.deepcopy(dash)}
        )
        return 200, {
            "id": dash["id"],
            "uid": uid,
            "url": f"/d/{uid}/{_slug(dash['title'])}",
            "status": "success",
            "version": dash["version"],
            "slug": _slug(dash["title"]),
        }

    # ---- annotations -----------------------------------------------------------------------------
    def _post_annotations(self, p, q, body):
        if not body.get("text"):
            raise SpecError("POST /annotations: Grafana refuses an annotation without text")
        a_id = next(self._ids)
        self.annotations[a_id] = {
            "id": a_id,
            "time": body.get("time") or 0,
            "timeEnd": body.get("timeEnd") or 0,
            "tags": body.get("tags") or [],
            "text": body["text"],
        }
        return 200, {"message": "Annotation added", "id": a_id}

    def _patch_annotations_annotation_id(self, p, q, body):
        a = self.annotations.get(_number(p["annotation_id"], "PATCH /annotations/{annotation_id}"))
        if a is None:
            return 404, {"message": "Could not find annotation to update"}
        for k in ("time", "timeEnd", "text", "tags"):
            if body.get(k):
                a[k] = body[k]
        return 200, {"message": "Annotation patched"}


class _Answer(Exception):
    pass


def _number(value: str, where: str) -> int:
    """Grafana's path ids are numbers, though its API description types them as strings."""
    if not value.isdigit():
        raise SpecError(f"{where}: {value!r} is not a numeric id")
    return int(value)


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
