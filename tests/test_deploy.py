"""The deployment manifests a hospital IT team runs: the Kubernetes kustomization rendered end to end on a
temporary copy (with real certificates from deploy/make_certs.sh and example site policies), and
docker-compose.yml's structure (services, volumes, commands, no runtime installation of dependencies)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ecgtwin.privacy import load_policy
from ecgtwin.privacy.policy import save_policy, site_policy

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site_a", "site_b", "site_c")


def example_policy(site: str, path: Path) -> None:
    save_policy(site_policy(site, (0, 1, 2), (1, 40, 120), 32, (None, 0.3, 0.7), epsilon=8.0, delta=1e-5,
                            population=200), path)
    assert load_policy(path).site == site


def test_the_kubernetes_manifests_render_with_certificates_and_policies(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed here: the kustomization is rendered where it is")
    k8s = tmp_path / "k8s"
    shutil.copytree(ROOT / "deploy" / "k8s", k8s)
    subprocess.run(["bash", str(ROOT / "deploy" / "make_certs.sh"), str(k8s / "certs"), *SITES], check=True,
                   capture_output=True)
    for site in SITES:
        (k8s / "policy" / site).mkdir(parents=True)
        example_policy(site, k8s / "policy" / site / "privacy.yaml")
    rendered = subprocess.run([kubectl, "kustomize", str(k8s)], check=True, capture_output=True, text=True).stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("Namespace", "ecgtwin") in kinds
    assert all(o["metadata"].get("namespace") == "ecgtwin" for o in objects if o["kind"] != "Namespace")
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    assert any(n.startswith("superlink-tls") for n in secrets)
    for letter in "abc":
        assert any(n.startswith(f"site-{letter}-auth") for n in secrets)
        policy = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(
            f"site-{letter}-policy"))
        assert yaml.safe_load(policy["data"]["privacy.yaml"])["site"] == f"site_{letter}"
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    commands = [" ".join(c.get("command", []) + c.get("args", [])) for o in workloads
                for c in o["spec"]["template"]["spec"]["containers"]]
    assert sum("flower-supernode" in c for c in commands) == 3 and sum("flower-superlink" in c for c in commands) == 1
    for command in commands:
        assert "allow-runtime-dependency-installation" not in command
        # plain HTTP only to the SuperNode's runtime API on the pod's own loopback, never to the SuperLink
        assert "--insecure" not in command or "client.worker --runtime-api-address=127.0.0.1:" in command
    for workload in (o for o in workloads if any("flower-supernode" in " ".join(c.get("args", []))
                                                 for c in o["spec"]["template"]["spec"]["containers"])):
        node, worker = workload["spec"]["template"]["spec"]["containers"]
        assert "--isolation=process" in node["args"] and "--host=127.0.0.1" in node["args"]
        assert worker["args"][:3] == ["python", "-m", "client.worker"] and "--port=9094" in node["args"]
    link = next(c for c in commands if "flower-superlink" in c)
    assert "--enable-supernode-auth" in link and "--ssl-certfile" in link


def target(volume: str) -> str:
    """The container path of a compose volume `SOURCE:TARGET[:MODE]` (SOURCE may hold ${VAR:-default})."""
    parts = volume.rsplit(":", 2)
    return parts[-2] if parts[-1] in ("ro", "rw") else parts[-1]


def test_docker_compose_runs_a_tls_consortium_without_runtime_installs():
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"superlink", *(f"supernode-{s}" for s in SITES), *(f"clientapp-{s}" for s in SITES)}
    link = services["superlink"]
    command = " ".join(link["command"])
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation", "--database="):
        assert flag in command, flag
    assert link["environment"]["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    for site in SITES:
        node = services[f"supernode-{site}"]
        command = " ".join(node["command"])
        assert command.startswith("flower-supernode") and "--root-certificates" in command
        assert "--auth-supernode-private-key" in command and "--insecure" not in command
        assert "allow-runtime-dependency-installation" not in command
        assert "data-path=" in command and "policy-path=" in command and "state-path=" in command
        mounts = {target(v): v for v in node["volumes"]}
        assert mounts["/data/store"].endswith(":ro") and mounts["/data/policy/privacy.yaml"].endswith(":ro")
        assert f"{site}_state" in mounts["/data/state"]  # the site's state (ledger) on its own volume
        assert node["depends_on"] == ["superlink"]
        assert "--isolation=process" in command and "--host=127.0.0.1" in command  # the runtime API: loopback only
        worker = services[f"clientapp-{site}"]  # the warm ClientApp, in the SuperNode's network namespace
        assert worker["command"][:3] == ["python", "-m", "client.worker"]
        assert worker["network_mode"] == f"service:supernode-{site}" and "networks" not in worker
        # the site's data, policy and state, and not the SuperNode's key
        assert {target(v): v for v in worker["volumes"]} == {k: v for k, v in mounts.items() if not k.startswith("/certs")}
    assert {f"{s}_state" for s in SITES} | {"superlink_state"} <= set(compose["volumes"])
