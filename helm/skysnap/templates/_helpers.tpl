{{/*
Chart name, truncated to the 63 characters of a DNS label.
*/}}
{{- define "skysnap.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. If the release name contains the chart name it is used as is.
*/}}
{{- define "skysnap.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "skysnap.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Recommended labels shared by every object; components add app.kubernetes.io/component.
*/}}
{{- define "skysnap.labels" -}}
helm.sh/chart: {{ include "skysnap.chart" . }}
{{ include "skysnap.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: skysnap
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "skysnap.selectorLabels" -}}
app.kubernetes.io/name: {{ include "skysnap.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "receiver") */}}
{{- define "skysnap.componentSelectorLabels" -}}
{{ include "skysnap.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "skysnap.componentLabels" -}}
{{ include "skysnap.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "skysnap.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "skysnap.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "skysnap.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "skysnap.configMapName" -}}
{{- printf "%s-config" (include "skysnap.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "skysnap.secretName" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else }}
{{- printf "%s-auth" (include "skysnap.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Whether a token Secret is referenced at all (chart-created or existing). */}}
{{- define "skysnap.hasSecret" -}}
{{- if or .Values.auth.existingSecret (include "skysnap.chartSecret" .) }}true{{ end }}
{{- end }}

{{/* Whether the chart creates the token Secret (some token set, no existingSecret). */}}
{{- define "skysnap.chartSecret" -}}
{{- if and (not .Values.auth.existingSecret) (or .Values.auth.agentToken .Values.auth.adminToken (include "skysnap.upstreamToken" .)) }}true{{ end }}
{{- end }}

{{/* Whether the receivers forward to an upstream OAP (upstream.addresses set). */}}
{{- define "skysnap.upstreamEnabled" -}}
{{- if .Values.upstream.addresses }}true{{ end }}
{{- end }}

{{/* upstream.token when it is used: forwarding on, token set (not with existingSecret). */}}
{{- define "skysnap.upstreamToken" -}}
{{- if and (include "skysnap.upstreamEnabled" .) (not .Values.auth.existingSecret) }}{{ .Values.upstream.token }}{{ end }}
{{- end }}

{{/* Whether the receivers speak TLS to the upstream (and mount upstream.tls.secretName). */}}
{{- define "skysnap.upstreamTls" -}}
{{- if and (include "skysnap.upstreamEnabled" .) .Values.upstream.tls.enabled }}true{{ end }}
{{- end }}

{{/* Where upstream.tls.secretName is mounted in the receiver. */}}
{{- define "skysnap.upstreamTlsDir" -}}
/etc/skysnap-upstream-tls
{{- end }}

{{- define "skysnap.storeKind" -}}
{{- dig "store" "kind" "sqlite" .Values.config }}
{{- end }}

{{- define "skysnap.pipelineMode" -}}
{{- dig "pipeline" "mode" "direct" .Values.config }}
{{- end }}

{{- define "skysnap.kafkaBrokers" -}}
{{- dig "kafka" "brokers" "" .Values.config | toString | trim }}
{{- end }}

{{/* shutdown.grace_ms as an integer (skysnap's default when unset). */}}
{{- define "skysnap.shutdownGraceMs" -}}
{{- dig "shutdown" "grace_ms" 20000 .Values.config | int64 }}
{{- end }}

{{/*
terminationGracePeriodSeconds = ceil(shutdown.grace_ms / 1000) + 10: skysnap exits on
its own within grace_ms after SIGTERM; the 10 s margin covers the preStop sleep and the
process exit, so the kubelet never SIGKILLs a pod that is still flushing batches.
*/}}
{{- define "skysnap.terminationGracePeriodSeconds" -}}
{{- $ms := include "skysnap.shutdownGraceMs" . | int64 }}
{{- add (div (add $ms 999) 1000) 10 }}
{{- end }}

{{/* Directory of sqlite.path, mounted from the PVC (or an emptyDir). */}}
{{- define "skysnap.sqliteDir" -}}
{{- dir (dig "sqlite" "path" "/var/lib/skysnap/data/skysnap.db" .Values.config) }}
{{- end }}

{{/*
skysnap's configuration file: the `config` values with the listen addresses taken from
`ports` (so that container ports, Service and probes always agree) and, when
upstream.addresses is set, upstream.addresses / tls / tls_*_path / tls_domain from the
`upstream` values. Tokens never go here: they come from the Secret as SKYSNAP_AUTH_* and
SKYSNAP_UPSTREAM_TOKEN environment variables.
*/}}
{{- define "skysnap.configYaml" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $grpc := get $config "grpc" | default dict }}
{{- $_ := set $grpc "addr" (printf "0.0.0.0:%d" (int .Values.ports.grpc)) }}
{{- $_ := set $config "grpc" $grpc }}
{{- $http := get $config "http" | default dict }}
{{- $_ := set $http "addr" (printf "0.0.0.0:%d" (int .Values.ports.http)) }}
{{- $_ := set $config "http" $http }}
{{- $metrics := get $config "metrics" | default dict }}
{{- $_ := set $metrics "addr" (printf "0.0.0.0:%d" (int .Values.ports.metrics)) }}
{{- $_ := set $config "metrics" $metrics }}
{{- if include "skysnap.upstreamEnabled" . }}
{{- $upstream := get $config "upstream" | default dict }}
{{- $_ := set $upstream "addresses" .Values.upstream.addresses }}
{{- if include "skysnap.upstreamTls" . }}
{{- $dir := include "skysnap.upstreamTlsDir" . }}
{{- $_ := set $upstream "tls" true }}
{{- $_ := set $upstream "tls_ca_path" (printf "%s/ca.crt" $dir) }}
{{- if .Values.upstream.tls.clientCertificate }}
{{- $_ := set $upstream "tls_cert_path" (printf "%s/tls.crt" $dir) }}
{{- $_ := set $upstream "tls_key_path" (printf "%s/tls.key" $dir) }}
{{- end }}
{{- with .Values.upstream.tls.domain }}
{{- $_ := set $upstream "tls_domain" . }}
{{- end }}
{{- end }}
{{- $_ := set $config "upstream" $upstream }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
Refuses value combinations that cannot work; included by every workload template.
*/}}
{{- define "skysnap.validate" -}}
{{- $kind := include "skysnap.storeKind" . }}
{{- $mode := include "skysnap.pipelineMode" . }}
{{- $brokers := include "skysnap.kafkaBrokers" . }}
{{- if eq $kind "sqlite" }}
{{- if gt (int .Values.receiver.replicaCount) 1 }}
{{- fail (printf "store.kind sqlite needs receiver.replicaCount 1 (got %d): one SQLite file cannot be shared by several pods. Use config.store.kind clickhouse to scale out." (int .Values.receiver.replicaCount)) }}
{{- end }}
{{- if .Values.receiver.autoscaling.enabled }}
{{- fail "store.kind sqlite cannot be used with receiver.autoscaling.enabled: one SQLite file cannot be shared by several pods. Use config.store.kind clickhouse to scale out." }}
{{- end }}
{{- if .Values.consumer.enabled }}
{{- fail "consumer.enabled needs config.store.kind clickhouse: the consumer pod cannot share the receiver's SQLite file." }}
{{- end }}
{{- end }}
{{- if and (eq $mode "kafka") (not $brokers) }}
{{- fail "config.pipeline.mode kafka needs config.kafka.brokers." }}
{{- end }}
{{- if and .Values.consumer.enabled (not $brokers) }}
{{- fail "consumer.enabled needs config.kafka.brokers (skysnap consume reads the Kafka topic)." }}
{{- end }}
{{- if and .Values.receiver.autoscaling.enabled (not (dig "requests" "cpu" "" (.Values.receiver.resources | default dict))) }}
{{- fail "receiver.autoscaling.enabled needs receiver.resources.requests.cpu (the HPA scales on CPU utilization of the request)." }}
{{- end }}
{{- if and .Values.receiver.autoscaling.enabled (gt (int .Values.receiver.autoscaling.minReplicas) (int .Values.receiver.autoscaling.maxReplicas)) }}
{{- fail "receiver.autoscaling.minReplicas must not exceed receiver.autoscaling.maxReplicas." }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if has .name (list "SKYSNAP_SHUTDOWN_GRACE_MS" "SKYSNAP_GRPC_ADDR" "SKYSNAP_HTTP_ADDR" "SKYSNAP_METRICS_ADDR" "SKYSNAP_AUTH_AGENT_TOKEN" "SKYSNAP_AUTH_ADMIN_TOKEN" "SKYSNAP_LOG" "SKYSNAP_CONFIG" "SKYSNAP_UPSTREAM_ADDRESSES" "SKYSNAP_UPSTREAM_TOKEN" "SKYSNAP_UPSTREAM_TLS" "SKYSNAP_UPSTREAM_TLS_CA_PATH" "SKYSNAP_UPSTREAM_TLS_CERT_PATH" "SKYSNAP_UPSTREAM_TLS_KEY_PATH" "SKYSNAP_UPSTREAM_TLS_DOMAIN") }}
{{- fail (printf "extraEnv %s: set it through the chart's values instead (config.shutdown.grace_ms, ports, auth, upstream, logLevel), which the probes, Service, grace period, Secret, TLS volume and NOTES follow." .name) }}
{{- end }}
{{- end }}
{{- if and .Values.auth.existingSecret (or .Values.auth.agentToken .Values.auth.adminToken .Values.upstream.token) }}
{{- fail "set either auth.existingSecret or the tokens auth.agentToken / auth.adminToken / upstream.token, not both (with auth.existingSecret the upstream token is read from its key auth.existingSecretKeys.upstreamToken)." }}
{{- end }}
{{- $configUpstream := dig "upstream" dict (.Values.config | default dict) }}
{{- if dig "addresses" list $configUpstream }}
{{- if .Values.upstream.addresses }}
{{- fail "the upstream OAP addresses are set twice, in upstream.addresses and config.upstream.addresses: keep upstream.addresses only (the chart renders it into the config, with the TLS files, the token Secret and NOTES)." }}
{{- else }}
{{- fail "config.upstream.addresses: set the top-level value upstream.addresses instead (the chart renders it into the config, with the TLS files, the token Secret and NOTES)." }}
{{- end }}
{{- end }}
{{- if and .Values.upstream.tls.enabled (not .Values.upstream.tls.secretName) }}
{{- fail (printf "upstream.tls.enabled needs upstream.tls.secretName: an existing Secret with ca.crt (and tls.crt / tls.key for upstream.tls.clientCertificate), mounted at %s." (include "skysnap.upstreamTlsDir" .)) }}
{{- end }}
{{- if and (not .Values.upstream.tls.enabled) (or .Values.upstream.tls.secretName .Values.upstream.tls.clientCertificate .Values.upstream.tls.domain) }}
{{- fail "upstream.tls.secretName / clientCertificate / domain are set but upstream.tls.enabled is false: the receivers would speak plain gRPC to the OAP. Set upstream.tls.enabled true, or clear them." }}
{{- end }}
{{- end }}

{{/*
Environment of both workloads. Kubernetes' service links are switched off in the pod
spec: they would inject SKYSNAP_SERVICE_HOST, SKYSNAP_PORT_11800_TCP, ... for any
Service named skysnap*, and skysnap refuses unknown SKYSNAP_* variables at start-up.
*/}}
{{- define "skysnap.env" -}}
- name: SKYSNAP_LOG
  value: {{ .Values.logLevel | quote }}
{{- if .Values.auth.existingSecret }}
- name: SKYSNAP_AUTH_AGENT_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "skysnap.secretName" . }}
      key: {{ .Values.auth.existingSecretKeys.agentToken }}
      optional: true
- name: SKYSNAP_AUTH_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "skysnap.secretName" . }}
      key: {{ .Values.auth.existingSecretKeys.adminToken }}
      optional: true
{{- else }}
{{- if .Values.auth.agentToken }}
- name: SKYSNAP_AUTH_AGENT_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "skysnap.secretName" . }}
      key: agent-token
{{- end }}
{{- if .Values.auth.adminToken }}
- name: SKYSNAP_AUTH_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "skysnap.secretName" . }}
      key: admin-token
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The receiver's upstream token (only the receiver serves gRPC and forwards): from the
chart's Secret, or from auth.existingSecret's key (optional: a missing key passes the
agents' own tokens). Nothing when upstream.addresses is empty.
*/}}
{{- define "skysnap.upstreamEnv" -}}
{{- if include "skysnap.upstreamEnabled" . }}
{{- if .Values.auth.existingSecret }}
- name: SKYSNAP_UPSTREAM_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "skysnap.secretName" . }}
      key: {{ .Values.auth.existingSecretKeys.upstreamToken }}
      optional: true
{{- else if .Values.upstream.token }}
- name: SKYSNAP_UPSTREAM_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "skysnap.secretName" . }}
      key: upstream-token
{{- end }}
{{- end }}
{{- end }}

{{/* Pod-level checksum annotations: a config or token change rolls the pods. */}}
{{- define "skysnap.checksums" -}}
checksum/config: {{ include "skysnap.configYaml" . | sha256sum }}
{{- if include "skysnap.chartSecret" . }}
checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{/* Soft anti-affinity: spread a component's pods over nodes. */}}
{{- define "skysnap.affinity" -}}
{{- $ctx := .ctx }}
{{- if $ctx.Values.affinity }}
{{- toYaml $ctx.Values.affinity }}
{{- else if eq $ctx.Values.podAntiAffinity "preferred" }}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "skysnap.componentSelectorLabels" . | nindent 12 }}
{{- end }}
{{- end }}
