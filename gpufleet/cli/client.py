"""The one HTTP client of a collector's API (silences, the report, the fleet view) and the one of an agent's
simulator, on the standard library only so that an agent-only install can use them. Every failure is a
ClientError whose message is one line naming the URL and what to check; a bearer token is sent, never shown."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict, cast

from gpufleet.core.labels import Matcher, MatcherDoc

DEFAULT_TIMEOUT_S = 10.0
# A long report range is computed while the request waits.
REPORT_TIMEOUT_S = 300.0


class ClientError(Exception):
    """A request that did not get its answer: unreachable, refused, or an answer that is not what the API says."""


class FleetAlert(TypedDict):
    rule: str
    state: str
    severity: str
    runbook_url: str | None


class FleetGPU(TypedDict, total=False):
    """One GPU of /api/v1/fleet; a value the GPU did not report is None."""

    node: str | None
    gpu: str | None
    uuid: str | None
    model: str | None
    cluster: str | None
    pod: str | None
    namespace: str | None
    container: str | None
    up: bool
    stale: bool
    sm_active: float | None
    utilization: float | None
    memory_used_bytes: float | None
    memory_total_bytes: float | None
    temperature_celsius: float | None
    power_watts: float | None
    throttle: list[str]
    alerts: list[FleetAlert]


class FleetNode(TypedDict, total=False):
    cluster: str | None
    node: str | None
    gpus: list[FleetGPU]


class FleetTotals(TypedDict, total=False):
    gpus: int
    up: int
    down: int
    stale: int
    nodes: int
    throttled: int
    alerts_firing: int
    alerts_pending: int
    power_watts: float


class FleetTruncated(TypedDict):
    """What /api/v1/fleet left out of its lists (past the collector's --fleet-max-gpus); totals count all."""

    gpus_listed: int
    gpus_omitted: int
    nodes_omitted: int
    alerts_omitted: int
    message: str


class Fleet(TypedDict, total=False):
    """/api/v1/fleet: every GPU by node, with the totals of the fleet page's header; ``truncated`` only when
    the lists were cut."""

    generated_at: float
    totals: FleetTotals
    nodes: list[FleetNode]
    truncated: FleetTruncated


SilenceState = Literal["active", "pending", "expired", "disabled"]


@dataclass(frozen=True)
class Silence:
    id: str
    state: SilenceState  # disabled: stored with a regex the collector no longer runs; it mutes nothing
    starts_at: float  # Unix seconds
    ends_at: float
    created_by: str
    comment: str
    matchers: tuple[str, ...]  # as written: name=value, name=~regex, ...
    reason: str = ""  # why a disabled silence is disabled


class _SilenceDoc(TypedDict):
    id: str
    matchers: list[MatcherDoc]
    startsAt: float
    endsAt: float
    createdBy: str
    comment: str
    status: dict[str, str]


def _matcher_text(doc: MatcherDoc) -> str:
    """A matcher as amtool writes it, without compiling its regex: a disabled silence's may not compile."""
    regex, equal = bool(doc.get("isRegex")), bool(doc.get("isEqual", True))
    op = ("=~" if regex else "=") if equal else ("!~" if regex else "!=")
    return f"{doc['name']}{op}{doc['value']}"


def _silence(doc: _SilenceDoc) -> Silence:
    state = doc["status"]["state"]
    return Silence(
        id=doc["id"],
        state=cast(SilenceState, state),
        starts_at=float(doc["startsAt"]),
        ends_at=float(doc["endsAt"]),
        created_by=doc["createdBy"],
        comment=doc["comment"],
        matchers=tuple(_matcher_text(m) for m in doc["matchers"]),
        reason=doc["status"].get("reason", ""),
    )


class _Http:
    """Requests to one base URL, with the failure messages both clients share."""

    def __init__(
        self,
        base_url: str,
        *,
        what: str,
        hint: str,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._what = what  # "the collector", "the agent"
        self._hint = hint  # what to check when it cannot be reached
        self._token = token
        self._timeout_s = timeout_s

    def request(
        self, method: str, path: str, body: object | None = None, *, timeout_s: float | None = None
    ) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(
            self.base_url + path,
            method=method,
            headers=headers,
            data=json.dumps(body).encode() if body is not None else None,
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self._timeout_s) as resp:
                data: bytes = resp.read()
                return data
        except urllib.error.HTTPError as exc:
            raise ClientError(
                f"{self._what} at {self.base_url} refused {method} {path.split('?')[0]} "
                f"({exc.code}): {_detail(exc)}{self._refusal_hint(exc.code)}"
            ) from None
        except (OSError, ValueError) as exc:  # ValueError: a URL urllib cannot use
            reason = getattr(exc, "reason", None) or exc
            raise ClientError(
                f"cannot reach {self._what} at {self.base_url} ({reason}); {self._hint}"
            ) from None

    def json(self, method: str, path: str, body: object | None = None) -> object:
        data = self.request(method, path, body)
        try:
            decoded: object = json.loads(data)
        except ValueError:
            raise ClientError(
                f"{self._what} at {self.base_url} answered {path} with something that is not JSON; "
                f"{self._hint}"
            ) from None
        return decoded

    def _refusal_hint(self, status: int) -> str:
        if status in (401, 403):
            return "; check --token (GPUFLEET_TOKEN; to read only, GPUFLEET_READ_TOKEN)"
        return ""


def _detail(exc: urllib.error.HTTPError) -> str:
    """The error text of a refusal: FastAPI's "detail", the API's "error", else the body itself, on one line."""
    text = exc.read().decode(errors="replace")
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        doc = json.loads(text)
        text = str(doc.get("detail") or doc["error"])
    return " ".join(text.split()) or exc.reason


class CollectorClient:
    """The collector's HTTP API, as the command line uses it."""

    def __init__(
        self, base_url: str, *, token: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self._http = _Http(
            base_url,
            what="the collector",
            token=token,
            timeout_s=timeout_s,
            hint="check --collector (GPUFLEET_COLLECTOR) and that the collector runs",
        )

    @property
    def base_url(self) -> str:
        return self._http.base_url

    def add_silence(
        self, matchers: Sequence[Matcher], *, duration: str, created_by: str, comment: str
    ) -> str:
        """The new silence's id."""
        doc = self._http.json(
            "POST",
            "/api/v1/silences",
            {
                "matchers": [m.to_api() for m in matchers],
                "duration": duration,
                "createdBy": created_by,
                "comment": comment,
            },
        )
        if not isinstance(doc, dict) or not isinstance(doc.get("silenceID"), str):
            raise self._malformed("/api/v1/silences", doc)
        return str(doc["silenceID"])

    def silences(self) -> list[Silence]:
        doc = self._http.json("GET", "/api/v1/silences")
        try:
            return [_silence(s) for s in cast(dict[str, list[_SilenceDoc]], doc)["silences"]]
        except (TypeError, KeyError, ValueError):
            raise self._malformed("/api/v1/silences", doc) from None

    def expire_silence(self, silence_id: str) -> None:
        self._http.request("DELETE", f"/api/v1/silences/{urllib.parse.quote(silence_id, safe='')}")

    def report(self, *, since: str, fmt: str, until: float | None = None) -> str:
        """The efficiency report, rendered by the collector as ``fmt`` (markdown or html)."""
        query = {"since": since, "format": fmt, **({"until": str(until)} if until is not None else {})}
        return self._http.request(
            "GET", "/api/v1/report?" + urllib.parse.urlencode(query), timeout_s=REPORT_TIMEOUT_S
        ).decode()

    def fleet(self) -> Fleet:
        doc = self._http.json("GET", "/api/v1/fleet")
        if not isinstance(doc, dict) or not isinstance(doc.get("nodes", []), list):
            raise self._malformed("/api/v1/fleet", doc)
        return cast(Fleet, doc)

    def _malformed(self, path: str, doc: object) -> ClientError:
        return ClientError(
            f"the collector at {self.base_url} answered {path} with {str(doc)[:200]!r}, not what "
            "its API describes; is --collector (GPUFLEET_COLLECTOR) a gpufleet collector of this "
            "version?"
        )


class AgentClient:
    """The simulator API of an agent started with --simulate."""

    def __init__(self, base_url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._http = _Http(
            base_url,
            what="the agent",
            timeout_s=timeout_s,
            hint="is it running with --simulate? check --agent (GPUFLEET_AGENT)",
        )

    def inject_fault(self, *, gpu: int, kind: str, xid: int | None, duration_s: float) -> str:
        """What the simulator says it injected."""
        doc = self._http.json(
            "POST", "/simulate/faults", {"gpu": gpu, "kind": kind, "xid": xid, "duration": duration_s}
        )
        if not isinstance(doc, dict) or "injected" not in doc:
            raise ClientError(
                f"the agent at {self._http.base_url} answered /simulate/faults with "
                f"{str(doc)[:200]!r}; is it a gpufleet agent of this version?"
            )
        return str(doc["injected"])
