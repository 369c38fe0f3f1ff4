"""Inference settings: endpoints to scrape, probes to run, Kubernetes discovery, the client receiver, SLOs.

They come from ``--inference-*`` flags and a YAML file (``--inference-config``); see docs/inference.md.
Every mistake names the key and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gpufleet.agent.inference.servers import SERVERS
from gpufleet.core.durations import parse_duration as _parse_duration
from gpufleet.core.yamlfile import load_yaml

PROBE_KINDS = ("openai-chat", "openai-completions", "http")


class ConfigError(ValueError):
    """A problem in the inference settings; the message says where and what to write instead."""


@dataclass(frozen=True)
class Slo:
    """A latency objective: ``target`` of the requests finish within ``latency_seconds``."""

    latency_seconds: float
    target: float

    @property
    def budget(self) -> float:
        return 1.0 - self.target


@dataclass(frozen=True)
class Endpoint:
    name: str
    url: str
    server: str = "auto"  # vllm | triton | tgi | generic | auto (from the metric names)
    model: str | None = None  # the model when the server labels none (TGI, generic)
    gpus: tuple[str, ...] = ()  # GPU indices or UUIDs serving it
    pod: str | None = None
    namespace: str | None = None
    container: str | None = None
    histogram: str | None = None  # generic: the latency histogram
    ttft_histogram: str | None = None
    scale: float = 1.0  # generic: factor from the histogram's unit to seconds
    model_label: str | None = None
    errors_counter: str | None = None
    slo: Slo | None = None
    origin: str = "config"  # config | kubernetes

    def reader_options(self) -> dict[str, Any]:
        return {
            "histogram": self.histogram,
            "ttft_histogram": self.ttft_histogram,
            "scale": self.scale,
            "model_label": self.model_label,
            "errors_counter": self.errors_counter,
        }


@dataclass(frozen=True)
class Probe:
    name: str
    url: str
    kind: str = "http"
    model: str | None = None  # openai kinds: None asks the server's /v1/models
    prompt: str = "Say OK."
    max_tokens: int = 8
    interval: float = 30.0
    timeout: float = 10.0
    method: str = "GET"  # http kind
    expect_status: int | None = None  # http kind: None accepts any 2xx
    api_key_env: str | None = None  # the environment variable holding a bearer token (never the token itself)


@dataclass(frozen=True)
class Kubernetes:
    kubelet: str  # e.g. http://NODE_IP:10255 (read-only port) or https://NODE_IP:10250
    token_file: str | None = None
    ca_file: str | None = None
    insecure_skip_verify: bool = False
    refresh: float = 30.0


@dataclass
class InferenceSettings:
    endpoints: list[Endpoint] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    kubernetes: Kubernetes | None = None
    receiver: str | None = None  # udp://127.0.0.1:9447 or unix:///run/gpufleet/inference.sock
    interval: float = 10.0
    slo: Slo | None = None  # default objective for every model without its own
    scrape_timeout: float = 5.0

    def configured(self) -> bool:
        """True when there is anything to scrape, probe or receive; an agent without any skips the source."""
        return bool(self.endpoints or self.probes or self.kubernetes or self.receiver)


def parse_duration(value: Any, where: str) -> float:
    try:
        return _parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_url(url: Any, where: str, schemes: tuple[str, ...] = ("http", "https")) -> str:
    if not isinstance(url, str) or urlsplit(url).scheme not in schemes or not urlsplit(url).netloc:
        raise ConfigError(f"{where}: {url!r} is not a URL; write it like http://127.0.0.1:8000/metrics")
    return url


def parse_slo(value: Any, where: str) -> Slo:
    """``{latency_seconds: 2.5, target: 0.99}`` or the flag form ``2.5:0.99``."""
    if isinstance(value, str):
        latency, _, target = value.partition(":")
        value = {"latency_seconds": latency, "target": target or "0.99"}
    if not isinstance(value, dict):
        raise ConfigError(
            f"{where}: write the objective as {{latency_seconds: 2.5, target: 0.99}} or 2.5:0.99"
        )
    try:
        latency_s, ratio = float(value["latency_seconds"]), float(value.get("target", 0.99))
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"{where}: needs latency_seconds (a number of seconds) and target (e.g. 0.99)"
        ) from None
    if latency_s <= 0 or not 0 < ratio < 1:
        raise ConfigError(f"{where}: latency_seconds must be > 0 and target between 0 and 1 (0.99 means 99%)")
    return Slo(latency_s, ratio)


def parse_endpoint_flag(text: str) -> Endpoint:
    """``NAME=URL`` from ``--inference-endpoint``."""
    name, sep, url = text.partition("=")
    if not sep or not name.strip():
        raise ConfigError(
            f"--inference-endpoint {text!r}: write NAME=URL, e.g. llama=http://127.0.0.1:8000/metrics"
        )
    return Endpoint(name.strip(), _check_url(url.strip(), f"--inference-endpoint {name}"))


def probe_kind_for(url: str) -> str:
    path = urlsplit(url).path.rstrip("/")
    if path.endswith("/chat/completions"):
        return "openai-chat"
    if path.endswith("/completions"):
        return "openai-completions"
    return "http"


def parse_probe_flag(text: str, **defaults: Any) -> Probe:
    """``NAME=URL`` from ``--inference-probe``; the URL's path picks the kind (…/chat/completions is OpenAI chat)."""
    name, sep, url = text.partition("=")
    if not sep or not name.strip():
        raise ConfigError(
            f"--inference-probe {text!r}: write NAME=URL, e.g. "
            "llama=http://127.0.0.1:8000/v1/chat/completions"
        )
    url = _check_url(url.strip(), f"--inference-probe {name}")
    return Probe(
        name.strip(), url, kind=probe_kind_for(url), **{k: v for k, v in defaults.items() if v is not None}
    )


