{{/* Names, labels and derived values shared by the templates. */}}

{{- define "meter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "meter.fullname" -}}
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

{{- define "meter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: proxy
{{- end }}

{{- define "meter.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "meter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "meter.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "meter.secretName" -}}
{{- .Values.secret.existingSecret | default (include "meter.fullname" .) }}
{{- end }}

{{- define "meter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- .Values.serviceAccount.name | default (include "meter.fullname" .) }}
{{- else }}
{{- .Values.serviceAccount.name | default "default" }}
{{- end }}
{{- end }}

{{/* A Deployment, or a StatefulSet when each replica's journal gets its own PersistentVolumeClaim. */}}
{{- define "meter.workloadKind" -}}
{{- if .Values.journal.persistence.enabled }}StatefulSet{{ else }}Deployment{{ end }}
{{- end }}

{{/* preStop sleep + meter's SIGTERM grace for in-flight requests + the journal flush after it. */}}
{{- define "meter.terminationGracePeriodSeconds" -}}
{{- add (int .Values.lifecycle.preStopSeconds) (int .Values.meter.shutdownGrace) (int .Values.lifecycle.drainSeconds) }}
{{- end }}

{{- define "meter.journalDir" -}}/var/lib/meter/journal{{- end }}
{{- define "meter.credentialsDir" -}}/etc/meter/credentials{{- end }}
