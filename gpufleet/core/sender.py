"""The one remote-write sender: POSTs an encoded body with the remote-write 1.0 headers and says what the
answer means (sent, retry later, refused for good) by the one retry policy. The agent's pusher and the
collector's forwarder keep their own queues and delegate each send and its verdict here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from gpufleet.core import remote_write as rw
from gpufleet.core.retry import Verdict, classify, parse_retry_after

if TYPE_CHECKING:
    import urllib3

# Tells the gpufleet collector to evaluate its rules now rather than at the next interval (an XID, a lost GPU).
URGENT_HEADER = "X-Gpufleet-Urgent"
_DETAIL_CHARS = 300


class HttpResponse(Protocol):
    @property
    def status(self) -> int: ...

    @property
    def data(self) -> bytes: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


class HttpTransport(Protocol):
    """What the sender needs of an HTTP client; a ``urllib3.PoolManager`` is one."""

    def request(self, method: str, url: str, *, body: bytes, headers: dict[str, str]) -> HttpResponse: ...


@dataclass(frozen=True, slots=True)
class SendResult:
    verdict: Verdict
    status: int  # 0: no HTTP answer at all
    detail: str  # the start of an error body, or the transport's error; empty on success
    retry_after_s: float | None = None

    @property
    def problem(self) -> str:
        """What went wrong, for a log line: ``HTTP 503: database unavailable`` or ``connection refused``."""
        return f"HTTP {self.status}: {self.detail}" if self.status else self.detail


class RemoteWriteSender:
    """Sends remote-write bodies to one URL. The transport is passed in (tests give a recording one,
    production a TLS-verifying urllib3 pool from :func:`http_pool`)."""

    def __init__(
        self,
        url: str,
        http: HttpTransport,
        *,
        user_agent: str,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url
        self._http = http
        self._headers = {
            "Content-Type": rw.CONTENT_TYPE,
            "Content-Encoding": rw.CONTENT_ENCODING,
            "X-Prometheus-Remote-Write-Version": rw.PROTOCOL_VERSION,
            "User-Agent": user_agent,
            **(headers or {}),
        }
        if token:
            self._headers["Authorization"] = f"Bearer {token}"

    def send(self, body: bytes, *, urgent: bool = False) -> SendResult:
        """POST one body. Never raises for a network failure: that is a ``retry`` verdict with the reason."""
        headers = {**self._headers, URGENT_HEADER: "1"} if urgent else dict(self._headers)
        try:
            resp = self._http.request("POST", self.url, body=body, headers=headers)
            status = resp.status
            detail = resp.data[:_DETAIL_CHARS].decode(errors="replace") if status >= 300 else ""
            retry_after = parse_retry_after(resp.headers.get("Retry-After")) if resp.headers else None
        except Exception as exc:  # any transport failure (refused, reset, TLS, timeout) is "no answer"
            status, detail, retry_after = 0, str(exc) or type(exc).__name__, None
        return SendResult(classify(status), status, detail, retry_after)


def http_pool(
    timeout: float = 10.0,
    *,
    ca_bundle: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
) -> urllib3.PoolManager:
    """A urllib3 pool that verifies HTTPS targets (system CAs, or ``ca_bundle``) and can present a client
    certificate for mutual TLS. Its own retries are off: the caller's queue and the retry policy decide."""
    import urllib3

    return urllib3.PoolManager(
        retries=False,
        timeout=urllib3.Timeout(total=timeout),
        cert_reqs="CERT_REQUIRED",
        ca_certs=ca_bundle or None,
        cert_file=client_cert or None,
        key_file=client_key if client_cert else None,
    )
