{{/*
Names and labels: one home for every name the templates use.
*/}}

{{/* The release's object names: <release>-dotsvlm-operator, or the release name when it already says so. */}}
{{- define "dotsvlm-operator.fullname" -}}
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

{{/*
Selector labels. `app.kubernetes.io/name: dotsvlm-operator` is fixed (not nameOverride): the
NetworkPolicy the operator puts beside every DotsVLMDeployment lets only pods with this label reach
the Ray dashboard (operator/dotsvlm_operator/naming.py, OPERATOR_POD_LABELS).
*/}}
{{- define "dotsvlm-operator.selectorLabels" -}}
app.kubernetes.io/name: dotsvlm-operator
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end -}}

{{/*
The version label: the image tag as a label value. A tag pinned with its digest (0.1.0@sha256:...) keeps the
part before the "@"; characters a label value cannot hold become "_", and it is cut to 63 characters that start
and end with a letter or digit (before, such a tag, or a long one cut at a "." or "-", was no label value and
`helm install` failed on every object).
*/}}
{{- define "dotsvlm-operator.versionLabel" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag | splitList "@" | first | default .Chart.AppVersion -}}
{{- regexReplaceAll "^[-_.]+|[-_.]+$" (regexReplaceAll "[^-A-Za-z0-9_.]" $tag "_" | trunc 63) "" -}}
{{- end -}}

{{- define "dotsvlm-operator.labels" -}}
{{ include "dotsvlm-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ include "dotsvlm-operator.versionLabel" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dotsvlm
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 }}
{{- end -}}

{{/*
The chart's labels with a user's map over them (dict "root" $ "extra" .Values.<x>.labels), each key written once
(a key written twice is a duplicate YAML key, which kubectl and `helm install` refuse).
*/}}
{{- define "dotsvlm-operator.labelsWith" -}}
{{- toYaml (mustMergeOverwrite (include "dotsvlm-operator.labels" .root | fromYaml) (.extra | default dict)) -}}
{{- end -}}

{{/*
The operator pod's labels: podLabels over the chart's labels, the selector labels over both (the Deployment's
selector must match its pods, and every DotsVLMDeployment's NetworkPolicy admits the operator by its name label).
*/}}
{{- define "dotsvlm-operator.podLabels" -}}
{{- $labels := mustMergeOverwrite (include "dotsvlm-operator.labels" . | fromYaml) (.Values.podLabels | default dict) -}}
{{- toYaml (mustMergeOverwrite $labels (include "dotsvlm-operator.selectorLabels" . | fromYaml)) -}}
{{- end -}}

{{- define "dotsvlm-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dotsvlm-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: set the name of an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* "true" when several replicas must share the work through kopf peering. */}}
{{- define "dotsvlm-operator.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicaCount) 1) -}}true{{- end -}}
{{- end -}}

{{- define "dotsvlm-operator.peeringName" -}}
{{- default (include "dotsvlm-operator.fullname" .) .Values.peering.name -}}
{{- end -}}

{{/* "true" when the operator watches only .Values.watchNamespaces (Roles instead of ClusterRoles). */}}
{{- define "dotsvlm-operator.namespaced" -}}
{{- if .Values.watchNamespaces -}}true{{- end -}}
{{- end -}}

{{/*
The rules for the objects the operator reads and writes inside a watched namespace. Verbs: kopf
watches (list, watch); the operator reads (get), server-side applies (patch; create when absent) and
deletes/re-creates children; it never updates with PUT. Pods are only read; events only created.
*/}}
{{- define "dotsvlm-operator.namespacedRules" -}}
- apiGroups: [dotsvlm.io]
  resources: [dotsvlmdeployments]
  verbs: [get, list, watch, patch]
- apiGroups: [dotsvlm.io]
  resources: [dotsvlmdeployments/status]
  verbs: [patch]
# The children's ownerReferences set blockOwnerDeletion (foreground deletion waits for them); where the
# OwnerReferencesPermissionEnforcement admission plugin runs (OpenShift), that needs update on finalizers.
- apiGroups: [dotsvlm.io]
  resources: [dotsvlmdeployments/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [services, configmaps, secrets]
  verbs: [get, list, watch, create, patch, delete]
# patch: the pod-deletion-cost annotation, so a shrinking pool removes an empty pod first.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, patch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [monitoring.coreos.com]
  resources: [podmonitors, prometheusrules]
  verbs: [get, list, watch, create, patch, delete]
{{- end -}}

{{/* kopf's peering objects: it watches them and patches its own heartbeat into their status. */}}
{{- define "dotsvlm-operator.peeringVerbs" -}}
[get, list, watch, patch]
{{- end -}}


{{/* A Prometheus duration (values.schema.json: e.g. 30s, 1m30s, 500ms) in milliseconds. */}}
{{- define "dotsvlm-operator.durationMs" -}}
{{- $total := 0 -}}
{{- range regexFindAll "[0-9]+(ms|s|m|h)" (toString .) -1 -}}
{{- $n := regexFind "^[0-9]+" . -}}
{{- $unit := trimPrefix $n . -}}
{{- $total = add $total (mul (int64 $n) (get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit)) -}}
{{- end -}}
{{- $total -}}
{{- end -}}
