{{/* Names and labels shared by every object. */}}
{{- define "gpufleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gpufleet.fullname" -}}
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

{{- define "gpufleet.agent.fullname" -}}{{ include "gpufleet.fullname" . | trunc 57 | trimSuffix "-" }}-agent{{- end -}}
{{- define "gpufleet.collector.fullname" -}}{{ include "gpufleet.fullname" . | trunc 53 | trimSuffix "-" }}-collector{{- end -}}
{{- define "gpufleet.secret" -}}{{ include "gpufleet.fullname" . | trunc 55 | trimSuffix "-" }}-secrets{{- end -}}

{{- define "gpufleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpufleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gpufleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "gpufleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gpufleet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "gpufleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "gpufleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "gpufleet.image" -}}
{{- $img := index . 0 -}}{{- $root := index . 1 -}}
{{- printf "%s:%s" $img.repository (default $root.Chart.AppVersion $img.tag) -}}
{{- end -}}

{{/* The collector's in-cluster URL, or the one given. Empty when agents do not push. */}}
{{- define "gpufleet.collectorUrl" -}}
{{- if .Values.agent.collectorUrl -}}
{{- .Values.agent.collectorUrl -}}
{{- else if .Values.collector.enabled -}}
{{- printf "%s://%s.%s.svc:%d" (ternary "https" "http" (not (empty .Values.collector.tls.existingSecret))) (include "gpufleet.collector.fullname" .) .Release.Namespace (int .Values.collector.port) -}}
{{- end -}}
{{- end -}}

{{/* Where runbook links point, for the collector and the PrometheusRule alike: the value given, else the
collector's own /runbooks under slack.publicUrl, else at its Service. Empty without a collector. */}}
{{- /* Where people reach the collector: slack.publicUrl, else its in-cluster Service URL (Slack's links and
silence commands name it; a pod's own address would be no use to anyone). */ -}}
{{- define "gpufleet.publicUrl" -}}
{{- if .Values.slack.publicUrl -}}
{{- .Values.slack.publicUrl | trimSuffix "/" -}}
{{- else if .Values.collector.enabled -}}
{{- printf "%s://%s.%s.svc:%d" (ternary "https" "http" (not (empty .Values.collector.tls.existingSecret))) (include "gpufleet.collector.fullname" .) .Release.Namespace (int .Values.collector.port) -}}
{{- end -}}
{{- end -}}

{{- define "gpufleet.runbookBaseUrl" -}}
{{- if .Values.collector.runbookBaseUrl -}}
{{- .Values.collector.runbookBaseUrl | trimSuffix "/" -}}
{{- else if .Values.collector.enabled -}}
{{- printf "%s/runbooks" (include "gpufleet.publicUrl" .) -}}
{{- end -}}
{{- end -}}

{{/* True (non-empty) when the store is SQLite: no database URL and no Secret holding one. */}}
{{- define "gpufleet.sqlite" -}}
{{- if and (not .Values.database.existingSecret) (or (not .Values.database.url) (hasPrefix "sqlite" .Values.database.url)) -}}true{{- end -}}
{{- end -}}

{{/* Where the write tokens live: the user's Secret or the chart's. */}}
{{- define "gpufleet.authSecret" -}}
{{- default (include "gpufleet.secret" .) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "gpufleet.slackSecret" -}}
{{- default (include "gpufleet.secret" .) .Values.slack.existingSecret -}}
{{- end -}}

{{- define "gpufleet.grafanaSecret" -}}
{{- default (include "gpufleet.secret" .) .Values.grafana.existingSecret -}}
{{- end -}}

{{- define "gpufleet.dbSecret" -}}
{{- default (include "gpufleet.secret" .) .Values.database.existingSecret -}}
{{- end -}}

