"""The Kubernetes manifests of deploy/k8s, checked offline.

Every YAML document is validated, strictly (unknown fields are errors), against the schemas of
Kubernetes 1.31 with `kubernetes-validate`. Each kustomization is rendered here (its resources,
recursively, and its `replicas`; a kustomization that uses anything else fails, so nothing is
left unrendered) and its output validated too. Then the parts must fit together: Services
select pods that exist, probes and Services name ports the containers have, SMG discovers the
replica pods by their labels and port, the Dynamo layouts' frontends and workers share their
etcd, the prefill and decode pools of deploy/k8s/dynamo-disagg run the same model the same way,
and every command-line option given to `supernode serve`, `supernode worker` or `smg launch` is
one that command has. The worker image's NIXL is the version the worker is built against.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import BIN, ROOT

K8S = ROOT / "deploy" / "k8s"
VERSION = "1.31.0"
KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "replicas"}


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def kustomizations() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def render(directory: Path) -> list[dict]:
    """What `kubectl kustomize DIRECTORY` prints, for the subset of kustomize used here."""
    k = docs(directory / "kustomization.yaml")[0]
    unknown = set(k) - KUSTOMIZE_KEYS
    assert not unknown, f"{directory}/kustomization.yaml uses {unknown}, which this test does not render"
    out: list[dict] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        # kustomize's load restriction: a file must lie under the kustomization's directory
        # (another kustomization, a directory, may lie anywhere).
        assert path.is_dir() or path.is_relative_to(directory.resolve()), f"{directory}: {entry} is outside it"
        out += render(path) if path.is_dir() else docs(path)
    for r in k.get("replicas", []):
        targets = [d for d in out if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == r["name"]]
        assert targets, f"{directory}: replicas names {r['name']}, which no resource is"
        for d in targets:
            d["spec"]["replicas"] = r["count"]
    keys = [(d["kind"], d["metadata"]["name"]) for d in out]
    assert len(keys) == len(set(keys)), f"{directory} renders a resource twice: {keys}"
    return out


def validate(doc: dict, where: str) -> None:
    try:
        kubernetes_validate.validate(doc, VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{where}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}: {e.message} at {list(e.path)}")


def test_there_are_manifests():
    found = {str(p.relative_to(K8S)) for p in manifests()}
    assert {"base/deployment.yaml", "base/service.yaml", "smg/deployment.yaml", "smg/service.yaml"} <= found, found
    assert {p.name for p in kustomizations()} == {"base", "smg", "dynamo", "dynamo-disagg"}


@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_each_manifest_is_valid(path):
    assert docs(path), f"{path} holds no document"
    for d in docs(path):
        validate(d, str(path.relative_to(ROOT)))


@pytest.mark.parametrize("directory", kustomizations(), ids=lambda p: p.name)
def test_each_rendered_layout_is_valid_and_fits_together(directory):
    out = render(directory)
    for d in out:
        validate(d, f"kustomize {directory.relative_to(ROOT)}")
    deployments = [d for d in out if d["kind"] == "Deployment"]
    for d in deployments:
        labels = d["spec"]["template"]["metadata"]["labels"]
        match = d["spec"]["selector"]["matchLabels"]
        assert match.items() <= labels.items(), f"{d['metadata']['name']}: its selector does not match its pods"
        for c in d["spec"]["template"]["spec"]["containers"]:
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    port = c[probe]["httpGet"]["port"]
                    assert port in ports or port in ports.values(), f"{c['name']}.{probe} names port {port}"
    for s in (d for d in out if d["kind"] == "Service"):
        selected = [
            d for d in deployments if s["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, f"Service {s['metadata']['name']} selects {len(selected)} Deployments"
        names = {p.get("name") for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for p in s["spec"]["ports"]:
            assert p["targetPort"] in names, f"Service {s['metadata']['name']} targets port {p['targetPort']}"
    accounts = {d["metadata"]["name"] for d in out if d["kind"] == "ServiceAccount"}
    for d in deployments:
        sa = d["spec"]["template"]["spec"].get("serviceAccountName")
        assert sa is None or sa in accounts, f"{d['metadata']['name']} runs as the missing ServiceAccount {sa}"


def container(out: list[dict], name: str) -> dict:
    [d] = [d for d in out if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
    [c] = d["spec"]["template"]["spec"]["containers"]
    return c


def option_values(args: list[str], option: str) -> list[str]:
    """The values that follow `option` up to the next option."""
    i = args.index(option) + 1
    values = []
    while i < len(args) and not args[i].startswith("--"):
        values.append(args[i])
        i += 1
    return values


def test_smg_layout_routes_to_the_replicas():
    out = render(K8S / "smg")
    [replicas] = [d for d in out if d["kind"] == "Deployment" and d["metadata"]["name"] == "supernode"]
    assert replicas["spec"]["replicas"] == 2
    pod_labels = replicas["spec"]["template"]["metadata"]["labels"]
    port = container(out, "supernode")["ports"][0]["containerPort"]
    args = container(out, "smg")["args"]
    assert args[0] == "launch"
    assert option_values(args, "--policy") == ["cache_aware"]
    assert "--service-discovery" in args
    selector = dict(kv.split("=", 1) for kv in option_values(args, "--selector"))
    assert selector and selector.items() <= pod_labels.items(), (selector, pod_labels)
    assert option_values(args, "--service-discovery-port") == [str(port)]
    env = {e["name"] for e in container(out, "smg").get("env", [])}
    for ref in re.findall(r"\$\((\w+)\)", " ".join(args)):
        assert ref in env, f"smg's args use $({ref}), which its env does not set"
    # SMG reads the pods of its namespace: its Role must let it.
    [role] = [d for d in out if d["kind"] == "Role"]
    assert any("pods" in r["resources"] and {"list", "watch"} <= set(r["verbs"]) for r in role["rules"])


def options(help_text: str) -> set[str]:
    return set(re.findall(r"--[a-z0-9][a-z0-9-]*", help_text))


def test_supernode_args_are_options_of_serve():
    if not BIN.exists():
        pytest.fail(f"no server binary at {BIN}: run `cargo build --release` or set SUPERNODE_BIN")
    known = options(subprocess.run([str(BIN), "serve", "--help"], capture_output=True, text=True, check=True).stdout)
    dockerfile = (ROOT / "Dockerfile").read_text()
    entry = re.search(r'ENTRYPOINT \["supernode", "serve", (.*)\]', dockerfile)
    assert entry, "the Dockerfile's entrypoint is not `supernode serve ...`"
    for d in render(K8S / "base"):
        if d["kind"] != "Deployment":
            continue
        c = d["spec"]["template"]["spec"]["containers"][0]
        given = {a for a in c["args"] if a.startswith("--")} | options(entry.group(1))
        assert given <= known, f"not options of `supernode serve`: {given - known}"
        # The entrypoint's port is the container's.
        assert f'"--port", "{c["ports"][0]["containerPort"]}"' in entry.group(1)


def test_smg_args_are_options_of_smg_launch():
    exe = Path(sys.executable).with_name("smg")
    if not exe.exists():
        pytest.skip("the smg wheel is not installed in this venv")
    known = options(subprocess.run([str(exe), "launch", "--help"], capture_output=True, text=True, check=True).stdout)
    args = container(render(K8S / "smg"), "smg")["args"]
    given = {a for a in args if a.startswith("--")}
    assert given <= known, f"not options of `smg launch`: {given - known}"


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


# The Dynamo layouts: their etcd Service, their frontend, and their workers with each one's replicas.
DYNAMO_LAYOUTS = {
    "dynamo": ("etcd", "dynamo-frontend", {"supernode-worker": 2}),
    "dynamo-disagg": ("etcd-disagg", "dynamo-frontend-disagg", {"supernode-prefill": 1, "supernode-decode": 1}),
}


def worker_help() -> set[str] | None:
    """The options of `supernode worker`, when a Dynamo build is here (scripts/python-tests.sh
    sets SUPERNODE_DYNAMO_BIN and SUPERNODE_DYNAMO_PYTHON)."""
    dyn_bin = os.environ.get("SUPERNODE_DYNAMO_BIN")
    if not dyn_bin:
        return None
    return options(subprocess.run([dyn_bin, "worker", "--help"], capture_output=True, text=True, check=True).stdout)


@pytest.mark.parametrize("layout", sorted(DYNAMO_LAYOUTS))
def test_dynamo_layout_fits_together(layout):
    """A Dynamo layout: the frontend and the workers find each other through the layout's etcd
    Service, on the transports the tests run them with; the workers' system port (health,
    metrics) is the one their probes use and fits Dynamo's 16-bit setting; SIGTERM's grace period
    fits in the pod's; and every option given to `supernode worker` and to Dynamo's frontend is
    one they have (when their builds are here: scripts/python-tests.sh sets them)."""
    etcd_name, frontend_name, workers = DYNAMO_LAYOUTS[layout]
    out = render(K8S / layout)
    [etcd_svc] = [d for d in out if d["kind"] == "Service" and d["metadata"]["name"] == etcd_name]
    etcd_url = f"http://{etcd_name}:{etcd_svc['spec']['ports'][0]['port']}"
    frontend = container(out, frontend_name)
    assert {d["metadata"]["name"] for d in out if d["kind"] == "Deployment"} == {etcd_name, frontend_name, *workers}
    for name, replicas in workers.items():
        [worker_dep] = [d for d in out if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
        assert worker_dep["spec"]["replicas"] == replicas, name
        worker = container(out, name)
        for c in (worker, frontend):
            env = env_of(c)
            assert env["DYN_DISCOVERY_BACKEND"] == "etcd", c["name"]
            assert env["ETCD_ENDPOINTS"] == etcd_url, c["name"]
            assert env["DYN_REQUEST_PLANE"] == "tcp" and env["DYN_EVENT_PLANE"] == "zmq", c["name"]
        env = env_of(worker)
        system = {p["name"]: p["containerPort"] for p in worker["ports"]}["system"]
        assert env["DYN_SYSTEM_PORT"] == str(system) and system < 32768
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert worker[probe]["httpGet"]["port"] == "system"
        grace = int(env["DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS"])
        assert worker_dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace
    assert option_values(frontend["args"], "--router-mode") == ["kv"]
    dyn_py = os.environ.get("SUPERNODE_DYNAMO_PYTHON")
    known = worker_help()
    if not (known and dyn_py):
        pytest.skip("no Dynamo build to check the options against (SUPERNODE_DYNAMO_BIN, SUPERNODE_DYNAMO_PYTHON)")
    for name in workers:
        given = {a for a in container(out, name)["args"] if a.startswith("--")}
        assert given <= known, f"{name}: not options of `supernode worker`: {given - known}"
    known = options(
        subprocess.run([dyn_py, "-m", "dynamo.frontend", "--help"], capture_output=True, text=True, check=True).stdout
    )
    given = {a for a in frontend["args"] if a.startswith("--")}
    assert given <= known, f"not options of Dynamo's frontend: {given - known}"


# Options that must be equal on prefill and decode workers (absent on both, or the same values)
# for the frontend to pair the pools under one model and a decode worker's cache to take the
# blocks a prefill worker computed.
SAME_IN_BOTH_POOLS = (
    "--model",
    "--precision",
    "--kv-cache-dtype",
    "--no-prefix-caching",
    "--served-model-name",
    "--namespace",
)


def given_values(args: list[str], option: str) -> list[str] | None:
    return option_values(args, option) if option in args else None


def test_dynamo_disagg_layout_pairs_a_prefill_and_a_decode_pool():
    """deploy/k8s/dynamo-disagg: one pool of `--disaggregation-mode prefill` workers and one of
    `decode` workers, loading the same model the same way with prefix caching on, on the same
    image and UCX transports; nothing in the layout restricts pod-to-pod traffic (UCX connects
    the pods directly). Its etcd and frontend are ../dynamo's renamed, and nothing of it collides
    with ../dynamo's names or is selected by ../dynamo's Services, or the other way round, so that
    both can be applied in one namespace."""
    out = render(K8S / "dynamo-disagg")
    prefill, decode = container(out, "supernode-prefill"), container(out, "supernode-decode")
    assert option_values(prefill["args"], "--disaggregation-mode") == ["prefill"]
    assert option_values(decode["args"], "--disaggregation-mode") == ["decode"]
    for option in SAME_IN_BOTH_POOLS:
        assert given_values(prefill["args"], option) == given_values(decode["args"], option), option
    assert "--no-prefix-caching" not in prefill["args"]
    assert prefill["image"] == decode["image"] == "supernode-worker:latest"
    assert env_of(prefill)["UCX_TLS"] == env_of(decode)["UCX_TLS"] == "tcp"
    assert not [d for d in out if d["kind"] == "NetworkPolicy"]

    agg = render(K8S / "dynamo")
    # The agg layout's etcd and frontend, with `-disagg` on their names and labels.
    for name in ("etcd-disagg", "dynamo-frontend-disagg"):
        copies = [d for d in out if d["metadata"]["name"] == name]
        originals = {d["kind"]: d for d in agg if d["metadata"]["name"] == name.removesuffix("-disagg")}
        assert {d["kind"] for d in copies} == set(originals) == {"Deployment", "Service"}, name
        for d in copies:
            assert yaml.safe_load(yaml.safe_dump(d).replace("-disagg", "")) == originals[d["kind"]], name
    names = {(d["kind"], d["metadata"]["name"]) for d in out}
    assert not names & {(d["kind"], d["metadata"]["name"]) for d in agg}, "a name of ../dynamo is taken again"
    for services, pods in ((agg, out), (out, agg)):
        for svc in (d for d in services if d["kind"] == "Service"):
            for d in (d for d in pods if d["kind"] == "Deployment"):
                labels = d["spec"]["template"]["metadata"]["labels"]
                assert not svc["spec"]["selector"].items() <= labels.items(), (
                    f"Service {svc['metadata']['name']} selects the other layout's {d['metadata']['name']}"
                )


def dockerfile_stages() -> dict[str, str]:
    """The Dockerfile's stages by name (`FROM ... AS name`; the last, unnamed, is "")."""
    stages = {}
    for part in re.split(r"^(?=FROM )", (ROOT / "Dockerfile").read_text(), flags=re.M)[1:]:
        m = re.match(r"FROM \S+(?: AS (\S+))?", part)
        stages[m.group(1) or ""] = part
    return stages


