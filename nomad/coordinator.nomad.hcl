# The coordinator: receives GitHub webhooks, plans tasks, consumes results.
#
# One source of truth: `nomad job run -var ... coordinator.nomad.hcl` reads this
# file as an HCL2 jobspec, and the Terraform module renders the same file with
# templatefile(). Hence the two rules kept throughout (see nomad/README.md):
#   - a variable is only ever used as an interpolation of var.NAME inside a
#     quoted string or heredoc (no bare var.NAME, no other expressions);
#   - a Nomad runtime interpolation is written with a doubled dollar sign,
#     which both HCL2 and templatefile read as a literal dollar-brace.

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
  description = "Nomad namespace of the job."
  default     = "default"
}

variable "coordinator_image" {
  type        = string
  description = "Coordinator container image, pinned by tag or digest."
  default     = "ghcr.io/agent-orchestrator/coordinator:0.1.0"
}

variable "coordinator_count" {
  type        = number
  description = "Coordinator replicas. All serve the API and webhooks; the singleton loops (recovery, missed-delivery sweep) run on one at a time through leases in the table (docs/operations.md)."
  default     = 2
}

variable "coordinator_cpu" {
  type        = number
  description = "CPU for the coordinator, in MHz."
  default     = 500
}

variable "coordinator_memory" {
  type        = number
  description = "Memory for the coordinator, in MB."
  default     = 512
}

variable "aws_region" {
  type        = string
  description = "AWS region of the queues, the table and the secrets."
  default     = "eu-west-1"
}

variable "aws_role_arn" {
  type        = string
  description = "IAM role the coordinator assumes with its Nomad workload identity."
  default     = "arn:aws:iam::123456789012:role/ao-dev-coordinator"
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
  description = "GitHub App ID."
  default     = "0"
}

variable "github_api_url" {
  type        = string
  description = "GitHub API base URL (GitHub Enterprise: https://HOST/api/v3)."
  default     = "https://api.github.com"
}

variable "github_private_key_ref" {
  type        = string
  description = "Secret ref of the GitHub App private key (file:, env: or aws-sm:)."
  default     = "file:/secrets/github-app.pem"
}

variable "webhook_secret_ref" {
  type        = string
  description = "Secret ref of the webhook secret."
  default     = "env:AO_GITHUB_WEBHOOK_SECRET"
}

variable "api_token_ref" {
  type        = string
  description = "Secret ref of the REST API bearer token."
  default     = "env:AO_API_TOKEN"
}

job "ao-coordinator" {
  id          = "${var.job_prefix}-coordinator"
  name        = "${var.job_prefix}-coordinator"
  type        = "service"
  namespace   = "${var.namespace}"
  datacenters = ["${var.datacenter}"]

  update {
    max_parallel      = 1
    health_check      = "checks"
    min_healthy_time  = "10s"
    healthy_deadline  = "3m"
    progress_deadline = "10m"
    auto_revert       = true
  }

  group "coordinator" {
    count = "${var.coordinator_count}"

    network {
      port "http" {
        to = 8080
      }
    }

    service {
      name     = "${var.job_prefix}-coordinator"
      provider = "consul"
      port     = "http"
      # "prometheus" marks the services nomad/monitoring/prometheus-scrape.yml scrapes.
      tags = ["http", "prometheus"]

      meta {
        metrics_path = "/metrics"
        component    = "coordinator"
      }

      check {
        name     = "alive"
        type     = "http"
        path     = "/healthz"
        interval = "10s"
        timeout  = "2s"
      }

      check {
        name     = "ready"
        type     = "http"
        path     = "/readyz"
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

    task "coordinator" {
      driver = "docker"

      # Grace period for SIGTERM: stop receiving, finish in-flight work.
      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      config {
        image           = "${var.coordinator_image}"
        ports           = ["http"]
        readonly_rootfs = true
        cap_drop        = ["ALL"]
        security_opt    = ["no-new-privileges"]

        logging {
          type = "awslogs"
          config {
            awslogs-group         = "${var.log_group}"
            awslogs-region        = "${var.aws_region}"
            awslogs-stream-prefix = "coordinator"
          }
        }
      }

      # AWS credentials: the task's workload identity is exchanged for the
      # coordinator role (AssumeRoleWithWebIdentity) by the AWS SDK.
      identity {
        name        = "aws"
        aud         = ["sts.amazonaws.com"]
        file        = true
        ttl         = "1h"
        change_mode = "noop"
      }

      env {
        AO__BACKEND__KIND           = "aws"
        AO__AWS__REGION             = "${var.aws_region}"
        AO__AWS__QUEUE_PREFIX       = "${var.queue_prefix}"
        AO__AWS__TABLE              = "${var.table_name}"
        AO__SERVER__LISTEN          = "0.0.0.0:8080"
        AO__GITHUB__APP_ID          = "${var.github_app_id}"
        AO__GITHUB__API_URL         = "${var.github_api_url}"
        AO__GITHUB__PRIVATE_KEY     = "${var.github_private_key_ref}"
        AO__GITHUB__WEBHOOK_SECRET  = "${var.webhook_secret_ref}"
        AO__API__TOKEN              = "${var.api_token_ref}"
        AO__LOG__FORMAT             = "json"
        AWS_REGION                  = "${var.aws_region}"
        AWS_ROLE_ARN                = "${var.aws_role_arn}"
        AWS_WEB_IDENTITY_TOKEN_FILE = "$${NOMAD_SECRETS_DIR}/nomad_aws.jwt"
      }

      # Secrets never appear in this file: they are read from the Nomad
      # Variable nomad/jobs/<job id> (readable only by this job) when the refs
      # above point at env: or file:. With aws-sm: refs the variable may be
      # absent; nomadVarList keeps the template from blocking on it.
      template {
        destination = "secrets/coordinator.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
          {{- range nomadVarList (printf "nomad/jobs/%s" (env "NOMAD_JOB_ID")) -}}
          {{- if eq .Path (printf "nomad/jobs/%s" (env "NOMAD_JOB_ID")) -}}
          {{- with nomadVar .Path }}
          {{- with .webhook_secret }}AO_GITHUB_WEBHOOK_SECRET={{ . }}{{ end }}
          {{ with .api_token }}AO_API_TOKEN={{ . }}{{ end }}
          {{ end -}}
          {{- end -}}
          {{- end }}
        EOT
      }

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

      resources {
        cpu    = "${var.coordinator_cpu}"
        memory = "${var.coordinator_memory}"
      }
    }
  }
}
