"""Renders helm/gpufleet with Helm's own template engine (helm-python-sdk binds Helm's Go library) and
validates what comes out: Kubernetes objects against the Kubernetes OpenAPI schemas (kubernetes-validate),
prometheus-operator objects against the structure of their CRDs (their schemas are not in kubernetes-validate)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "gpufleet"
# The newest Kubernetes that kubernetes-validate ships schemas for; the chart claims >=1.27.
KUBE_VERSION = kubernetes_validate.latest_version()
RELEASE, NAMESPACE = "gf", "monitoring"

helm.disable_logging()  # the loader logs the files/dashboards symbolic link on every load


def render(values: dict[str, Any] | None = None, chart: Path = CHART) -> dict[str, str]:
    """Template path -> rendered text, exactly as `helm template` produces it."""
    with helm.Chart.load(chart) as c:
        return c.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in a render (NOTES.txt is text for the user, not an object)."""
    out: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                doc.setdefault("__template__", path)
                out.append(doc)
    return out


def find(objs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    assert len(hits) == 1, f"expected one {kind} *{suffix}, got {[o['metadata']['name'] for o in hits]}"
    return hits[0]


def container(objs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    kind = "DaemonSet" if component == "agent" else "Deployment"
    return find(objs, kind, f"-{component}")["spec"]["template"]["spec"]["containers"][0]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


# ---- prometheus-operator objects: structure of the monitoring.coreos.com/v1 CRDs ----------------------
# Written from the prometheus-operator API reference for the fields this chart sets; unknown fields are
# rejected, as the API server does for a structural CRD schema.
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _LABELS,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_NS_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
}
_KEY_REF = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "key"],
    "properties": {"name": {"type": "string", "minLength": 1}, "key": {"type": "string", "minLength": 1}},
}
_SECRET_OR_CONFIGMAP = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "maxProperties": 1,
    "properties": {"secret": _KEY_REF, "configMap": _KEY_REF},
}
_TLS_CONFIG = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "serverName": {"type": "string"},
        "insecureSkipVerify": {"type": "boolean"},
        "ca": _SECRET_OR_CONFIGMAP,
        "cert": _SECRET_OR_CONFIGMAP,
        "keySecret": _KEY_REF,
    },
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https"]},
        "tlsConfig": _TLS_CONFIG,
        "interval": {"type": "string", "pattern": _DURATION},
        "scrapeTimeout": {"type": "string", "pattern": _DURATION},
        "honorLabels": {"type": "boolean"},
        "metricRelabelings": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "sourceLabels": {"type": "array", "items": {"type": "string"}},
                    "separator": {"type": "string"},
                    "targetLabel": {"type": "string"},
                    "regex": {"type": "string"},
                    "modulus": {"type": "integer"},
                    "replacement": {"type": "string"},
                    "action": {
                        "enum": [
                            "replace",
                            "keep",
                            "drop",
                            "hashmod",
                            "labelmap",
                            "labeldrop",
                            "labelkeep",
                            "lowercase",
                            "uppercase",
                            "keepequal",
                            "dropequal",
                        ]
                    },
                },
            },
        },
    },
}
_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": {"type": "string"},
        "record": {"type": "string"},
        "expr": {"type": ["string", "integer"]},
        "for": {"type": "string", "pattern": _DURATION},
        "keep_firing_for": {"type": "string", "pattern": _DURATION},
        "labels": _LABELS,
        "annotations": _LABELS,
    },
}


def _crd(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
        },
    }


CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": _crd(
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": _NS_SELECTOR,
                "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
        }
    ),
    "PodMonitor": _crd(
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector"],
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": _NS_SELECTOR,
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
        }
    ),
    "PrometheusRule": _crd(
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "rules": {"type": "array", "items": _RULE},
                        },
                    },
                }
            },
        }
    ),
}


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(int(n) * units[u] for n, u in re.findall(r"([0-9]+)(ms|y|w|d|h|m|s)", duration))


def validate(obj: dict[str, Any]) -> None:
    """Raise if the object is not valid for Kubernetes KUBE_VERSION (or for its CRD)."""
    obj = {k: v for k, v in obj.items() if k != "__template__"}
    kind = obj.get("kind")
    if kind in CRD_SCHEMAS:
        jsonschema.validate(obj, CRD_SCHEMAS[kind])
        # Metadata of a custom resource is an ordinary ObjectMeta: check it as one.
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}, KUBE_VERSION, strict=True
        )
        for ep in obj["spec"].get("endpoints", []) + obj["spec"].get("podMetricsEndpoints", []):
            if "scrapeTimeout" in ep and "interval" in ep:
                assert _seconds(ep["scrapeTimeout"]) <= _seconds(ep["interval"]), (
                    f"{kind}: scrapeTimeout {ep['scrapeTimeout']} exceeds interval {ep['interval']}"
                )
        return
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
