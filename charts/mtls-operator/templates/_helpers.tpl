{{- define "mtls-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mtls-operator.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "mtls-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mtls-operator.serviceAccountName" -}}
{{- default (include "mtls-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- /* The watched namespaces as a JSON list: watchNamespaces plus the older watchNamespace, without
duplicates, in the order given. Empty: all namespaces. Use with `include ... | fromJsonArray`. */ -}}
{{- define "mtls-operator.watchNamespaces" -}}
{{- $namespaces := list -}}
{{- range .Values.watchNamespaces -}}
{{- $namespaces = append $namespaces . -}}
{{- end -}}
{{- with .Values.watchNamespace -}}
{{- $namespaces = append $namespaces . -}}
{{- end -}}
{{- $namespaces | uniq | toJson -}}
{{- end -}}

{{- /* The operator's RBAC rules: the base rules, plus the Pod rules for Annotate and the egress proxy
rules, each only when its feature is enabled. */ -}}
{{- define "mtls-operator.rules" -}}
{{- .Files.Get "files/operator-rules.yaml" }}
{{- if .Values.restart.annotate.enabled }}
{{ .Files.Get "files/annotate-rules.yaml" }}
{{- end }}
{{- if .Values.egress.enabled }}
{{ .Files.Get "files/egress-rules.yaml" }}
{{- end }}
{{- end -}}
