# A worker job for ONE capability: long-polls that capability's queue and runs
# each subtask in a sandbox, dispatched from sandbox.nomad.hcl.
#
#   nomad job run -var capability=coder worker.nomad.hcl
#
# The same file is rendered once per agent type by the Terraform module with
# templatefile(). Rules (see nomad/README.md): variables only as interpolations
# of var.NAME inside strings, Nomad runtime interpolations with a doubled dollar.

variable "job_prefix" {
  type        = string
  description = "Prefix of every job ID of the deployment."
  default     = "ao"
}

variable "datacenter" {
  type        = string
  description = "Datacenter (glob) the job may run in."
  default     = "*"
}

variable "namespace" {
  type        = string
  description = "Nomad namespace of the workers and of the sandbox jobs they dispatch."
  default     = "default"
}

variable "capability" {
  type        = string
  description = "The capability (agent type) of this worker job: planner, coder, tester, reviewer or docs."
  default     = "coder"

  validation {
    condition     = contains(["planner", "coder", "tester", "reviewer", "docs"], var.capability)
    error_message = "The capability must be one of planner, coder, tester, reviewer, docs."
  }
}

variable "capabilities" {
  type        = string
  description = "worker.capabilities, comma-separated: the queues this worker receives from."
  default     = "coder"
}

variable "worker_image" {
  type        = string
  description = "Worker container image, pinned by tag or digest."
  default     = "ghcr.io/agent-orchestrator/worker:0.1.0"
}

variable "worker_cpu" {
  type        = number
  description = "CPU for the worker daemon itself, in MHz (agents run in sandbox jobs)."
  default     = 200
}

variable "worker_memory" {
  type        = number
  description = "Memory for the worker daemon itself, in MB."
  default     = 256
}

variable "concurrency" {
  type        = number
  description = "worker.concurrency: subtasks one worker runs at once."
  default     = 2
}

variable "min_instances" {
  type        = number
  description = "Fewest workers of this capability the autoscaler keeps."
  default     = 0
}

variable "max_instances" {
  type        = number
  description = "Most workers of this capability the autoscaler starts."
  default     = 5
}

variable "aws_region" {
  type        = string
  description = "AWS region of the queues and the secrets."
  default     = "eu-west-1"
}

variable "aws_role_arn" {
  type        = string
  description = "IAM role of this capability's workers, assumed with the Nomad workload identity."
  default     = "arn:aws:iam::123456789012:role/ao-dev-worker-coder"
}

variable "queue_prefix" {
  type        = string
  description = "aws.queue_prefix: queue names are <prefix>-<capability>, <prefix>-results, <name>-dlq."
  default     = "agent-orchestrator"
}

variable "table_name" {
  type        = string
  description = "aws.table: the DynamoDB table."
  default     = "agent-orchestrator"
}

variable "log_group" {
  type        = string
  description = "CloudWatch log group the container logs go to (awslogs driver)."
  default     = "/agent-orchestrator/dev"
}

variable "github_app_id" {
  type        = string
  description = "GitHub App ID (the worker mints repository-scoped installation tokens)."
  default     = "0"
}

variable "github_api_url" {
  type        = string
  description = "GitHub API base URL."
  default     = "https://api.github.com"
}

variable "github_private_key_ref" {
  type        = string
  description = "Secret ref of the GitHub App private key (file:, env: or aws-sm:)."
  default     = "file:/secrets/github-app.pem"
}

variable "agent_api_key_ref" {
  type        = string
  description = "Secret ref of the model API key (file:, env: or aws-sm:). Only the worker holds it: its per-attempt proxy adds it to the sandbox's model calls."
  default     = "file:/secrets/anthropic-api-key"
}

variable "nomad_scheme" {
  type        = string
  description = "Scheme of the local Nomad agent's HTTP API (http or https)."
  default     = "http"
}

variable "nomad_port" {
  type        = number
  description = "Port of the local Nomad agent's HTTP API."
  default     = 4646
}

variable "queue_target_per_worker" {
  type        = number
  description = "Autoscaler target: queued plus in-flight messages per worker (usually = concurrency)."
  default     = 2
}

