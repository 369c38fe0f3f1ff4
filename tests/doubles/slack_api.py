"""A local Slack Web API double that checks each request against Slack's OpenAPI specification.

The real ``slack_sdk.WebClient`` talks HTTP to it (``base_url``). For every call it checks
that the method exists in the spec, the bearer token is sent, every parameter is one
the method declares, required parameters are present, and Block Kit limits hold.
A request that fails a check gets ``{"ok": false, "error": "invalid_arguments"}`` and is
recorded in ``problems``; tests assert ``problems == []``.

It can be scripted to answer 429 with ``Retry-After`` or a 5xx, to test retries.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.doubles.reference import load_spec

SPEC_FILE = "slack/slack-web-openapi-v2.json"

# Block Kit limits (Slack's documented caps).
MAX_BLOCKS = 50
MAX_HEADER_TEXT = 150
MAX_SECTION_TEXT = 3000
MAX_FIELDS = 10
MAX_FIELD_TEXT = 2000
MAX_TEXT = 40000
MAX_BUTTON_TEXT = 75
MAX_BUTTON_URL = 3000
MAX_ACTION_ELEMENTS = 25


@dataclass
class Message:
    channel: str
    ts: str
    text: str
    blocks: list = field(default_factory=list)
    attachments: list = field(default_factory=list)
    thread_ts: str | None = None
    edits: list[dict] = field(default_factory=list)
    received_at: float = 0.0  # Unix time the double took the post (for latency benchmarks)
    edited_at: list[float] = field(default_factory=list)


class SlackDouble:
    def __init__(self) -> None:
        self.spec = load_spec(SPEC_FILE)
        self.problems: list[str] = []
        self.calls: list[tuple[str, dict]] = []
        self.messages: list[Message] = []
        self.scripted: list[
            tuple[int, dict, dict]
        ] = []  # (status, headers, body) answered before normal handling
        self._lock = threading.Lock()
        self._ts = itertools.count(1)
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                double._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._server.server_port}/api/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def collector_flags(self, channel: str = "C0ONCALL") -> list[str]:
        """`gpufleet collector`'s flags that send its notifications here."""
        return [
            "--slack-token",
            "xoxb-test-token",
            "--slack-channel",
            channel,
            "--slack-base-url",
            self.base_url,
        ]

    def __enter__(self) -> SlackDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---- scripting -------------------------------------------------------------------------------
    def answer_next(self, status: int, *, retry_after: int | None = None, times: int = 1) -> None:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        body = {"ok": False, "error": "ratelimited" if status == 429 else "internal_error"}
        with self._lock:
            self.scripted += [(status, headers, body)] * times

    def channel_messages(self, channel: str) -> list[Message]:
        return [m for m in self.messages if m.channel == channel and m.thread_ts is None]

    # ---- handling --------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        method = h.path.split("?")[0].rsplit("/", 1)[-1]
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length)
        ctype = h.headers.get("Content-Type", "")
        if ctype.startswith("application/json"):
            params = json.loads(raw or b"{}")
        else:
            params = {k: v[0] for k, v in urllib.parse.parse_qs(raw.decode()).items()}
        with self._lock:
            self.calls.append((method, params))
            if self.scripted:
                status, headers, body = self.scripted.pop(0)
                return self._reply(h, status, body, headers)
        problems = self._check(method, h.headers.get("Authorization", ""), ctype, params)
        if problems:
            with self._lock:
                self.problems += [f"{method}: {p}" for p in problems]
            return self._reply(
                h,
                200,
                {"ok": False, "error": "invalid_arguments", "response_metadata": {"messages": problems}},
            )
        return self._reply(h, 200, self._perform(method, params))

    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json; charset=utf-8")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _check(self, method: str, auth: str, ctype: str, params: dict) -> list[str]:
        op = self.spec["paths"].get(f"/{method}", {}).get("post")
        if op is None:
            return [f"/{method} is not a POST method in the Slack Web API specification"]
        problems = []
        consumes = op.get("consumes", [])
        if not any(ctype.startswith(c) for c in consumes):
            problems.append(f"content type {ctype!r} is not one of {consumes}")
        declared = {p["name"]: p for p in op.get("parameters", [])}
        if (
            "token" in declared
            and declared["token"].get("in") == "header"
            and not auth.startswith("Bearer xox")
        ):
            problems.append("no bearer token in the Authorization header")
        for name, p in declared.items():
            if p.get("required") and p.get("in") == "formData" and name not in params:
                problems.append(f"required parameter {name!r} is missing")
        for name, value in params.items():
            p = declared.get(name)
            if p is None or p.get("in") != "formData":
                problems.append(f"parameter {name!r} is not declared for {method}")
                continue
            if name in ("blocks", "attachments"):
                if isinstance(value, str):
                    try:
                        value = json.loads(value)
                    except json.JSONDecodeError:
                        problems.append(f"{name} is not JSON")
                        continue
                if not isinstance(value, list):
                    problems.append(f"{name} must be a JSON array")
                    continue
            elif p.get("type") == "string" and not isinstance(value, str):
                problems.append(f"parameter {name!r} must be a string, not {type(value).__name__}")
            elif p.get("type") == "boolean" and not isinstance(value, (bool, str)):
                problems.append(f"parameter {name!r} must be a boolean")
        if method in ("chat.postMessage", "chat.update"):
            if not any(k in params for k in ("text", "blocks", "attachments")):
                problems.append("one of text, blocks or attachments is required")
            if len(str(params.get("text", ""))) > MAX_TEXT:
                problems.append(f"text over {MAX_TEXT} characters")
            if params.get("reply_broadcast") in (True, "true", "1") and not params.get("thread_ts"):
                problems.append("reply_broadcast is only meaningful with thread_ts")
            problems += self._check_blocks(params)
        return problems

    @staticmethod
    def _check_blocks(params: dict) -> list[str]:
        problems = []

        def as_list(v: Any) -> list:
            return json.loads(v) if isinstance(v, str) else (v or [])

        block_lists = [as_list(params.get("blocks"))]
        for att in as_list(params.get("attachments")):
            block_lists.append(att.get("blocks", []))
            if (
                "color" in att
                and not str(att["color"]).startswith("#")
                and att["color"] not in ("good", "warning", "danger")
            ):
                problems.append(f"attachment color {att['color']!r} is not a hex colour")
        for blocks in block_lists:
            if len(blocks) > MAX_BLOCKS:
                problems.append(f"{len(blocks)} blocks, over {MAX_BLOCKS}")
            for b in blocks:
                t = b.get("type")
                if t == "header":
                    if b.get("text", {}).get("type") != "plain_text":
                        problems.append("a header block's text must be plain_text")
                    if len(b.get("text", {}).get("text", "")) > MAX_HEADER_TEXT:
                        problems.append(f"header text over {MAX_HEADER_TEXT} characters")
                elif t == "section":
                    if "text" not in b and "fields" not in b:
                        problems.append("a section needs text or fields")
                    if len(b.get("text", {}).get("text", "")) > MAX_SECTION_TEXT:
                        problems.append(f"section text over {MAX_SECTION_TEXT} characters")
                    if len(b.get("fields", [])) > MAX_FIELDS:
                        problems.append(f"section with {len(b['fields'])} fields, over {MAX_FIELDS}")
                    for f in b.get("fields", []):
                        if len(f.get("text", "")) > MAX_FIELD_TEXT:
                            problems.append(f"field text over {MAX_FIELD_TEXT} characters")
                elif t in ("context", "actions"):
                    if not b.get("elements"):
                        problems.append(f"a {t} block needs elements")
                    if t == "actions" and len(b.get("elements", [])) > MAX_ACTION_ELEMENTS:
                        problems.append(f"an actions block with over {MAX_ACTION_ELEMENTS} elements")
                    for e in b.get("elements", []):
                        if e.get("type") == "button" and not (
                            e.get("url", "").startswith("http") or e.get("action_id")
                        ):
                            problems.append("a button needs a url or an action_id")
                        if e.get("type") == "button":
                            if len(e.get("text", {}).get("text", "")) > MAX_BUTTON_TEXT:
                                problems.append(f"button text over {MAX_BUTTON_TEXT} characters")
                            if len(e.get("url", "")) > MAX_BUTTON_URL:
                                problems.append(f"button url over {MAX_BUTTON_URL} characters")
                elif t not in ("divider", "image", "rich_text", "input", "file", "video"):
                    problems.append(f"unknown block type {t!r}")
        return problems

    def _perform(self, method: str, params: dict) -> dict:
        def as_list(v: Any) -> list:
            return json.loads(v) if isinstance(v, str) else (v or [])

        with self._lock:
            if method == "chat.postMessage":
                ts = f"{int(time.time())}.{next(self._ts):06d}"
                m = Message(
                    params["channel"],
                    ts,
                    params.get("text", ""),
                    as_list(params.get("blocks")),
                    as_list(params.get("attachments")),
                    params.get("thread_ts"),
                    received_at=time.time(),
                )
                self.messages.append(m)
                return {
                    "ok": True,
                    "channel": m.channel,
                    "ts": ts,
                    "message": {"type": "message", "text": m.text, "ts": ts, "bot_id": "B0GPUFLEET"},
                }
            if method == "chat.update":
                for m in self.messages:
                    if m.channel == params["channel"] and m.ts == params["ts"]:
                        m.edits.append(params)
                        m.edited_at.append(time.time())
                        m.text = params.get("text", m.text)
                        m.attachments = as_list(params.get("attachments")) or m.attachments
                        return {"ok": True, "channel": m.channel, "ts": m.ts, "text": m.text}
                return {"ok": False, "error": "message_not_found"}
            if method == "auth.test":
                return {
                    "ok": True,
                    "url": "https://gpufleet.slack.com/",
                    "team": "gpufleet",
                    "user": "gpufleet",
                    "team_id": "T0",
                    "user_id": "U0",
                    "bot_id": "B0GPUFLEET",
                }
        return {"ok": True}
