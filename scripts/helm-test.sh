#!/usr/bin/env bash
# Tests the Helm chart helm/skysnap offline (no cluster needed), installing what it
# needs when it is missing:
#   * helm, built with `go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION` into
#     ${GOBIN:-$HOME/go/bin} (needs Go and the Go module proxy; ~5 min from scratch on
#     2 cores, seconds once built);
#   * a Python venv .venv-helm with kubernetes-validate (Kubernetes' OpenAPI schemas,
#     offline) and PyYAML.
# Then, for the default values and each helm/skysnap/ci/*-values.yaml:
#   helm lint --strict, helm template, kubernetes-validate --strict of every rendered
#   object against Kubernetes $K8S_VERSIONS, and tests/helm/check_rendered.py (grace
#   period, Service ports, config keys vs config/skysnap.yaml, env vars, probes, the
#   upstream OAP's config keys, token variable and TLS volume against the values, ...;
#   with a built skysnap binary also `skysnap schema --config <rendered>` with the pod's
#   environment), and NOTES.txt (agents' address; forwarding to upstream.addresses or
#   dropping the non-profiling data). Value combinations the chart must refuse (sqlite
#   with 2 replicas, upstream addresses in two places, ...) must make `helm template` fail.
# ServiceMonitor (a CRD) has no schema in kubernetes-validate: the tool warns and skips
# it; this script accepts that warning for ServiceMonitor only (any other kind without a
# schema, e.g. a wrong apiVersion, fails) and check_rendered.py checks its fields.
# Prints `N passed, M failed` last and exits 1 on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."

HELM_VERSION=${HELM_VERSION:-v3.22.0}
KUBERNETES_VALIDATE_VERSION=${KUBERNETES_VALIDATE_VERSION:-1.37.0}
PYYAML_VERSION=${PYYAML_VERSION:-6.0.4}
# The newest Kubernetes the tool knows and the oldest it has schemas for.
K8S_VERSIONS=${K8S_VERSIONS:-"1.37.0 1.25.0"}
CHART=helm/skysnap
VENV=.venv-helm
GOBIN_DIR=${GOBIN:-$HOME/go/bin}

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "PASS $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }
step() { echo; echo "== $*"; }

# --- tools --------------------------------------------------------------------------------
step "helm $HELM_VERSION"
HELM=""
for candidate in "$(command -v helm 2>/dev/null || true)" "$GOBIN_DIR/helm"; do
  if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" version --short 2>/dev/null | grep -q '^v3\.'; then
    HELM=$candidate
    break
  fi
done
if [ -z "$HELM" ]; then
  command -v go >/dev/null || { echo "helm is missing and so is Go (needed to build it)"; exit 1; }
  if ! go list -m -versions helm.sh/helm/v3 | tr ' ' '\n' | grep -qx "$HELM_VERSION"; then
    echo "helm.sh/helm/v3 $HELM_VERSION is not on the Go module proxy"; exit 1
  fi
  echo "building helm $HELM_VERSION with go install (a few minutes the first time)"
  started=$(date +%s)
  GOBIN=$GOBIN_DIR go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" || { echo "go install failed"; exit 1; }
  echo "go install helm took $(( $(date +%s) - started ))s"
  HELM=$GOBIN_DIR/helm
fi
echo "using $HELM: $("$HELM" version --short)"

