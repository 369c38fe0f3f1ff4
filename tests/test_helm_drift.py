"""Chart values and the programs' flags do not drift apart: every environment variable the chart sets is one
the program reads (read from the click commands themselves), every setting of the program has a chart value,
and what the chart sets parses as the program expects."""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from gpufleet.cli import main
from gpufleet.core.durations import parse_duration
from tests.conftest import free_port, wait_until
from tests.helm_render import container, env_of, find, objects, render
from tests.test_helm_chart import MATRIX
from tests.test_security_tls import make_ca, make_leaf

COMPONENTS = ("agent", "collector")

# Read by the NVIDIA container runtime when it sets up the container, not by gpufleet.
RUNTIME_ENV = {"NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"}

# Filled in from the downward API only so that later variables can refer to them as $(NAME): the kubelet
# expands the reference, gpufleet never reads the variable itself.
EXPANDED_ONLY = {"NODE_IP"}

# Program settings deliberately left out of the chart, with the reason. Empty today: a new flag must either
# get a chart value (values.yaml, values.schema.json, the template) or a line here saying why not.
NOT_IN_CHART: dict[tuple[str, str], str] = {
    ("agent", "proc_root"): "the container sees the host's processes at /proc itself once hostPID is on "
    "(agent.perProcess); the flag exists for tests and for agents run outside a pod",
    (
        "collector",
        "reuse_port",
    ): "a pod runs one collector on its port, and `collector.workers` shares it among "
    "several processes itself; the flag is for several collectors started apart on one host",
}

# Flags without an environment variable, set through the container's args.
ARG_VALUES = {("agent", "verbose"): ("agent", "verbose"), ("collector", "verbose"): ("collector", "verbose")}


def program_envvars(command: str) -> dict[str, click.Parameter]:
    """Environment variable -> parameter, for one subcommand, by click's own introspection."""
    out: dict[str, click.Parameter] = {}
    for param in main.commands[command].params:
        names = param.envvar if isinstance(param.envvar, (list, tuple)) else [param.envvar]
        for name in names:
            if name:
                out[name] = param
    return out


def flag_of(command: str, flag: str) -> click.Parameter | None:
    return next((p for p in main.commands[command].params if flag in getattr(p, "opts", [])), None)


@pytest.fixture(scope="module")
def chart_env() -> dict[str, dict[str, list[dict]]]:
    """component -> env var name -> the entries the chart renders for it, over the whole values matrix."""
    seen: dict[str, dict[str, list[dict]]] = {c: {} for c in COMPONENTS}
    for values in MATRIX.values():
        objs = objects(render(values))
        kinds = {o["kind"] for o in objs}
        for component in COMPONENTS:
            if ("DaemonSet" if component == "agent" else "Deployment") not in kinds:
                continue
            for name, entry in env_of(container(objs, component)).items():
                seen[component].setdefault(name, []).append(entry)
    return seen


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_env_var_the_chart_sets_is_read_by_the_program(chart_env, component):
    read = program_envvars(component)
    assert chart_env[component], "the chart set no environment at all"
    unknown = []
    for name in chart_env[component]:
        if name in read or name in RUNTIME_ENV:
            continue
        if name in EXPANDED_ONLY:
            refs = [e.get("value", "") for entries in chart_env[component].values() for e in entries]
            assert any(f"$({name})" in v for v in refs), f"the chart sets {name} but no variable refers to it"
            continue
        unknown.append(name)
    assert not unknown, (
        f"the chart sets {unknown} on the {component}, but `gpufleet {component}` reads none of "
        f"them (it reads {sorted(read)}): rename the chart's variable or add the flag"
    )


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_program_setting_has_a_chart_value(chart_env, component):
    missing = []
    for param in main.commands[component].params:
        if not isinstance(param, click.Option) or param.name in ("help",):
            continue
        if (component, param.name) in NOT_IN_CHART:
            continue
        if (component, param.name) in ARG_VALUES:
            continue
        names = param.envvar if isinstance(param.envvar, (list, tuple)) else [param.envvar]
        if not any(n in chart_env[component] for n in names if n):
            missing.append(
                f"{param.opts[-1]} ({', '.join(n for n in names if n) or 'no environment variable'})"
            )
    assert not missing, (
        f"`gpufleet {component}` settings with no chart value: {missing}; add a value to "
        "helm/gpufleet (values.yaml, values.schema.json, the template) or a reason to NOT_IN_CHART"
    )


