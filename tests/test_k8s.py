"""The Kubernetes manifests (``k8s/``), offline: rendered with ``kubectl kustomize``, validated
against the real schemas of the oldest and newest Kubernetes versions ``kubernetes-validate``
knows (``--strict``; a warning such as an unknown apiVersion counts as an error), and checked
against spawnmesh itself: every ``SPAWNMESH_*`` variable is a setting, the environment a pod
gets loads without error or warning, the named ports are the configured ports, the grace
period covers the shutdown budget, and a multi-replica variant never uses SQLite.
"""

from __future__ import annotations

import base64
import copy
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
kv_utils = pytest.importorskip("kubernetes_validate.utils")

from spawnmesh.config import RESERVED_ENV, NodeConfig, load_config, settings  # noqa: E402
from spawnmesh.keyring import Keyring  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
VARIANTS = {"base": K8S, "postgres": K8S / "overlays" / "postgres"}
VERSIONS = sorted(
    {kv_utils.major_minor(v) for v in kv_utils.all_versions()},
    key=lambda v: tuple(map(int, v.split("."))),
)
OLDEST, NEWEST = VERSIONS[0], VERSIONS[-1]
POD = {"metadata.name": "spawnmesh-0", "metadata.namespace": "shop", "status.podIP": "10.1.2.3"}
"""What the downward API gives the first pod (fieldRef values) in these checks."""
EXTRA_ENV = {"POD_NAMESPACE"}
"""Non-setting variables the manifests may define (only to build other values)."""
MARGIN_S = 5
"""Slack the grace period must leave beyond preStop + leave + drain (flush, store close)."""


# ----------------------------------------------------------------------------- rendering


def _kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl is not installed: cannot render the kustomizations offline")
    return exe


def render(path: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize PATH`` as a list of objects."""
    out = subprocess.run(
        [_kubectl(), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(VARIANTS[request.param])


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    sts = one(docs, "StatefulSet")
    (c,) = [c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "spawnmesh"]
    return c


# ----------------------------------------------------------------------------- schemas


def _validator() -> str:
    beside = Path(sys.executable).with_name("kubernetes-validate")
    return str(beside) if beside.exists() else "kubernetes-validate"


def schema_problems(docs: list[dict[str, Any]], version: str, tmp: Path) -> list[str]:
    """Run ``kubernetes-validate --strict`` on the objects; every line that is not a pass
    (errors, and warnings such as a kind or apiVersion without a schema) is a problem."""
    path = tmp / f"rendered-{version}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    out = subprocess.run(
        [_validator(), "--strict", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = (out.stdout + out.stderr).splitlines()
    problems = [line for line in lines if line.strip() and not line.startswith("INFO ")]
    passed = [line for line in lines if line.startswith("INFO ") and " passed " in line]
    if out.returncode != 0 and not problems:
        problems.append(f"exit {out.returncode}")
    if len(passed) != len(docs):
        problems.append(f"{len(passed)} of {len(docs)} objects reported as passed")
    return problems


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_manifests_validate_against_the_oldest_and_newest_schemas(
    variant: tuple[str, list[dict[str, Any]]], version: str, tmp_path: Path
) -> None:
    name, docs = variant
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "ConfigMap",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "Service",
        "StatefulSet",
    ], name
    assert schema_problems(docs, version, tmp_path) == [], f"{name} on Kubernetes {version}"


def test_the_validation_rejects_unknown_fields_and_unknown_api_versions(tmp_path: Path) -> None:
    """The check above can fail: a misspelt field is an error under --strict, and an object
    of an apiVersion without a schema is a warning, which counts too."""
    docs = render(VARIANTS["base"])
    typo = copy.deepcopy(docs)
    c = container(typo)
    c["readinessProbe"]["httpGet"]["paht"] = c["readinessProbe"]["httpGet"].pop("path")
    assert any(p.startswith("ERROR") for p in schema_problems(typo, NEWEST, tmp_path))
    future = copy.deepcopy(docs)
    one(future, "PodDisruptionBudget")["apiVersion"] = "policy/v1beta9"
    assert any(p.startswith("WARN") for p in schema_problems(future, NEWEST, tmp_path))


# ----------------------------------------------------------------------------- spawnmesh


SETTING_ENV = {name: doc for doc in settings() for name in doc.env}
PRIMARY_ENV = {doc.env[0] for doc in settings()}


def secret_values(secret: dict[str, Any]) -> dict[str, str]:
    """A Secret's values as the API server stores them: ``data`` (base64), with every
    ``stringData`` key written over it (stringData wins)."""
    values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    values.update({k: str(v) for k, v in secret.get("stringData", {}).items()})
    return values


def pod_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The environment the container gets, as the kubelet builds it: envFrom ConfigMaps,
    then env entries (fieldRef from :data:`POD`, secretKeyRef from the rendered Secret,
    ``$(VAR)`` expanded from what is defined before)."""
    c = container(docs)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        cm = one(docs, "ConfigMap", source["configMapRef"]["name"])
        env.update({k: str(v) for k, v in cm["data"].items()})
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], item["value"])
            continue
        ref = item["valueFrom"]
        if "fieldRef" in ref:
            env[item["name"]] = POD[ref["fieldRef"]["fieldPath"]]
        else:
            sref = ref["secretKeyRef"]
            data = secret_values(one(docs, "Secret", sref["name"]))
            assert sref["key"] in data, f"Secret {sref['name']} has no key {sref['key']}"
            env[item["name"]] = data[sref["key"]]
    return env