def test_the_worker_image_carries_nixl():
    """The `worker` target: NIXL's libraries from the nixl-cu12 wheel, of the version of the
    nixl-sys crate in Cargo.lock (the C API the worker dlopens), copied from the `nixl` stage with
    the wheel's two library directories side by side, where the worker's LD_LIBRARY_PATH and
    NIXL_PLUGIN_DIR point; and the worker's entrypoint is `supernode worker`."""
    stages = dockerfile_stages()
    nixl, worker = stages["nixl"], stages["worker"]
    [version] = re.findall(r"pip install --no-cache-dir --no-deps nixl-cu12==([\w.]+)", nixl)
    locked = re.findall(r'name = "nixl-sys"\nversion = "([^"]+)"', (ROOT / "Cargo.lock").read_text())
    assert locked == [version], f"Cargo.lock has nixl-sys {locked}, the Dockerfile installs nixl-cu12 {version}"
    for kept in (".nixl_cu12.mesonpy.libs/libnixl_capi.so", ".nixl_cu12.mesonpy.libs/plugins/libplugin_UCX.so"):
        assert kept in nixl, kept
    assert "COPY --from=nixl /opt/nixl /opt/nixl" in worker
    env = dict(re.findall(r"(\w+)=(\S+)", worker.split("\nENV ", 1)[1].split("\nVOLUME", 1)[0]))
    assert env["LD_LIBRARY_PATH"] == "/opt/nixl/.nixl_cu12.mesonpy.libs"
    assert env["NIXL_PLUGIN_DIR"] == "/opt/nixl/.nixl_cu12.mesonpy.libs/plugins"
    assert 'ENTRYPOINT ["supernode", "worker"]' in worker


def test_the_validator_rejects_a_broken_manifest():
    """The check above can fail: a port given as a name where a number is due is refused."""
    [svc] = docs(K8S / "base" / "service.yaml")
    svc["spec"]["ports"][0]["port"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, VERSION, strict=True)
    svc["spec"]["ports"][0]["port"] = 8080
    svc["spec"]["ports"][0]["targetPorts"] = "http"  # a misspelt field: strict mode refuses it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, VERSION, strict=True)
