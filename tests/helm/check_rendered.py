#!/usr/bin/env python3
"""Checks the manifests `helm template` rendered from helm/skysnap.

Usage: check_rendered.py RENDERED.yaml --name NAME --reference config/skysnap.yaml
                         [--values VALUES.yaml ...] [--skysnap-bin BIN]

Prints one line per check, `PASS <name>: <check>` or `FAIL <name>: <check>: <why>` (or
`SKIP ...`), and exits 1 when a check failed. scripts/helm-test.sh counts the lines.

What it checks, for every Deployment the chart rendered:
  * terminationGracePeriodSeconds > shutdown.grace_ms (read from the rendered ConfigMap)
    and equals ceil(grace_ms / 1000) + 10;
  * the ConfigMap's skysnap.yaml only uses sections and keys that exist in the
    repository's config/skysnap.yaml (compared section by section), holds no tokens,
    and is mounted where the container's --config points;
  * every SKYSNAP_* environment variable is a real configuration key (skysnap refuses
    unknown ones at start-up) and service links are off (Kubernetes would otherwise add
    SKYSNAP_SERVICE_HOST & co. for a Service named skysnap*);
  * probes (receiver: httpGet /healthz and /readyz on port http; consumer: tcpSocket on
    port metrics), container ports, security context, recommended labels, checksums;
  * the receiver Service has ports grpc (appProtocol grpc), http and metrics;
  * SQLite: one replica, Recreate, the data volume at sqlite.path's directory;
  * HPA / PDB consistency, ServiceMonitor ports, the dashboard ConfigMap's JSON;
  * forwarding to an upstream OAP: no token in the ConfigMap, addresses are host:port,
    TLS files on a read-only Secret volume of the receiver, SKYSNAP_UPSTREAM_TOKEN only
    from a Secret and only on the receiver; with --values (the chart's values.yaml, then
    the value set's file, merged as Helm does) the rendered upstream section, token
    variable, Secret key and TLS volume are those the values ask for;
  * optionally (--skysnap-bin): the real skysnap binary loads the rendered config with
    the pod's environment (`skysnap schema --config ...`, which validates and exits).
"""

import argparse
import base64
import json
import math
import os
import posixpath
import re
import subprocess
import sys
import tempfile

import yaml

CLIENT_ENV_VARS = {"SKYSNAP_SERVER", "SKYSNAP_CONFIG", "SKYSNAP_LOG"}
RECOMMENDED_LABELS = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
]
# Sections whose value is a free map (their keys are librdkafka's, not skysnap's).
FREE_MAP_KEYS = {("kafka", "properties")}


class Checker:
    def __init__(self, name):
        self.name = name
        self.passed = 0
        self.failed = 0

    def check(self, what, ok, why=""):
        if ok:
            self.passed += 1
            print(f"PASS {self.name}: {what}")
        else:
            self.failed += 1
            print(f"FAIL {self.name}: {what}: {why}")
        return ok

    def skip(self, what, why):
        print(f"SKIP {self.name}: {what}: {why}")


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def component(doc):
    return doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def reference_keys(path):
    with open(path) as f:
        ref = yaml.safe_load(f)
    return {section: set((keys or {}).keys()) for section, keys in ref.items()}


def env_key_exists(variable, ref):
    """Mirrors skysnap's apply_env: SKYSNAP_<SECTION>_<KEY>, section up to the first _."""
    if variable in CLIENT_ENV_VARS:
        return True
    rest = variable[len("SKYSNAP_"):].lower()
    if "_" not in rest:
        return False
    section, key = rest.split("_", 1)
    return key in ref.get(section, set())


