"""The Helm chart, rendered by Helm's own engine over the installs people do, every object valid for a
current Kubernetes; wrong values fail at template time with a message that names the fix."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from gpufleet.cli import main
from tests.helm_render import CHART, NAMESPACE, container, env_of, find, objects, render, validate

PG_URL = "postgresql+psycopg://gpufleet:s3cret@db.example:5432/gpufleet"

# An inference config file as a user writes it (docs/inference.md, "Config file").
INFERENCE_CONFIG = """\
endpoints:
  - name: ranker
    url: http://10.0.0.13:9100/metrics
    server: generic
    histogram: ranker_latency_milliseconds
    scale: 0.001
    gpus: [0, 1]
    slo: {latency_seconds: 0.2, target: 0.995}
probes:
  - {name: ranker-health, url: "http://10.0.0.13:9100/healthz", interval: 30s, timeout: 2s}
"""

# The installs the chart must get right; each is rendered and every object validated.
MATRIX: dict[str, dict] = {
    "defaults": {},
    "per-process": {"agent": {"perProcess": True}},
    "nvlink-per-link": {"agent": {"nvlinkPerLink": True}},
    "prometheus-operator": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True},
    },
    "pod-monitor": {"podMonitor": {"enabled": True}, "agent": {"service": {"enabled": False}}},
    "external-database": {"database": {"url": PG_URL}, "collector": {"replicas": 3}},
    "existing-secrets": {
        "database": {"existingSecret": "gpufleet-db", "existingSecretKey": "url"},
        "auth": {"existingSecret": "gpufleet-auth"},
        "slack": {"existingSecret": "gpufleet-slack", "channel": "C0123ONCALL"},
        "grafana": {"url": "https://grafana.example", "existingSecret": "gpufleet-grafana"},
        "collector": {"replicas": 2},
    },
    "locked-down": {
        "networkPolicy": {
            "enabled": True,
            "agentIngressFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            ],
            "collectorIngressFrom": [{"podSelector": {"matchLabels": {"app": "grafana"}}}],
        },
        "agent": {"podResources": {"enabled": False}, "nvidia": {"runtimeClassName": ""}},
        "collector": {"persistence": {"enabled": False}},
    },
    "tokens-and-slack": {
        "auth": {"tokens": ["a" * 32, "b" * 32]},
        "cluster": "prod-east",
        "slack": {
            "token": "xoxb-1-2-3",
            "channel": "C0123ONCALL",
            "baseUrl": "https://slack.example/api/",
            "digestCron": "0 9 * * mon",
            "digestChannel": "C0DIGEST",
            "publicUrl": "https://gpufleet.example.com",
        },
        "grafana": {
            "url": "https://grafana.example",
            "token": "glsa_x",
            "dashboardUrl": "https://grafana.example/d/gpufleet-node-gpu-postgres",
        },
        "rules": {"files": {"gpu.yaml": "groups: []\n", "site.yaml": "groups: []\n"}},
    },
    "agents-only": {
        "collector": {"enabled": False},
        "podMonitor": {"enabled": True},
        "agent": {"simulate": 4, "gpuNodesOnly": False, "verbose": True, "sources": ["gpu", "host"]},
    },
    "inference": {
        "networkPolicy": {"enabled": True},
        "agent": {
            "inference": {
                "endpoints": [
                    "llama=http://10.0.0.12:8000/metrics",
                    "tgi=http://tgi.serving.svc:3000/metrics",
                ],
                "config": INFERENCE_CONFIG,
                "kubelet": {"url": "https://$(NODE_IP):10250", "rbac": {"create": True}},
                "interval": 5,
                "slo": "2.5:0.99",
                "probes": [
                    "llama-chat=http://10.0.0.12:8000/v1/chat/completions",
                    "tgi-health=http://tgi.serving.svc:3000/health",
                ],
                "probeInterval": 15,
                "probeTimeout": 4,
                "probePrompt": "Say OK.",
                "probeModel": "llama-3-8b",
                "probeMaxTokens": 4,
                "receiver": {"address": "udp://0.0.0.0:9447", "hostPort": True},
            },
            "workload": {
                "kubeletUrl": "https://$(NODE_IP):10250",
                "jobLabelKeys": ["training.kubeflow.org/job-name", "app"],
            },
        },
    },
    # Every reliability and security setting at once: a non-root agent spooling on a host folder, mutual TLS
    # between agents and collector, more tokens from a file, every request limit.
    "tls-and-spool": {
        "agent": {
            "runAsUser": 10001,
            "spool": {"maxBytes": "2GiB", "maxAge": "2d"},
            "tls": {
                "ca": {"existingConfigMap": "fleet-ca"},
                "clientCert": {"existingSecret": "agent-client"},
            },
        },
        "collector": {
            "tls": {"existingSecret": "collector-tls", "clientCAKey": "ca.crt"},
            "limits": {
                "maxBodyBytes": 32 << 20,
                "maxUncompressedBytes": 128 << 20,
                "maxSeries": 200_000,
                "maxSamples": 4_000_000,
                "maxLabels": 60,
                "maxLabelLength": 4096,
                "maxInflightWrites": 128,
                "writeRateLimit": 600_000,
                "writeBurst": 6_000_000,
                "maxSilenceChangesPerMinute": 60,
                "maxFuture": "2h",
                "maxPast": "7d",
                "maxActiveSeries": 400_000,
                "maxActiveSeriesPerCluster": 200_000,
                "seriesIdleAfter": "3h",
                "fleetMaxGpus": 12_000,
                "queryMaxSeries": 10_000,
                "queryMaxSamples": 5_000_000,
                "queryTimeout": "20s",
                "queryMaxConcurrent": 2,
            },
        },
        "auth": {"tokenFile": {"existingSecret": "fleet-tokens"}},
        "serviceMonitor": {"enabled": True},
    },
    "open-writes": {"auth": {"enabled": False}},
    # Moving off dcgm-exporter: agents serve both names; rules and the Prometheus dashboards for its names.
    "dcgm-migration": {
        "agent": {"metricNames": "both"},
        "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "grafana": {"dashboards": {"configMaps": True}},
    },
    # PostgreSQL kept for a year at one-minute resolution, forwarded to two remote-write receivers.
    "store-options": {
        "database": {"url": PG_URL},
        "collector": {
            "retention": {"rawDays": 0.5, "oneMinuteDays": 365, "oneHourDays": 1825},
            "forward": [
                "http://prometheus.monitoring.svc:9090/api/v1/write",
                "https://mimir.example/api/v1/push",
            ],
            "forwardWhenFull": "drop",
            "forwardMaxQueueSamples": 20_000_000,
            "forwardMaxQueueBytes": 1 << 30,
            "forwardShards": 8,
            "workers": 2,
            "rawLayout": "rows",
        },
    },
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: objects(render(values)) for name, values in MATRIX.items()}


@pytest.mark.parametrize("scenario", list(MATRIX))
def test_every_rendered_object_is_valid_for_current_kubernetes(rendered, scenario):
    objs = rendered[scenario]
    assert objs, "the chart rendered nothing"
    for obj in objs:
        try:
            validate(obj)
        except Exception as exc:  # name the object, the schema error alone does not say which one
            pytest.fail(
                f"{scenario}: {obj['kind']} {obj['metadata'].get('name')} from {obj['__template__']}: {exc}"
            )


def test_agent_runs_only_on_gpu_nodes_and_tolerates_their_taint(rendered):
    pod = find(rendered["defaults"], "DaemonSet", "-agent")["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    keys = {t["matchExpressions"][0]["key"] for t in terms}
    assert keys == {"nvidia.com/gpu.present", "feature.node.kubernetes.io/pci-10de.present"}
    assert all(len(t["matchExpressions"]) == 1 for t in terms), (
        "any one GPU label must be enough (terms are ORed)"
    )
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["runtimeClassName"] == "nvidia"
    env = env_of(pod["containers"][0])
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    # It watches GPUs without taking one from the scheduler.
    assert "nvidia.com/gpu" not in json.dumps(pod["containers"][0].get("resources", {}))
    anywhere = find(rendered["agents-only"], "DaemonSet", "-agent")["spec"]["template"]["spec"]
    assert "affinity" not in anywhere


def test_agent_node_name_comes_from_the_downward_api(rendered):
    env = env_of(container(rendered["defaults"], "agent"))
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_agent_has_least_privilege_and_host_pid_only_for_per_process(rendered):
    for scenario in MATRIX:
        if "DaemonSet" not in {o["kind"] for o in rendered[scenario]}:
            continue
        pod = find(rendered[scenario], "DaemonSet", "-agent")["spec"]["template"]["spec"]
        sc = pod["containers"][0]["securityContext"]
        assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False, scenario
        assert sc["capabilities"] == {"drop": ["ALL"]}, scenario
        assert sc["readOnlyRootFilesystem"] is True
        assert pod.get("hostPID", False) is (scenario == "per-process"), scenario
        assert pod.get("hostNetwork", False) is False
        assert pod["automountServiceAccountToken"] is False
    # The spool's init container: root for one chown, CAP_CHOWN alone, never privileged.
    init = find(rendered["tls-and-spool"], "DaemonSet", "-agent")["spec"]["template"]["spec"][
        "initContainers"
    ]
    assert [i["name"] for i in init] == ["spool-owner"]
    isc = init[0]["securityContext"]
    assert isc["privileged"] is False and isc["allowPrivilegeEscalation"] is False
    assert (
        isc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]} and isc["readOnlyRootFilesystem"] is True
    )
    per_process = env_of(container(rendered["per-process"], "agent"))
    assert per_process["GPUFLEET_PROCESS_METRICS"]["value"] == "true"
    assert "GPUFLEET_PROCESS_METRICS" not in env_of(container(rendered["defaults"], "agent"))
    # Without the root-only kubelet socket the agent runs as the image's unprivileged user.
    locked = find(rendered["locked-down"], "DaemonSet", "-agent")["spec"]["template"]["spec"]
    assert (
        locked["securityContext"]["runAsNonRoot"] is True and locked["securityContext"]["runAsUser"] == 10001
    )
    assert "runtimeClassName" not in locked


def test_privileged_and_profiling_are_explicit_options():
    objs = objects(render({"agent": {"profilingCapability": True}}))
    assert container(objs, "agent")["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["SYS_ADMIN"],
    }
    objs = objects(render({"agent": {"privileged": True}}))
    assert container(objs, "agent")["securityContext"]["privileged"] is True
    for o in objs:
        validate(o)


def test_pod_resources_socket_is_mounted_read_only(rendered):
    ds = find(rendered["defaults"], "DaemonSet", "-agent")["spec"]["template"]["spec"]
    c = ds["containers"][0]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "pod-resources")
    assert mount["readOnly"] is True and mount["mountPath"] == "/var/lib/kubelet/pod-resources"
    vol = next(v for v in ds["volumes"] if v["name"] == "pod-resources")
    assert vol["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    assert (
        env_of(c)["GPUFLEET_POD_RESOURCES_SOCKET"]["value"] == "/var/lib/kubelet/pod-resources/kubelet.sock"
    )


def test_agent_resources_and_health_probes(rendered):
    c = container(rendered["defaults"], "agent")
    assert c["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["ports"][0]["containerPort"] == 9445
    c = container(rendered["defaults"], "collector")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}


def _secret_data(objs) -> dict[str, str]:
    secrets = [o for o in objs if o["kind"] == "Secret"]
    return {k: base64.b64decode(v).decode() for s in secrets for k, v in s.get("data", {}).items()}


def test_sqlite_by_default_on_a_kept_volume_with_one_replica(rendered):
    objs = rendered["defaults"]
    deploy = find(objs, "Deployment", "-collector")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"] == {"type": "Recreate"}
    assert (
        env_of(container(objs, "collector"))["GPUFLEET_DB"]["value"]
        == "sqlite:////var/lib/gpufleet/gpufleet.db"
    )
    pvc = find(objs, "PersistentVolumeClaim", "-collector")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert find(objs, "PodDisruptionBudget", "-collector")["spec"]["maxUnavailable"] == 1


def test_external_database_comes_from_a_secret_and_allows_replicas(rendered):
    objs = rendered["external-database"]
    deploy = find(objs, "Deployment", "-collector")
    assert deploy["spec"]["replicas"] == 3 and deploy["spec"]["strategy"]["type"] == "RollingUpdate"
    ref = env_of(container(objs, "collector"))["GPUFLEET_DB"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "gf-gpufleet-secrets", "key": "dsn"}
    assert _secret_data(objs)["dsn"] == PG_URL
    assert PG_URL not in json.dumps(deploy), "the DSN (with its password) must not sit in the Deployment"
    assert not [o for o in objs if o["kind"] == "PersistentVolumeClaim"]


def test_existing_secrets_are_referenced_not_created(rendered):
    objs = rendered["existing-secrets"]
    assert not [o for o in objs if o["kind"] == "Secret"], "every secret came from the user's Secrets"
    col = env_of(container(objs, "collector"))
    assert col["GPUFLEET_DB"]["valueFrom"]["secretKeyRef"] == {"name": "gpufleet-db", "key": "url"}
    assert col["GPUFLEET_TOKENS"]["valueFrom"]["secretKeyRef"] == {"name": "gpufleet-auth", "key": "tokens"}
    assert col["GPUFLEET_SLACK_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "gpufleet-slack",
        "key": "slack-token",
    }
    assert col["GPUFLEET_GRAFANA_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "gpufleet-grafana",
        "key": "grafana-token",
    }
    agent = env_of(container(objs, "agent"))
    assert agent["GPUFLEET_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "gpufleet-auth",
        "key": "agent-token",
    }


def test_write_tokens_agents_send_are_ones_the_collector_accepts(rendered):
    for scenario in ("defaults", "tokens-and-slack"):
        objs = rendered[scenario]
        data = _secret_data(objs)
        agent_ref = env_of(container(objs, "agent"))["GPUFLEET_TOKEN"]["valueFrom"]["secretKeyRef"]
        col_ref = env_of(container(objs, "collector"))["GPUFLEET_TOKENS"]["valueFrom"]["secretKeyRef"]
        accepted = data[col_ref["key"]].split(",")
        assert data[agent_ref["key"]] in accepted and len(data[agent_ref["key"]]) >= 32, scenario
    assert _secret_data(rendered["tokens-and-slack"])["tokens"] == "a" * 32 + "," + "b" * 32
    assert _secret_data(rendered["tokens-and-slack"])["slack-token"] == "xoxb-1-2-3"


def test_agents_push_to_this_releases_collector(rendered):
    env = env_of(container(rendered["defaults"], "agent"))
    assert env["GPUFLEET_COLLECTOR"]["value"] == f"http://gf-gpufleet-collector.{NAMESPACE}.svc:9446"
    only = env_of(container(rendered["agents-only"], "agent"))
    assert "GPUFLEET_COLLECTOR" not in only and "GPUFLEET_TOKEN" not in only


def test_rule_files_replace_or_add_to_the_built_in_pack(rendered):
    objs = rendered["tokens-and-slack"]
    c = container(objs, "collector")
    assert env_of(c)["GPUFLEET_RULES"]["value"] == "/usr/share/gpufleet/rules"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"] if m["name"] == "rules"}
    assert set(mounts) == {"/usr/share/gpufleet/rules/gpu.yaml", "/usr/share/gpufleet/rules/site.yaml"}
    cm = find(objs, "ConfigMap", "-rules")
    assert set(cm["data"]) == {"gpu.yaml", "site.yaml"}
    own = objects(render({"rules": {"builtin": False, "files": {"mine.yaml": "groups: []\n"}}}))
    c = container(own, "collector")
    assert env_of(c)["GPUFLEET_RULES"]["value"] == "/etc/gpufleet/rules"
    assert [m["mountPath"] for m in c["volumeMounts"] if m["name"] == "rules"] == ["/etc/gpufleet/rules"]


def test_service_monitor_scrapes_agents_with_their_own_pod_labels(rendered):
    sm = find(rendered["prometheus-operator"], "ServiceMonitor")
    agent_ep = next(e for e in sm["spec"]["endpoints"] if e["port"] == "metrics")
    assert agent_ep["honorLabels"] is True and agent_ep["scrapeTimeout"] == "10s"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    svc = find(rendered["prometheus-operator"], "Service", "-agent")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["ports"][0]["name"] == "metrics"
    pm = find(rendered["pod-monitor"], "PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True


def test_agent_scrapes_keep_the_workloads_job_and_drop_the_scrape_job(rendered):
    """honorLabels keeps the agent's `job` (the workload) instead of renaming it exported_job; a series with
    no job of its own loses the scrape's job name (prometheus-operator's: the Service's name for a
    ServiceMonitor, NAMESPACE/NAME for a PodMonitor), so GPUs without a workload are not one "job"."""
    sm = find(rendered["prometheus-operator"], "ServiceMonitor")
    svc = find(rendered["prometheus-operator"], "Service", "-agent")
    pm = find(rendered["pod-monitor"], "PodMonitor")
    for ep, scrape_job in (
        (next(e for e in sm["spec"]["endpoints"] if e["port"] == "metrics"), svc["metadata"]["name"]),
        (pm["spec"]["podMetricsEndpoints"][0], f"{NAMESPACE}/{pm['metadata']['name']}"),
    ):
        assert ep["honorLabels"] is True
        (relabel,) = ep["metricRelabelings"]
        assert relabel["sourceLabels"] == ["job"] and relabel["targetLabel"] == "job"
        assert re.fullmatch(relabel["regex"], scrape_job) and not re.fullmatch(
            relabel["regex"], "llama-train"
        )
        assert relabel["replacement"] == "" and relabel["action"] == "replace"
    collector_ep = next(e for e in sm["spec"]["endpoints"] if e["port"] == "http")
    assert "metricRelabelings" not in collector_ep and "honorLabels" not in collector_ep


def test_monitors_and_rules_carry_the_labels_a_prometheus_selects_by(rendered):
    objs = rendered["dcgm-migration"]
    for kind in ("PodMonitor", "PrometheusRule"):
        assert find(objs, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_workload_attribution_reads_the_kubelet_with_the_agents_token(rendered):
    """agent.workload: the kubelet URL and label keys reach the agent, with $(NODE_IP) from the downward API
    and the projected token the kubelet's authenticated port takes."""
    objs = rendered["inference"]
    c = container(objs, "agent")
    env = env_of(c)
    assert env["GPUFLEET_KUBELET"]["value"] == "https://$(NODE_IP):10250"
    assert env["GPUFLEET_JOB_LABEL_KEYS"]["value"] == "training.kubeflow.org/job-name,app"
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert "kubelet-token" in {m["name"] for m in c["volumeMounts"]}
    only = env_of(
        container(
            objects(render({"agent": {"workload": {"kubeletUrl": "https://$(NODE_IP):10250"}}})), "agent"
        )
    )
    assert "NODE_IP" in only and "GPUFLEET_JOB_LABEL_KEYS" not in only
    plain = env_of(container(rendered["defaults"], "agent"))
    assert not {"GPUFLEET_KUBELET", "GPUFLEET_JOB_LABEL_KEYS", "NODE_IP"} & set(plain)


