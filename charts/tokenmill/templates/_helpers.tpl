{{/* The release's full name, at most 63 characters. */}}
{{- define "tokenmill.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tokenmill.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "tokenmill.labels" -}}
{{ include "tokenmill.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tokenmill
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "tokenmill.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tokenmill.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tokenmill.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The operator's permissions: exactly the API calls it makes (rbac/operator-clusterrole.yaml,
checked by the tests against every call the operator makes). The argument is the peering
resource: clusterkopfpeerings cluster-wide, kopfpeerings in a namespace.
*/}}
{{- define "tokenmill.rules" -}}
- apiGroups: ["tokenmill.dev"]
  resources: ["corpusfilters", "syntheticdatajobs", "trainingstages", "ptsjobs"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["tokenmill.dev"]
  resources: ["corpusfilters/status", "syntheticdatajobs/status", "trainingstages/status", "ptsjobs/status"]
  verbs: ["patch"]
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["kopf.dev"]
  resources: [{{ . | quote }}]
  verbs: ["get", "list", "watch", "patch"]
{{- end -}}