job "ao-worker" {
  id          = "${var.job_prefix}-worker-${var.capability}"
  name        = "${var.job_prefix}-worker-${var.capability}"
  type        = "service"
  namespace   = "${var.namespace}"
  datacenters = ["${var.datacenter}"]

  meta {
    capability = "${var.capability}"
  }

  group "worker" {
    count = "${var.min_instances}"

    # Queue-depth autoscaling (Nomad Autoscaler, Prometheus APM, target-value).
    # The query is the backlog per running worker: visible plus in-flight
    # messages of this capability's queue divided by the number of workers of
    # this capability that report slots. target-value then asks for
    # ceil(workers * backlog_per_worker / target) = ceil(backlog / target).
    scaling {
      enabled = true
      min     = "${var.min_instances}"
      max     = "${var.max_instances}"

      policy {
        cooldown            = "2m"
        evaluation_interval = "30s"

        check "queue_depth" {
          source = "prometheus"
          query  = "sum(max by (state) (ao_queue_messages{queue=\"${var.capability}\",state=~\"visible|in_flight\"})) / clamp_min(count(ao_worker_slots{state=\"free\",capability=\"${var.capability}\"}) or vector(0), 1)"

          strategy "target-value" {
            target = "${var.queue_target_per_worker}"
          }
        }
      }
    }

    # Host networking: each attempt's network proxy listens on an ephemeral port
    # of the host address (nomad.proxy_listen), which the sandbox allocations must
    # reach; a bridge network would map only the http port.
    network {
      port "http" {}
    }

    service {
      name     = "${var.job_prefix}-worker-${var.capability}"
      provider = "consul"
      port     = "http"
      tags     = ["http", "prometheus", "capability-${var.capability}"]

      meta {
        metrics_path = "/metrics"
        component    = "worker"
        capability   = "${var.capability}"
      }

      check {
        name     = "alive"
        type     = "http"
        path     = "/healthz"
        interval = "10s"
        timeout  = "2s"
      }
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "15s"
      mode     = "delay"
    }

    task "worker" {
      driver = "docker"

      # On SIGTERM the worker stops receiving and finishes or releases its
      # in-flight subtasks; give it the visibility-heartbeat period to do so.
      kill_signal  = "SIGTERM"
      kill_timeout = "2m"

      config {
        image           = "${var.worker_image}"
        network_mode    = "host"
        readonly_rootfs = true
        cap_drop        = ["ALL"]
        security_opt    = ["no-new-privileges"]

        logging {
          type = "awslogs"
          config {
            awslogs-group         = "${var.log_group}"
            awslogs-region        = "${var.aws_region}"
            awslogs-stream-prefix = "worker-${var.capability}"
          }
        }
      }

      # Workload identity for AWS (SQS, Secrets Manager) ...
      identity {
        name        = "aws"
        aud         = ["sts.amazonaws.com"]
        file        = true
        ttl         = "1h"
        change_mode = "noop"
      }

      # ... and for the Nomad API (dispatching sandbox jobs): NOMAD_TOKEN env.
      identity {
        env         = true
        change_mode = "restart"
      }

      env {
        AO__BACKEND__KIND           = "aws"
        AO__AWS__REGION             = "${var.aws_region}"
        AO__AWS__QUEUE_PREFIX       = "${var.queue_prefix}"
        AO__AWS__TABLE              = "${var.table_name}"
        AO__WORKER__LISTEN          = "$${NOMAD_ADDR_http}"
        AO__WORKER__CAPABILITIES    = "${var.capabilities}"
        AO__WORKER__CONCURRENCY     = "${var.concurrency}"
        AO__SANDBOX__DRIVER         = "nomad"
        AO__NOMAD__ADDR             = "${var.nomad_scheme}://$${attr.unique.network.ip-address}:${var.nomad_port}"
        AO__NOMAD__TOKEN            = "env:NOMAD_TOKEN"
        AO__NOMAD__NAMESPACE        = "${var.namespace}"
        AO__NOMAD__JOB_PREFIX       = "${var.job_prefix}"
        # Where the sandboxes present their identity for the run spec and secrets.
        AO__NOMAD__HANDOVER_URL     = "http://$${NOMAD_ADDR_http}"
        # Where each attempt's proxy listens (an ephemeral port): the model
        # endpoint, which adds the model key, and the sandbox's only way out.
        AO__NOMAD__PROXY_LISTEN     = "$${NOMAD_IP_http}"
        AO__GITHUB__APP_ID          = "${var.github_app_id}"
        AO__GITHUB__API_URL         = "${var.github_api_url}"
        AO__GITHUB__PRIVATE_KEY     = "${var.github_private_key_ref}"
        AO__AGENT__API_KEY          = "${var.agent_api_key_ref}"
        AO__LOG__FORMAT             = "json"
        AWS_REGION                  = "${var.aws_region}"
        AWS_ROLE_ARN                = "${var.aws_role_arn}"
        AWS_WEB_IDENTITY_TOKEN_FILE = "$${NOMAD_SECRETS_DIR}/nomad_aws.jwt"
      }

      # The GitHub App key, when its ref is file:/secrets/github-app.pem, comes
      # from the Nomad Variable nomad/jobs/<job id>; absent variable = empty file.
      template {
        destination = "secrets/github-app.pem"
        perms       = "0400"
        change_mode = "restart"
        data        = <<-EOT
          {{- range nomadVarList (printf "nomad/jobs/%s" (env "NOMAD_JOB_ID")) -}}
          {{- if eq .Path (printf "nomad/jobs/%s" (env "NOMAD_JOB_ID")) -}}
          {{- with nomadVar .Path }}{{ with .github_private_key }}{{ . }}{{ end }}{{ end -}}
          {{- end -}}
          {{- end }}
        EOT
      }

      # The model key, when its ref is file:/secrets/anthropic-api-key, likewise
      # (key anthropic_api_key). The sandbox job never gets it.
      template {
        destination = "secrets/anthropic-api-key"
        perms       = "0400"
        change_mode = "restart"
        data        = <<-EOT
          {{- range nomadVarList (printf "nomad/jobs/%s" (env "NOMAD_JOB_ID")) -}}
          {{- if eq .Path (printf "nomad/jobs/%s" (env "NOMAD_JOB_ID")) -}}
          {{- with nomadVar .Path }}{{ with .anthropic_api_key }}{{ . }}{{ end }}{{ end -}}
          {{- end -}}
          {{- end }}
        EOT
      }

      resources {
        cpu    = "${var.worker_cpu}"
        memory = "${var.worker_memory}"
      }
    }
  }
}