_ENDPOINT_KEYS = {
    "name",
    "url",
    "server",
    "model",
    "gpus",
    "pod",
    "namespace",
    "container",
    "histogram",
    "ttft_histogram",
    "scale",
    "model_label",
    "errors_counter",
    "slo",
}
_PROBE_KEYS = {
    "name",
    "url",
    "kind",
    "model",
    "prompt",
    "max_tokens",
    "interval",
    "timeout",
    "method",
    "expect_status",
    "api_key_env",
}
_KUBE_KEYS = {"kubelet", "token_file", "ca_file", "insecure_skip_verify", "refresh"}
_TOP_KEYS = {"endpoints", "probes", "kubernetes", "receiver", "interval", "slo", "scrape_timeout"}


def _unknown(doc: dict, allowed: set[str], where: str) -> None:
    extra = set(doc) - allowed
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {sorted(extra)}; allowed: {sorted(allowed)}")


def _named(doc: Any, what: str, allowed: set[str], where: str, example: str) -> tuple[str, str]:
    """Check one config entry: a mapping of known keys with a name. Returns its name and where it is."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: each {what} is a mapping with at least name and url")
    _unknown(doc, allowed, where)
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: 'name' is missing; give every {what} a short name{example}")
    return name, f"{where} ({name})"


def endpoint_from(doc: Any, where: str) -> Endpoint:
    name, where = _named(doc, "endpoint", _ENDPOINT_KEYS, where, " (e.g. llama-70b)")
    server = str(doc.get("server", "auto"))
    if server not in (*SERVERS, "auto"):
        raise ConfigError(f"{where}: server {server!r} is not one of {', '.join((*SERVERS, 'auto'))}")
    if server == "generic" and not doc.get("histogram"):
        raise ConfigError(f"{where}: a generic endpoint needs 'histogram', the name of its latency histogram")
    gpus = doc.get("gpus", ())
    if isinstance(gpus, (str, int)):
        gpus = [gpus]
    try:
        scale = float(doc.get("scale", 1.0))
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: scale must be a number (0.001 for a histogram in milliseconds)"
        ) from None
    return Endpoint(
        name=name,
        url=_check_url(doc.get("url"), f"{where}: url"),
        server=server,
        model=doc.get("model"),
        gpus=tuple(str(g) for g in gpus),
        pod=doc.get("pod"),
        namespace=doc.get("namespace"),
        container=doc.get("container"),
        histogram=doc.get("histogram"),
        ttft_histogram=doc.get("ttft_histogram"),
        scale=scale,
        model_label=doc.get("model_label"),
        errors_counter=doc.get("errors_counter"),
        slo=parse_slo(doc["slo"], f"{where}: slo") if "slo" in doc else None,
    )


def probe_from(doc: Any, where: str) -> Probe:
    name, where = _named(doc, "probe", _PROBE_KEYS, where, "")
    url = _check_url(doc.get("url"), f"{where}: url")
    kind = str(doc.get("kind", probe_kind_for(url)))
    if kind not in PROBE_KINDS:
        raise ConfigError(f"{where}: kind {kind!r} is not one of {', '.join(PROBE_KINDS)}")
    try:
        max_tokens = int(doc.get("max_tokens", 8))
        expect = doc.get("expect_status")
        expect = int(expect) if expect is not None else None
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: max_tokens and expect_status are whole numbers") from None
    timeout = parse_duration(doc.get("timeout", 10), f"{where}: timeout")
    interval = parse_duration(doc.get("interval", 30), f"{where}: interval")
    if timeout <= 0 or interval <= 0:
        raise ConfigError(f"{where}: interval and timeout must be positive")
    return Probe(
        name=name,
        url=url,
        kind=kind,
        model=doc.get("model"),
        prompt=str(doc.get("prompt", "Say OK.")),
        max_tokens=max_tokens,
        interval=interval,
        timeout=timeout,
        method=str(doc.get("method", "GET")).upper(),
        expect_status=expect,
        api_key_env=doc.get("api_key_env"),
    )


def check_receiver(address: str, where: str) -> str:
    parts = urlsplit(address)
    if parts.scheme == "udp" and parts.hostname and parts.port:
        return address
    if parts.scheme == "unix" and parts.path:
        return address
    raise ConfigError(
        f"{where}: {address!r} is not udp://HOST:PORT or unix:///PATH (e.g. udp://127.0.0.1:9447)"
    )


def load_config(path: str | Path, base: InferenceSettings | None = None) -> InferenceSettings:
    """Read a YAML inference config; what it lists is added to ``base`` (the flags)."""
    p = Path(path)
    try:
        doc = load_yaml(p) or {}
    except ValueError as exc:
        raise ConfigError(
            f"inference config {exc}; check --inference-config (GPUFLEET_INFERENCE_CONFIG)"
        ) from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: expected a mapping with endpoints:, probes:, kubernetes:, receiver:")
    _unknown(doc, _TOP_KEYS, str(p))
    s = replace(base) if base is not None else InferenceSettings()
    s.endpoints = list(s.endpoints) + [
        endpoint_from(e, f"{p}: endpoints[{i}]") for i, e in enumerate(doc.get("endpoints") or [])
    ]
    s.probes = list(s.probes) + [
        probe_from(e, f"{p}: probes[{i}]") for i, e in enumerate(doc.get("probes") or [])
    ]
    if "interval" in doc:
        s.interval = parse_duration(doc["interval"], f"{p}: interval")
    if "scrape_timeout" in doc:
        s.scrape_timeout = parse_duration(doc["scrape_timeout"], f"{p}: scrape_timeout")
    if "slo" in doc:
        s.slo = parse_slo(doc["slo"], f"{p}: slo")
    if "receiver" in doc:
        s.receiver = check_receiver(str(doc["receiver"]), f"{p}: receiver")
    kube = doc.get("kubernetes")
    if kube is not None:
        if not isinstance(kube, dict):
            raise ConfigError(f"{p}: kubernetes: expected a mapping with kubelet: URL")
        _unknown(kube, _KUBE_KEYS, f"{p}: kubernetes")
        s.kubernetes = Kubernetes(
            kubelet=_check_url(kube.get("kubelet"), f"{p}: kubernetes.kubelet"),
            token_file=kube.get("token_file"),
            ca_file=kube.get("ca_file"),
            insecure_skip_verify=bool(kube.get("insecure_skip_verify", False)),
            refresh=parse_duration(kube.get("refresh", 30), f"{p}: kubernetes.refresh"),
        )
    names = [e.name for e in s.endpoints]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(
            f"{p}: endpoint name(s) {sorted(dup)} used twice; names label the series, make them unique"
        )
    return s


SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


def kubelet_from_flag(url: str, where: str) -> Kubernetes:
    """The kubelet a flag names; its https port takes the pod's service-account token when one is mounted."""
    url = _check_url(url, where)
    token = (
        SERVICE_ACCOUNT_TOKEN if url.startswith("https://") and Path(SERVICE_ACCOUNT_TOKEN).exists() else None
    )
    return Kubernetes(kubelet=url, token_file=token)


