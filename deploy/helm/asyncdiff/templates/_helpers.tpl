{{/* Names and labels. */}}
{{- define "asyncdiff.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "asyncdiff.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "asyncdiff.labels" -}}
{{ include "asyncdiff.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/*
GPUs one pod needs: asyncdiff/placement.py's Placement.world_size, the one rule
(tests/deploy/test_helm.py checks this against it for every N, S, batched stride):
N components on N GPUs; plain stride 2 with N > 1 adds one GPU for the last
component's second instance; batched stride stays on N.
*/}}
{{- define "asyncdiff.gpuCount" -}}
{{- $a := .Values.asyncdiff -}}
{{- $n := int $a.components -}}
{{- $s := int $a.stride -}}
{{- if lt $n 1 -}}{{- fail (printf "asyncdiff.components must be >= 1, got %d" $n) -}}{{- end -}}
{{- if not (has $s (list 1 2)) -}}{{- fail (printf "asyncdiff.stride must be 1 or 2, got %d" $s) -}}{{- end -}}
{{- if and $a.batchedStride (ne $s 2) -}}{{- fail "asyncdiff.batchedStride only applies to stride 2" -}}{{- end -}}
{{- add $n (ternary 1 0 (and (eq $s 2) (not $a.batchedStride) (gt $n 1))) -}}
{{- end -}}

{{/* CUDA ids inside the pod, comma-separated: the device plugin shows the pod's GPUs as 0..count-1. */}}
{{- define "asyncdiff.gpuList" -}}
{{- $ids := list -}}
{{- range $i := until (int (include "asyncdiff.gpuCount" .)) -}}{{- $ids = append $ids (toString $i) -}}{{- end -}}
{{- join "," $ids -}}
{{- end -}}

{{/* The placement flags of `python3 -m export` (as `python -m asyncdiff.placement --export-args` prints them), plus the layout. */}}
{{- define "asyncdiff.placementArgs" -}}
{{- $a := .Values.asyncdiff -}}
{{- $args := list "--components" (toString (int $a.components)) "--stride" (toString (int $a.stride)) "--gpus" (include "asyncdiff.gpuList" .) -}}
{{- if $a.batchedStride -}}{{- $args = append $args "--batched-stride" -}}{{- end -}}
{{- if not (has $a.layout (list "sequential" "outer-ring")) -}}{{- fail (printf "asyncdiff.layout must be sequential or outer-ring, got %s" $a.layout) -}}{{- end -}}
{{- $args = concat $args (list "--layout" $a.layout) -}}
{{- join " " $args -}}
{{- end -}}

{{- define "asyncdiff.repository" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.modelRepository.mountPath) .Values.modelRepository.path -}}
{{- end -}}

{{- define "asyncdiff.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{/* Container resources with nvidia.com/gpu set from the placement (requests = limits, as extended resources must). */}}
{{- define "asyncdiff.gpuResources" -}}
{{- $res := deepCopy (.resources | default dict) -}}
{{- $gpus := .gpus -}}
{{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" $gpus) (get $res "limits" | default dict)) -}}
{{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" $gpus) (get $res "requests" | default dict)) -}}
{{- toYaml $res -}}
{{- end -}}

{{/* `--cuda-memory-pool-byte-size=<gpu>:<bytes>` for every GPU of the pod, as serve.deployment.cuda_pool_args writes them. */}}
{{- define "asyncdiff.poolArgs" -}}
{{- $bytes := mul (int64 .mb) 1048576 -}}
{{- $flags := list -}}
{{- range $g := until (int .gpus) -}}{{- $flags = append $flags (printf "--cuda-memory-pool-byte-size=%d:%d" $g $bytes) -}}{{- end -}}
{{- join " " $flags -}}
{{- end -}}