def test_agents_run_at_node_critical_priority_unless_told_otherwise(rendered):
    pod = find(rendered["defaults"], "DaemonSet", "-agent")["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    own = objects(render({"agent": {"priorityClassName": ""}}))
    assert "priorityClassName" not in find(own, "DaemonSet", "-agent")["spec"]["template"]["spec"]
    collector = find(rendered["defaults"], "Deployment", "-collector")["spec"]["template"]["spec"]
    assert "priorityClassName" not in collector


def test_inference_latency_settings_reach_the_agent(rendered):
    objs = rendered["inference"]
    pod = find(objs, "DaemonSet", "-agent")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = [e["name"] for e in c["env"]]
    # Kubernetes expands $(NODE_IP) only from a variable listed before the one that uses it.
    assert env.index("NODE_IP") < env.index("GPUFLEET_INFERENCE_KUBELET")
    assert env_of(c)["NODE_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    # The config file: a ConfigMap mounted read-only where GPUFLEET_INFERENCE_CONFIG points.
    cm = find(objs, "ConfigMap", "-agent-inference")
    assert yaml.safe_load(cm["data"]["config.yaml"]) == yaml.safe_load(
        MATRIX["inference"]["agent"]["inference"]["config"]
    )
    mount = next(m for m in c["volumeMounts"] if m["name"] == "inference-config")
    assert mount["readOnly"] is True
    assert env_of(c)["GPUFLEET_INFERENCE_CONFIG"]["value"] == mount["mountPath"] + "/config.yaml"
    assert (
        next(v for v in pod["volumes"] if v["name"] == "inference-config")["configMap"]["name"]
        == cm["metadata"]["name"]
    )
    assert (
        "checksum/inference-config"
        in find(objs, "DaemonSet", "-agent")["spec"]["template"]["metadata"]["annotations"]
    )
    # Kubelet discovery on the authenticated port: RBAC for the agent's ServiceAccount and a token in the agent only.
    role = find(objs, "ClusterRole", "-agent-kubelet")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes/pods"], "verbs": ["get"]}]
    binding = find(objs, "ClusterRoleBinding", "-agent-kubelet")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": NAMESPACE}
    ]
    assert pod["automountServiceAccountToken"] is False
    token = next(m for m in c["volumeMounts"] if m["name"] == "kubelet-token")
    assert token == {
        "name": "kubelet-token",
        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
        "readOnly": True,
    }
    from gpufleet.agent.inference.config import SERVICE_ACCOUNT_TOKEN

    assert token["mountPath"] + "/token" == SERVICE_ACCOUNT_TOKEN, (
        "the agent reads the token where the chart mounts it"
    )
    # The UDP receiver on the node's port, admitted by the agent's NetworkPolicy.
    assert {"name": "inference", "containerPort": 9447, "protocol": "UDP", "hostPort": 9447} in c["ports"]
    pol = find(objs, "NetworkPolicy", "-agent")
    assert {"ports": [{"port": "inference", "protocol": "UDP"}]} in pol["spec"]["ingress"]
    # None of it without inference values.
    defaults = rendered["defaults"]
    plain = container(defaults, "agent")
    assert not [n for n in env_of(plain) if "INFERENCE" in n or n == "NODE_IP"]
    assert not [
        o
        for o in defaults
        if o["kind"] in ("ClusterRole", "ClusterRoleBinding", "ConfigMap")
        and "agent" in o["metadata"]["name"]
    ]
    assert {m["name"] for m in plain["volumeMounts"]} == {"tmp", "spool", "pod-resources"}


def test_inference_receiver_socket_and_read_only_kubelet_port():
    objs = objects(
        render(
            {
                "agent": {
                    "inference": {
                        "kubelet": {"url": "http://$(NODE_IP):10255"},
                        "interval": 2.5,
                        "receiver": {
                            "address": "unix:///run/gpufleet/inference.sock",
                            "hostPath": "/run/gpufleet",
                        },
                    }
                }
            }
        )
    )
    for o in objs:
        validate(o)
    pod = find(objs, "DaemonSet", "-agent")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert (
        next(m for m in c["volumeMounts"] if m["name"] == "inference-socket")["mountPath"] == "/run/gpufleet"
    )
    vol = next(v for v in pod["volumes"] if v["name"] == "inference-socket")
    assert vol["hostPath"] == {"path": "/run/gpufleet", "type": "DirectoryOrCreate"}
    assert env_of(c)["GPUFLEET_INFERENCE_INTERVAL"]["value"] == "2.5"
    # The read-only port takes no token and there is no RBAC to bind.
    assert "kubelet-token" not in {v["name"] for v in pod["volumes"]}
    assert not [o for o in objs if o["kind"].startswith("ClusterRole")]
    assert [p["name"] for p in c["ports"]] == ["metrics"]


def _pod(objs, component: str) -> dict:
    return find(objs, "DaemonSet" if component == "agent" else "Deployment", f"-{component}")["spec"][
        "template"
    ]["spec"]


def _volume(pod: dict, name: str) -> dict:
    return next(v for v in pod["volumes"] if v["name"] == name)


def _mount(c: dict, name: str) -> dict:
    return next(m for m in c["volumeMounts"] if m["name"] == name)


def test_spool_on_a_host_folder_outlives_the_agent_pod(rendered):
    # A non-root agent: the kubelet creates the folder as root, the init container hands it to uid 10001.
    pod = _pod(rendered["tls-and-spool"], "agent")
    c = pod["containers"][0]
    assert _volume(pod, "spool")["hostPath"] == {
        "path": "/var/lib/gpufleet/spool",
        "type": "DirectoryOrCreate",
    }
    assert (
        env_of(c)["GPUFLEET_SPOOL_DIR"]["value"]
        == _mount(c, "spool")["mountPath"]
        == "/var/lib/gpufleet/spool"
    )
    assert _mount(c, "spool").get("readOnly", False) is False
    init = pod["initContainers"][0]
    assert init["command"] == ["chown", "-R", "10001:10001", "/var/lib/gpufleet/spool"]
    assert _mount(init, "spool")["mountPath"] == "/var/lib/gpufleet/spool"
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["fsGroup"] == 10001
    env = env_of(c)
    assert (env["GPUFLEET_SPOOL_MAX_BYTES"]["value"], env["GPUFLEET_SPOOL_MAX_AGE"]["value"]) == (
        "2GiB",
        "2d",
    )
    # By default the agent is root (the kubelet socket is root-only): the host folder, no init container, and
    # the limits left to the agent.
    pod = _pod(rendered["defaults"], "agent")
    assert _volume(pod, "spool")["hostPath"]["type"] == "DirectoryOrCreate" and "initContainers" not in pod
    assert "GPUFLEET_SPOOL_MAX_BYTES" not in env_of(pod["containers"][0])
    # emptyDir: writable by anyone, nothing to chown; none: memory only.
    pod = _pod(objects(render({"agent": {"runAsUser": 10001, "spool": {"type": "emptyDir"}}})), "agent")
    assert _volume(pod, "spool") == {"name": "spool", "emptyDir": {}} and "initContainers" not in pod
    pod = _pod(objects(render({"agent": {"spool": {"type": "none"}}})), "agent")
    assert env_of(pod["containers"][0])["GPUFLEET_SPOOL_DIR"]["value"] == ""
    assert "spool" not in {v["name"] for v in pod["volumes"]}
    pod = _pod(
        objects(
            render(
                {
                    "agent": {
                        "runAsUser": 10001,
                        "spool": {"chownInit": False, "hostPath": "/data/gpufleet/spool"},
                    }
                }
            )
        ),
        "agent",
    )
    assert "initContainers" not in pod and _volume(pod, "spool")["hostPath"]["path"] == "/data/gpufleet/spool"


def test_https_collector_with_probes_over_https_and_agents_verifying_it():
    objs = objects(
        render(
            {
                "collector": {"tls": {"existingSecret": "collector-tls"}},
                "agent": {"tls": {"ca": {"existingSecret": "fleet-ca", "key": "bundle.pem"}}},
            }
        )
    )
    for o in objs:
        validate(o)
    pod = _pod(objs, "collector")
    c = pod["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": "HTTPS"}, probe
    assert _mount(c, "tls") == {"name": "tls", "mountPath": "/etc/gpufleet/tls", "readOnly": True}
    vol = _volume(pod, "tls")["secret"]
    assert vol["secretName"] == "collector-tls" and vol["defaultMode"] == 0o440
    assert [i["key"] for i in vol["items"]] == ["tls.crt", "tls.key"]
    env = env_of(c)
    assert env["GPUFLEET_TLS_CERT"]["value"] == "/etc/gpufleet/tls/tls.crt"
    assert env["GPUFLEET_TLS_KEY"]["value"] == "/etc/gpufleet/tls/tls.key"
    assert "GPUFLEET_TLS_CLIENT_CA" not in env
    # The agents push to https:// and verify the collector with the CA from the Secret.
    apod = _pod(objs, "agent")
    a = apod["containers"][0]
    aenv = env_of(a)
    assert aenv["GPUFLEET_COLLECTOR"]["value"] == f"https://gf-gpufleet-collector.{NAMESPACE}.svc:9446"
    assert aenv["GPUFLEET_CA_BUNDLE"]["value"] == "/etc/gpufleet/tls/ca/bundle.pem"
    assert _mount(a, "tls-ca") == {"name": "tls-ca", "mountPath": "/etc/gpufleet/tls/ca", "readOnly": True}
    assert _volume(apod, "tls-ca")["secret"]["items"] == [{"key": "bundle.pem", "path": "bundle.pem"}]
    assert "GPUFLEET_CLIENT_CERT" not in aenv
    # Plain HTTP by default.
    plain = container(objects(render({})), "collector")
    assert "GPUFLEET_TLS_CERT" not in env_of(plain) and "scheme" not in plain["livenessProbe"]["httpGet"]


def test_mutual_tls_client_certificates_token_file_and_limits(rendered):
    objs = rendered["tls-and-spool"]
    pod = _pod(objs, "collector")
    c = pod["containers"][0]
    env = env_of(c)
    assert env["GPUFLEET_TLS_CLIENT_CA"]["value"] == "/etc/gpufleet/tls/ca.crt"
    assert [i["key"] for i in _volume(pod, "tls")["secret"]["items"]] == ["tls.crt", "tls.key", "ca.crt"]
    # The kubelet's probes present no client certificate: they check the port.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["tcpSocket"] == {"port": "http"} and "httpGet" not in c[probe], probe
    # More tokens from a file in the user's Secret, next to the generated one the agents send.
    assert env["GPUFLEET_TOKEN_FILE"]["value"] == "/etc/gpufleet/auth/tokens"
    assert _mount(c, "token-file") == {
        "name": "token-file",
        "mountPath": "/etc/gpufleet/auth",
        "readOnly": True,
    }
    assert _volume(pod, "token-file")["secret"]["items"] == [{"key": "token-file", "path": "tokens"}]
    assert "GPUFLEET_TOKENS" in env
    limits = MATRIX["tls-and-spool"]["collector"]["limits"]
    names = {
        "maxBodyBytes": "GPUFLEET_MAX_BODY_BYTES",
        "maxUncompressedBytes": "GPUFLEET_MAX_UNCOMPRESSED_BYTES",
        "maxSeries": "GPUFLEET_MAX_SERIES",
        "maxSamples": "GPUFLEET_MAX_SAMPLES",
        "maxLabels": "GPUFLEET_MAX_LABELS",
        "maxLabelLength": "GPUFLEET_MAX_LABEL_LENGTH",
        "maxInflightWrites": "GPUFLEET_MAX_INFLIGHT_WRITES",
        "writeRateLimit": "GPUFLEET_WRITE_RATE_LIMIT",
        "writeBurst": "GPUFLEET_WRITE_BURST",
        "maxSilenceChangesPerMinute": "GPUFLEET_MAX_SILENCE_CHANGES_PER_MINUTE",
        "maxFuture": "GPUFLEET_MAX_FUTURE",
        "maxPast": "GPUFLEET_MAX_PAST",
        "maxActiveSeries": "GPUFLEET_MAX_ACTIVE_SERIES",
        "maxActiveSeriesPerCluster": "GPUFLEET_MAX_ACTIVE_SERIES_PER_CLUSTER",
        "seriesIdleAfter": "GPUFLEET_SERIES_IDLE_AFTER",
        "fleetMaxGpus": "GPUFLEET_FLEET_MAX_GPUS",
        "queryMaxSeries": "GPUFLEET_QUERY_MAX_SERIES",
        "queryMaxSamples": "GPUFLEET_QUERY_MAX_SAMPLES",
        "queryTimeout": "GPUFLEET_QUERY_TIMEOUT",
        "queryMaxConcurrent": "GPUFLEET_QUERY_MAX_CONCURRENT",
    }
    assert {names[k]: str(v) for k, v in limits.items()} == {n: env[n]["value"] for n in names.values()}
    assert not [
        n
        for n in env_of(container(rendered["defaults"], "collector"))
        if n.startswith(("GPUFLEET_MAX_", "GPUFLEET_WRITE_"))
    ]
    assert env["GPUFLEET_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # The agents present their client certificate; the key is readable by their group only.
    apod = _pod(objs, "agent")
    a = apod["containers"][0]
    aenv = env_of(a)
    assert aenv["GPUFLEET_COLLECTOR"]["value"].startswith("https://")
    assert (aenv["GPUFLEET_CLIENT_CERT"]["value"], aenv["GPUFLEET_CLIENT_KEY"]["value"]) == (
        "/etc/gpufleet/tls/client/tls.crt",
        "/etc/gpufleet/tls/client/tls.key",
    )
    assert _mount(a, "tls-client")["readOnly"] is True
    client = _volume(apod, "tls-client")["secret"]
    assert client["secretName"] == "agent-client" and client["defaultMode"] == 0o440
    assert _volume(apod, "tls-ca")["configMap"]["name"] == "fleet-ca"
    assert aenv["GPUFLEET_CA_BUNDLE"]["value"] == "/etc/gpufleet/tls/ca/ca.crt"
    # Prometheus scrapes the collector over HTTPS with the same CA and client certificate.
    sm = find(objs, "ServiceMonitor")
    ep = next(e for e in sm["spec"]["endpoints"] if e["port"] == "http")
    assert ep["scheme"] == "https"
    assert ep["tlsConfig"] == {
        "serverName": f"gf-gpufleet-collector.{NAMESPACE}.svc",
        "ca": {"configMap": {"name": "fleet-ca", "key": "ca.crt"}},
        "cert": {"secret": {"name": "agent-client", "key": "tls.crt"}},
        "keySecret": {"name": "agent-client", "key": "tls.key"},
    }


def test_collector_gets_tokens_or_an_explicit_open_door(rendered):
    """`gpufleet collector` refuses to listen on 0.0.0.0 without tokens unless told: the default install
    passes the generated token, auth.enabled=false passes GPUFLEET_ALLOW_OPEN_WRITES."""
    env = env_of(container(rendered["defaults"], "collector"))
    assert env["GPUFLEET_TOKENS"]["valueFrom"]["secretKeyRef"]["key"] == "tokens"
    assert _secret_data(rendered["defaults"])["tokens"]
    assert "GPUFLEET_ALLOW_OPEN_WRITES" not in env
    env = env_of(container(rendered["open-writes"], "collector"))
    assert env["GPUFLEET_ALLOW_OPEN_WRITES"]["value"] == "true" and "GPUFLEET_TOKENS" not in env


def test_network_policies_admit_agents_and_listed_peers(rendered):
    pols = {o["metadata"]["name"]: o for o in rendered["locked-down"] if o["kind"] == "NetworkPolicy"}
    col = pols["gf-gpufleet-collector"]["spec"]["ingress"][0]["from"]
    assert col[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "agent"
    assert {"podSelector": {"matchLabels": {"app": "grafana"}}} in col
    assert pols["gf-gpufleet-agent"]["spec"]["ingress"][0]["ports"] == [
        {"port": "metrics", "protocol": "TCP"}
    ]


def test_retention_forwarding_and_layout_reach_the_collector_only_when_set(rendered):
    env = env_of(container(rendered["store-options"], "collector"))
    assert {
        n: env[n]["value"]
        for n in ("GPUFLEET_RETENTION_RAW", "GPUFLEET_RETENTION_1M", "GPUFLEET_RETENTION_1H")
    } == {"GPUFLEET_RETENTION_RAW": "0.5", "GPUFLEET_RETENTION_1M": "365", "GPUFLEET_RETENTION_1H": "1825"}
    assert env["GPUFLEET_FORWARD"]["value"] == " ".join(MATRIX["store-options"]["collector"]["forward"])
    assert env["GPUFLEET_RAW_LAYOUT"]["value"] == "rows"
    assert {n: env[n]["value"] for n in env if n.startswith("GPUFLEET_FORWARD_")} == {
        "GPUFLEET_FORWARD_WHEN_FULL": "drop",
        "GPUFLEET_FORWARD_MAX_QUEUE_SAMPLES": "20000000",
        "GPUFLEET_FORWARD_MAX_QUEUE_BYTES": "1073741824",
        "GPUFLEET_FORWARD_SHARDS": "8",
    }
    assert env["GPUFLEET_WORKERS"]["value"] == "2"
    slack = env_of(container(rendered["tokens-and-slack"], "collector"))
    assert (
        slack["GPUFLEET_GRAFANA_DASHBOARD_URL"]["value"]
        == "https://grafana.example/d/gpufleet-node-gpu-postgres"
    )
    defaults = env_of(container(rendered["defaults"], "collector"))
    assert not [
        n
        for n in defaults
        if n.startswith(
            (
                "GPUFLEET_RETENTION_",
                "GPUFLEET_FORWARD",
                "GPUFLEET_RAW_LAYOUT",
                "GPUFLEET_GRAFANA_DASHBOARD_URL",
                "GPUFLEET_WORKERS",
            )
        )
    ]
    # One value alone is passed alone: the collector's defaults hold for the others.
    one = env_of(container(objects(render({"collector": {"retention": {"oneHourDays": 3650}}})), "collector"))
    assert [n for n in one if n.startswith("GPUFLEET_RETENTION_")] == ["GPUFLEET_RETENTION_1H"]


# ---- wrong values fail at template time, with the fix in the message --------------------------------
@pytest.mark.parametrize(
    "values, says",
    [
        ({"agent": {"perProccess": True}}, "additional properties 'perProccess' not allowed"),
        ({"agent": {"interval": 0}}, "/agent/interval"),
        ({"agent": {"metricNames": "dcgm-exporter"}}, "/agent/metricNames"),
        ({"grafana": {"dashboards": {"flavour": "influx"}}}, "/grafana/dashboards/flavour"),
        ({"agent": {"workload": {"kubeletUrl": "10.0.0.1:10250"}}}, "/agent/workload/kubeletUrl"),
        ({"agent": {"workload": {"jobLabelKeys": ["job name"]}}}, "/agent/workload/jobLabelKeys/0"),
        (
            {"grafana": {"dashboards": {"configMaps": True, "flavour": "postgres"}}},
            "grafana.dashboards.flavour=postgres reads the collector's PostgreSQL store",
        ),
        (
            {"prometheusRule": {"enabled": True}, "rules": {"files": {"site.yaml": "groups: []\n"}}},
            "gpufleet alerts export --format prometheusrule --metric-names gpufleet --with-builtin site.yaml",
        ),
        (
            {
                "prometheusRule": {"enabled": True},
                "agent": {"metricNames": "dcgm"},
                "rules": {"builtin": False, "files": {"mine.yaml": "groups: []\n"}},
            },
            "--metric-names dcgm mine.yaml -o rules-export.yaml",
        ),
        (
            {"prometheusRule": {"enabled": True, "exported": "groups: []\n"}},
            "prometheusRule.exported is not a PrometheusRule with rule groups",
        ),
        ({"collector": {"replicas": 0}}, "/collector/replicas"),
        ({"agent": {"resources": {"requests": {"nvidia.com/gpu": 1}}}}, "/agent/resources/requests"),
        ({"database": {"url": "mysql://x"}}, "/database/url"),
        ({"auth": {"tokens": ["short"]}}, "/auth/tokens/0"),
        ({"serviceMonitor": {"interval": "15 seconds"}}, "/serviceMonitor/interval"),
        ({"collector": {"replicas": 2}}, "collector.replicas > 1 needs PostgreSQL"),
        ({"collector": {"replicas": 2}, "database": {"url": "sqlite:////data/x.db"}}, "needs PostgreSQL"),
        ({"slack": {"token": "xoxb-1"}}, "slack.channel is empty"),
        ({"slack": {"channel": "C0123"}}, "there is no bot token"),
        ({"grafana": {"token": "t"}}, "grafana.url is empty"),
        ({"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}, "scrape every agent twice"),
        ({"rules": {"builtin": False}}, "leaves the collector without rules"),
        ({"rules": {"files": {"gpu.txt": "x"}}}, "is not a rule file name"),
        (
            {"agent": {"inference": {"endpoints": ["http://127.0.0.1:8000/metrics"]}}},
            "/agent/inference/endpoints/0",
        ),
        ({"agent": {"inference": {"probes": ["a=http://x/v1 b=http://y/v1"]}}}, "/agent/inference/probes/0"),
        ({"agent": {"inference": {"slo": "99%"}}}, "/agent/inference/slo"),
        ({"agent": {"inference": {"kubelet": {"url": "10.0.0.1:10250"}}}}, "/agent/inference/kubelet/url"),
        (
            {"agent": {"inference": {"kubelet": {"rbac": {"resources": ["nodes"]}}}}},
            "/agent/inference/kubelet/rbac",
        ),
        (
            {"agent": {"inference": {"receiver": {"address": "tcp://0.0.0.0:9447"}}}},
            "/agent/inference/receiver/address",
        ),
        (
            {"agent": {"inference": {"config": "endpoints: [unclosed"}}},
            "agent.inference.config is not a YAML mapping",
        ),
        (
            {"agent": {"inference": {"config": "- just a list"}}},
            "agent.inference.config is not a YAML mapping",
        ),
        (
            {"agent": {"inference": {"receiver": {"hostPort": True}}}},
            "set agent.inference.receiver.address to udp://",
        ),
        (
            {"agent": {"inference": {"receiver": {"address": "unix:///run/gpufleet/inference.sock"}}}},
            "set agent.inference.receiver.hostPath",
        ),
        ({"agent": {"spool": {"type": "hostpath"}}}, "/agent/spool/type"),
        ({"agent": {"spool": {"hostPath": "var/lib/gpufleet"}}}, "/agent/spool/hostPath"),
        ({"agent": {"spool": {"maxBytes": "2 gigabytes"}}}, "/agent/spool/maxBytes"),
        ({"agent": {"spool": {"maxAge": "1 week"}}}, "/agent/spool/maxAge"),
        ({"agent": {"spool": {"sizeLimit": "1Gi"}}}, "additional properties 'sizeLimit' not allowed"),
        ({"collector": {"limits": {"maxBodyBytes": 100}}}, "/collector/limits/maxBodyBytes"),
        ({"collector": {"limits": {"maxInflightWrites": "64"}}}, "/collector/limits/maxInflightWrites"),
        ({"collector": {"tls": {"existingSecret": "Collector_TLS"}}}, "/collector/tls/existingSecret"),
        ({"collector": {"tls": {"clientCAKey": "ca.crt"}}}, "set collector.tls.existingSecret"),
        (
            {"collector": {"tls": {"existingSecret": "collector-tls", "clientCAKey": "ca.crt"}}},
            "set agent.tls.clientCert.existingSecret",
        ),
        (
            {"agent": {"tls": {"clientCert": {"existingSecret": "agent-client"}}}},
            "set collector.tls.existingSecret (this release's collector serves HTTPS) or an https:// agent.collectorUrl",
        ),
        (
            {
                "agent": {"tls": {"ca": {"existingSecret": "a", "existingConfigMap": "b"}}},
                "collector": {"tls": {"existingSecret": "collector-tls"}},
            },
            "unset the other",
        ),
        (
            {"auth": {"enabled": False, "tokenFile": {"existingSecret": "fleet-tokens"}}},
            "set auth.enabled=true",
        ),
        ({"collector": {"retention": {"rawDays": 0.1}}}, "/collector/retention/rawDays"),
        ({"collector": {"retention": {"oneHourDays": "730"}}}, "/collector/retention/oneHourDays"),
        ({"collector": {"retention": {"raw": 15}}}, "additional properties 'raw' not allowed"),
        ({"collector": {"forward": ["prometheus:9090/api/v1/write"]}}, "/collector/forward/0"),
        ({"collector": {"forward": ["http://a/api/v1/write http://b/api/v1/write"]}}, "/collector/forward/0"),
        ({"collector": {"rawLayout": "chunked"}, "database": {"url": PG_URL}}, "/collector/rawLayout"),
        ({"collector": {"rawLayout": "rows"}}, "collector.rawLayout=rows applies to PostgreSQL only"),
        (
            {"grafana": {"dashboardUrl": "grafana.example/d/gpufleet-node-gpu-postgres"}},
            "/grafana/dashboardUrl",
        ),
        ({"collector": {"runbookBaseUrl": "wiki.example.com/gpu"}}, "/collector/runbookBaseUrl"),
        (
            {"collector": {"enabled": False}, "prometheusRule": {"enabled": True}},
            "set collector.runbookBaseUrl",
        ),
    ],
)
def test_wrong_values_fail_with_a_clear_message(values, says):
    with pytest.raises(helm.HelmError) as err:
        render(values)
    assert says in str(err.value)


def test_a_broken_template_fails_the_render(tmp_path):
    chart = _copy_chart(tmp_path)
    (chart / "templates" / "broken.yaml").write_text("{{ .Values.agent.port | nosuchfunction }}\n")
    with pytest.raises(helm.HelmError, match="nosuchfunction"):
        render({}, chart=chart)


def test_an_invalid_object_fails_validation(tmp_path):
    chart = _copy_chart(tmp_path)
    ds = chart / "templates" / "agent-daemonset.yaml"
    ds.write_text(
        ds.read_text().replace("containerPort: {{ $a.port }}", "containerPort: nine-four-four-five")
    )
    bad = find(objects(render({}, chart=chart)), "DaemonSet", "-agent")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)
    sm = find(
        objects(render({"serviceMonitor": {"enabled": True, "interval": "5s", "scrapeTimeout": "10s"}})),
        "ServiceMonitor",
    )
    with pytest.raises(AssertionError, match="exceeds interval"):
        validate(sm)


def _copy_chart(tmp_path: Path) -> Path:
    dest = tmp_path / "gpufleet"
    shutil.copytree(CHART, dest, symlinks=False)  # files/dashboards becomes a real folder
    return dest


# ---- dashboards for the Grafana sidecar -------------------------------------------------------------
def test_chart_ships_the_repository_dashboards():
    link = CHART / "files" / "dashboards"
    assert link.resolve() == (CHART.parents[1] / "dashboards").resolve(), (
        "files/dashboards must point at the repository's dashboards/ so the chart ships what `dashboards build` made"
    )


def test_dashboard_config_maps_for_sidecar_provisioning(tmp_path):
    chart = _copy_chart(tmp_path)
    shipped = chart / "files" / "dashboards"
    for f in shipped.glob("*.json"):
        f.unlink()
    for flavour in ("postgres", "prometheus", "prometheus-dcgm"):
        (shipped / f"gpu-fleet.{flavour}.json").write_text(json.dumps({"title": f"GPU fleet {flavour}"}))
        (shipped / f"gpu-health.{flavour}.json").write_text(json.dumps({"title": f"GPU health {flavour}"}))
    values = {
        "grafana": {
            "dashboards": {
                "configMaps": True,
                "namespace": "grafana",
                "extra": {
                    "gpu-health.prometheus.json": json.dumps({"title": "Ours"}),
                    "site.json": json.dumps({"title": "Site"}),
                },
            }
        }
    }
    cms = [o for o in objects(render(values, chart=chart)) if o["kind"] == "ConfigMap"]
    by_file = {k: json.loads(v) for cm in cms for k, v in cm["data"].items()}
    assert by_file == {
        "gpu-fleet.prometheus.json": {"title": "GPU fleet prometheus"},
        "gpu-health.prometheus.json": {"title": "Ours"},
        "site.json": {"title": "Site"},
    }
    for cm in cms:
        validate(cm)
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["namespace"] == "grafana"
        assert cm["metadata"]["annotations"]["grafana_folder"] == "GPU fleet"


# ---- PrometheusRule -----------------------------------------------------------------------------------
def _rendered_rule_groups() -> dict:
    rule = find(objects(render({"prometheusRule": {"enabled": True}})), "PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def test_rendered_prometheus_rule_passes_promtool(tmp_path):
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    path = tmp_path / "gpufleet-rules.yaml"
    path.write_text(yaml.safe_dump(_rendered_rule_groups(), allow_unicode=True))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_catches_a_broken_expression(tmp_path):
    groups = _rendered_rule_groups()
    groups["groups"][0]["rules"][0]["expr"] = "increase(gpufleet_gpu_xid_errors_total[5m] > 0"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(groups))
    assert subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True).returncode != 0


@pytest.mark.parametrize(
    "names, file", [("gpufleet", "prometheusrule.yaml"), ("dcgm", "prometheusrule-dcgm.yaml")]
)
def test_prometheus_rule_file_matches_gpufleet_alerts_export(tmp_path, names, file):
    out = tmp_path / "prometheusrule.yaml"
    result = CliRunner().invoke(
        main, ["alerts", "export", "--format", "prometheusrule", "--metric-names", names, "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    exported = yaml.safe_load(out.read_text())
    committed = yaml.safe_load((CHART / "files" / file).read_text())
    assert (exported["spec"], exported["metadata"]["annotations"]) == (
        committed["spec"],
        committed["metadata"]["annotations"],
    ), f"helm/gpufleet/files/{file} is stale: regenerate it with make generated"


@pytest.mark.parametrize(
    "values, base",
    [
        ({}, "http://gf-gpufleet-collector.monitoring.svc:9446/runbooks"),
        (
            {"collector": {"tls": {"existingSecret": "collector-tls"}}},
            "https://gf-gpufleet-collector.monitoring.svc:9446/runbooks",
        ),
        ({"slack": {"publicUrl": "https://gpufleet.example.com/"}}, "https://gpufleet.example.com/runbooks"),
        (
            {
                "slack": {"publicUrl": "https://gpufleet.example.com"},
                "collector": {"runbookBaseUrl": "https://wiki.example.com/gpu/"},
            },
            "https://wiki.example.com/gpu",
        ),
        (
            {"collector": {"enabled": False, "runbookBaseUrl": "https://wiki.example.com/gpu"}},
            "https://wiki.example.com/gpu",
        ),
    ],
)
def test_runbook_links_of_the_prometheus_rule_and_the_collector_agree(tmp_path, values, base):
    """The chart's PrometheusRule is `gpufleet alerts export --runbook-base-url BASE`, and the collector sends
    and shows the same BASE/NAME links: its own /runbooks unless told otherwise."""
    objs = objects(render({**values, "prometheusRule": {"enabled": True}}))
    out = tmp_path / "prometheusrule.yaml"
    result = CliRunner().invoke(
        main, ["alerts", "export", "--format", "prometheusrule", "--runbook-base-url", base, "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    spec = find(objs, "PrometheusRule")["spec"]
    assert spec == yaml.safe_load(out.read_text())["spec"]
    assert f"{base}/xid-critical" in {
        r["annotations"]["runbook_url"] for g in spec["groups"] for r in g["rules"]
    }
    if values.get("collector", {}).get("enabled", True):
        assert env_of(container(objs, "collector"))["GPUFLEET_RUNBOOK_BASE_URL"]["value"] == base


def test_notes_tell_where_to_look_next():
    notes = render({})["gpufleet/templates/NOTES.txt"]
    assert "kubectl -n monitoring get daemonset gf-gpufleet-agent" in notes
    assert "port-forward service/gf-gpufleet-collector 9446" in notes
    assert "No Slack token" in notes
    assert "docs/install.md" in notes
    assert (
        "gf-gpufleet-collector.monitoring.svc:9446/runbooks/NAME,\n  which opens inside the cluster only"
        in notes
    )
    assert (
        "WARNING: auth.enabled=false" in render({"auth": {"enabled": False}})["gpufleet/templates/NOTES.txt"]
    )


def test_helm_lint_is_clean():
    report = helm.lint(str(CHART), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
    assert not problems, problems


def test_read_tokens_given_to_the_chart_are_what_the_collector_it_starts_reads_with(tmp_path, monkeypatch):
    """auth.readTokens go into the chart's Secret and reach the collector as GPUFLEET_READ_TOKENS; started with
    the environment the chart gives it, the collector reads with them and refuses reads without a token."""
    import urllib.error
    import urllib.request

    from tests.conftest import free_port
    from tests.wiring import CollectorProcess

    write, read = "w" * 32, "r" * 24
    objs = objects(render({"auth": {"tokens": [write], "readTokens": [f"{read}@east"]}}))
    for obj in objs:
        validate(obj)
    env, data = env_of(container(objs, "collector")), _secret_data(objs)
    given = {
        n: data[env[n]["valueFrom"]["secretKeyRef"]["key"]]
        for n in ("GPUFLEET_TOKENS", "GPUFLEET_READ_TOKENS")
    }
    assert given["GPUFLEET_READ_TOKENS"] == f"{read}@east"
    # from an existing Secret, read tokens are optional: a Secret made for write tokens alone still starts
    existing = env_of(container(objects(render({"auth": {"existingSecret": "mine"}})), "collector"))
    assert existing["GPUFLEET_READ_TOKENS"]["valueFrom"]["secretKeyRef"] == {
        "name": "mine",
        "key": "read-tokens",
        "optional": True,
    }
    assert "GPUFLEET_READ_TOKENS" not in env_of(container(objects(render({})), "collector"))

    for name, value in given.items():
        monkeypatch.setenv(name, value)
    collector = CollectorProcess(free_port(), ["--db", f"sqlite:///{tmp_path}/c.db"], tmp_path / "c.log")
    try:

        def status(token: str | None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            req = urllib.request.Request(collector.url + "/api/v1/gpus", headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert (status(None), status(read), status(write), status("r" * 23)) == (401, 200, 200, 401)
    finally:
        collector.stop()
