#!/usr/bin/env python3
"""Checks the Kubernetes manifests in deploy/kubernetes against each other and against
the multilora binary they run.

    check_deploy.py --binary target/debug/multilora --deploy deploy/kubernetes

Every problem found is printed (one `error:` line each) and the exit status is 1; on
success one summary line is printed. What is checked:

* every file parses as YAML; each object has the expected kind and apiVersion
  (Deployment apps/v1, Service v1, InferencePool inference.networking.k8s.io/v1,
  HTTPRoute gateway.networking.k8s.io/v1, Kustomization); the kustomization lists
  exactly the manifest files of the folder;
* the Deployment's selector, the Service's selector and the InferencePool's
  selector.matchLabels all select the pod template's labels;
* the container runs `multilora serve`; every `--flag` in its args is a flag that
  `BINARY serve --help` lists, value-taking flags have a value, and values are checked
  where their form is known (addresses as HOST:PORT on all interfaces, byte sizes as
  the help describes them, counts as positive integers, the listed choices); every
  MULTILORA_* environment variable is one the help names;
* the container ports agree with the --listen / --http-listen ports; the startup,
  readiness and liveness probes are gRPC probes on the gRPC port, and the startup
  probe allows minutes for the model to load; the Service's targetPorts name
  container ports; the InferencePool's target port is the HTTP port and its
  endpointPickerRef is complete; the HTTPRoute's backendRef names the InferencePool;
* --model and --adapter-dir paths lie on mounted volumes (the adapter volume
  read-only) and every volumeMount names a volume;
* a --tenants-file is given (or MULTILORA_TENANTS_FILE), and it and any TLS files lie
  on read-only mounts; gRPC probes can reach a TLS port (`mode: TLS`, and no
  --tls-client-ca: the kubelet has no client certificate);
  a --state-dir lies on a writable mount that no two replicas share;
* resources have CPU and memory requests and limits; the KV pool plus the host
  adapter cache fit under the memory limit; --adapter-memory is at most half of
  --kv-cache-memory;
* terminationGracePeriodSeconds exceeds --drain-timeout-s (default 30) plus any
  preStop sleep.
"""

import argparse
import ipaddress
import pathlib
import re
import subprocess
import sys

try:
    import yaml
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("error: PyYAML is missing: run `make python` (it installs into .venv)")

EXPECTED = {
    "deployment.yaml": ("apps/v1", "Deployment"),
    "service.yaml": ("v1", "Service"),
    "inferencepool.yaml": ("inference.networking.k8s.io/v1", "InferencePool"),
    "httproute.yaml": ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}
KUSTOMIZATION = "kustomization.yaml"
KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"
INFERENCE_GROUP = "inference.networking.k8s.io"

# Units of the server's byte sizes (src/byte_size.rs): any case, optional space.
BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
BYTE_FLAGS = ("kv-cache-memory", "adapter-memory", "adapter-host-memory")
COUNT_FLAGS = (
    "block-size",
    "max-batch-tokens",
    "max-running",
    "max-active-adapters",
    "drain-timeout-s",
)
CHOICES = {
    "dtype": {"f32", "bf16", "f16", "quantized", "auto"},
    "kv-dtype": {"auto", "f32", "bf16"},
    "quant-type": {"q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"},
}
DEFAULT_DRAIN_S = 30
DEFAULT_GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds
MIN_STARTUP_S = 120  # the startup probe must allow at least this for the model to load
K8S_UNITS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
}

errors = []


def error(msg):
    errors.append(msg)


def parse_byte_size(text):
    """Bytes of a server byte size (`2GiB`, `1.5 GB`, `512MiB`, `1073741824`), or None."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)", text.strip())
    if not m or m.group(2).lower() not in BYTE_UNITS:
        return None
    return int(float(m.group(1)) * BYTE_UNITS[m.group(2).lower()])


def parse_k8s_memory(text):
    """Bytes of a Kubernetes memory quantity (`24Gi`, `512M`, `1e9`), or None."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(text).strip())
    if not m:
        return None
    return int(float(m.group(1)) * K8S_UNITS[m.group(2) or ""])


