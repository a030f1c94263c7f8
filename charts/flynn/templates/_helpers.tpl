{{/*
The mesh (mirrors flynn_runtime/topology.py; tests/helm cross-check it): process name -> console
script, whether it keeps state, and the gRPC services whose health it reports.
*/}}
{{- define "flynn.components" -}}
config:
  script: flynn-config
  stateful: true
  grpcServices: [flynn.v1.ConfigService, flynn.v1.Principals]
queue:
  script: flynn-queue
  stateful: true
  grpcServices: [flynn.v1.RunControl]
reactions:
  script: flynn-reactions
  stateful: true
  grpcServices: [flynn.v1.Reactions]
nodes:
  script: flynn-nodes
  stateful: true
  grpcServices: [flynn.v1.Nodes, flynn.v1.Canvas]
voice:
  script: flynn-voice
  stateful: false
  grpcServices: [flynn.v1.Voice]
gateway:
  script: flynn-gateway
  stateful: false
  grpcServices: [flynn.v1.Gateway, flynn.v1.System]
{{- end }}

{{/* Backends every service may call (flynn_runtime/settings.py BACKENDS): FLYNN_<NAME>_ADDR. */}}
{{- define "flynn.backends" -}}
[config, queue, reactions, nodes, voice]
{{- end }}

{{/*
Whether a component is deployed: "true" or "false". Args: root, name. queue, reactions, nodes and voice
may be left out (`<name>.enabled: false`); config and the gateway always run.
*/}}
{{- define "flynn.enabled" -}}
{{- $v := index .root.Values .name }}
{{- if and (kindIs "map" $v) (hasKey $v "enabled") }}{{ ternary "true" "false" (eq $v.enabled true) }}{{ else }}true{{ end }}
{{- end }}

{{- define "flynn.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flynn.fullname" -}}
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

{{/* Name of a component's resources: <fullname>-<component> (room left for "-headless"). */}}
{{- define "flynn.componentName" -}}
{{- printf "%s-%s" (include "flynn.fullname" .root | trunc 44 | trimSuffix "-") .name }}
{{- end }}

