"""Checks that the files of configs/ agree with each other and with the shim.

Schemas say each manifest is well formed; this says they fit together: the RuntimeClass's handler
is the runtime containerd's fragment registers, the node label the RuntimeClass schedules on is
the one the installer sets, the agent's state dir is the shim's StateDir, and so on. Run by
configs/validate.sh with the validator's virtualenv (PyYAML) as `check-consistency.py REPO_ROOT`.
"""

import re
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import yaml

ROOT = Path(sys.argv[1])
CONFIGS = ROOT / "configs"
CRI = "io.containerd.cri.v1.runtime"
ENGINES = {"criu", "dmtcp"}
errors: list[str] = []


def check(ok: bool, message: str) -> None:
    if not ok:
        errors.append(message)


def docs(path: str) -> list[dict]:
    with open(CONFIGS / path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def find(path: str, kind: str) -> dict:
    found = [d for d in docs(path) if d.get("kind") == kind]
    if len(found) != 1:
        sys.exit(f"{path}: expected one {kind}, found {len(found)}")
    return found[0]


def flag(args: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in a container's args."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def port_of(listen: str | None) -> int | None:
    return int(listen.rsplit(":", 1)[1]) if listen and ":" in listen else None


def mount_path(container: dict, volume: str) -> str | None:
    return next((m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] == volume), None)


def volume(pod: dict, name: str) -> dict:
    return next((v for v in pod.get("volumes", []) if v["name"] == name), {})


def shim_option_keys() -> set[str] | None:
    """The option keys the shim accepts (it denies unknown ones), read from its source."""
    src = ROOT / "shim/src/options.rs"
    if not src.is_file():
        return None
    keys = set(re.findall(r'#\[serde\(rename = "([A-Za-z]+)"', src.read_text()))
    return keys or None


# --- containerd fragment ------------------------------------------------------------------------
fragment_path = CONFIGS / "containerd/mig-runtime.toml"
try:
    fragment = tomllib.loads(fragment_path.read_text())
except tomllib.TOMLDecodeError as e:
    sys.exit(f"{fragment_path}: invalid TOML: {e}")
check(fragment.get("version") == 3, "containerd/mig-runtime.toml: `version = 3` (containerd 2.x) is required")
runtimes = fragment.get("plugins", {}).get(CRI, {}).get("containerd", {}).get("runtimes", {})
check(list(runtimes) == ["mig"], f"containerd/mig-runtime.toml: expected exactly runtimes.mig under plugins.'{CRI}', found {list(runtimes)}")
runtime = runtimes.get("mig", {})
check(runtime.get("runtime_type") == "io.containerd.mig.v2", "containerd/mig-runtime.toml: runtime_type must be io.containerd.mig.v2")
check("mig.dev/*" in runtime.get("pod_annotations", []), 'containerd/mig-runtime.toml: pod_annotations must include "mig.dev/*"')
options = runtime.get("options", {})
known = shim_option_keys()
if known is not None:
    unknown = set(options) - known
    check(not unknown, f"containerd/mig-runtime.toml: options {sorted(unknown)} are not accepted by the shim (shim/src/options.rs knows {sorted(known)})")
check(isinstance(options.get("SystemdCgroup"), bool), "containerd/mig-runtime.toml: options.SystemdCgroup must be a boolean")
check(options.get("Engine") in ENGINES, f"containerd/mig-runtime.toml: options.Engine must be one of {sorted(ENGINES)}")
for key in ("StateDir", "DmtcpDir"):
    check(str(options.get(key, "")).startswith("/"), f"containerd/mig-runtime.toml: options.{key} must be an absolute path")
state_dir = options.get("StateDir")

# --- RuntimeClass and the installer's label -----------------------------------------------------
rc = find("runtimeclass.yaml", "RuntimeClass")
check(rc["handler"] in runtimes, f"runtimeclass.yaml: handler {rc['handler']!r} is not a runtime of the containerd fragment")
selector = rc.get("scheduling", {}).get("nodeSelector", {})
installer = (CONFIGS / "install/install-node.sh").read_text()
label = re.search(r"^LABEL=(\S+)", installer, re.M)
check(label is not None and selector == {label.group(1): "true"},
      f"runtimeclass.yaml: nodeSelector {selector} is not the label install-node.sh sets ({label.group(1) if label else None}=true)")

# --- the node DaemonSet -------------------------------------------------------------------------
ds = find("install/daemonset.yaml", "DaemonSet")
pod = ds["spec"]["template"]["spec"]
agent = next(c for c in pod["containers"] if c["name"] == "agent")
args = agent["args"]
check(args[:3] == ["serve", "--role", "node"],
      "install/daemonset.yaml: the agent must run `mig-server serve --role node`")
check(flag(args, "--state-dir") == state_dir, f"install/daemonset.yaml: agent --state-dir {flag(args, '--state-dir')} != the shim's StateDir {state_dir}")
state_mount = next((m for m in agent["volumeMounts"] if m["mountPath"] == state_dir), None)
check(state_mount is not None and volume(pod, state_mount["name"]).get("hostPath", {}).get("path") == state_dir,
      f"install/daemonset.yaml: the agent must mount hostPath {state_dir} at {state_dir}")
memory_dir = options.get("MemoryDir", "")
if memory_dir != "off":
    memory_parent = memory_dir or "/dev/shm/kubernetes-mig"
    memory_mount = next((m for m in agent["volumeMounts"] if m["mountPath"] == memory_parent), None)
    check(memory_mount is not None and volume(pod, memory_mount["name"]).get("hostPath", {}).get("path") == memory_parent,
          f"install/daemonset.yaml: the agent must mount hostPath {memory_parent} at {memory_parent} (the shim's MemoryDir)")
    check(flag(args, "--memory-dir") in (None, memory_dir),
          f"install/daemonset.yaml: agent --memory-dir {flag(args, '--memory-dir')} != the shim's MemoryDir {memory_dir!r}")
socket = flag(args, "--containerd-address") or ""
check(any(socket.startswith(m["mountPath"] + "/") for m in agent["volumeMounts"]),
      f"install/daemonset.yaml: --containerd-address {socket} is not under a mounted directory")
agent_port = port_of(flag(args, "--listen"))
check(agent_port in [p["containerPort"] for p in agent.get("ports", [])], "install/daemonset.yaml: --listen port is not a containerPort")
token_file = flag(args, "--token-file") or ""
check(mount_path(agent, "token") == str(Path(token_file).parent), "install/daemonset.yaml: --token-file is not in the token volume")
check(pod.get("hostPID") is True, "install/daemonset.yaml: hostPID is needed for nsenter -t 1")
init = pod["initContainers"][0]
check(init.get("securityContext", {}).get("privileged") is True, "install/daemonset.yaml: the installer must be privileged")
install_volume = volume(pod, "install").get("configMap", {}).get("name")

# --- the controller -----------------------------------------------------------------------------
deploy = find("server/deployment.yaml", "Deployment")
controller = deploy["spec"]["template"]["spec"]["containers"][0]
check(controller["args"][:3] == ["serve", "--role", "controller"],
      "server/deployment.yaml: the controller must run `mig-server serve --role controller`")
controller_port = port_of(flag(controller["args"], "--listen"))
check(mount_path(controller, "token") == str(Path(flag(controller["args"], "--token-file") or "").parent),
      "server/deployment.yaml: --token-file is not in the token volume")
check(volume(deploy["spec"]["template"]["spec"], "token").get("secret", {}).get("secretName")
      == volume(pod, "token").get("secret", {}).get("secretName"), "agent and controller must read the same token Secret")
svc = find("server/service.yaml", "Service")
url = urlparse(flag(args, "--controller") or "")
check(url.hostname == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc",
      f"install/daemonset.yaml: --controller host {url.hostname} is not the Service {svc['metadata']['name']}.{svc['metadata']['namespace']}.svc")
svc_port = svc["spec"]["ports"][0]
check(url.port == svc_port["port"], f"install/daemonset.yaml: --controller port {url.port} != Service port {svc_port['port']}")
named = {p["name"]: p["containerPort"] for p in controller.get("ports", [])}
check(named.get(svc_port["targetPort"]) == controller_port, "server/service.yaml: targetPort does not reach the controller's --listen port")
check(svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items(), "server/service.yaml: selector does not match the controller's pods")

# --- examples -----------------------------------------------------------------------------------
for path in sorted((CONFIGS / "examples").glob("*.yaml")):
    workloads = [d for d in docs(f"examples/{path.name}") if d["kind"] in ("Deployment", "StatefulSet")]
    check(bool(workloads), f"examples/{path.name}: no Deployment or StatefulSet")
    for w in workloads:
        template = w["spec"]["template"]
        check(template["spec"].get("runtimeClassName") == rc["metadata"]["name"], f"examples/{path.name}: {w['metadata']['name']} lacks runtimeClassName: {rc['metadata']['name']}")
        engine = template["metadata"].get("annotations", {}).get("mig.dev/engine")
        check(engine in ENGINES, f"examples/{path.name}: {w['metadata']['name']}'s pod template needs annotation mig.dev/engine: criu|dmtcp")

# --- kustomization and secrets ------------------------------------------------------------------
kustomization = yaml.safe_load((CONFIGS / "kustomization.yaml").read_text())
resources = kustomization.get("resources", [])
for r in resources:
    check((CONFIGS / r).is_file(), f"kustomization.yaml: resource {r} does not exist")
installable = {str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("*.yaml") if p.name != "kustomization.yaml"}
installable |= {str(p.relative_to(CONFIGS)) for d in ("install", "server") for p in (CONFIGS / d).glob("*.yaml")}
check(installable <= set(resources), f"kustomization.yaml: not listed: {sorted(installable - set(resources))}")
generated = {g["name"]: g for g in kustomization.get("configMapGenerator", [])}
check(install_volume in generated, f"kustomization.yaml: no configMapGenerator for {install_volume} (the DaemonSet's installer volume)")
for g in generated.values():
    for f in g.get("files", []):
        check((CONFIGS / f.split("=", 1)[-1]).is_file(), f"kustomization.yaml: {f} does not exist")
for p in CONFIGS.rglob("*.yaml"):
    for d in yaml.safe_load_all(p.read_text()):
        check(not (d and d.get("kind") == "Secret"), f"{p.relative_to(CONFIGS)}: a Secret must not be committed (create mig-token by hand)")

if errors:
    print("\n".join(f"  {e}" for e in errors), file=sys.stderr)
    sys.exit(1)
print(f"[validate] consistent: handler mig, label {label.group(1)}=true, state dir {state_dir}, "
      f"controller {url.geturl()}, shim options {sorted(options)}")