def test_every_variable_and_configmap_key_is_a_spawnmesh_setting(
    variant: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = variant
    cm = one(docs, "ConfigMap", "spawnmesh-config")
    for key in cm["data"]:
        assert key in PRIMARY_ENV, f"ConfigMap key {key} is not a setting's variable"
    for item in container(docs).get("env", []):
        name = item["name"]
        if name.startswith("SPAWNMESH_"):
            assert name in SETTING_ENV or name in RESERVED_ENV, f"{name} is not a setting"
        else:
            assert name in EXTRA_ENV, f"unexpected variable {name}"


def load_pod_config(docs: list[dict[str, Any]], caplog: pytest.LogCaptureFixture) -> NodeConfig:
    env = pod_env(docs)
    with caplog.at_level(logging.WARNING, logger="spawnmesh.config"):
        config = load_config(env=env)  # raises ConfigError on any bad value
    assert not [r for r in caplog.records if r.name == "spawnmesh.config"], caplog.text
    return config


def test_the_pod_environment_loads_and_names_the_configured_ports(
    variant: tuple[str, list[dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    _, docs = variant
    config = load_pod_config(docs, caplog)
    c = container(docs)
    ports = {(p["name"], p.get("protocol", "TCP")): p["containerPort"] for p in c["ports"]}
    assert ports == {
        ("gossip", "UDP"): config.cluster.gossip_port,
        ("gossip-tcp", "TCP"): config.cluster.gossip_port,
        ("peer", "TCP"): config.cluster.peer_port,
        ("host-api", "TCP"): config.host.port,
        ("ops", "TCP"): config.ops.port,
    }
    assert config.name == POD["metadata.name"]
    assert config.cluster.advertise_host == POD["status.podIP"]
    assert config.ops.host == "0.0.0.0"  # the kubelet probes the pod IP
    assert config.cluster.bind_host == "0.0.0.0" and config.cluster.key  # sealed gossip
    assert config.host.enabled and config.host.token  # host API off loopback needs a token
    assert config.statestore.key and not config.statestore.allow_plaintext
    assert not config.cluster.seeds  # membership comes from DNS alone
    # Services point at named container ports.
    names = {p["name"] for p in c["ports"]}
    for svc in (d for d in docs if d["kind"] == "Service"):
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in names, (svc["metadata"]["name"], p)


def test_peer_discovery_goes_through_the_headless_service(
    variant: tuple[str, list[dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    _, docs = variant
    config = load_pod_config(docs, caplog)
    sts = one(docs, "StatefulSet")
    peers = one(docs, "Service", sts["spec"]["serviceName"])
    spec = peers["spec"]
    assert spec["clusterIP"] == "None" and spec["publishNotReadyAddresses"] is True
    assert spec["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    srv = {p["name"]: p for p in spec["ports"]}
    assert srv["gossip"]["protocol"] == "UDP"
    assert srv["gossip"]["port"] == config.cluster.gossip_port
    # The SRV name of that port, fully qualified (resolved without search domains).
    svc, ns = peers["metadata"]["name"], POD["metadata.namespace"]
    assert config.cluster.dns_name == f"_gossip._udp.{svc}.{ns}.svc.cluster.local"
    assert sts["spec"]["podManagementPolicy"] == "OrderedReady"  # one leave at a time
    client = one(docs, "Service", "spawnmesh")
    assert [p["targetPort"] for p in client["spec"]["ports"]] == ["host-api"]
    pdb = one(docs, "PodDisruptionBudget")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_probes_shutdown_budget_security_and_resources(
    variant: tuple[str, list[dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    _, docs = variant
    config = load_pod_config(docs, caplog)
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    c = container(docs)
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    # preStop sleep, then SIGTERM: leave (<= leave_timeout_ms), hand off and drain
    # (<= shutdown_grace_ms); the kubelet's SIGKILL must come later than all of that.
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    leave_and_drain_ms = config.cluster.leave_timeout_ms + config.actors.shutdown_grace_ms
    budget = int(cmd[1]) + leave_and_drain_ms / 1000
    assert pod["terminationGracePeriodSeconds"] >= budget + MARGIN_S
    assert c["command"][-1] == "run"  # spawnmesh itself gets SIGTERM (no shell in between)
    # Non-root, read-only root; the writable mounts cover what the node writes.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["enableServiceLinks"] is False  # no SPAWNMESH_SERVICE_HOST & co.
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = [m["mountPath"] for m in c["volumeMounts"]]
    assert any(c["workingDir"].startswith(m) for m in mounts)
    assert "/tmp" in mounts
    if config.statestore.url.startswith("sqlite:"):
        db = config.statestore.url.removeprefix("sqlite:///")
        assert any(db.startswith(m + "/") for m in mounts), db
    res = c["resources"]
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]
    assert "cpu" not in res["limits"]  # throttling would stretch probe and gossip timeouts


def test_several_replicas_share_one_statestore(
    variant: tuple[str, list[dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    """Actors move between pods, so only a single replica may keep state in SQLite."""
    name, docs = variant
    config = load_pod_config(docs, caplog)
    sts = one(docs, "StatefulSet")
    replicas = sts["spec"]["replicas"]
    if config.statestore.url.startswith("sqlite:"):
        assert replicas == 1, name
        assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["data"]
    else:
        assert replicas >= 3 and config.statestore.url.startswith("postgresql+psycopg://")
        assert "volumeClaimTemplates" not in sts["spec"]  # nothing on the pods to keep
    assert (name == "base") == (replicas == 1)


def test_the_committed_secret_holds_only_placeholders() -> None:
    """Real keys are generated (``spawnmesh keygen``) and never committed: the example's
    keys parse as keys but are all zero."""
    secret = yaml.safe_load((K8S / "base" / "secret.yaml").read_text())
    for field in ("statestore-key", "cluster-key"):
        keys = Keyring.parse(secret["stringData"][field]).export()
        assert [set(k) for _, k in keys] == [{0}], f"{field} is not the placeholder"
    assert "replace" in secret["stringData"]["host-token"]
    assert "CHANGE-ME@" in secret["stringData"]["statestore-url"]


# ----------------------------------------------------------------------------- the Secret


REAL_URL = "postgresql+psycopg://spawnmesh:s3cret@db.prod.svc:5432/spawnmesh"


def _copy_k8s(tmp: Path) -> Path:
    root = tmp / "k8s"
    shutil.copytree(K8S, root)
    return root


def _generated_secret(url: str) -> str:
    """The Secret as docs/deploy-kubernetes.md generates it (``kubectl create secret
    --dry-run=client``: base64 ``data``, no ``stringData``), with real-looking keys."""
    key = "k1:" + base64.b64encode(bytes(range(32))).decode()
    out = subprocess.run(
        [_kubectl(), "create", "secret", "generic", "spawnmesh-secrets", "--dry-run=client",
         "-o", "yaml", f"--from-literal=statestore-key={key}",
         f"--from-literal=cluster-key={key}", "--from-literal=host-token=" + "ab" * 32,
         f"--from-literal=statestore-url={url}"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_postgres_overlay_uses_the_url_of_the_generated_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The documented way: regenerate base/secret.yaml with the real URL. Nothing in the
    overlay may override it (a stringData patch would win over the Secret's data)."""
    root = _copy_k8s(tmp_path)
    (root / "base" / "secret.yaml").write_text(_generated_secret(REAL_URL))
    docs = render(root / "overlays" / "postgres")
    secret = one(docs, "Secret", "spawnmesh-secrets")
    assert "stringData" not in secret, secret.get("stringData")
    assert secret_values(secret)["statestore-url"] == REAL_URL
    assert "CHANGE-ME" not in yaml.safe_dump_all(docs)
    config = load_pod_config(docs, caplog)
    assert config.statestore.url == REAL_URL
    assert one(docs, "StatefulSet")["spec"]["replicas"] == 3


def test_the_postgres_overlay_renders_with_the_secret_applied_directly(tmp_path: Path) -> None:
    """The other documented way: apply the Secret yourself and drop it from the base's
    resources; both variants still render, and the pods read the URL from that Secret."""
    root = _copy_k8s(tmp_path)
    kustomization = root / "base" / "kustomization.yaml"
    text = kustomization.read_text()
    assert "  - secret.yaml\n" in text
    kustomization.write_text(text.replace("  - secret.yaml\n", "", 1))
    for path in (root, root / "overlays" / "postgres"):
        docs = render(path)
        assert not [d for d in docs if d["kind"] == "Secret"], path
        env = {e["name"]: e for e in container(docs)["env"]}
        ref = env["SPAWNMESH_STATESTORE_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "spawnmesh-secrets", "key": "statestore-key"}
    url_ref = env["SPAWNMESH_STATESTORE_URL"]["valueFrom"]["secretKeyRef"]
    assert url_ref == {"name": "spawnmesh-secrets", "key": "statestore-url"}
    assert "SPAWNMESH_STATESTORE_URL" not in one(docs, "ConfigMap")["data"]
