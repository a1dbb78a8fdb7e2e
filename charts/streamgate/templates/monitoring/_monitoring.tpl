{{/*
Whether to render a monitoring.coreos.com/v1 object of `kind` that `key` enables:
"true" when its CRD is served; "" when it is not (or the object is disabled); a failure naming the
missing CRD when monitoring.requireCRDs is set.
Usage: include "streamgate.monitoring.render" (dict "ctx" $ "kind" "ServiceMonitor" "key" "serviceMonitor")
*/}}
{{- define "streamgate.monitoring.render" -}}
{{- $ctx := .ctx }}
{{- $values := index $ctx.Values.monitoring .key }}
{{- if $values.enabled }}
{{- if $ctx.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" .kind) }}
{{- "true" }}
{{- else if $ctx.Values.monitoring.requireCRDs }}
{{- fail (printf "monitoring.%s.enabled is true but the cluster has no %s CRD (monitoring.coreos.com/v1): install the Prometheus Operator (e.g. kube-prometheus-stack) first, or with `helm template` pass --api-versions monitoring.coreos.com/v1/%s, or set monitoring.requireCRDs=false to leave it out" .key .kind .kind) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels of every monitoring object: the chart's, plus the user's additionalLabels. */}}
{{- define "streamgate.monitoring.labels" -}}
{{ include "streamgate.labels" .ctx }}
app.kubernetes.io/component: monitoring
{{- with .additional }}
{{ toYaml . }}
{{- end }}
{{- end }}