step "Python venv $VENV (kubernetes-validate $KUBERNETES_VALIDATE_VERSION, PyYAML)"
if ! "$VENV/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null \
   || [ "$("$VENV/bin/kubernetes-validate" --version 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
  python3 -m venv "$VENV" || { echo "cannot create $VENV"; exit 1; }
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "PyYAML==$PYYAML_VERSION" || { echo "pip install failed"; exit 1; }
fi
echo "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version)"
PY=$VENV/bin/python

# A skysnap binary, when one is built, also loads every rendered configuration. Copied,
# because a concurrent cargo build may replace it.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
SKYSNAP_BIN=${SKYSNAP_BIN:-}
if [ -z "$SKYSNAP_BIN" ]; then
  for candidate in target/release/skysnap target/debug/skysnap; do
    [ -x "$candidate" ] && { SKYSNAP_BIN=$candidate; break; }
  done
fi
bin_args=()
if [ -n "$SKYSNAP_BIN" ] && cp "$SKYSNAP_BIN" "$work/skysnap" 2>/dev/null; then
  echo "skysnap binary for config loading: $SKYSNAP_BIN"
  bin_args=(--skysnap-bin "$work/skysnap")
else
  echo "no skysnap binary: the 'skysnap loads the rendered config' check is skipped"
fi

# NOTES.txt is not rendered by `helm template`: a copy of the chart carries it inside a
# ConfigMap so that it is rendered (and must not fail) for every value set.
notes_chart=$work/notes-chart/skysnap
mkdir -p "$(dirname "$notes_chart")" && cp -r "$CHART" "$notes_chart"
{
  printf '{{- define "skysnap.notesTest" }}'
  cat "$CHART/templates/NOTES.txt"
  printf '{{- end }}\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  NOTES.txt: {{ include "skysnap.notesTest" . | quote }}\n'
} >"$notes_chart/templates/notes-test.yaml"
rm "$notes_chart/templates/NOTES.txt"

# --- value sets -------------------------------------------------------------------------------
value_sets=("default")
for file in "$CHART"/ci/*-values.yaml; do
  value_sets+=("$file")
done

for set in "${value_sets[@]}"; do
  if [ "$set" = default ]; then name=default; values=(); else name=$(basename "$set" .yaml); values=(-f "$set"); fi
  # The chart's values.yaml, then the set's file: check_rendered.py merges them as Helm does.
  value_files=(--values "$CHART/values.yaml")
  [ "$set" = default ] || value_files+=(--values "$set")
  step "$name"
  rendered=$work/$name.yaml

  if out=$("$HELM" lint --strict "$CHART" "${values[@]}" 2>&1); then
    pass "$name: helm lint --strict"
  else
    fail "$name: helm lint --strict"; echo "$out"
  fi

  k8s_latest=${K8S_VERSIONS%% *}
  if "$HELM" template skysnap "$CHART" "${values[@]}" --namespace skysnap \
       --kube-version "$k8s_latest" >"$rendered" 2>"$work/err"; then
    pass "$name: helm template ($(grep -c '^kind:' "$rendered") objects)"
  else
    fail "$name: helm template"; cat "$work/err"; continue
  fi

  for version in $K8S_VERSIONS; do
    out=$("$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "$rendered" 2>&1)
    rc=$?
    unexpected=$(echo "$out" | grep -E '^(ERROR|FATAL)|^WARN' | grep -v 'kind ServiceMonitor' || true)
    skipped=$(echo "$out" | grep -c 'kind ServiceMonitor' || true)
    if [ $rc -eq 0 ] && [ -z "$unexpected" ]; then
      pass "$name: kubernetes-validate --strict -k $version (ServiceMonitor skipped: $skipped)"
    else
      fail "$name: kubernetes-validate --strict -k $version"; echo "$out"
    fi
  done

  if "$HELM" template skysnap "$notes_chart" "${values[@]}" --namespace skysnap \
       --show-only templates/notes-test.yaml 2>"$work/err" >"$work/notes"
     grep -q 'collector.backend_service=skysnap.skysnap.svc:' "$work/notes" \
       && grep -q 'then open http://127.0.0.1:' "$work/notes"; then
    pass "$name: NOTES.txt renders, with the agents' address and the page's port-forward"
  else
    fail "$name: NOTES.txt renders"; cat "$work/err"
  fi
  # Forwarding: "forwarded to <upstream.addresses>", or the non-profiling data is dropped.
  expected=$("$PY" - "${value_files[@]}" <<'EOF_PY'
import sys, yaml
addresses = []
for path in sys.argv[2::2]:
    with open(path) as f:
        addresses = ((yaml.safe_load(f) or {}).get("upstream") or {}).get("addresses", addresses) or []
print(f"forwarded to {', '.join(addresses)}" if addresses else "is accepted and dropped")
EOF_PY
)
  if tr '\n' ' ' <"$work/notes" | sed 's/\\n/ /g' | grep -qF "$expected"; then
    pass "$name: NOTES.txt: non-profiling data \"$expected\""
  else
    fail "$name: NOTES.txt: non-profiling data \"$expected\""; cat "$work/notes"
  fi

  "$PY" tests/helm/check_rendered.py "$rendered" --name "$name" \
    --reference config/skysnap.yaml "${value_files[@]}" "${bin_args[@]}" >"$work/check.out" 2>&1
  cat "$work/check.out"
  passed=$((passed + $(grep -c '^PASS ' "$work/check.out")))
  failed=$((failed + $(grep -c '^FAIL ' "$work/check.out")))
  if ! grep -qE '^(PASS|FAIL) ' "$work/check.out"; then
    fail "$name: check_rendered.py produced no checks"
  fi
done

# --- combinations the chart must refuse ----------------------------------------------------------
step "expected failures"
expect_failure() {
  local what=$1 pattern=$2
  shift 2
  if "$HELM" template skysnap "$CHART" "$@" >/dev/null 2>"$work/err"; then
    fail "$what: helm template succeeded but must fail"
  elif grep -qiE "$pattern" "$work/err"; then
    pass "$what: helm template fails ($(grep -oiE "$pattern" "$work/err" | head -1))"
  else
    fail "$what: helm template failed for another reason"; cat "$work/err"
  fi
}
expect_failure "sqlite + receiver.replicaCount 2" "sqlite needs receiver.replicaCount 1" \
  --set receiver.replicaCount=2
expect_failure "sqlite (ci values) + receiver.replicaCount 2" "sqlite needs receiver.replicaCount 1" \
  -f "$CHART/ci/sqlite-values.yaml" --set receiver.replicaCount=2
expect_failure "sqlite + HPA" "sqlite cannot be used with receiver.autoscaling" \
  --set receiver.autoscaling.enabled=true
expect_failure "sqlite + consumer" "consumer.enabled needs config.store.kind clickhouse" \
  --set consumer.enabled=true
expect_failure "pipeline.mode kafka without brokers" "pipeline.mode kafka needs config.kafka.brokers" \
  --set config.store.kind=clickhouse --set config.pipeline.mode=kafka
expect_failure "HPA without a CPU request" "needs receiver.resources.requests.cpu" \
  -f "$CHART/ci/clickhouse-kafka-values.yaml" --set receiver.autoscaling.enabled=true \
  --set receiver.resources.requests.cpu=null
expect_failure "extraEnv SKYSNAP_SHUTDOWN_GRACE_MS (bypasses the grace period)" "set it through the chart's values" \
  --set 'extraEnv[0].name=SKYSNAP_SHUTDOWN_GRACE_MS' --set-string 'extraEnv[0].value=60000'
expect_failure "unknown config key (schema)" "additional properties? 'bogus' not allowed|bogus" \
  --set config.grpc.bogus=1
expect_failure "config.grpc.addr (from ports, schema)" "additional properties? 'addr' not allowed|addr" \
  --set config.grpc.addr=0.0.0.0:1
expect_failure "tokens in config.auth (schema)" "additional properties? 'auth' not allowed|auth" \
  --set config.auth.agent_token=x
expect_failure "unknown top-level value (schema)" "additional properties? 'replicas' not allowed|replicas" \
  --set replicas=3
expect_failure "clickhouse.cluster not a plain name (schema)" "does not match|pattern" \
  --set config.clickhouse.cluster='a b'
expect_failure "clickhouse.url with a server that is no URL (schema)" "does not match|pattern" \
  --set 'config.clickhouse.url=http://a:8123\,b:8123'
expect_failure "bad store.kind (schema)" "sqlite|clickhouse|enum|value must be one of" \
  --set config.store.kind=postgres
upstream_values=$CHART/ci/upstream-values.yaml
expect_failure "upstream addresses in upstream and config.upstream" "set twice, in upstream.addresses and config.upstream.addresses" \
  -f "$upstream_values" --set 'config.upstream.addresses[0]=oap:11800'
expect_failure "config.upstream.addresses alone" "config.upstream.addresses: set the top-level value upstream.addresses" \
  --set 'config.upstream.addresses[0]=oap:11800'
expect_failure "upstream.tls.enabled without secretName" "upstream.tls.enabled needs upstream.tls.secretName" \
  -f "$upstream_values" --set upstream.tls.secretName=
expect_failure "upstream TLS settings with tls.enabled false" "upstream.tls.enabled is false" \
  -f "$upstream_values" --set upstream.tls.enabled=false
expect_failure "upstream.token with auth.existingSecret" "set either auth.existingSecret or the tokens" \
  --set 'upstream.addresses[0]=oap:11800' --set upstream.token=x --set auth.existingSecret=tokens
expect_failure "extraEnv SKYSNAP_UPSTREAM_TOKEN (bypasses the Secret)" "set it through the chart's values" \
  -f "$upstream_values" --set 'extraEnv[0].name=SKYSNAP_UPSTREAM_TOKEN' --set-string 'extraEnv[0].value=x'
expect_failure "upstream address with a scheme (schema)" "does not match|pattern" \
  --set 'upstream.addresses[0]=http://oap:11800'
expect_failure "upstream address without a port (schema)" "does not match|pattern" \
  --set 'upstream.addresses[0]=oap'
expect_failure "config.upstream.token (schema)" "additional properties? 'token' not allowed|token" \
  --set config.upstream.token=x
expect_failure "config.upstream.tls_ca_path (schema)" "additional properties? 'tls_ca_path' not allowed|tls_ca_path" \
  --set config.upstream.tls_ca_path=/ca.crt
expect_failure "unknown upstream value (schema)" "additional properties? 'caFile' not allowed|caFile" \
  --set upstream.tls.caFile=x

# --- package ----------------------------------------------------------------------------------------
step "helm package"
if "$HELM" package "$CHART" -d "$work" >/dev/null 2>"$work/err" \
   && listing=$(tar -tzf "$work"/skysnap-*.tgz) \
   && grep -qx 'skysnap/dashboards/skysnap.json' <<<"$listing" \
   && grep -qx 'skysnap/values.schema.json' <<<"$listing"; then
  pass "helm package (with dashboards/skysnap.json and values.schema.json)"
else
  fail "helm package"; cat "$work/err"
fi

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
