"""Run the rendered chart's pods with podman, from the built images, as a kubelet would.

What is taken from each rendered Pod template, and how it is run:
- image, command (-> --entrypoint), args: as rendered (the chart's image names are mapped to the
  locally built images by `images`);
- env: values as rendered; fieldRef metadata.name -> the pod's name, status.podIP -> its address;
- securityContext (container over pod): --user uid:gid, runAsNonRoot (refused when uid 0),
  readOnlyRootFilesystem (--read-only, without podman's extra tmpfs mounts), capabilities.drop/add,
  allowPrivilegeEscalation: false (no-new-privileges), podman's default seccomp (RuntimeDefault);
- resources.limits.memory -> --memory;
- volumes: Secret and ConfigMap items as read-only files (mode 0644); emptyDir and
  volumeClaimTemplates as podman volumes (owned by the pod's user, as fsGroup makes them), kept
  across a container restart of the same pod (sizeLimit is not enforced);
- Services: every pod gets a fixed address on one podman network, and every Service name (short,
  namespaced, FQDN; StatefulSet pod names under the headless Service) is a host alias of the address
  of the pod it selects (the Service port must equal the target port: aliases cannot remap ports);
- probes: startup, then readiness and liveness, against the pod's address, gRPC health on the
  declared port and service name, or httpGet; a container that exits while its startup probe is
  pending fails the run with its exit code and the last lines of its log.

Not modelled (docs/operations/IMAGE.md): the scheduler, the kubelet's restarts, replicas (one pod
per workload), NetworkPolicy, resource requests, PodDisruptionBudgets.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Manifest = dict[str, Any]
ENGINE = ("podman", "--runtime", "runc")
ULIMITS = ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# Written by the container engine itself when it sets a container up (as the kubelet does), not by Flynn.
ENGINE_WRITES = frozenset(
    {
        "/etc",
        "/etc/hosts",
        "/etc/hostname",
        "/etc/resolv.conf",
        "/etc/passwd",
        "/etc/group",
        "/run",
        "/run/.containerenv",
    }
)


class HarnessError(AssertionError):
    """The chart's pods did not run from the image; the message says which pod and why."""


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*ENGINE, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise HarnessError(f"podman {' '.join(args[:3])} … failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _memory(limit: str) -> str:
    units = {"Ki": "k", "Mi": "m", "Gi": "g"}
    for suffix, unit in units.items():
        if limit.endswith(suffix):
            return limit.removesuffix(suffix) + unit
    return limit


def _named(docs: list[Manifest], kind: str, name: str) -> Manifest:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise HarnessError(f"the chart mounts {kind} {name!r}, which it does not render")


@dataclass
class Pod:
    name: str  # the pod's name (StatefulSet: <name>-0)
    workload: Manifest
    ip: str
    container: str = ""  # podman container name

    @property
    def spec(self) -> dict[str, Any]:
        if self.workload["kind"] == "Pod":
            spec: dict[str, Any] = self.workload["spec"]
        else:
            spec = self.workload["spec"]["template"]["spec"]
        return spec

    @property
    def main(self) -> dict[str, Any]:
        c: dict[str, Any] = self.spec["containers"][0]
        return c

    @property
    def labels(self) -> dict[str, str]:
        if self.workload["kind"] == "Pod":
            return dict(self.workload["metadata"].get("labels", {}))
        return dict(self.workload["spec"]["template"]["metadata"].get("labels", {}))

    def port(self, port: int | str) -> int:
        if isinstance(port, int):
            return port
        for p in self.main.get("ports", []):
            if p["name"] == port:
                return int(p["containerPort"])
        raise HarnessError(f"{self.name}: no container port named {port!r}")


@dataclass
class ChartOnPodman:
    """One run of the rendered chart on podman; `with chart.running(): ...` cleans up everything."""

    docs: list[Manifest]
    images: dict[str, str]  # rendered image name -> local image
    workdir: Path
    prefix: str = field(default_factory=lambda: f"flynn-it-{secrets.token_hex(3)}")
    pods: dict[str, Pod] = field(default_factory=dict)
    network: str = ""
    volumes: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)
    _subnet: str = ""
    _volumes_before: frozenset[str] = frozenset()

    # --- setup ------------------------------------------------------------------------------------

    def _create_network(self) -> None:
        for _ in range(8):
            third = secrets.randbelow(200) + 20
            subnet = f"10.{secrets.randbelow(50) + 200}.{third}"
            name = f"{self.prefix}-net"
            proc = podman("network", "create", "--subnet", f"{subnet}.0/24", name, check=False)
            if proc.returncode == 0:
                self.network, self._subnet = name, subnet
                return
        raise HarnessError(f"could not create a podman network: {proc.stderr}")

    def plan(self, only: tuple[str, ...] = ()) -> None:
        """One pod per Deployment/StatefulSet (restricted to the components in `only`)."""
        self._volumes_before = frozenset(podman("volume", "ls", "--format", "{{.Name}}").stdout.split())
        self._create_network()
        host = 10
        for d in self.docs:
            if d["kind"] not in WORKLOAD_KINDS:
                continue
            component = d["metadata"]["labels"].get("app.kubernetes.io/component", d["metadata"]["name"])
            if only and component not in only:
                continue
            name = d["metadata"]["name"]
            pod_name = f"{name}-0" if d["kind"] == "StatefulSet" else f"{name}-{secrets.token_hex(3)}"
            self.pods[component] = Pod(pod_name, d, f"{self._subnet}.{host}")
            host += 1

    def host_aliases(self) -> dict[str, str]:
        """Every Service name -> the address of the pod it selects."""
        aliases: dict[str, str] = {}
        for svc in (d for d in self.docs if d["kind"] == "Service"):
            meta, spec = svc["metadata"], svc["spec"]
            selected = [p for p in self.pods.values() if spec["selector"].items() <= p.labels.items()]
            if not selected:
                continue
            pod = selected[0]
            for port in spec["ports"]:
                target = pod.port(port.get("targetPort", port["port"]))
                if target != port["port"]:
                    raise HarnessError(
                        f"Service {meta['name']} port {port['port']} -> {target}: host aliases cannot remap ports"
                    )
            ns = meta.get("namespace", "default")
            names = [meta["name"], f"{meta['name']}.{ns}", f"{meta['name']}.{ns}.svc.cluster.local"]
            if spec.get("clusterIP") == "None" and pod.workload["kind"] == "StatefulSet":
                names += [f"{pod.name}.{n}" for n in names]
            for n in names:
                aliases[n] = pod.ip
        return aliases

    def _volume_args(self, pod: Pod, container: dict[str, Any]) -> list[str]:
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        claims = {
            t["metadata"]["name"]
            for t in (
                pod.workload["spec"].get("volumeClaimTemplates", []) if pod.workload["kind"] != "Pod" else []
            )
        }
        args: list[str] = []
        for mount in container.get("volumeMounts", []):
            vname, path = mount["name"], mount["mountPath"]
            if vname in claims or "emptyDir" in volumes.get(vname, {}):
                volume = f"{self.prefix}-{vname}-{pod.name}"
                if podman("volume", "exists", volume, check=False).returncode != 0:
                    podman("volume", "create", volume)
                    self.volumes.append(volume)
                args += ["-v", f"{volume}:{path}{':ro' if mount.get('readOnly') else ''}"]
                continue
            vol = volumes.get(vname)
            if vol is None:
                raise HarnessError(f"{pod.name}: volumeMount {vname!r} has no volume")
            if "secret" in vol or "configMap" in vol:
                local = self._write_items(pod, vname, vol)
                args += ["-v", f"{local}:{path}:ro"]
            else:
                raise HarnessError(f"{pod.name}: volume {vname!r} of a kind this harness does not run: {vol}")
        return args

    def _write_items(self, pod: Pod, vname: str, vol: dict[str, Any]) -> Path:
        if "secret" in vol:
            obj = _named(self.docs, "Secret", vol["secret"]["secretName"])
            data = {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
            data.update(obj.get("stringData", {}))
            items = vol["secret"].get("items") or [{"key": k, "path": k} for k in data]
        else:
            obj = _named(self.docs, "ConfigMap", vol["configMap"]["name"])
            data = dict(obj.get("data", {}))
            items = vol["configMap"].get("items") or [{"key": k, "path": k} for k in data]
        root = self.workdir / pod.name / vname
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        for item in items:
            if item["key"] not in data:
                raise HarnessError(
                    f"{pod.name}: volume {vname!r} wants key {item['key']!r}, not in {obj['metadata']['name']}"
                )
            f = root / item["path"]
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(data[item["key"]])
            f.chmod(0o644)
        return root

    def _security_args(self, pod: Pod, container: dict[str, Any]) -> list[str]:
        sc = {**pod.spec.get("securityContext", {}), **container.get("securityContext", {})}
        args: list[str] = []
        uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
        if uid is None:
            user = podman("image", "inspect", "--format", "{{.Config.User}}", self.image_of(container)).stdout
            uid = int(user.strip().split(":")[0] or 0)
        if sc.get("runAsNonRoot") and int(uid) == 0:
            raise HarnessError(f"{pod.name}: runAsNonRoot but the container would run as uid 0")
        args += ["--user", f"{uid}:{gid if gid is not None else uid}"]
        if "fsGroup" in sc:
            args += ["--group-add", str(sc["fsGroup"])]
        if sc.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]
        caps = sc.get("capabilities", {})
        for cap in caps.get("drop", []):
            args += ["--cap-drop", cap]
        for cap in caps.get("add", []):
            args += ["--cap-add", cap]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        if sc.get("privileged"):
            args += ["--privileged"]
        return args

    def image_of(self, container: dict[str, Any]) -> str:
        rendered = container["image"]
        if rendered not in self.images:
            raise HarnessError(f"no local image for {rendered!r} (known: {sorted(self.images)})")
        return self.images[rendered]

    def _env_args(self, pod: Pod, container: dict[str, Any]) -> list[str]:
        args: list[str] = []
        for e in container.get("env", []):
            if "value" in e:
                value = str(e["value"])
            else:
                ref = e.get("valueFrom", {})
                path = ref.get("fieldRef", {}).get("fieldPath")
                if path == "metadata.name":
                    value = pod.name
                elif path == "status.podIP":
                    value = pod.ip
                elif "secretKeyRef" in ref:
                    secret = _named(self.docs, "Secret", ref["secretKeyRef"]["name"])
                    value = base64.b64decode(secret["data"][ref["secretKeyRef"]["key"]]).decode()
                else:
                    raise HarnessError(
                        f"{pod.name}: env {e['name']} from {ref}, which this harness does not run"
                    )
            args += ["--env", f"{e['name']}={value}"]
        return args

    def run_args(self, pod: Pod, container: dict[str, Any] | None = None) -> list[str]:
        c = container or pod.main
        args = ["run", "-d", "--name", f"{self.prefix}-{pod.name}", "--hostname", pod.name]
        args += ["--network", self.network, "--ip", pod.ip, *ULIMITS]
        for alias, ip in sorted(self.host_aliases().items()):
            args += ["--add-host", f"{alias}:{ip}"]
        args += self._security_args(pod, c)
        limit = c.get("resources", {}).get("limits", {}).get("memory")
        if limit:
            args += ["--memory", _memory(str(limit))]
        args += self._env_args(pod, c)
        args += self._volume_args(pod, c)
        if c.get("command"):
            args += ["--entrypoint", json.dumps(c["command"])]
        args += [self.image_of(c), *c.get("args", [])]
        return args

    # --- running ----------------------------------------------------------------------------------

    def start(self, pod: Pod) -> None:
        name = f"{self.prefix}-{pod.name}"
        podman("rm", "-f", "-v", "-t", "0", name, check=False)
        pod.container = name
        if name not in self.containers:
            self.containers.append(name)
        try:
            podman(*self.run_args(pod))
        except HarnessError as e:
            raise HarnessError(f"pod {pod.name} (image {pod.main['image']}) did not start: {e}") from None

    def state(self, pod: Pod) -> tuple[str, int]:
        out = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", pod.container).stdout
        status, code = out.split()
        return status, int(code)

    def logs(self, pod: Pod, lines: int = 40) -> str:
        """The last `lines` lines of the container's output (0: all of it). Cut here: podman's --tail
        counts partial log records, not lines."""
        proc = podman("logs", pod.container, check=False)
        text = (proc.stdout + proc.stderr).strip()
        return "\n".join(text.splitlines()[-lines:]) if lines else text

    def probe_once(self, pod: Pod, probe: dict[str, Any]) -> str | None:
        """None when the probe passes, else why not."""
        timeout = float(probe.get("timeoutSeconds", 1))
        if "grpc" in probe:
            port = pod.port(probe["grpc"]["port"])
            service = probe["grpc"].get("service", "")
            try:
                with grpc.insecure_channel(f"{pod.ip}:{port}") as ch:
                    resp = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=timeout
                    )
            except grpc.RpcError as e:
                return f"grpc health {pod.ip}:{port} {service!r}: {e.code().name} {e.details()}"
            if resp.status != health_pb2.HealthCheckResponse.SERVING:
                return f"grpc health {service!r}: {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
            return None
        if "httpGet" in probe:
            get = probe["httpGet"]
            url = f"http://{pod.ip}:{pod.port(get['port'])}{get.get('path', '/')}"
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            try:
                with opener.open(url, timeout=timeout) as resp:
                    return None if 200 <= resp.status < 400 else f"GET {url}: {resp.status}"
            except OSError as e:
                return f"GET {url}: {e}"
        raise HarnessError(f"{pod.name}: a probe of a kind this harness does not run: {probe}")

    def wait_started(self, pod: Pod) -> None:
        """The startup probe (else readiness) passes within periodSeconds x failureThreshold, polled
        more often than the kubelet would; a container that exits first fails with its log."""
        probe = pod.main.get("startupProbe") or pod.main.get("readinessProbe")
        if probe is None:
            raise HarnessError(f"{pod.name}: no startup or readiness probe to wait for")
        budget = float(probe.get("periodSeconds", 10)) * float(probe.get("failureThreshold", 3))
        deadline = time.monotonic() + budget
        why: str | None = "not probed"
        while time.monotonic() < deadline:
            status, code = self.state(pod)
            if status in ("exited", "stopped"):
                raise HarnessError(
                    f"pod {pod.name} (image {pod.main['image']}) exited with code {code} before its "
                    f"startup probe passed; last log lines:\n{self.logs(pod)}"
                )
            why = self.probe_once(pod, probe)
            if why is None:
                return
            time.sleep(0.5)
        raise HarnessError(
            f"pod {pod.name}: startup probe failing after {budget:.0f} s: {why}\n{self.logs(pod)}"
        )

    def check_probes(self, pod: Pod) -> None:
        for kind in ("readinessProbe", "livenessProbe"):
            probe = pod.main.get(kind)
            if probe is None:
                continue
            why = self.probe_once(pod, probe)
            if why is not None:
                raise HarnessError(f"pod {pod.name}: {kind} fails: {why}")

    def writes_outside_volumes(self, pod: Pod) -> list[str]:
        """Paths the container changed in its image's filesystem (not under a mount)."""
        mounts = [m["mountPath"] for m in pod.main.get("volumeMounts", [])]
        out = podman("diff", "--format", "json", pod.container, check=False).stdout or "{}"
        changed = json.loads(out)
        paths = [p for key in ("changed", "added", "deleted") for p in (changed.get(key) or [])]
        # A mount's own files, and the directories the engine creates to mount on (as the kubelet does).
        inside = [
            p
            for p in paths
            if any(
                p == m or p.startswith(m.rstrip("/") + "/") or m.startswith(p.rstrip("/") + "/")
                for m in mounts
            )
        ]
        return sorted(set(paths) - set(inside) - ENGINE_WRITES)

    def run_pod_to_completion(self, manifest: Manifest, timeout: float = 180) -> tuple[int, str]:
        """A bare Pod (the helm test hook): run it, wait for it to exit, return code and log."""
        pod = Pod(manifest["metadata"]["name"], manifest, f"{self._subnet}.{200 + len(self.containers)}")
        self.start(pod)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, code = self.state(pod)
            if status in ("exited", "stopped"):
                return code, self.logs(pod, 0)
            time.sleep(0.5)
        raise HarnessError(f"pod {pod.name} still running after {timeout:.0f} s:\n{self.logs(pod)}")

    def kill_and_restart(self, component: str) -> None:
        """`podman kill`, then a new container for the same pod with the same volumes and address."""
        pod = self.pods[component]
        podman("kill", pod.container)
        podman("rm", "-f", "-v", "-t", "0", pod.container)
        self.start(pod)
        self.wait_started(pod)

    def up(self) -> None:
        for pod in self.pods.values():
            self.start(pod)
        for pod in self.pods.values():
            self.wait_started(pod)
        for pod in self.pods.values():
            self.check_probes(pod)

    def cleanup(self) -> None:
        for name in reversed(self.containers):
            podman("rm", "-f", "-v", "-t", "5", name, check=False, timeout=60)
        for volume in self.volumes:
            podman("volume", "rm", "-f", volume, check=False)
        if self.network:
            podman("network", "rm", "-f", self.network, check=False)

    @contextmanager
    def running(self, only: tuple[str, ...] = ()) -> Iterator[ChartOnPodman]:
        try:
            self.plan(only)
            self.up()
            yield self
        finally:
            self.cleanup()

    def leftovers(self) -> list[str]:
        """Containers, volumes and networks of this run still present (after cleanup: none)."""
        left: list[str] = []
        for what in ("ps -a", "volume ls", "network ls"):
            out = podman(*what.split(), "--format", "{{.Name}}" if what != "ps -a" else "{{.Names}}").stdout
            left += [f"{what.split()[0]} {n}" for n in out.split() if n.startswith(self.prefix)]
        # Anonymous volumes (the image's VOLUME /data where a pod mounts nothing there) are removed too.
        now = set(podman("volume", "ls", "--format", "{{.Name}}").stdout.split())
        left += [f"volume {n}" for n in sorted(now - self._volumes_before) if f"volume {n}" not in left]
        return left