{{- define "flynn.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flynn.labels" -}}
helm.sh/chart: {{ include "flynn.chart" . }}
app.kubernetes.io/name: {{ include "flynn.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flynn
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "flynn.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flynn.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "flynn.componentLabels" -}}
{{ include "flynn.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "flynn.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "flynn.voiceImage" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- $repo := default (printf "%s-voice" .Values.image.repository) .Values.image.voiceRepository }}
{{- if .Values.image.voiceDigest }}
{{- printf "%s@%s" $repo .Values.image.voiceDigest }}
{{- else }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}
{{- end }}

{{- define "flynn.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "flynn.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* In-cluster address of a component: host:port of its ClusterIP Service; with a database, the
stateful ones as dns:///<headless>:port, every ready replica, calls spread by gRPC round_robin. */}}
{{- define "flynn.address" -}}
{{- $v := index .root.Values .name }}
{{- $stateful := has .name (list "config" "queue" "reactions" "nodes") }}
{{- if and $stateful (include "flynn.databaseEnabled" .root) }}
{{- printf "dns:///%s-headless.%s.svc.%s:%d" (include "flynn.componentName" .) .root.Release.Namespace .root.Values.clusterDomain (int $v.grpcPort) }}
{{- else }}
{{- printf "%s.%s.svc.%s:%d" (include "flynn.componentName" .) .root.Release.Namespace .root.Values.clusterDomain (int $v.grpcPort) }}
{{- end }}
{{- end }}

{{/* The gateway's System.GetMetrics scrapes each backend's metrics port: FLYNN_METRICS_ADDRS. */}}
{{- define "flynn.metricsAddrs" -}}
{{- $root := . }}
{{- $out := list }}
{{- range $backend := (include "flynn.backends" $root | fromYamlArray) }}
{{- $v := index $root.Values $backend }}
{{- if eq (include "flynn.enabled" (dict "root" $root "name" $backend)) "true" }}
{{- $out = append $out (printf "%s=%s.%s.svc.%s:%d" $backend (include "flynn.componentName" (dict "root" $root "name" $backend)) $root.Release.Namespace $root.Values.clusterDomain (int $v.metricsPort)) }}
{{- end }}
{{- end }}
{{- join "," $out }}
{{- end }}

{{- define "flynn.tokensSecretName" -}}
{{- default (printf "%s-tokens" (include "flynn.fullname" .)) .Values.auth.existingTokensSecret }}
{{- end }}

{{- define "flynn.credentialsSecretName" -}}
{{- printf "%s-credentials" (include "flynn.fullname" .) }}
{{- end }}

{{- define "flynn.serviceTokenSecretName" -}}
{{- default (include "flynn.credentialsSecretName" .) .Values.auth.existingServiceTokenSecret }}
{{- end }}

{{/* Key of a service's own credential in the service-token Secret (dict root name). */}}
{{- define "flynn.serviceTokenSecretKey" -}}
{{- if .root.Values.auth.existingServiceTokenSecret }}{{ .name }}{{ else }}service-{{ .name }}-token{{ end }}
{{- end }}

{{/* Key of the agent credential (run control shows it to external agents; it grants nothing). */}}
{{- define "flynn.agentTokenSecretKey" -}}
{{- if .Values.auth.existingServiceTokenSecret }}agent{{ else }}agent-token{{ end }}
{{- end }}

{{/* The services whose credentials the chart generates (every gRPC component). */}}
{{- define "flynn.serviceNames" -}}
[config, queue, reactions, nodes, voice, gateway]
{{- end }}

{{/* "true" when the stateful services keep their state in PostgreSQL (database.url or database.urlKey). */}}
{{- define "flynn.databaseEnabled" -}}
{{- if or .Values.database.url .Values.database.urlKey }}true{{ end }}
{{- end }}

{{/* terminationGracePeriodSeconds: stop hook, server.stop and close are each bounded by the grace. */}}
{{- define "flynn.terminationGrace" -}}
{{- add (mul 3 (int .graceSeconds)) 5 }}
{{- end }}

{{- define "flynn.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "flynn.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Pod template of one component. Args: root (the chart context), name (component), comp (its entry in
flynn.components).
*/}}
{{- define "flynn.podTemplate" -}}
{{- $root := .root }}
{{- $v := index $root.Values .name -}}
metadata:
  labels:
    {{- include "flynn.componentLabels" . | nindent 4 }}
  annotations:
    kubectl.kubernetes.io/default-container: {{ .name }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "flynn.serviceAccountName" $root }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ include "flynn.terminationGrace" $v }}
  securityContext:
    {{- include "flynn.podSecurityContext" $root | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .name }}
      image: {{ include (ternary "flynn.voiceImage" "flynn.image" (eq .name "voice")) $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      args: [{{ .comp.script | quote }}]
      env:
        - name: FLYNN_LISTEN
          value: "0.0.0.0:{{ $v.grpcPort }}"
        - name: FLYNN_METRICS_LISTEN
          value: "0.0.0.0:{{ $v.metricsPort }}"
        - name: FLYNN_DATA_DIR
          value: /data
        - name: FLYNN_GRACE_SECONDS
          value: {{ $v.graceSeconds | quote }}
        - name: FLYNN_LOG_LEVEL
          value: {{ $v.logLevel | quote }}
        - name: FLYNN_INSTANCE_ID
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: FLYNN_TOKENS_FILE
          value: /etc/flynn/tokens/tokens.yaml
        - name: FLYNN_SERVICE_TOKEN_FILE
          value: /etc/flynn/service-token/token
        {{- with $root.Values.trustedProxies }}
        - name: FLYNN_TRUSTED_PROXIES
          value: {{ join "," . | quote }}
        {{- end }}
        {{- range $backend := (include "flynn.backends" $root | fromYamlArray) }}
        {{- $backendCtx := dict "root" $root "name" $backend }}
        - name: FLYNN_{{ upper $backend }}_ADDR
          {{- /* Empty: not deployed (flynn_runtime/settings.py Settings.deployed). */}}
          value: {{ ternary (include "flynn.address" $backendCtx) "" (eq (include "flynn.enabled" $backendCtx) "true") | quote }}
        {{- end }}
        {{- if and .comp.stateful (include "flynn.databaseEnabled" $root) }}
        # Replicas forward to each other (a node's stream, a session's owner) at the pod IP.
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: FLYNN_ADVERTISE_ADDRESS
          value: "$(POD_IP):{{ $v.grpcPort }}"
        {{- if $root.Values.database.url }}
        - name: FLYNN_DATABASE_URL
          value: {{ $root.Values.database.url | quote }}
        {{- else }}
        - name: FLYNN_DATABASE_URL
          valueFrom:
            secretKeyRef:
              name: {{ $root.Values.database.existingSecret | quote }}
              key: {{ $root.Values.database.urlKey | quote }}
        {{- end }}
        {{- if $root.Values.database.existingSecret }}
        - name: FLYNN_DATABASE_PASSWORD_FILE
          value: /etc/flynn/database/password
        {{- end }}
        {{- end }}
        {{- if eq .name "config" }}
        - name: FLYNN_SEED_FILE
          value: /etc/flynn/seed/config.yaml
        {{- end }}
        {{- if eq .name "queue" }}
        - name: FLYNN_AGENT_TOKEN_FILE
          value: /etc/flynn/service-token/agent
        - name: FLYNN_MAX_SESSIONS_PER_PRINCIPAL
          value: {{ $v.maxSessionsPerPrincipal | default 10000 | quote }}
        {{- end }}
        {{- if and (eq .name "gateway") $v.proxyProtocolPort }}
        # TCP load balancers that send the PROXY protocol connect here (believed from trustedProxies).
        - name: FLYNN_PROXY_PROTOCOL_LISTEN
          value: "0.0.0.0:{{ $v.proxyProtocolPort }}"
        {{- end }}
        {{- if eq .name "gateway" }}
        - name: FLYNN_METRICS_ADDRS
          value: {{ include "flynn.metricsAddrs" $root | quote }}
        - name: FLYNN_REFLECTION_REQUIRES_TOKEN
          value: {{ $root.Values.gateway.reflectionRequiresToken | quote }}
        {{- end }}
        {{- with $root.Values.gateway.limits }}
        {{- if eq $.name "gateway" }}
        - name: FLYNN_MAX_STREAMS_PER_CONNECTION
          value: {{ .streamsPerConnection | quote }}
        {{- end }}
        - name: FLYNN_MAX_TOTAL_CALLS
          value: {{ .totalCalls | quote }}
        - name: FLYNN_MAX_PUBLIC_STREAMS
          value: {{ .publicStreams | quote }}
        - name: FLYNN_MAX_AUDIO_SECONDS
          value: {{ .audioSeconds | quote }}
        {{- end }}
        {{- $gwTls := include "flynn.gatewayTlsSecret" $root }}
        {{- $meshTls := include "flynn.meshTlsSecret" $root }}
        {{- if and (eq .name "gateway") $gwTls }}
        - name: FLYNN_TLS_CERT_FILE
          value: /etc/flynn/tls/tls.crt
        - name: FLYNN_TLS_KEY_FILE
          value: /etc/flynn/tls/tls.key
        {{- end }}
        {{- if $meshTls }}
        - name: FLYNN_TLS_CA_FILE
          value: /etc/flynn/mesh-tls/ca.crt
        {{- if eq .name "gateway" }}
        - name: FLYNN_TLS_CLIENT_CERT_FILE
          value: /etc/flynn/mesh-tls/tls.crt
        - name: FLYNN_TLS_CLIENT_KEY_FILE
          value: /etc/flynn/mesh-tls/tls.key
        {{- else }}
        - name: FLYNN_TLS_CERT_FILE
          value: /etc/flynn/mesh-tls/tls.crt
        - name: FLYNN_TLS_KEY_FILE
          value: /etc/flynn/mesh-tls/tls.key
        {{- end }}
        {{- end }}
        {{- $tls := include "flynn.servesTls" . }}
        {{- if $tls }}
        - name: FLYNN_LOCAL_LISTEN
          value: "127.0.0.1:{{ include "flynn.localPort" $v }}"
        {{- end }}
        {{- include "flynn.tracingEnv" (dict "root" $root "name" .name) | nindent 8 }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ $v.grpcPort }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $v.metricsPort }}
          protocol: TCP
        {{- if and (eq .name "gateway") $v.proxyProtocolPort }}
        - name: grpc-proxy
          containerPort: {{ $v.proxyProtocolPort }}
          protocol: TCP
        {{- end }}
      {{- /* The kubelet's gRPC probe speaks no TLS: a TLS process is probed from inside the pod, on
      its loopback-only plaintext port. */}}
      {{- $probe := "" }}
      {{- if $tls }}
      {{- $probe = printf "exec:\n  command: [flynn-healthcheck, --timeout, \"4\", %s]" (printf "127.0.0.1:%s/%s" (include "flynn.localPort" $v) (first .comp.grpcServices) | quote) }}
      {{- else }}
      {{- $probe = printf "grpc:\n  port: %d\n  service: %s" (int $v.grpcPort) (first .comp.grpcServices | quote) }}
      {{- end }}
      startupProbe:
        {{- $probe | nindent 8 }}
        periodSeconds: {{ $root.Values.probes.startup.periodSeconds }}
        failureThreshold: {{ $root.Values.probes.startup.failureThreshold }}
        {{- if $tls }}
        timeoutSeconds: 5
        {{- end }}
      readinessProbe:
        {{- $probe | nindent 8 }}
        periodSeconds: {{ $root.Values.probes.readiness.periodSeconds }}
        failureThreshold: {{ $root.Values.probes.readiness.failureThreshold }}
        {{- if $tls }}
        timeoutSeconds: 5
        {{- end }}
      livenessProbe:
        {{- $probe | nindent 8 }}
        periodSeconds: {{ $root.Values.probes.liveness.periodSeconds }}
        failureThreshold: {{ $root.Values.probes.liveness.failureThreshold }}
        timeoutSeconds: {{ $root.Values.probes.liveness.timeoutSeconds }}
      resources:
        {{- toYaml $v.resources | nindent 8 }}
      securityContext:
        {{- include "flynn.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: /data
        - name: tmp
          mountPath: /tmp
        - name: tokens
          mountPath: /etc/flynn/tokens
          readOnly: true
        - name: service-token
          mountPath: /etc/flynn/service-token
          readOnly: true
        {{- if eq .name "config" }}
        - name: seed
          mountPath: /etc/flynn/seed
          readOnly: true
        {{- end }}
        {{- if and .comp.stateful (include "flynn.databaseEnabled" $root) $root.Values.database.existingSecret }}
        - name: database
          mountPath: /etc/flynn/database
          readOnly: true
        {{- end }}
        {{- if and (eq .name "gateway") $gwTls }}
        # A Secret volume, not subPath: renewals appear in place and the gateway re-reads them.
        - name: tls
          mountPath: /etc/flynn/tls
          readOnly: true
        {{- end }}
        {{- if $meshTls }}
        - name: mesh-tls
          mountPath: /etc/flynn/mesh-tls
          readOnly: true
        {{- end }}
  volumes:
    {{- if not .comp.stateful }}
    - name: data
      emptyDir:
        sizeLimit: {{ $v.dataSizeLimit }}
    {{- else if include "flynn.databaseEnabled" $root }}
    # State is in PostgreSQL: /data only holds the audit log, so no PersistentVolumeClaim.
    - name: data
      emptyDir:
        sizeLimit: {{ $root.Values.database.scratchSizeLimit }}
    {{- end }}
    {{- if and .comp.stateful (include "flynn.databaseEnabled" $root) $root.Values.database.existingSecret }}
    - name: database
      secret:
        secretName: {{ $root.Values.database.existingSecret | quote }}
        defaultMode: 0440
        items:
          - key: {{ $root.Values.database.passwordKey | quote }}
            path: password
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 256Mi
    - name: tokens
      secret:
        secretName: {{ include "flynn.tokensSecretName" $root }}
        defaultMode: 0440
        items:
          - key: tokens.yaml
            path: tokens.yaml
    - name: service-token
      secret:
        secretName: {{ include "flynn.serviceTokenSecretName" $root }}
        defaultMode: 0440
        items:
          - key: {{ include "flynn.serviceTokenSecretKey" (dict "root" $root "name" .name) }}
            path: token
          {{- if eq .name "queue" }}
          - key: {{ include "flynn.agentTokenSecretKey" $root }}
            path: agent
          {{- end }}
    {{- if and (eq .name "gateway") $gwTls }}
    - name: tls
      secret:
        secretName: {{ $gwTls }}
        defaultMode: 0440
        items:
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
    {{- end }}
    {{- if $meshTls }}
    - name: mesh-tls
      secret:
        secretName: {{ $meshTls }}
        defaultMode: 0440
        items:
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
          - key: ca.crt
            path: ca.crt
    {{- end }}
    {{- if eq .name "config" }}
    - name: seed
      configMap:
        name: {{ include "flynn.componentName" (dict "root" $root "name" "config") }}-seed
        items:
          - key: config.yaml
            path: config.yaml
    {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $v.affinity }}
  affinity:
    {{- toYaml $v.affinity | nindent 4 }}
  {{- else if not .comp.stateful }}
  # Replicas prefer different nodes, so that the PodDisruptionBudget protects something.
  affinity:
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels:
                {{- include "flynn.selectorLabels" . | nindent 16 }}
  {{- end }}
{{- end }}

{{/*
OpenTelemetry environment of one component (values.tracing); nothing when tracing is off.
Args: root, name.
*/}}
{{- define "flynn.tracingEnv" -}}
{{- $t := .root.Values.tracing -}}
{{- if $t.enabled }}
{{- if not $t.otlpEndpoint }}
{{- fail "tracing.enabled needs tracing.otlpEndpoint (the collector's OTLP/gRPC address)" }}
{{- end }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $t.otlpEndpoint | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $t.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $t.samplerArg | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "flynn-%s" .name | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "service.namespace=%s,service.instance.id=$(FLYNN_INSTANCE_ID)%s" .root.Release.Namespace (ternary (printf ",%s" $t.resourceAttributes) "" (ne $t.resourceAttributes "")) | quote }}
{{- if $t.captureContent }}
- name: OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT
  value: "true"
{{- end }}
{{- end }}
{{- end }}

{{/* --- TLS (SECURITY.md "TLS and certificate rotation") ------------------------------------ */}}

{{/* Secret with the gateway's serving certificate (tls.crt, tls.key), or "" when the gateway is plaintext. */}}
{{- define "flynn.gatewayTlsSecret" -}}
{{- if .Values.gateway.tls.existingSecret }}
{{- .Values.gateway.tls.existingSecret }}
{{- else if .Values.gateway.tls.certManager.enabled }}
{{- printf "%s-tls" (include "flynn.componentName" (dict "root" . "name" "gateway")) }}
{{- end }}
{{- end }}

{{/* Secret with the mesh certificate (tls.crt, tls.key, ca.crt), or "" without mutual TLS. */}}
{{- define "flynn.meshTlsSecret" -}}
{{- if .Values.meshTls.enabled }}
{{- if .Values.meshTls.existingSecret }}
{{- .Values.meshTls.existingSecret }}
{{- else if .Values.meshTls.certManager.enabled }}
{{- printf "%s-mesh-tls" (include "flynn.fullname" .) }}
{{- else }}
{{- fail "meshTls.enabled needs meshTls.existingSecret or meshTls.certManager.enabled" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Refuses a gateway reachable from outside the cluster without TLS, unless allowPlaintext. */}}
{{- define "flynn.checkGatewayTls" -}}
{{- $gw := .Values.gateway }}
{{- $external := ne $gw.service.type "ClusterIP" }}
{{- $plainIngress := and $gw.ingress.enabled (not $gw.ingress.tlsSecretName) }}
{{- if and (or $external $plainIngress) (not (include "flynn.gatewayTlsSecret" .)) (not $gw.allowPlaintext) }}
{{- fail (printf "the gateway is reachable from outside (%s) without TLS: set gateway.tls.existingSecret or gateway.tls.certManager.enabled (or gateway.ingress.tlsSecretName), or gateway.allowPlaintext: true to accept tokens in the clear" (ternary (printf "service.type %s" $gw.service.type) "an Ingress without tlsSecretName" $external)) }}
{{- end }}
{{- end }}

{{/* In-cluster DNS names of a component's Service. */}}
{{- define "flynn.dnsNames" -}}
{{- $name := include "flynn.componentName" . }}
{{- $ns := .root.Release.Namespace }}
- {{ $name }}
- {{ printf "%s.%s" $name $ns }}
- {{ printf "%s.%s.svc" $name $ns }}
- {{ printf "%s.%s.svc.%s" $name $ns .root.Values.clusterDomain }}
{{- end }}

{{/* The loopback-only plaintext port a TLS process also serves, for its exec probes. */}}
{{- define "flynn.localPort" -}}
{{- add (int .grpcPort) 10000 }}
{{- end }}

{{/* Whether component .name serves TLS on its gRPC port ("true" or ""). */}}
{{- define "flynn.servesTls" -}}
{{- if eq .name "gateway" }}
{{- if include "flynn.gatewayTlsSecret" .root }}true{{ end }}
{{- else if include "flynn.meshTlsSecret" .root }}true{{ end }}
{{- end }}
