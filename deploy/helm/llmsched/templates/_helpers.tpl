{{/* Chart name. */}}
{{- define "llmsched.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: <release>-llmsched, or the release name when it already says llmsched. */}}
{{- define "llmsched.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "llmsched.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llmsched.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmsched.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llmsched.labels" -}}
helm.sh/chart: {{ include "llmsched.chart" . }}
{{ include "llmsched.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: endpoint-picker
{{- end -}}

{{- define "llmsched.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "llmsched.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "llmsched.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The InferencePool's name and namespace, and so the namespace discovery watches. */}}
{{- define "llmsched.poolName" -}}
{{- default .Release.Name .Values.discovery.pool.name -}}
{{- end -}}

{{- define "llmsched.poolNamespace" -}}
{{- if eq .Values.discovery.mode "pool" -}}
{{- default .Release.Namespace .Values.discovery.pool.namespace -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* Leader election: on with more than one replica, as the inferencepool chart. */}}
{{- define "llmsched.leaderElection" -}}
{{- if and (gt (int .Values.replicas) 1) (ne .Values.ha.mode "active-active") -}}true{{- end -}}
{{- end -}}

{{/* Several replicas, all active, sharing state (ha.mode active-active). */}}
{{- define "llmsched.activeActive" -}}
{{- if and (gt (int .Values.replicas) 1) (eq .Values.ha.mode "active-active") -}}true{{- end -}}
{{- end -}}

{{/* A cluster-wide unique name for cluster-scoped objects. */}}
{{- define "llmsched.clusterName" -}}
{{- printf "%s-%s" (include "llmsched.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Does the EPP serve ext_proc over TLS? (flags.secure-serving, default true) */}}
{{- define "llmsched.eppTls" -}}
{{- if hasKey .Values.flags "secure-serving" -}}
{{- if eq (toString (index .Values.flags "secure-serving")) "false" -}}false{{- else -}}true{{- end -}}
{{- else -}}true{{- end -}}
{{- end -}}

{{/* The EPP container's arguments, in the inferencepool chart's order. */}}
{{- define "llmsched.eppArgs" -}}
{{- if eq .Values.discovery.mode "pool" }}
- --pool-name
- {{ include "llmsched.poolName" . | quote }}
- --pool-namespace
- {{ include "llmsched.poolNamespace" . | quote }}
- --pool-group
- {{ .Values.discovery.pool.group | quote }}
{{- else }}
- --endpoint-selector
- {{ required "discovery.endpointSelector is required when discovery.mode is endpointSelector" .Values.discovery.endpointSelector | quote }}
- --endpoint-target-ports
- {{ join "," .Values.discovery.endpointTargetPorts | quote }}
{{- end }}
- --zap-encoder
- "json"
- --config-file
- {{ printf "/config/%s" .Values.config.pluginsConfigFile | quote }}
{{- if include "llmsched.leaderElection" . }}
- --ha-enable-leader-election
{{- end }}
{{- if include "llmsched.activeActive" . }}
- --ha-mode=active-active
- --ha-port
- {{ .Values.ha.port | quote }}
{{- end }}
- --grpc-port
- {{ .Values.ports.grpc | quote }}
- --grpc-health-port
- {{ .Values.ports.health | quote }}
- --metrics-port
- {{ .Values.ports.metrics | quote }}
{{- if eq .Values.mode "proxy" }}
- --proxy-port
- {{ .Values.proxy.port | quote }}
{{- end }}
{{- range $key, $value := .Values.flags }}
{{- /* YAML numbers arrive as float64: print whole numbers as integers, never 1e+08. */}}
{{- $v := $value }}
{{- if and (kindIs "float64" $value) (eq (float64 $value) (floor $value)) }}{{ $v = int64 $value }}{{ end }}
- {{ printf "--%s=%v" $key $v | quote }}
{{- end }}
- --tracing=false
{{- if not .Values.metrics.auth.enabled }}
- --metrics-endpoint-auth=false
{{- end }}
{{- end -}}

{{/* The init container's `llmsched envoy-config` arguments (mode standalone). */}}
{{- define "llmsched.envoyConfigArgs" -}}
- --mode
- epp
- --listen-address
- "0.0.0.0"
- --listen-port
- {{ .Values.envoy.port | quote }}
- --admin
- {{ printf "127.0.0.1:%v" .Values.envoy.adminPort | quote }}
- --epp
{{- if include "llmsched.activeActive" . }}
- {{ printf "%s-epp.%s.svc:%v" (include "llmsched.fullname" .) .Release.Namespace .Values.ports.grpc | quote }}
{{- else }}
- {{ printf "127.0.0.1:%v" .Values.ports.grpc | quote }}
{{- end }}
- --epp-health-port
- {{ .Values.ports.health | quote }}
- {{ printf "--epp-tls=%s" (include "llmsched.eppTls" .) | quote }}
- --health-check-interval
- {{ .Values.envoy.healthCheckInterval | quote }}
{{- if .Values.envoy.accessLog }}
- --access-log
{{- end }}
{{- if .Values.envoy.failureModeAllow }}
- --failure-mode-allow
{{- end }}
{{- range .Values.envoy.extraArgs }}
- {{ . | quote }}
{{- end }}
- --output
- /etc/envoy/envoy.yaml
{{- end -}}
