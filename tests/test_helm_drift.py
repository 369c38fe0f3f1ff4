"""Chart values and the programs' flags do not drift apart: every environment variable the chart sets is one
the program reads (read from the click commands themselves), every setting of the program has a chart value,
and what the chart sets parses as the program expects."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from gpufleet.cli import main
from tests.helm_render import container, env_of, objects, render
from tests.test_helm_chart import MATRIX

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
    assert not unknown, (f"the chart sets {unknown} on the {component}, but `gpufleet {component}` reads none of "
                         f"them (it reads {sorted(read)}): rename the chart's variable or add the flag")


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
            missing.append(f"{param.opts[-1]} ({', '.join(n for n in names if n) or 'no environment variable'})")
    assert not missing, (f"`gpufleet {component}` settings with no chart value: {missing}; add a value to "
                         "helm/gpufleet (values.yaml, values.schema.json, the template) or a reason to NOT_IN_CHART")


def test_verbose_flags_reach_the_container_args():
    objs = objects(render({"agent": {"verbose": True}, "collector": {"verbose": True}}))
    for component in COMPONENTS:
        args = container(objs, component)["args"]
        ctx = main.commands[component].make_context(component, args[1:])
        assert ctx.params["verbose"] is True


# What the kubelet fills in from the downward API on the node the pod runs on.
FIELDS = {"spec.nodeName": "gpu-node-7", "status.hostIP": "10.1.2.3"}


def _resolve(entry: dict, secrets: dict[str, str], earlier: dict[str, str]) -> str:
    if "value" in entry:
        # Dependent variables: $(NAME) of a variable defined earlier in the list is expanded, as the kubelet does.
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: earlier.get(m.group(1), m.group(0)),
                      entry["value"])
    ref = entry["valueFrom"]
    if "fieldRef" in ref:
        return FIELDS[ref["fieldRef"]["fieldPath"]]
    key = ref["secretKeyRef"]
    return secrets.get(key["key"], f"from-secret-{key['name']}-{key['key']}")


@pytest.mark.parametrize("scenario", ["defaults", "tokens-and-slack", "external-database", "existing-secrets",
                                      "agents-only", "inference"])
def test_the_program_parses_what_the_chart_sets(scenario, tmp_path):
    """Feed each container's rendered environment to the real click command and read back its settings."""
    from collector.rules.model import default_rules_path

    objs = objects(render(MATRIX[scenario]))
    secrets = {k: base64.b64decode(v).decode() for o in objs if o["kind"] == "Secret"
               for k, v in o.get("data", {}).items()}
    for component in COMPONENTS:
        kind = "DaemonSet" if component == "agent" else "Deployment"
        if kind not in {o["kind"] for o in objs}:
            continue
        c = container(objs, component)
        env: dict[str, str] = {}
        for name, e in env_of(c).items():
            env[name] = _resolve(e, secrets, env)
        # The ConfigMap the chart mounts at the config's path, written where this machine can read it.
        if "GPUFLEET_INFERENCE_CONFIG" in env:
            cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-inference"))
            path = tmp_path / Path(env["GPUFLEET_INFERENCE_CONFIG"]).name
            path.write_text(cm["data"][path.name])
            env["GPUFLEET_INFERENCE_CONFIG"] = str(path)
        # The image copies the built-in rule pack (the alerts package's files) to this folder.
        if "GPUFLEET_RULES" in env:
            env["GPUFLEET_RULES"] = env["GPUFLEET_RULES"].replace("/usr/share/gpufleet/rules",
                                                                  str(default_rules_path()))
        with CliRunner(env=env).isolation():
            ctx = main.commands[component].make_context(component, list(c["args"][1:]))
        p = ctx.params
        if component == "agent":
            assert p["node"] == "gpu-node-7"
            assert p["listen"] == "0.0.0.0:9445"
            assert p["interval"] == 1.0 and p["push_interval"] == 5.0
            if "GPUFLEET_COLLECTOR" in env:
                assert p["collector"] == env["GPUFLEET_COLLECTOR"]
                assert p["token"] == env["GPUFLEET_TOKEN"]
            if scenario == "agents-only":
                assert p["simulate"] == 4 and p["verbose"] is True and p["sources"] == "gpu,host"
            if scenario == "inference":
                _check_inference(p, MATRIX[scenario]["agent"]["inference"])
        else:
            assert p["listen"] == "0.0.0.0:9446"
            assert p["db"] == env["GPUFLEET_DB"]
            assert p["tokens"] == env["GPUFLEET_TOKENS"]
            assert p["console"] is False and p["eval_interval"] == 5.0
            assert [str(r) for r in p["rules"]] == [env["GPUFLEET_RULES"]]
            if scenario == "tokens-and-slack":
                assert p["slack_token"] == "xoxb-1-2-3" and p["slack_channel"] == "C0123ONCALL"
                assert p["slack_base_url"] == "https://slack.example/api/"
    if scenario == "tokens-and-slack":
        agent_env = env_of(container(objs, "agent"))
        assert agent_env["GPUFLEET_CLUSTER"]["value"] == "prod-east"


def _check_inference(p: dict, values: dict) -> None:
    """The agent's own settings loader takes what the chart rendered: flags, the mounted file, the node IP."""
    from gpufleet.cli import _inference_settings

    assert p["inference_endpoints"] == tuple(values["endpoints"])
    assert p["inference_probes"] == tuple(values["probes"])
    assert p["inference_kubelet"] == "https://10.1.2.3:10250"
    assert p["inference_interval"] == 5.0 and p["inference_slo"] == "2.5:0.99"
    assert (p["inference_probe_interval"], p["inference_probe_timeout"]) == (15.0, 4.0)
    assert (p["inference_probe_prompt"], p["inference_probe_model"], p["inference_probe_max_tokens"]) == \
        ("Say OK.", "llama-3-8b", 4)
    assert p["inference_receiver"] == "udp://0.0.0.0:9447"
    s = _inference_settings(p)
    assert [e.name for e in s.endpoints] == ["llama", "tgi", "ranker"]
    ranker = s.endpoints[2]
    assert ranker.server == "generic" and ranker.gpus == ("0", "1") and ranker.slo.target == 0.995
    assert [(pr.name, pr.kind) for pr in s.probes] == [
        ("llama-chat", "openai-chat"), ("tgi-health", "http"), ("ranker-health", "http")]
    assert s.probes[0].model == "llama-3-8b" and s.probes[0].max_tokens == 4 and s.probes[0].timeout == 4.0
    assert s.kubernetes.kubelet == "https://10.1.2.3:10250"
    assert s.slo.latency_seconds == 2.5 and s.interval == 5.0 and s.receiver == "udp://0.0.0.0:9447"