def test_verbose_flags_reach_the_container_args():
    objs = objects(render({"agent": {"verbose": True}, "collector": {"verbose": True}}))
    for component in COMPONENTS:
        args = container(objs, component)["args"]
        ctx = main.commands[component].make_context(component, args[1:])
        assert ctx.params["verbose"] is True


# What the kubelet fills in from the downward API on the node the pod runs on.
FIELDS = {
    "spec.nodeName": "gpu-node-7",
    "status.hostIP": "10.1.2.3",
    "metadata.name": "gf-gpufleet-collector-5d8f7c9b4-x2k7q",
}

# Variables that name a file: the chart must mount it, read-only, from a Secret or ConfigMap.
FILE_ENV = (
    "GPUFLEET_CA_BUNDLE",
    "GPUFLEET_CLIENT_CERT",
    "GPUFLEET_CLIENT_KEY",
    "GPUFLEET_TOKEN_FILE",
    "GPUFLEET_TLS_CERT",
    "GPUFLEET_TLS_KEY",
    "GPUFLEET_TLS_CLIENT_CA",
)

# A write token the user keeps in the token-file Secret of the tls-and-spool scenario, hashed there.
SITE_TOKEN = "site-token-" + "s" * 32

# What users keep in the Secrets the chart only names (existingSecret), where the program checks the value as it
# reads the variable: the database URL. Other keys get a placeholder.
USER_SECRETS = {("gpufleet-db", "url"): "postgresql+psycopg://gpufleet:secret@db.example:5432/gpufleet"}


def _resolve(entry: dict, secrets: dict[str, str], earlier: dict[str, str]) -> str:
    if "value" in entry:
        # Dependent variables: $(NAME) of a variable defined earlier in the list is expanded, as the kubelet does.
        return re.sub(
            r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: earlier.get(m.group(1), m.group(0)), entry["value"]
        )
    ref = entry["valueFrom"]
    if "fieldRef" in ref:
        return FIELDS[ref["fieldRef"]["fieldPath"]]
    key = ref["secretKeyRef"]
    return secrets.get(
        key["key"], USER_SECRETS.get((key["name"], key["key"]), f"from-secret-{key['name']}-{key['key']}")
    )