def merge_values(base, override):
    """Helm's merge of a values file over the chart's: maps merge, null deletes, the rest
    (lists included) replaces."""
    out = dict(base)
    for key, value in (override or {}).items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = value
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("rendered")
    parser.add_argument("--name", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--values", action="append", default=[],
                        help="values files in Helm's order (the chart's values.yaml first)")
    parser.add_argument("--skysnap-bin")
    args = parser.parse_args()
    values = None
    for path in args.values:
        with open(path) as f:
            values = merge_values(values or {}, yaml.safe_load(f) or {})

    c = Checker(args.name)
    docs = load_docs(args.rendered)
    ref = reference_keys(args.reference)

    # --- ConfigMap: skysnap.yaml ----------------------------------------------------
    config_maps = [d for d in by_kind(docs, "ConfigMap") if "skysnap.yaml" in d.get("data", {})]
    if not c.check("one ConfigMap with skysnap.yaml", len(config_maps) == 1, f"found {len(config_maps)}"):
        return finish(c)
    config_map = config_maps[0]
    config_text = config_map["data"]["skysnap.yaml"]
    config = yaml.safe_load(config_text) or {}
    unknown = []
    for section, keys in config.items():
        if section not in ref:
            unknown.append(section)
            continue
        if not isinstance(keys, dict):
            unknown.append(f"{section} (not a mapping)")
            continue
        for key in keys:
            if key not in ref[section]:
                unknown.append(f"{section}.{key}")
    c.check("skysnap.yaml keys exist in config/skysnap.yaml (section by section)", not unknown,
            f"unknown keys {unknown}")
    for section, key in FREE_MAP_KEYS:
        value = (config.get(section) or {}).get(key)
        if value is not None:
            c.check(f"{section}.{key} is a map of strings",
                    isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
                    repr(value))
    auth = config.get("auth") or {}
    c.check("no tokens in the ConfigMap", not auth.get("agent_token") and not auth.get("admin_token"),
            f"auth section {auth}")
    grace_ms = int((config.get("shutdown") or {}).get("grace_ms", 20000))
    store_kind = (config.get("store") or {}).get("kind", "sqlite")
    sqlite_path = (config.get("sqlite") or {}).get("path", "./data/skysnap.db")

    secrets = {d["metadata"]["name"]: d for d in by_kind(docs, "Secret")}

    # --- Deployments --------------------------------------------------------------------
    deployments = by_kind(docs, "Deployment")
    receivers = [d for d in deployments if component(d) == "receiver"]
    consumers = [d for d in deployments if component(d) == "consumer"]
    c.check("one receiver Deployment", len(receivers) == 1, f"found {len(receivers)}")
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    pdbs = by_kind(docs, "PodDisruptionBudget")

    for dep in deployments:
        comp = component(dep)
        label = f"{comp} {dep['metadata']['name']}"
        pod = dep["spec"]["template"]["spec"]
        tgps = pod.get("terminationGracePeriodSeconds")
        expected = math.ceil(grace_ms / 1000) + 10
        c.check(f"{label}: terminationGracePeriodSeconds > shutdown.grace_ms ({grace_ms} ms)",
                isinstance(tgps, int) and tgps * 1000 > grace_ms, f"got {tgps}")
        c.check(f"{label}: terminationGracePeriodSeconds = ceil(grace_ms/1000) + 10 = {expected}",
                tgps == expected, f"got {tgps}")
        c.check(f"{label}: enableServiceLinks false", pod.get("enableServiceLinks") is False,
                f"got {pod.get('enableServiceLinks')!r}")
        containers = pod["containers"]
        c.check(f"{label}: one container", len(containers) == 1, f"{len(containers)}")
        ctr = containers[0]
        argv = (ctr.get("command") or []) + (ctr.get("args") or [])
        sub = "serve" if comp == "receiver" else "consume"
        c.check(f"{label}: runs `skysnap {sub} --config ...`",
                sub in argv and "--config" in argv, f"argv {argv}")
        config_file = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m for m in ctr.get("volumeMounts", [])}
        config_mount = mounts.get(posixpath.dirname(config_file or "/x/y"))
        c.check(f"{label}: ConfigMap mounted where --config points ({config_file})",
                config_mount is not None
                and volumes.get(config_mount["name"], {}).get("configMap", {}).get("name")
                == config_map["metadata"]["name"]
                and posixpath.basename(config_file) == "skysnap.yaml",
                f"mounts {sorted(mounts)}")
        # Environment.
        names = [e["name"] for e in ctr.get("env", [])]
        bad = [n for n in names if n.startswith("SKYSNAP_") and not env_key_exists(n, ref)]
        c.check(f"{label}: SKYSNAP_* env vars are real keys", not bad, f"unknown {bad}")
        c.check(f"{label}: no duplicate env vars", len(names) == len(set(names)), f"{names}")
        for env in ctr.get("env", []):
            ref_ = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref_ and ref_["name"] in secrets:
                data = secrets[ref_["name"]].get("data", {})
                c.check(f"{label}: {env['name']} -> key {ref_['key']} of chart Secret",
                        ref_["key"] in data and base64.b64decode(data[ref_["key"]]).decode() != "",
                        f"keys {sorted(data)}")
        # Probes and ports.
        ports = {p["name"]: p["containerPort"] for p in ctr.get("ports", [])}
        if comp == "receiver":
            c.check(f"{label}: container ports grpc/http/metrics",
                    set(ports) == {"grpc", "http", "metrics"}, f"{ports}")
            live = (ctr.get("livenessProbe") or {}).get("httpGet") or {}
            ready = (ctr.get("readinessProbe") or {}).get("httpGet") or {}
            c.check(f"{label}: liveness httpGet /healthz port http",
                    live.get("path") == "/healthz" and live.get("port") == "http", f"{live}")
            c.check(f"{label}: readiness httpGet /readyz port http",
                    ready.get("path") == "/readyz" and ready.get("port") == "http", f"{ready}")
            for addr_key, port_name in (("grpc", "grpc"), ("http", "http"), ("metrics", "metrics")):
                addr = (config.get(addr_key) or {}).get("addr", "")
                c.check(f"{label}: {addr_key}.addr matches container port {port_name}",
                        addr.rsplit(":", 1)[-1] == str(ports.get(port_name)), f"{addr} vs {ports}")
        else:
            c.check(f"{label}: container port metrics only", set(ports) == {"metrics"}, f"{ports}")
            for probe in ("livenessProbe", "readinessProbe"):
                tcp = (ctr.get(probe) or {}).get("tcpSocket") or {}
                c.check(f"{label}: {probe} tcpSocket port metrics", tcp.get("port") == "metrics",
                        f"{ctr.get(probe)}")
            addr = (config.get("metrics") or {}).get("addr", "")
            c.check(f"{label}: metrics.addr matches container port",
                    addr.rsplit(":", 1)[-1] == str(ports.get("metrics")), f"{addr} vs {ports}")
        # Security.
        psc = pod.get("securityContext") or {}
        sc = ctr.get("securityContext") or {}
        c.check(f"{label}: non-root, read-only root filesystem, no privilege escalation",
                (psc.get("runAsNonRoot") or sc.get("runAsNonRoot")) is True
                and sc.get("readOnlyRootFilesystem") is True
                and sc.get("allowPrivilegeEscalation") is False,
                f"pod {psc} container {sc}")
        c.check(f"{label}: /tmp is writable (emptyDir)",
                "/tmp" in mounts and "emptyDir" in volumes.get(mounts["/tmp"]["name"], {}),
                f"mounts {sorted(mounts)}")
        # Labels and annotations.
        for obj, where in ((dep["metadata"], "Deployment"), (dep["spec"]["template"]["metadata"], "pod")):
            missing = [l for l in RECOMMENDED_LABELS + ["app.kubernetes.io/component"]
                       if l not in obj.get("labels", {})]
            c.check(f"{label}: {where} has the recommended labels", not missing, f"missing {missing}")
        selector = dep["spec"]["selector"]["matchLabels"]
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        c.check(f"{label}: selector matches pod labels",
                all(pod_labels.get(k) == v for k, v in selector.items()), f"{selector}")
        annotations = dep["spec"]["template"]["metadata"].get("annotations", {})
        c.check(f"{label}: checksum/config annotation", "checksum/config" in annotations,
                f"{sorted(annotations)}")
        if secrets:
            c.check(f"{label}: checksum/secret annotation", "checksum/secret" in annotations,
                    f"{sorted(annotations)}")
        anti = ((pod.get("affinity") or {}).get("podAntiAffinity") or {}).get(
            "preferredDuringSchedulingIgnoredDuringExecution") or []
        c.check(f"{label}: preferred pod anti-affinity by hostname on its selector labels",
                any(t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
                    and t["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector for t in anti),
                f"{pod.get('affinity')}")
        # Replicas, HPA, PDB.
        replicas = dep["spec"].get("replicas")
        hpa = [h for h in hpas if h["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]]
        if hpa:
            c.check(f"{label}: no replicas field with an HPA", replicas is None, f"replicas {replicas}")
            metric = hpa[0]["spec"]["metrics"][0]
            c.check(f"{label}: HPA autoscaling/v2 on CPU",
                    hpa[0]["apiVersion"] == "autoscaling/v2" and metric["resource"]["name"] == "cpu",
                    f"{hpa[0]['apiVersion']} {metric}")
        pdb = [p for p in pdbs if p["spec"]["selector"]["matchLabels"] == selector]
        if hpa or (replicas or 1) > 1:
            c.check(f"{label}: PDB minAvailable 1 (replicas > 1 or HPA)",
                    len(pdb) == 1 and pdb[0]["spec"].get("minAvailable") == 1
                    and pdb[0]["apiVersion"] == "policy/v1", f"{pdb}")
        else:
            c.check(f"{label}: no PDB with a single replica", not pdb, f"{pdb}")
        # SQLite.
        if comp == "receiver" and store_kind == "sqlite":
            c.check(f"{label}: sqlite: exactly 1 replica and no HPA", replicas == 1 and not hpa,
                    f"replicas {replicas} hpa {bool(hpa)}")
            c.check(f"{label}: sqlite: strategy Recreate",
                    dep["spec"].get("strategy", {}).get("type") == "Recreate", f"{dep['spec'].get('strategy')}")
            data_dir = posixpath.dirname(sqlite_path)
            data_mount = mounts.get(data_dir)
            c.check(f"{label}: sqlite: data volume mounted at {data_dir}",
                    posixpath.isabs(sqlite_path) and data_mount is not None
                    and not data_mount.get("readOnly", False), f"mounts {sorted(mounts)}")
            if data_mount:
                volume = volumes.get(data_mount["name"], {})
                claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
                if claim:
                    pvcs = [p["metadata"]["name"] for p in by_kind(docs, "PersistentVolumeClaim")]
                    c.check(f"{label}: sqlite: PVC {claim} rendered", claim in pvcs, f"PVCs {pvcs}")
                else:
                    c.check(f"{label}: sqlite: data volume is a PVC or emptyDir", "emptyDir" in volume, f"{volume}")
    if store_kind == "sqlite":
        c.check("sqlite: no consumer Deployment", not consumers, f"{len(consumers)} consumers")
    pipeline_mode = (config.get("pipeline") or {}).get("mode", "direct")
    if pipeline_mode == "kafka":
        c.check("pipeline.mode kafka has kafka.brokers",
                bool(str((config.get("kafka") or {}).get("brokers", "")).strip()), "no brokers")

    # --- Services -----------------------------------------------------------------------
    services = by_kind(docs, "Service")
    receiver_services = [s for s in services if component(s) == "receiver"]
    if c.check("one receiver Service", len(receiver_services) == 1, f"found {len(receiver_services)}"):
        svc = receiver_services[0]
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        c.check("Service ports grpc, http, metrics", set(ports) == {"grpc", "http", "metrics"}, f"{sorted(ports)}")
        c.check("Service port grpc has appProtocol grpc",
                ports.get("grpc", {}).get("appProtocol") == "grpc", f"{ports.get('grpc')}")
        c.check("Service ports are 11800/12800/1234 unless ports.* changed",
                [ports.get(n, {}).get("port") for n in ("grpc", "http", "metrics")] == [11800, 12800, 1234],
                f"{ {n: p.get('port') for n, p in ports.items()} }")
        page = svc["metadata"].get("annotations", {}).get("skysnap.io/page", "")
        c.check("Service points at the profiling page on its http port",
                page.startswith(f"http://{svc['metadata']['name']}.")
                and page.endswith(f":{ports.get('http', {}).get('port')}/"), f"{page!r}")
        if receivers:
            sel = svc["spec"]["selector"]
            pod_labels = receivers[0]["spec"]["template"]["metadata"]["labels"]
            c.check("Service selects the receiver pods only",
                    all(pod_labels.get(k) == v for k, v in sel.items())
                    and sel.get("app.kubernetes.io/component") == "receiver", f"{sel}")

    # --- ServiceMonitors --------------------------------------------------------------------
    for sm in by_kind(docs, "ServiceMonitor"):
        sel = sm["spec"]["selector"]["matchLabels"]
        matched = [s for s in services
                   if all(s["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
        ports = {p["name"] for s in matched for p in s["spec"]["ports"]}
        c.check(f"ServiceMonitor {sm['metadata']['name']}: apiVersion monitoring.coreos.com/v1",
                sm["apiVersion"] == "monitoring.coreos.com/v1", sm["apiVersion"])
        c.check(f"ServiceMonitor {sm['metadata']['name']}: selects a Service with its endpoint ports",
                len(matched) == 1 and all(e.get("port") in ports for e in sm["spec"]["endpoints"]),
                f"matched {[s['metadata']['name'] for s in matched]} ports {ports}")
    if consumers and by_kind(docs, "ServiceMonitor"):
        c.check("ServiceMonitors for receivers and consumers",
                {component(sm) for sm in by_kind(docs, "ServiceMonitor")} == {"receiver", "consumer"},
                "missing one")

    # --- Dashboard ------------------------------------------------------------------------
    for cm in by_kind(docs, "ConfigMap"):
        if "skysnap.json" in cm.get("data", {}):
            ok = True
            try:
                dash = json.loads(cm["data"]["skysnap.json"])
            except ValueError as e:
                ok, dash = False, {}
                c.check("dashboard ConfigMap holds valid JSON", False, str(e))
            if ok:
                c.check("dashboard ConfigMap holds valid JSON", True)
                c.check("dashboard ConfigMap label grafana_dashboard=\"1\"",
                        cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1",
                        f"{cm['metadata'].get('labels')}")
                c.check("dashboard has panels", len(dash.get("panels", [])) > 0, "none")

    check_upstream(c, config, deployments, secrets, values)

    # --- Every object: recommended labels ------------------------------------------------------
    missing = [f"{d['kind']}/{d['metadata']['name']}" for d in docs
               if any(l not in d["metadata"].get("labels", {}) for l in RECOMMENDED_LABELS)]
    c.check("every object has the recommended labels", not missing, f"{missing}")

    # --- The real binary loads the rendered config with the pod's environment ---------------
    if args.skysnap_bin:
        for dep in deployments:
            run_binary(c, args.skysnap_bin, dep, config_text, secrets)
    else:
        c.skip("skysnap loads the rendered config", "no skysnap binary (build one or set SKYSNAP_BIN)")
    return finish(c)


UPSTREAM_TLS_KEYS = ("tls_ca_path", "tls_cert_path", "tls_key_path")
UPSTREAM_CHART_KEYS = {"addresses", "tls", "tls_domain", *UPSTREAM_TLS_KEYS}
HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?):[0-9]{1,5}$")


def container_env(dep):
    return {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0].get("env", [])}


def secret_file_mounts(dep):
    """{mountPath: (secretName, item paths or None for the whole Secret, readOnly)}."""
    pod = dep["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    out = {}
    for m in pod["containers"][0].get("volumeMounts", []):
        secret = volumes.get(m["name"], {}).get("secret")
        if secret is not None:
            items = secret.get("items")
            out[m["mountPath"]] = (secret.get("secretName"), None if items is None else
                                   {i["path"]: i["key"] for i in items}, m.get("readOnly", False))
    return out


def check_upstream(c, config, deployments, secrets, values):
    """Forwarding to an upstream OAP (README "Two ways to deploy it")."""
    upstream = config.get("upstream") or {}
    addresses = upstream.get("addresses") or []
    receivers = [d for d in deployments if component(d) == "receiver"]
    consumers = [d for d in deployments if component(d) == "consumer"]
    c.check("upstream: no token in the ConfigMap", not upstream.get("token"), "upstream.token is set")
    if addresses:
        bad = [a for a in addresses if not isinstance(a, str) or not HOST_PORT.match(a)]
        c.check(f"upstream: {len(addresses)} addresses, each host:port without a scheme", not bad, f"{bad}")
        if upstream.get("tls"):
            c.check("upstream: tls true comes with tls_ca_path (the Secret's ca.crt)",
                    bool(upstream.get("tls_ca_path")), f"{upstream}")
        c.check("upstream: tls_cert_path and tls_key_path set together",
                bool(upstream.get("tls_cert_path")) == bool(upstream.get("tls_key_path")), f"{upstream}")
        for dep in receivers:
            label = f"receiver {dep['metadata']['name']}"
            mounts = secret_file_mounts(dep)
            for key in UPSTREAM_TLS_KEYS:
                path = upstream.get(key)
                if not path:
                    continue
                directory, base = posixpath.split(path)
                mount = mounts.get(directory)
                c.check(f"{label}: upstream.{key} {path} is on a read-only Secret volume",
                        mount is not None and mount[2] is True and (mount[1] is None or base in mount[1]),
                        f"secret mounts {mounts}")
    else:
        chart_keys = sorted(UPSTREAM_CHART_KEYS & set(upstream))
        c.check("upstream: no addresses, so no addresses/TLS keys in the ConfigMap", not chart_keys,
                f"{chart_keys}")
    for dep in deployments:
        label = f"{component(dep)} {dep['metadata']['name']}"
        env = container_env(dep).get("SKYSNAP_UPSTREAM_TOKEN")
        if component(dep) != "receiver" or not addresses:
            c.check(f"{label}: no SKYSNAP_UPSTREAM_TOKEN ({'no gRPC' if addresses else 'no forwarding'})",
                    env is None, f"{env}")
        elif env is not None:
            c.check(f"{label}: SKYSNAP_UPSTREAM_TOKEN from a Secret, not a literal",
                    "value" not in env and (env.get("valueFrom") or {}).get("secretKeyRef") is not None, f"{env}")
    for dep in consumers:
        label = f"consumer {dep['metadata']['name']}"
        c.check(f"{label}: no upstream TLS volume (no gRPC)",
                not any(p.startswith("/etc/skysnap-upstream-tls") for p in secret_file_mounts(dep)),
                f"{secret_file_mounts(dep)}")

    if values is None:
        return
    # What the values ask for.
    want = values.get("upstream") or {}
    auth = values.get("auth") or {}
    want_addresses = want.get("addresses") or []
    c.check(f"upstream: ConfigMap upstream.addresses = upstream.addresses {want_addresses}",
            addresses == want_addresses, f"rendered {addresses}")
    tuning = (values.get("config") or {}).get("upstream") or {}
    for key, value in tuning.items():
        c.check(f"upstream: config.upstream.{key} rendered", upstream.get(key) == value,
                f"{upstream.get(key)!r} != {value!r}")
    if not want_addresses:
        return
    tls = want.get("tls") or {}
    directory = "/etc/skysnap-upstream-tls"
    if tls.get("enabled"):
        client = bool(tls.get("clientCertificate"))
        expected = {"tls": True, "tls_ca_path": f"{directory}/ca.crt"}
        if client:
            expected.update(tls_cert_path=f"{directory}/tls.crt", tls_key_path=f"{directory}/tls.key")
        if tls.get("domain"):
            expected["tls_domain"] = tls["domain"]
        got = {k: upstream.get(k) for k in ("tls", "tls_domain", *UPSTREAM_TLS_KEYS) if upstream.get(k) is not None}
        c.check(f"upstream: ConfigMap TLS keys {sorted(expected)}", got == expected, f"rendered {got}")
        items = {"ca.crt": "ca.crt", **({"tls.crt": "tls.crt", "tls.key": "tls.key"} if client else {})}
        for dep in receivers:
            mount = secret_file_mounts(dep).get(directory)
            c.check(f"receiver {dep['metadata']['name']}: Secret {tls.get('secretName')} mounted read-only "
                    f"at {directory} with {sorted(items)}",
                    mount == (tls.get("secretName"), items, True), f"{mount}")
    else:
        c.check("upstream: no TLS keys in the ConfigMap (upstream.tls.enabled false)",
                not any(upstream.get(k) for k in ("tls", "tls_domain", *UPSTREAM_TLS_KEYS)), f"{upstream}")
    for dep in receivers:
        label = f"receiver {dep['metadata']['name']}"
        env = container_env(dep).get("SKYSNAP_UPSTREAM_TOKEN")
        ref = ((env or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        if auth.get("existingSecret"):
            key = (auth.get("existingSecretKeys") or {}).get("upstreamToken")
            c.check(f"{label}: SKYSNAP_UPSTREAM_TOKEN from key {key} of existing Secret "
                    f"{auth['existingSecret']} (optional)",
                    ref == {"name": auth["existingSecret"], "key": key, "optional": True}, f"{env}")
        elif want.get("token"):
            secret = secrets.get(ref.get("name"), {})
            data = secret.get("data", {})
            c.check(f"{label}: SKYSNAP_UPSTREAM_TOKEN from key upstream-token of the chart Secret, "
                    "holding upstream.token",
                    ref.get("key") == "upstream-token" and "optional" not in ref
                    and base64.b64decode(data.get("upstream-token", "")).decode() == want["token"],
                    f"env {env} secret keys {sorted(data)}")
        else:
            c.check(f"{label}: no SKYSNAP_UPSTREAM_TOKEN (the agents' own tokens pass through)",
                    env is None, f"{env}")


def run_binary(c, binary, dep, config_text, secrets):
    """`skysnap schema --config FILE` loads FILE and the environment exactly as serve and
    consume do (unknown keys and bad values fail), then prints DDL and exits."""
    ctr = dep["spec"]["template"]["spec"]["containers"][0]
    env = {"PATH": "/usr/bin:/bin"}
    for e in ctr.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
            continue
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if ref and ref["name"] in secrets:
            data = secrets[ref["name"]].get("data", {})
            if ref["key"] in data:
                env[e["name"]] = base64.b64decode(data[ref["key"]]).decode()
        elif ref:
            env[e["name"]] = "from-external-secret"  # a Secret made outside the chart
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "skysnap.yaml")
        with open(path, "w") as f:
            f.write(config_text)
        proc = subprocess.run([os.path.abspath(binary), "schema", "--config", path], env=env, cwd=tmp,
                              capture_output=True, text=True, timeout=60)
    c.check(f"{component(dep)} {dep['metadata']['name']}: skysnap accepts the rendered config "
            f"and env ({', '.join(sorted(k for k in env if k != 'PATH'))})",
            proc.returncode == 0, (proc.stderr or proc.stdout).strip()[-400:])


def finish(c):
    print(f"{c.name}: {c.passed} passed, {c.failed} failed", file=sys.stderr)
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
