{{/*
The mesh (mirrors flynn_runtime/topology.py; tests/helm cross-check it): process name -> console
script, whether it keeps state, and the gRPC services whose health it reports.
*/}}
{{- define "flynn.components" -}}
config:
  script: flynn-config
  stateful: true
  grpcServices: [flynn.v1.ConfigService]
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
{{- $out = append $out (printf "%s=%s.%s.svc.%s:%d" $backend (include "flynn.componentName" (dict "root" $root "name" $backend)) $root.Release.Namespace $root.Values.clusterDomain (int $v.metricsPort)) }}
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

{{- define "flynn.serviceTokenSecretKey" -}}
{{- if .Values.auth.existingServiceTokenSecret }}token{{ else }}service-token{{ end }}
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
      image: {{ include "flynn.image" $root }}
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
        {{- range $backend := (include "flynn.backends" $root | fromYamlArray) }}
        - name: FLYNN_{{ upper $backend }}_ADDR
          value: {{ include "flynn.address" (dict "root" $root "name" $backend) | quote }}
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
        {{- if eq .name "gateway" }}
        - name: FLYNN_METRICS_ADDRS
          value: {{ include "flynn.metricsAddrs" $root | quote }}
        {{- end }}
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
      startupProbe:
        grpc:
          port: {{ $v.grpcPort }}
          service: {{ first .comp.grpcServices | quote }}
        periodSeconds: {{ $root.Values.probes.startup.periodSeconds }}
        failureThreshold: {{ $root.Values.probes.startup.failureThreshold }}
      readinessProbe:
        grpc:
          port: {{ $v.grpcPort }}
          service: {{ first .comp.grpcServices | quote }}
        periodSeconds: {{ $root.Values.probes.readiness.periodSeconds }}
        failureThreshold: {{ $root.Values.probes.readiness.failureThreshold }}
      livenessProbe:
        grpc:
          port: {{ $v.grpcPort }}
          service: {{ first .comp.grpcServices | quote }}
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
          - key: {{ include "flynn.serviceTokenSecretKey" $root }}
            path: token
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