def parse_addr(text):
    """(host, port) of HOST:PORT or [V6]:PORT, or None."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not m:
        return None
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None  # the server's SocketAddr wants an IP, not a host name
    if not 1 <= port <= 65535:
        return None
    return host, port


def serve_help(binary):
    """(flags -> takes_value, env names) from `BINARY serve --help`."""
    try:
        out = subprocess.run(
            [binary, "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except OSError as e:
        sys.exit(f"error: cannot run {binary}: {e}")
    if out.returncode != 0:
        sys.exit(f"error: `{binary} serve --help` failed ({out.returncode}):\n{out.stderr}")
    flags = {}
    for m in re.finditer(r"^\s+(?:-\w,\s+)?--([a-z0-9][a-z0-9-]*)(\s+<[^>]+>)?", out.stdout, re.M):
        flags[m.group(1)] = bool(m.group(2))
    envs = set(re.findall(r"\[env:\s*(MULTILORA_[A-Z0-9_]+)=", out.stdout))
    if "listen" not in flags:
        sys.exit(f"error: `{binary} serve --help` lists no --listen flag:\n{out.stdout}")
    return flags, envs


def load_docs(path):
    try:
        with open(path, encoding="utf-8") as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        error(f"{path.name}: does not parse: {e}")
        return None


def load_manifests(deploy):
    """{kind: object} for the expected files, checking kinds, versions and the kustomization."""
    objects = {}
    for name, (api, kind) in EXPECTED.items():
        path = deploy / name
        if not path.is_file():
            error(f"{name}: missing from {deploy}")
            continue
        docs = load_docs(path)
        if docs is None:
            continue
        if len(docs) != 1:
            error(f"{name}: expected one {kind} object, found {len(docs)} documents")
            continue
        doc = docs[0]
        if not isinstance(doc, dict):
            error(f"{name}: not a mapping")
            continue
        if doc.get("kind") != kind or doc.get("apiVersion") != api:
            error(
                f"{name}: expected kind {kind} apiVersion {api}, "
                f"found kind {doc.get('kind')} apiVersion {doc.get('apiVersion')}"
            )
        if not (doc.get("metadata") or {}).get("name"):
            error(f"{name}: metadata.name is missing")
        objects[kind] = doc

    kpath = deploy / KUSTOMIZATION
    if not kpath.is_file():
        error(f"{KUSTOMIZATION}: missing from {deploy}")
        return objects
    kdocs = load_docs(kpath) or []
    kust = kdocs[0] if len(kdocs) == 1 and isinstance(kdocs[0], dict) else {}
    if kust.get("kind") != "Kustomization" or kust.get("apiVersion") != KUSTOMIZE_API:
        error(f"{KUSTOMIZATION}: expected kind Kustomization apiVersion {KUSTOMIZE_API}")
    listed = kust.get("resources") or []
    files = {
        p.name
        for p in deploy.iterdir()
        if p.suffix in (".yaml", ".yml") and p.name != KUSTOMIZATION
    }
    for missing in sorted(files - set(listed)):
        error(f"{KUSTOMIZATION}: does not list {missing}")
    for extra in sorted(set(listed) - files):
        error(f"{KUSTOMIZATION}: lists {extra}, which is not in {deploy}")
    if len(listed) != len(set(listed)):
        error(f"{KUSTOMIZATION}: lists a resource twice: {listed}")
    return objects


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_args(container):
    """The argument list after `serve`, or None if the container does not run serve."""
    words = [str(w) for w in (container.get("command") or []) + (container.get("args") or [])]
    if "serve" not in words:
        return None
    return words[words.index("serve") + 1 :]


def parse_flags(args, known):
    """{flag: [values]} from the serve args, reporting unknown flags and missing values."""
    values = {}
    i = 0
    while i < len(args):
        word = args[i]
        i += 1
        if not word.startswith("--"):
            error(f"deployment: stray argument {word!r} (not a --flag or its value)")
            continue
        name, eq, value = word[2:].partition("=")
        if name not in known:
            error(f"deployment: --{name} is not a `multilora serve` flag (see serve --help)")
            if not eq and i < len(args) and not args[i].startswith("--"):
                value = args[i]  # presumably its value: one complaint is enough
                i += 1
            values.setdefault(name, []).append(value)
            continue
        if known[name]:
            if not eq:
                if i >= len(args) or args[i].startswith("--"):
                    error(f"deployment: --{name} needs a value")
                    continue
                value = args[i]
                i += 1
        elif eq:
            error(f"deployment: --{name} takes no value, got {value!r}")
        values.setdefault(name, []).append(value if known[name] else None)
    return values


def last(values, name):
    got = values.get(name)
    return got[-1] if got else None


def check_values(values):
    """Validates the values whose form is known; returns (grpc_port, http_port, sizes)."""
    ports = {}
    for flag in ("listen", "http-listen"):
        text = last(values, flag)
        if text is None:
            error(f"deployment: --{flag} is not set (its default listens on 127.0.0.1 only)")
            continue
        addr = parse_addr(text)
        if addr is None:
            error(f"deployment: --{flag}={text!r} is not an IP HOST:PORT address")
            continue
        if ipaddress.ip_address(addr[0]).is_loopback:
            error(f"deployment: --{flag}={text} listens on loopback; use 0.0.0.0 so probes and peers reach it")
        ports[flag] = addr[1]
    if ports.get("listen") is not None and ports.get("listen") == ports.get("http-listen"):
        error("deployment: --listen and --http-listen use the same port")

    sizes = {}
    for flag in BYTE_FLAGS:
        text = last(values, flag)
        if text is None:
            continue
        n = parse_byte_size(text)
        if n is None:
            error(f"deployment: --{flag}={text!r} is not a byte size (e.g. 6GiB, 512MiB, 1.5GB)")
        else:
            sizes[flag] = n
    for flag in COUNT_FLAGS:
        text = last(values, flag)
        if text is not None and not re.fullmatch(r"[1-9]\d*", text):
            error(f"deployment: --{flag}={text!r} is not a positive integer")
    for flag, choices in CHOICES.items():
        text = last(values, flag)
        if text is not None and text not in choices:
            error(f"deployment: --{flag}={text!r} is not one of {sorted(choices)}")
    device = last(values, "device")
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        error(f"deployment: --device={device!r} is not cpu or cuda[:N]")
    for spec in values.get("adapter") or []:
        if spec is not None and not re.fullmatch(r"[^=\s]+=\S+", spec):
            error(f"deployment: --adapter={spec!r} is not NAME=SOURCE")
    return ports.get("listen"), ports.get("http-listen"), sizes


def mount_at(mounts, path):
    """The volumeMount (of `mounts`) that `path` lies on, the deepest one; None if none."""
    best = None
    for m in mounts:
        root = str(m.get("mountPath", "")).rstrip("/")
        if root and (path == root or path.startswith(root + "/")):
            if best is None or len(root) > len(best["mountPath"].rstrip("/")):
                best = m
    return best


def flag_or_env(values, container, flag):
    """The value `--flag` has in the args, else the one its MULTILORA_* env var has."""
    got = last(values, flag)
    if got is not None:
        return got
    env_name = "MULTILORA_" + flag.upper().replace("-", "_")
    for env in container.get("env") or []:
        if env.get("name") == env_name and "value" in env:
            return str(env["value"])
    return None


def check_tenants_tls_state(values, container, pod, replicas):
    """The tenants file and TLS material lie on read-only volumes, the state dir on a
    writable one no other replica shares, and gRPC probes can still reach the server."""
    mounts = container.get("volumeMounts") or []
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    tenants = flag_or_env(values, container, "tenants-file")
    if tenants is None:
        error(
            "deployment: no --tenants-file: every caller could use every adapter and load "
            "adapters (the server runs open only for local use)"
        )
    for flag in ("tenants-file", "tls-cert", "tls-key", "tls-client-ca"):
        path = flag_or_env(values, container, flag)
        if path is None:
            continue
        m = mount_at(mounts, path)
        if m is None:
            error(f"deployment: --{flag} {path} is on no mounted volume")
        elif not m.get("readOnly"):
            error(f"deployment: --{flag} {path} is mounted read-write; mount it read-only (a Secret)")
    probes = [container.get(k) or {} for k in ("startupProbe", "readinessProbe", "livenessProbe")]
    grpc_probes = [p["grpc"] for p in probes if p.get("grpc")]
    if flag_or_env(values, container, "tls-client-ca") is not None and grpc_probes:
        error(
            "deployment: --tls-client-ca with gRPC probes: the kubelet presents no client "
            "certificate, so the pod would never be ready; terminate TLS at the gateway"
        )
    elif flag_or_env(values, container, "tls-cert") is not None:
        if any(str(g.get("mode", "")).upper() != "TLS" for g in grpc_probes):
            error(
                "deployment: --tls-cert with a plaintext gRPC probe, which cannot reach a TLS "
                "port: set the probes' `mode: TLS` where the cluster has it, or terminate TLS "
                "at the gateway"
            )
    state = flag_or_env(values, container, "state-dir")
    if state is None:
        return
    m = mount_at(mounts, state)
    if m is None:
        error(f"deployment: --state-dir {state} is on no mounted volume (the root filesystem is read-only)")
        return
    if m.get("readOnly"):
        error(f"deployment: --state-dir {state} is mounted read-only; the journal is written there")
    volume = volumes.get(m.get("name")) or {}
    if "persistentVolumeClaim" in volume and replicas != 1:
        error(
            f"deployment: --state-dir {state} is on claim "
            f"{volume['persistentVolumeClaim'].get('claimName')!r}, shared by {replicas} replicas: "
            "each would replay the others' runtime loads and append to one journal; keep runtime "
            "adapters in the shared adapter volume, or run one replica per claim (a StatefulSet)"
        )


def probe_window(probe):
    return (probe.get("periodSeconds") or 10) * (probe.get("failureThreshold") or 3)


def check_deployment(dep, known, envs):
    """Checks the Deployment on its own; returns facts the other objects are checked against."""
    spec = dep.get("spec") or {}
    template = spec.get("template") or {}
    pod_labels = (template.get("metadata") or {}).get("labels") or {}
    pod = template.get("spec") or {}
    if not pod_labels:
        error("deployment: the pod template has no labels")
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    if not selects(selector, pod_labels):
        error(f"deployment: selector {selector} does not select the pod labels {pod_labels}")

    containers = pod.get("containers") or []
    serving = [(c, container_args(c)) for c in containers]
    serving = [(c, a) for c, a in serving if a is not None]
    if len(serving) != 1:
        error(f"deployment: expected one container running `multilora serve`, found {len(serving)}")
        return {"pod_labels": pod_labels, "container_ports": {}, "http_port": None}
    container, args = serving[0]
    image = str(container.get("image") or "")
    if not image:
        error("deployment: the container has no image")

    values = parse_flags(args, known)
    grpc_port, http_port, sizes = check_values(values)
    for env in container.get("env") or []:
        name = env.get("name", "")
        if name.startswith("MULTILORA_") and name not in envs:
            error(f"deployment: env {name} is not one `multilora serve --help` names")

    # Ports.
    cports = {}
    for p in container.get("ports") or []:
        if p.get("name"):
            cports[p["name"]] = p.get("containerPort")
    numbers = set(cports.values())
    for flag, port in (("--listen", grpc_port), ("--http-listen", http_port)):
        if port is not None and port not in numbers:
            error(f"deployment: {flag} port {port} is not a named containerPort ({cports})")
    if grpc_port is not None and cports.get("grpc") not in (None, grpc_port):
        error(f"deployment: containerPort `grpc` is {cports['grpc']}, but --listen uses {grpc_port}")
    if http_port is not None and cports.get("http") not in (None, http_port):
        error(f"deployment: containerPort `http` is {cports['http']}, but --http-listen uses {http_port}")

    # Probes: gRPC health on the gRPC port.
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if not probe:
            error(f"deployment: no {kind}")
            continue
        grpc = probe.get("grpc")
        if not grpc:
            error(f"deployment: {kind} is not a gRPC probe (grpc.health.v1 knows when the model is ready)")
            continue
        if grpc.get("port") != grpc_port:
            error(f"deployment: {kind} probes port {grpc.get('port')}, not the gRPC port {grpc_port}")
        service = grpc.get("service", "")
        if service not in ("", "multilora.v1.Generation"):
            error(f"deployment: {kind} asks about service {service!r}, which the server does not report")
    startup = container.get("startupProbe") or {}
    if startup and probe_window(startup) < MIN_STARTUP_S:
        error(
            f"deployment: the startupProbe gives up after {probe_window(startup)}s "
            f"(periodSeconds x failureThreshold); loading the model needs at least {MIN_STARTUP_S}s"
        )

    # Volumes: model and adapter folders are mounted; adapters read-only.
    volumes = {v.get("name") for v in pod.get("volumes") or []}
    mounts = container.get("volumeMounts") or []
    for m in mounts:
        if m.get("name") not in volumes:
            error(f"deployment: volumeMount {m.get('name')!r} names no volume")

    def mount_of(path):
        return mount_at(mounts, path)

    model = last(values, "model")
    if model is None:
        error("deployment: --model is not set")
    elif model.startswith("/") and mount_of(model) is None:
        error(f"deployment: --model {model} is on no mounted volume")
    adapter_dirs = values.get("adapter-dir") or []
    if not adapter_dirs:
        error("deployment: no --adapter-dir (adapters come from a shared volume)")
    for d in adapter_dirs:
        m = mount_of(d or "")
        if m is None:
            error(f"deployment: --adapter-dir {d} is on no mounted volume")
        elif not m.get("readOnly"):
            error(f"deployment: --adapter-dir {d} is mounted read-write; mount the shared adapters read-only")

    check_tenants_tls_state(values, container, pod, spec.get("replicas", 1))

    # Resources and memory budgets.
    resources = container.get("resources") or {}
    for part in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if (resources.get(part) or {}).get(res) is None:
                error(f"deployment: resources.{part}.{res} is not set")
    limit_text = (resources.get("limits") or {}).get("memory")
    limit = parse_k8s_memory(limit_text) if limit_text is not None else None
    if limit_text is not None and limit is None:
        error(f"deployment: resources.limits.memory {limit_text!r} is not a memory quantity")
    kv = sizes.get("kv-cache-memory", 1 << 30)
    host = sizes.get("adapter-host-memory", 4 << 30)
    active = sizes.get("adapter-memory", 256 << 20)
    if limit is not None and kv + host >= limit:
        error(
            f"deployment: --kv-cache-memory + --adapter-host-memory ({(kv + host) / 2**30:.1f} GiB) "
            f"do not fit the memory limit {limit_text} (the weights need room too)"
        )
    if active > kv // 2:
        error("deployment: --adapter-memory is more than half of --kv-cache-memory (the server refuses it)")

    # Graceful shutdown.
    drain_text = last(values, "drain-timeout-s")
    drain = int(drain_text) if drain_text and drain_text.isdigit() else DEFAULT_DRAIN_S
    pre_stop = ((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}
    sleep_s = int(pre_stop.get("seconds") or 0)
    grace = pod.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
    if not isinstance(grace, int) or grace <= drain + sleep_s:
        error(
            f"deployment: terminationGracePeriodSeconds {grace} must exceed --drain-timeout-s {drain}"
            + (f" plus the preStop sleep {sleep_s}s" if sleep_s else "")
        )

    return {
        "pod_labels": pod_labels,
        "container_ports": cports,
        "http_port": http_port,
        "grpc_port": grpc_port,
        "replicas": spec.get("replicas", 1),
        "flags": len(values),
    }


def check_service(svc, facts):
    spec = svc.get("spec") or {}
    selector = spec.get("selector") or {}
    if not selects(selector, facts["pod_labels"]):
        error(f"service: selector {selector} does not select the pod labels {facts['pod_labels']}")
    cports = facts["container_ports"]
    ports = spec.get("ports") or []
    if not ports:
        error("service: no ports")
    for p in ports:
        target = p.get("targetPort", p.get("port"))
        if isinstance(target, str):
            if target not in cports:
                error(f"service: targetPort {target!r} names no container port ({sorted(cports)})")
        elif target not in cports.values():
            error(f"service: targetPort {target} is no container port ({cports})")
    named = {p.get("targetPort") for p in ports}
    for want in ("grpc", "http"):
        if want in cports and want not in named and cports[want] not in named:
            error(f"service: does not expose the container port {want!r}")


def check_pool(pool, facts):
    spec = pool.get("spec") or {}
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    if not selects(selector, facts["pod_labels"]):
        error(f"inferencepool: selector.matchLabels {selector} does not select the pod labels {facts['pod_labels']}")
    for old in ("targetPortNumber", "extensionRef"):
        if old in spec:
            error(f"inferencepool: {old} is the pre-GA (v1alpha2) field; v1 does not have it")
    numbers = [p.get("number") for p in spec.get("targetPorts") or [] if isinstance(p, dict)]
    if not numbers:
        error("inferencepool: spec.targetPorts has no {number: ...} entry")
    elif facts["http_port"] is not None and numbers != [facts["http_port"]]:
        error(
            f"inferencepool: targetPorts {numbers} should be just the HTTP port {facts['http_port']} "
            "(the OpenAI API and /metrics, which the endpoint picker scrapes)"
        )
    ref = spec.get("endpointPickerRef") or {}
    if not ref.get("name"):
        error("inferencepool: endpointPickerRef.name is not set")
    if ref.get("kind", "Service") == "Service" and not (ref.get("port") or {}).get("number"):
        error("inferencepool: endpointPickerRef.port.number is required for a Service")
    mode = ref.get("failureMode")
    if mode is not None and mode not in ("FailOpen", "FailClose"):
        error(f"inferencepool: endpointPickerRef.failureMode {mode!r} is not FailOpen or FailClose")
    app_protocol = spec.get("appProtocol")
    if app_protocol not in (None, "http"):
        error(f"inferencepool: appProtocol {app_protocol!r}: the target port speaks HTTP/1.1 (http)")


def check_route(route, pool_name):
    spec = route.get("spec") or {}
    if not spec.get("parentRefs"):
        error("httproute: no parentRefs (the Gateway)")
    refs = [b for rule in spec.get("rules") or [] for b in rule.get("backendRefs") or []]
    pools = [
        b
        for b in refs
        if b.get("group") == INFERENCE_GROUP and b.get("kind") == "InferencePool"
    ]
    if not pools:
        error(f"httproute: no backendRef of group {INFERENCE_GROUP}, kind InferencePool")
    for b in pools:
        if b.get("name") != pool_name:
            error(f"httproute: backendRef names InferencePool {b.get('name')!r}, not {pool_name!r}")
    if len(pools) != len(refs):
        error("httproute: a backendRef bypasses the InferencePool (and so the endpoint picker)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", required=True, help="the multilora executable")
    ap.add_argument("--deploy", required=True, help="the manifests folder (deploy/kubernetes)")
    opts = ap.parse_args()

    deploy = pathlib.Path(opts.deploy)
    if not deploy.is_dir():
        sys.exit(f"error: {deploy} is not a folder")
    known, envs = serve_help(opts.binary)
    objects = load_manifests(deploy)

    facts = None
    if "Deployment" in objects:
        facts = check_deployment(objects["Deployment"], known, envs)
    if facts is not None:
        if "Service" in objects:
            check_service(objects["Service"], facts)
        if "InferencePool" in objects:
            check_pool(objects["InferencePool"], facts)
    if "HTTPRoute" in objects and "InferencePool" in objects:
        check_route(objects["HTTPRoute"], (objects["InferencePool"].get("metadata") or {}).get("name"))

    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        print(f"{len(errors)} problem(s) in {deploy}", file=sys.stderr)
        return 1
    print(
        f"ok: {len(objects)} manifests in {deploy} agree: {facts['replicas']} replicas, "
        f"gRPC :{facts['grpc_port']} (gRPC probes), HTTP :{facts['http_port']} "
        f"(InferencePool target), {facts['flags']} serve flags known to {opts.binary}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