{{/* Settings that contradict each other fail the render with the fix in the message. */}}
{{- define "gpufleet.validate" -}}
{{- if and .Values.collector.enabled (gt (int .Values.collector.replicas) 1) (include "gpufleet.sqlite" .) -}}
{{- fail "collector.replicas > 1 needs PostgreSQL: SQLite is one file that one collector owns. Set database.url (postgresql+psycopg://...) or database.existingSecret, or collector.replicas=1." -}}
{{- end -}}
{{- if and .Values.slack.channel (not (or .Values.slack.token .Values.slack.existingSecret)) -}}
{{- fail "slack.channel is set but there is no bot token: set slack.token or slack.existingSecret." -}}
{{- end -}}
{{- if and (or .Values.slack.token .Values.slack.existingSecret) (not .Values.slack.channel) -}}
{{- fail "a Slack bot token is set but slack.channel is empty: set slack.channel to the channel ID (C0123...)." -}}
{{- end -}}
{{- if and (or .Values.grafana.token .Values.grafana.existingSecret) (not .Values.grafana.url) -}}
{{- fail "a Grafana token is set but grafana.url is empty: set grafana.url (https://grafana.example.com)." -}}
{{- end -}}
{{- if and .Values.serviceMonitor.enabled .Values.podMonitor.enabled -}}
{{- fail "serviceMonitor.enabled and podMonitor.enabled would scrape every agent twice: enable one of them." -}}
{{- end -}}
{{- if and .Values.serviceMonitor.enabled (not .Values.agent.service.enabled) -}}
{{- fail "serviceMonitor.enabled selects the agents' Service: set agent.service.enabled=true, or use podMonitor.enabled." -}}
{{- end -}}
{{- if and .Values.prometheusRule.enabled (not (include "gpufleet.runbookBaseUrl" .)) -}}
{{- fail "prometheusRule.enabled without a collector leaves the rules' runbook links nowhere to point: set collector.runbookBaseUrl (a collector's /runbooks, or your wiki)." -}}
{{- end -}}
{{- if and (not .Values.rules.builtin) (not .Values.rules.files) .Values.collector.enabled -}}
{{- fail "rules.builtin=false with no rules.files leaves the collector without rules: add rules.files or set rules.builtin=true." -}}
{{- end -}}
{{- range $name, $_ := .Values.rules.files -}}
{{- if not (regexMatch "^[A-Za-z0-9._-]+\\.ya?ml$" $name) -}}
{{- fail (printf "rules.files key %q is not a rule file name: use NAME.yaml" $name) -}}
{{- end -}}
{{- end -}}
{{- $inf := .Values.agent.inference -}}
{{- if $inf.config -}}
{{- $doc := fromYaml $inf.config -}}
{{- if hasKey $doc "Error" -}}
{{- fail (printf "agent.inference.config is not a YAML mapping (%s): write the agent's inference config file (endpoints:, probes:, kubernetes:, receiver:, slo:), see docs/inference.md." (get $doc "Error")) -}}
{{- end -}}
{{- end -}}
{{- $receiver := $inf.receiver.address -}}
{{- if and $inf.receiver.hostPort (not (hasPrefix "udp://" $receiver)) -}}
{{- fail "agent.inference.receiver.hostPort opens a UDP port: set agent.inference.receiver.address to udp://0.0.0.0:PORT." -}}
{{- end -}}
{{- if and (hasPrefix "unix://" $receiver) (not $inf.receiver.hostPath) -}}
{{- fail "agent.inference.receiver.address is a unix socket: set agent.inference.receiver.hostPath to the host folder that holds it (application pods mount the same folder)." -}}
{{- end -}}
{{- $ctls := .Values.collector.tls -}}
{{- $atls := .Values.agent.tls -}}
{{- if and $ctls.clientCAKey (not $ctls.existingSecret) -}}
{{- fail "collector.tls.clientCAKey names a key of collector.tls.existingSecret, which is empty: set collector.tls.existingSecret to the Secret with tls.crt, tls.key and the client CA." -}}
{{- end -}}
{{- if and .Values.auth.tokenFile.existingSecret (not .Values.auth.enabled) -}}
{{- fail "auth.tokenFile.existingSecret is set but auth.enabled=false leaves writes open: set auth.enabled=true (the default)." -}}
{{- end -}}
{{- if and $atls.ca.existingSecret $atls.ca.existingConfigMap -}}
{{- fail "agent.tls.ca.existingSecret and agent.tls.ca.existingConfigMap are both set: the CA comes from one of them, unset the other." -}}
{{- end -}}
{{- if .Values.agent.enabled -}}
{{- $url := include "gpufleet.collectorUrl" . -}}
{{- if and (or $atls.ca.existingSecret $atls.ca.existingConfigMap $atls.clientCert.existingSecret) (not (hasPrefix "https://" $url)) -}}
{{- fail (printf "agent.tls is set but the agents push to %q: set collector.tls.existingSecret (this release's collector serves HTTPS) or an https:// agent.collectorUrl." (default "no collector" $url)) -}}
{{- end -}}
{{- if and $ctls.clientCAKey .Values.collector.enabled (not .Values.agent.collectorUrl) (not $atls.clientCert.existingSecret) -}}
{{- fail "collector.tls.clientCAKey makes the collector require client certificates, but the agents have none: set agent.tls.clientCert.existingSecret to a kubernetes.io/tls Secret signed by that CA." -}}
{{- end -}}
{{- end -}}
{{- if and .Values.collector.enabled .Values.collector.rawLayout (include "gpufleet.sqlite" .) -}}
{{- fail (printf "collector.rawLayout=%s applies to PostgreSQL only; SQLite always stores one row per sample: leave collector.rawLayout empty, or set database.url (postgresql+psycopg://...) or database.existingSecret." .Values.collector.rawLayout) -}}
{{- end -}}
{{- $dash := .Values.grafana.dashboards -}}
{{- if and $dash.configMaps (eq $dash.flavour "postgres") .Values.collector.enabled (include "gpufleet.sqlite" .) -}}
{{- fail "grafana.dashboards.flavour=postgres reads the collector's PostgreSQL store, but this release's collector keeps SQLite, which Grafana cannot read: set database.url (postgresql+psycopg://...) or database.existingSecret, or grafana.dashboards.flavour=prometheus." -}}
{{- end -}}
{{- range $name, $_ := .Values.grafana.dashboards.extra -}}
{{- if not (regexMatch "^[A-Za-z0-9._-]+\\.json$" $name) -}}
{{- fail (printf "grafana.dashboards.extra key %q is not a dashboard file name: use NAME.json" $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The pod-level and container-level security of the agent: least privilege unless asked otherwise. */}}
{{- define "gpufleet.agent.runAsUser" -}}
{{- if not (kindIs "invalid" .Values.agent.runAsUser) -}}{{ .Values.agent.runAsUser }}
{{- else if .Values.agent.podResources.enabled -}}0
{{- else -}}10001
{{- end -}}
{{- end -}}

{{/* Changes when a secret setting changes, so pods restart and read it (a generated token is kept, so it
     does not change the sum). */}}
{{- define "gpufleet.secretsChecksum" -}}
{{- list .Values.auth .Values.database .Values.slack .Values.grafana.token .Values.grafana.existingSecret | toJson | sha256sum -}}
{{- end -}}

{{/* Non-empty when the agent needs a service-account token: for the kubelet's authenticated port. */}}
{{- define "gpufleet.agent.kubeletToken" -}}
{{- if or .Values.agent.inference.kubelet.rbac.create (hasPrefix "https://" .Values.agent.inference.kubelet.url) (hasPrefix "https://" .Values.agent.workload.kubeletUrl) -}}true{{- end -}}
{{- end -}}

{{/* The collector's health probe: HTTPS when it serves TLS; the TCP port alone when it requires client
     certificates, which the kubelet's probes cannot present. */}}
{{- define "gpufleet.collector.probe" -}}
{{- if .Values.collector.tls.clientCAKey -}}
tcpSocket:
  port: http
{{- else -}}
httpGet:
  path: /healthz
  port: http
  {{- if .Values.collector.tls.existingSecret }}
  scheme: HTTPS
  {{- end }}
{{- end -}}
{{- end -}}

{{/* For an agent scrape (the argument: the job name prometheus-operator gives it): a GPU series without a job
of its own would take the scrape's job name, making every GPU with no known workload peers of one "job"
(GpuStraggler groups by job); this removes the scrape's job from the agent's series. */}}
{{- define "gpufleet.agent.dropScrapeJob" -}}
metricRelabelings:
  - sourceLabels: [job]
    regex: {{ regexQuoteMeta . | quote }}
    targetLabel: job
    replacement: ""
    action: replace
{{- end -}}

