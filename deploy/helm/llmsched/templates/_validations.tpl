{{/* Checks across values that the JSON schema cannot express; included by deployment.yaml. */}}
{{- define "llmsched.validate" -}}
{{- if not .Values.config.existingConfigMap -}}
{{- $known := concat (list "default-plugins.yaml" "reference-default.yaml") (keys .Values.config.files) -}}
{{- if not (has .Values.config.pluginsConfigFile $known) -}}
{{- fail (printf "config.pluginsConfigFile %q is not in the chart's ConfigMap (%s): add it under config.files" .Values.config.pluginsConfigFile (join ", " (sortAlpha $known))) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.inferencePool.create (eq .Values.discovery.mode "pool") (empty .Values.inferencePool.modelServers.matchLabels) -}}
{{- fail "inferencePool.modelServers.matchLabels is required when inferencePool.create is true" -}}
{{- end -}}
{{- if and (eq .Values.discovery.mode "endpointSelector") (not .Values.discovery.endpointSelector) -}}
{{- fail "discovery.endpointSelector is required when discovery.mode is endpointSelector" -}}
{{- end -}}
{{- $ports := dict -}}
{{- $_ := set $ports (toString .Values.ports.grpc) "ports.grpc" -}}
{{- range $name, $port := dict "ports.health" .Values.ports.health "ports.metrics" .Values.ports.metrics -}}
{{- if hasKey $ports (toString $port) -}}
{{- fail (printf "%s and %s are both %v" (get $ports (toString $port)) $name $port) -}}
{{- end -}}
{{- $_ := set $ports (toString $port) $name -}}
{{- end -}}
{{- $extra := dict -}}
{{- if eq .Values.mode "proxy" -}}{{- $_ := set $extra "proxy.port" .Values.proxy.port -}}{{- end -}}
{{- if eq .Values.mode "standalone" -}}
{{- $_ := set $extra "envoy.port" .Values.envoy.port -}}
{{- $_ := set $extra "envoy.adminPort" .Values.envoy.adminPort -}}
{{- end -}}
{{- range $name, $port := $extra -}}
{{- if hasKey $ports (toString $port) -}}
{{- fail (printf "%s and %s are both %v" (get $ports (toString $port)) $name $port) -}}
{{- end -}}
{{- $_ := set $ports (toString $port) $name -}}
{{- end -}}
{{- end -}}
