{{/* The chart name, overridable. */}}
{{- define "streamgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name of the release's objects. */}}
{{- define "streamgate.fullname" -}}
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

{{- define "streamgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "streamgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "streamgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "streamgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "streamgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "streamgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Names the operator is told about, so RBAC can be scoped to them. */}}
{{- define "streamgate.webhookService" -}}
{{- printf "%s-webhook" (include "streamgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "streamgate.webhookConfiguration" -}}
{{- printf "%s-sidecar-injector" (include "streamgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "streamgate.webhookSecret" -}}
{{- printf "%s-webhook-tls" (include "streamgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "streamgate.redis" -}}
{{- printf "%s-redis" (include "streamgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The store URL handed to the sidecars when no Secret is used. */}}
{{- define "streamgate.storeUrl" -}}
{{- if .Values.sidecar.store.url }}
{{- .Values.sidecar.store.url }}
{{- else if .Values.redis.enabled }}
{{- printf "redis://%s.%s.svc:6379" (include "streamgate.redis" .) .Release.Namespace }}
{{- else }}
{{- "memory" }}
{{- end }}
{{- end }}

{{/* Restricted-compliant container security context. */}}
{{- define "streamgate.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The live-session API's APIService name (fixed: group and version). */}}
{{- define "streamgate.apiService" -}}
v1alpha1.live.streamgate.dev
{{- end }}