def settings_from_flags(
    *,
    endpoints: tuple[str, ...] = (),
    config: str | None = None,
    kubelet: str | None = None,
    interval: float = 10.0,
    slo: str | None = None,
    probes: tuple[str, ...] = (),
    probe_interval: float = 30.0,
    probe_timeout: float = 10.0,
    probe_prompt: str | None = None,
    probe_model: str | None = None,
    probe_max_tokens: int | None = None,
    receiver: str | None = None,
) -> InferenceSettings:
    """The ``--inference-*`` flags (and their environment twins), then the config file on top."""
    s = InferenceSettings(interval=interval)
    s.endpoints = [parse_endpoint_flag(e) for e in endpoints]
    s.probes = [
        parse_probe_flag(
            p,
            interval=probe_interval,
            timeout=probe_timeout,
            prompt=probe_prompt,
            model=probe_model,
            max_tokens=probe_max_tokens,
        )
        for p in probes
    ]
    if slo:
        s.slo = parse_slo(slo, "--inference-slo")
    if receiver:
        s.receiver = check_receiver(receiver, "--inference-receiver")
    if kubelet:
        s.kubernetes = kubelet_from_flag(kubelet, "--inference-kubelet")
    if config:
        s = load_config(config, s)
    names = [e.name for e in s.endpoints]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(
            f"inference endpoint name(s) {dup} used twice; names label the series, make them unique"
        )
    return s