def _mounted(pod: dict, c: dict, path: str) -> tuple[str, str]:
    """(Secret or ConfigMap name, key) of the file at ``path`` in container ``c``; fails unless a read-only
    mount of a Secret or ConfigMap provides exactly that file."""
    for m in c.get("volumeMounts", []):
        prefix = m["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        assert m.get("readOnly") is True, f"{path} comes from mount {m['name']}, which is writable"
        vol = next(v for v in pod["volumes"] if v["name"] == m["name"])
        src = vol.get("secret") or vol.get("configMap")
        assert src is not None, f"{path} comes from volume {vol}, neither a Secret nor a ConfigMap"
        rel = path[len(prefix) :]
        items = src.get("items")
        if items:
            keys = [i["key"] for i in items if i["path"] == rel]
            assert keys, f"volume {m['name']} mounts {[i['path'] for i in items]}, not {rel}"
            return src.get("secretName") or src["name"], keys[0]
        return src.get("secretName") or src["name"], rel
    raise AssertionError(f"no mount in the {c['name']} container provides {path}")


def _container_env(
    objs: list[dict], component: str, tmp_path: Path, files: dict[tuple[str, str], bytes]
) -> tuple[dict[str, str], list[str]]:
    """The environment and arguments the container runs with, as the kubelet makes them, with every mounted
    file written under tmp_path (contents from ``files`` by (Secret or ConfigMap, key))."""
    from gpufleet.collector.rules.model import default_rules_path

    secrets = {
        k: base64.b64decode(v).decode()
        for o in objs
        if o["kind"] == "Secret"
        for k, v in o.get("data", {}).items()
    }
    pod = find(objs, "DaemonSet" if component == "agent" else "Deployment", f"-{component}")["spec"][
        "template"
    ]["spec"]
    c = container(objs, component)
    env: dict[str, str] = {}
    for name, e in env_of(c).items():
        env[name] = _resolve(e, secrets, env)
    # The ConfigMap the chart mounts at the config's path, written where this machine can read it.
    if "GPUFLEET_INFERENCE_CONFIG" in env:
        cm = next(
            o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-inference")
        )
        path = tmp_path / Path(env["GPUFLEET_INFERENCE_CONFIG"]).name
        path.write_text(cm["data"][path.name])
        env["GPUFLEET_INFERENCE_CONFIG"] = str(path)
    for name in FILE_ENV:
        if name in env:
            source, key = _mounted(pod, c, env[name])
            path = tmp_path / component / source / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(files.get((source, key), b"placeholder\n"))
            env[name] = str(path)
    # The image copies the built-in rule pack (the alerts package's files) to this folder.
    if "GPUFLEET_RULES" in env:
        env["GPUFLEET_RULES"] = env["GPUFLEET_RULES"].replace(
            "/usr/share/gpufleet/rules", str(default_rules_path())
        )
    return env, list(c["args"])


@pytest.mark.parametrize(
    "scenario",
    [
        "defaults",
        "tokens-and-slack",
        "external-database",
        "existing-secrets",
        "agents-only",
        "inference",
        "tls-and-spool",
        "open-writes",
        "store-options",
    ],
)
def test_the_program_parses_what_the_chart_sets(scenario, tmp_path):
    """Feed each container's rendered environment to the real click command and read back its settings."""
    objs = objects(render(MATRIX[scenario]))
    for component in COMPONENTS:
        kind = "DaemonSet" if component == "agent" else "Deployment"
        if kind not in {o["kind"] for o in objs}:
            continue
        env, args = _container_env(objs, component, tmp_path, {})
        c = {"args": args}
        with CliRunner(env=env).isolation():
            ctx = main.commands[component].make_context(component, list(c["args"][1:]))
        p = ctx.params
        if component == "agent":
            assert p["node"] == "gpu-node-7"
            assert p["listen"] == "0.0.0.0:9445"
            assert p["interval"] == 1.0 and p["push_interval"] == 5.0
            if "GPUFLEET_COLLECTOR" in env:
                assert p["collector"] == env["GPUFLEET_COLLECTOR"]
                assert p["token"] == env.get("GPUFLEET_TOKEN")
            if scenario == "agents-only":
                assert p["simulate"] == 4 and p["verbose"] is True and p["sources"] == "gpu,host"
            if scenario == "inference":
                _check_inference(p, MATRIX[scenario]["agent"]["inference"])
            assert p["spool_dir"] == "/var/lib/gpufleet/spool"
            if scenario == "tls-and-spool":
                assert (p["spool_max_bytes"], p["spool_max_age"]) == ("2GiB", "2d")
                assert p["collector"].startswith("https://")
                assert [
                    Path(p[k]).relative_to(tmp_path).parts for k in ("ca_bundle", "client_cert", "client_key")
                ] == [
                    ("agent", "fleet-ca", "ca.crt"),
                    ("agent", "agent-client", "tls.crt"),
                    ("agent", "agent-client", "tls.key"),
                ]
                from gpufleet.cli.agent import agent_settings

                s = agent_settings(p)
                assert (s.spool_max_bytes, s.spool_max_age) == (2 << 30, 2 * 86400.0)
        else:
            assert p["listen"] == "0.0.0.0:9446"
            assert p["db"] == env["GPUFLEET_DB"]
            assert p["tokens"] == env.get("GPUFLEET_TOKENS")
            assert p["name"] == FIELDS["metadata.name"]
            assert p["allow_open_writes"] is (scenario == "open-writes")
            if scenario == "tls-and-spool":
                limits = MATRIX[scenario]["collector"]["limits"]
                # sizes and counts as they are; durations (the sample-time window) as seconds
                expected = {k: parse_duration(v) if isinstance(v, str) else v for k, v in limits.items()}
                assert {k: p[re.sub(r"([A-Z])", r"_\1", k).lower()] for k in limits} == expected
                assert [
                    Path(p[k]).relative_to(tmp_path).parts
                    for k in ("token_file", "tls_cert", "tls_key", "tls_client_ca")
                ] == [
                    ("collector", "fleet-tokens", "token-file"),
                    ("collector", "collector-tls", "tls.crt"),
                    ("collector", "collector-tls", "tls.key"),
                    ("collector", "collector-tls", "ca.crt"),
                ]
            assert p["console"] is False and p["eval_interval"] == 5.0
            assert [str(r) for r in p["rules"]] == [env["GPUFLEET_RULES"]]
            # runbook links: the collector's own /runbooks, where people reach it when the chart knows
            assert p["runbook_base_url"] == (
                "https://gpufleet.example.com/runbooks"
                if scenario == "tokens-and-slack"
                else "https://gf-gpufleet-collector.monitoring.svc:9446/runbooks"
                if scenario == "tls-and-spool"
                else "http://gf-gpufleet-collector.monitoring.svc:9446/runbooks"
            )
            if scenario == "tokens-and-slack":
                assert p["slack_token"] == "xoxb-1-2-3" and p["slack_channel"] == "C0123ONCALL"
                assert p["slack_base_url"] == "https://slack.example/api/"
                assert p["grafana_dashboard_url"] == "https://grafana.example/d/gpufleet-node-gpu-postgres"
            from gpufleet.cli.collector import collector_settings

            s = collector_settings(p)
            if scenario == "store-options":
                values = MATRIX[scenario]["collector"]
                assert s.forward == values["forward"] and s.raw_layout == "rows"
                day = 86_400_000
                assert (s.retention.raw_ms, s.retention.rollup_1m_ms, s.retention.rollup_1h_ms) == (
                    day // 2,
                    365 * day,
                    1825 * day,
                )
            else:  # nothing set: the collector's own defaults
                assert s.forward == [] and s.raw_layout == "chunks"
                assert s.retention.raw_ms == 15 * 86_400_000
    if scenario == "tokens-and-slack":
        agent_env = env_of(container(objs, "agent"))
        assert agent_env["GPUFLEET_CLUSTER"]["value"] == "prod-east"


def _check_inference(p: dict, values: dict) -> None:
    """The agent's own settings loader takes what the chart rendered: flags, the mounted file, the node IP."""
    from gpufleet.cli.agent import inference_settings as _inference_settings

    assert p["inference_endpoints"] == tuple(values["endpoints"])
    assert p["inference_probes"] == tuple(values["probes"])
    assert p["inference_kubelet"] == "https://10.1.2.3:10250"
    assert p["inference_interval"] == 5.0 and p["inference_slo"] == "2.5:0.99"
    assert (p["inference_probe_interval"], p["inference_probe_timeout"]) == (15.0, 4.0)
    assert (p["inference_probe_prompt"], p["inference_probe_model"], p["inference_probe_max_tokens"]) == (
        "Say OK.",
        "llama-3-8b",
        4,
    )
    assert p["inference_receiver"] == "udp://0.0.0.0:9447"
    s = _inference_settings(p)
    assert [e.name for e in s.endpoints] == ["llama", "tgi", "ranker"]
    ranker = s.endpoints[2]
    assert ranker.server == "generic" and ranker.gpus == ("0", "1") and ranker.slo.target == 0.995
    assert [(pr.name, pr.kind) for pr in s.probes] == [
        ("llama-chat", "openai-chat"),
        ("tgi-health", "http"),
        ("ranker-health", "http"),
    ]
    assert s.probes[0].model == "llama-3-8b" and s.probes[0].max_tokens == 4 and s.probes[0].timeout == 4.0
    assert s.kubernetes.kubelet == "https://10.1.2.3:10250"
    assert s.slo.latency_seconds == 2.5 and s.interval == 5.0 and s.receiver == "udp://0.0.0.0:9447"


# ---- the rendered install runs: real `gpufleet collector` and `gpufleet agent` processes -------------------
@pytest.fixture(scope="module")
def chart_files(tmp_path_factory) -> dict[tuple[str, str], bytes]:
    """What the user's Secrets and ConfigMaps named in the tls-and-spool scenario hold: a CA, the collector's
    serving certificate (for localhost, where the test reaches it), an agent's client certificate, a token file."""
    from gpufleet.collector.auth import hash_token

    d = tmp_path_factory.mktemp("chart-pki")
    ca_key, ca = make_ca(d / "ca", "fleet CA")
    make_leaf(d / "collector", "collector", ca_key, ca, server=True)
    make_leaf(d / "agent", "gpu-node-7", ca_key, ca, server=False)
    return {
        ("collector-tls", "tls.crt"): (d / "collector.crt").read_bytes(),
        ("collector-tls", "tls.key"): (d / "collector.key").read_bytes(),
        ("collector-tls", "ca.crt"): (d / "ca.crt").read_bytes(),
        ("fleet-ca", "ca.crt"): (d / "ca.crt").read_bytes(),
        ("agent-client", "tls.crt"): (d / "agent.crt").read_bytes(),
        ("agent-client", "tls.key"): (d / "agent.key").read_bytes(),
        ("fleet-tokens", "token-file"): f"# other sites\nsha256:{hash_token(SITE_TOKEN)}\n".encode(),
    }


def _process_env(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    return {**base, **env, "PYTHONUNBUFFERED": "1"}


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


@pytest.mark.parametrize("scenario", ["defaults", "open-writes", "tls-and-spool"])
def test_the_rendered_install_runs_and_agents_write(scenario, tmp_path, chart_files):
    """The collector starts with exactly what the chart renders (tokens, or the explicit open door; TLS and
    the token file from their mounts; every limit) on a non-loopback address, and an agent with its rendered
    settings (URL scheme, token, CA, client certificate, spool) gets its GPUs into it."""
    objs = objects(render(MATRIX[scenario]))
    port, agent_port = free_port(), free_port()
    env, args = _container_env(objs, "collector", tmp_path, chart_files)
    env.update(
        GPUFLEET_LISTEN=f"0.0.0.0:{port}",
        GPUFLEET_DB=f"sqlite:///{tmp_path / 'gpufleet.db'}",
        GPUFLEET_EVAL_INTERVAL="60",
    )
    aenv, aargs = _container_env(objs, "agent", tmp_path, chart_files)
    tls = "GPUFLEET_TLS_CERT" in env
    base = f"{'https' if tls else 'http'}://localhost:{port}"
    ctx = None
    if tls:  # this test reads the collector with the agents' CA and client certificate
        ctx = ssl.create_default_context(cafile=aenv["GPUFLEET_CA_BUNDLE"])
        ctx.load_cert_chain(aenv["GPUFLEET_CLIENT_CERT"], aenv["GPUFLEET_CLIENT_KEY"])
    collector = subprocess.Popen(
        [sys.executable, "-m", "gpufleet.cli", *args],
        env=_process_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    agent = None
    # with tokens every read needs one: this test reads with the agents' (write tokens may read)
    reader = {"Authorization": f"Bearer {aenv['GPUFLEET_TOKEN']}"} if aenv.get("GPUFLEET_TOKEN") else {}
    try:

        def get(path: str):
            assert collector.poll() is None, "the collector stopped:\n" + _stop(collector)
            try:
                req = urllib.request.Request(base + path, headers=reader)
                with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
                    return json.loads(resp.read())
            except OSError:
                return None

        wait_until(lambda: get("/healthz"), timeout=30)
        assert aenv["GPUFLEET_COLLECTOR"].startswith("https://" if tls else "http://")
        # Reach this machine's collector instead of the Service's cluster name; listen off the agent port.
        aenv.update(
            GPUFLEET_COLLECTOR=base,
            GPUFLEET_LISTEN=f"127.0.0.1:{agent_port}",
            GPUFLEET_SIMULATE="2",
            GPUFLEET_PUSH_INTERVAL="0.5",
            GPUFLEET_SPOOL_DIR=str(tmp_path / "spool"),
        )
        aenv.pop("GPUFLEET_POD_RESOURCES_SOCKET", None)  # no kubelet here
        agent = subprocess.Popen(
            [sys.executable, "-m", "gpufleet.cli", *aargs],
            env=_process_env(aenv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_until(lambda: len((get("/api/v1/gpus") or {}).get("gpus", [])) == 2, timeout=30)
    finally:
        agent_out = _stop(agent) if agent is not None else ""
        out = _stop(collector)
    assert "write tokens" in out, out
    assert (
        "2 write tokens"
        if scenario == "tls-and-spool"
        else "0 write tokens"
        if scenario == "open-writes"
        else "1 write tokens"
    ) in out, out
    assert "client certificates required" in out if tls else "client certificates" not in out, out
    assert "Traceback" not in agent_out, agent_out


def test_without_the_open_door_the_collector_refuses_to_start(tmp_path):
    """What GPUFLEET_ALLOW_OPEN_WRITES is for: auth.enabled=false without it would not start."""
    env, args = _container_env(objects(render(MATRIX["open-writes"])), "collector", tmp_path, {})
    del env["GPUFLEET_ALLOW_OPEN_WRITES"]
    env.update(GPUFLEET_LISTEN=f"0.0.0.0:{free_port()}", GPUFLEET_DB=f"sqlite:///{tmp_path / 'gpufleet.db'}")
    result = subprocess.run(
        [sys.executable, "-m", "gpufleet.cli", *args],
        env=_process_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "--allow-open-writes" in result.stderr, result.stderr
