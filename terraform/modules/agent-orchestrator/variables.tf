# ---------------------------------------------------------------------------
# Identity of the deployment
# ---------------------------------------------------------------------------

variable "cluster_name" {
  description = "Name of the Nomad cluster the orchestrator runs on; first part of every resource name."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,30}[a-z0-9]$", var.cluster_name))
    error_message = "cluster_name must be 2-32 characters of lowercase letters, digits and dashes, starting with a letter."
  }
}

variable "environment" {
  description = "Environment name (dev, staging, prod, ...); second part of every resource name."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9]{0,15}$", var.environment))
    error_message = "environment must be 1-16 lowercase letters or digits, starting with a letter."
  }
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}

# ---------------------------------------------------------------------------
# Network: interface endpoints keep AWS API traffic inside the VPC
# ---------------------------------------------------------------------------

variable "vpc_id" {
  description = "VPC of the Nomad clients; the interface endpoints for SQS, Secrets Manager, STS and CloudWatch Logs are created in it."
  type        = string

  validation {
    condition     = can(regex("^vpc-[0-9a-f]+$", var.vpc_id))
    error_message = "vpc_id must look like vpc-0123abcd."
  }
}

variable "subnet_ids" {
  description = "Private subnets of the Nomad clients (one per availability zone) for the interface endpoints."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) > 0 && alltrue([for s in var.subnet_ids : can(regex("^subnet-[0-9a-f]+$", s))])
    error_message = "subnet_ids must be a non-empty list of subnet IDs."
  }
}

variable "security_group_ids" {
  description = "Security groups of the interface endpoints; they must allow HTTPS (443) from the Nomad clients."
  type        = list(string)

  validation {
    condition     = alltrue([for s in var.security_group_ids : can(regex("^sg-[0-9a-f]+$", s))])
    error_message = "security_group_ids must be security group IDs."
  }
}

variable "create_vpc_endpoints" {
  description = "Create the interface endpoints (set false when the VPC already has them)."
  type        = bool
  default     = true
}

# ---------------------------------------------------------------------------
# GitHub App
# ---------------------------------------------------------------------------

variable "webhook_url" {
  description = "Public URL GitHub delivers webhooks to (the coordinator's POST /webhooks/github behind your load balancer)."
  type        = string

  validation {
    condition     = startswith(var.webhook_url, "https://") && endswith(var.webhook_url, "/webhooks/github")
    error_message = "webhook_url must be an https URL ending in /webhooks/github."
  }
}

variable "github_app_id" {
  description = "GitHub App ID (github.app_id)."
  type        = string

  validation {
    condition     = can(regex("^[0-9]+$", var.github_app_id))
    error_message = "github_app_id must be numeric."
  }
}

variable "github_installation_id" {
  description = "Installation ID of the GitHub App on your organisation; recorded in tags and outputs for operators."
  type        = string

  validation {
    condition     = can(regex("^[0-9]+$", var.github_installation_id))
    error_message = "github_installation_id must be numeric."
  }
}

variable "github_private_key_secret_arn" {
  description = "ARN of the existing Secrets Manager secret holding the GitHub App private key (PEM). Not created here so the key never passes through Terraform state."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+$", var.github_private_key_secret_arn))
    error_message = "github_private_key_secret_arn must be a Secrets Manager secret ARN."
  }
}

variable "github_api_url" {
  description = "GitHub API base URL (github.api_url); https://HOST/api/v3 for GitHub Enterprise Server."
  type        = string
  default     = "https://api.github.com"
}

# ---------------------------------------------------------------------------
# Agent types (= capabilities) and their workers
# ---------------------------------------------------------------------------

variable "agent_types" {
  description = <<-EOT
    Worker and sandbox settings by agent type. Keys are the capabilities planner, coder,
    tester, reviewer, docs; all five are required because the coordinator derives and
    watches a queue for each (use max_instances = 0 to run no worker of a type).
      image        - sandbox image the agent runs in (git, Claude Code CLI, runner), pinned
      cpu_limit    - CPU of one sandbox, MHz
      memory_limit - memory of one sandbox, MB
      max_instances, min_instances - autoscaler bounds of the worker job
      capabilities - queues the worker receives from (worker.capabilities); defaults to [key]
      concurrency  - worker.concurrency
      env_vars     - extra plain (non-secret) environment of the sandbox
  EOT
  type = map(object({
    image         = string
    cpu_limit     = number
    memory_limit  = number
    max_instances = optional(number, 5)
    min_instances = optional(number, 0)
    capabilities  = optional(list(string))
    concurrency   = optional(number, 2)
    env_vars      = optional(map(string), {})
  }))

  validation {
    condition     = alltrue([for k in keys(var.agent_types) : contains(["planner", "coder", "tester", "reviewer", "docs"], k)])
    error_message = "agent_types keys must be capability names: planner, coder, tester, reviewer, docs."
  }

  validation {
    condition     = alltrue([for c in ["planner", "coder", "tester", "reviewer", "docs"] : contains(keys(var.agent_types), c)])
    error_message = "agent_types must have all five capabilities (the coordinator uses every queue); set max_instances = 0 to run none of a type."
  }

  validation {
    condition = alltrue(flatten([
      for k, t in var.agent_types : [
        for c in coalesce(t.capabilities, [k]) : contains(["planner", "coder", "tester", "reviewer", "docs"], c)
      ]
    ]))
    error_message = "agent_types[*].capabilities may only name capabilities."
  }

  validation {
    condition = alltrue([
      for k, t in var.agent_types :
      t.cpu_limit >= 100 && t.memory_limit >= 256 && t.min_instances >= 0 && t.max_instances >= t.min_instances && t.concurrency >= 1
    ])
    error_message = "agent_types: cpu_limit >= 100, memory_limit >= 256, 0 <= min_instances <= max_instances, concurrency >= 1."
  }

  validation {
    condition = alltrue(flatten([
      for k, t in var.agent_types : [
        for name, value in t.env_vars :
        can(regex("^[A-Za-z_][A-Za-z0-9_]*$", name)) && !strcontains(value, "\n") && !strcontains(value, "\"") && !can(regex("[$%][{]", value)) && !strcontains(value, "{{")
      ]
    ]))
    error_message = "env_vars names must be identifiers; values may not hold newlines, double quotes, or template sequences (dollar-brace, percent-brace, double braces)."
  }
}

variable "agent_timeout" {
  description = "Longest run of one subtask, in seconds. The task queues' visibility timeout is derived from it (plus a margin, at most SQS's 12 h); workers extend it by heartbeat while they work."
  type        = number
  default     = 1800

  validation {
    condition     = var.agent_timeout >= 60 && var.agent_timeout <= 43200
    error_message = "agent_timeout must be between 60 and 43200 seconds."
  }
}

variable "task_queue_size" {
  description = "Backlog (visible messages) of one task queue above which its CloudWatch alarm fires."
  type        = number
  default     = 100

  validation {
    condition     = var.task_queue_size >= 1
    error_message = "task_queue_size must be at least 1."
  }
}

variable "alarm_actions" {
  description = "SNS topic ARNs notified by the queue alarms."
  type        = list(string)
  default     = []
}

# ---------------------------------------------------------------------------
# Queues, table, secrets, logs
# ---------------------------------------------------------------------------

variable "queue_prefix" {
  description = "aws.queue_prefix. Default: <cluster_name>-<environment>."
  type        = string
  default     = null

  validation {
    condition     = var.queue_prefix == null || can(regex("^[A-Za-z0-9_-]{1,60}$", var.queue_prefix))
    error_message = "queue_prefix must be 1-60 letters, digits, dashes or underscores (SQS names end in -<capability>-dlq)."
  }
}

variable "table_name" {
  description = "aws.table. Default: <cluster_name>-<environment>."
  type        = string
  default     = null

  validation {
    condition     = var.table_name == null || can(regex("^[A-Za-z0-9_.-]{3,255}$", var.table_name))
    error_message = "table_name must be 3-255 letters, digits, underscores, dashes or dots."
  }
}

variable "max_receive_count" {
  description = "Receives of one message before SQS moves it to the dead-letter queue."
  type        = number
  default     = 3

  validation {
    condition     = var.max_receive_count >= 2
    error_message = "max_receive_count must be at least 2, so one crashed worker does not dead-letter a subtask."
  }
}

variable "max_message_size" {
  description = "Largest SQS message, in bytes."
  type        = number
  default     = 262144

  validation {
    condition     = var.max_message_size >= 1024 && var.max_message_size <= 262144
    error_message = "max_message_size must be between 1024 and 262144 bytes."
  }
}

variable "message_retention_seconds" {
  description = "How long task and result messages are kept, in seconds (dead-letter queues keep them 14 days)."
  type        = number
  default     = 345600

  validation {
    condition     = var.message_retention_seconds >= 3600 && var.message_retention_seconds <= 1209600
    error_message = "message_retention_seconds must be between 3600 and 1209600."
  }
}

variable "kms_key_arn" {
  description = "Customer-managed KMS key for SQS, DynamoDB and Secrets Manager. Null: SQS-managed SSE and the AWS managed keys of DynamoDB and Secrets Manager."
  type        = string
  default     = null
}

variable "deletion_protection" {
  description = "Protect the DynamoDB table from deletion."
  type        = bool
  default     = true
}

variable "secret_recovery_window_days" {
  description = "Days a deleted secret can still be restored (0 deletes at once)."
  type        = number
  default     = 7

  validation {
    condition     = var.secret_recovery_window_days == 0 || (var.secret_recovery_window_days >= 7 && var.secret_recovery_window_days <= 30)
    error_message = "secret_recovery_window_days must be 0 or between 7 and 30."
  }
}

variable "log_retention_days" {
  description = "Retention of the CloudWatch log group, in days."
  type        = number
  default     = 30

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a value CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, 60, 90, ...)."
  }
}

# ---------------------------------------------------------------------------
# Nomad: job files and workload identity
# ---------------------------------------------------------------------------

variable "nomad_jobs_dir" {
  description = "Directory holding the job files (the repository's nomad/). Default: nomad/ of the repository this module sits in."
  type        = string
  default     = null
}

variable "nomad_job_prefix" {
  description = "Prefix of the Nomad job IDs (nomad.job_prefix): <prefix>-coordinator, <prefix>-worker-<type>, <prefix>-sandbox-<type>."
  type        = string
  default     = "ao"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,30}$", var.nomad_job_prefix))
    error_message = "nomad_job_prefix must be lowercase letters, digits and dashes."
  }
}

variable "nomad_namespace" {
  description = "Nomad namespace of all jobs (nomad.namespace)."
  type        = string
  default     = "default"
}

variable "nomad_datacenter" {
  description = "Nomad datacenter (glob) the jobs may run in."
  type        = string
  default     = "*"
}

variable "nomad_oidc_provider_arn" {
  description = "ARN of the IAM OIDC provider for the Nomad cluster's workload identity issuer. The roles here trust it: a task presents its Nomad workload identity (JWT, audience below) and AWS returns the role's credentials (AssumeRoleWithWebIdentity)."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:oidc-provider/.+$", var.nomad_oidc_provider_arn))
    error_message = "nomad_oidc_provider_arn must be an IAM OIDC provider ARN."
  }
}

variable "nomad_oidc_audience" {
  description = "Audience (aud) of the Nomad workload identities presented to AWS; the job files use sts.amazonaws.com."
  type        = string
  default     = "sts.amazonaws.com"
}

variable "trusted_principal_arns" {
  description = "Extra IAM principals allowed to assume the coordinator and worker roles (for example an EC2 instance role of hosts that run them outside Nomad). Empty: workload identity only."
  type        = list(string)
  default     = []
}

variable "coordinator_image" {
  description = "Coordinator container image, pinned by tag or digest."
  type        = string
}

variable "worker_image" {
  description = "Worker container image, pinned by tag or digest."
  type        = string
}

variable "coordinator_count" {
  description = "Coordinator replicas; they share the backend and hold the singleton loops through leases (docs/operations.md). Two by default, so one may die."
  type        = number
  default     = 2
}

variable "coordinator_cpu_limit" {
  description = "CPU of the coordinator task, in MHz."
  type        = number
  default     = 500

  validation {
    condition     = var.coordinator_cpu_limit >= 100
    error_message = "coordinator_cpu_limit must be at least 100 MHz."
  }
}

variable "coordinator_memory_limit" {
  description = "Memory of the coordinator task, in MB."
  type        = number
  default     = 512

  validation {
    condition     = var.coordinator_memory_limit >= 128
    error_message = "coordinator_memory_limit must be at least 128 MB."
  }
}

variable "sandbox_runtime" {
  description = "OCI runtime of the sandboxes: runc, or runsc (gVisor) where the Docker plugin allows it."
  type        = string
  default     = "runc"

  validation {
    condition     = contains(["runc", "runsc"], var.sandbox_runtime)
    error_message = "sandbox_runtime must be runc or runsc."
  }
}

variable "sandbox_network_mode" {
  description = "Docker network mode of the sandboxes; the agent needs egress to git and the model API."
  type        = string
  default     = "bridge"
}

variable "sandbox_pids_limit" {
  description = "Most processes one sandbox may run at once."
  type        = number
  default     = 512

  validation {
    condition     = var.sandbox_pids_limit >= 64
    error_message = "sandbox_pids_limit must be at least 64."
  }
}

variable "sandbox_workspace_mb" {
  description = "Size of the sandbox's /workspace tmpfs (the clone), in MB; it counts against the sandbox memory."
  type        = number
  default     = 1024
}

variable "sandbox_tmp_mb" {
  description = "Size of the sandbox's /tmp and home tmpfs mounts, in MB."
  type        = number
  default     = 256
}

variable "worker_cpu_limit" {
  description = "CPU of one worker daemon task, in MHz (the agents run in sandbox jobs, sized by agent_types)."
  type        = number
  default     = 200
}

variable "worker_memory_limit" {
  description = "Memory of one worker daemon task, in MB."
  type        = number
  default     = 256
}

variable "nomad_api_scheme" {
  description = "Scheme of the Nomad agents' HTTP API the workers dispatch sandboxes through (nomad.addr is <scheme>://<node address>:<port>)."
  type        = string
  default     = "http"

  validation {
    condition     = contains(["http", "https"], var.nomad_api_scheme)
    error_message = "nomad_api_scheme must be http or https."
  }
}

variable "nomad_api_port" {
  description = "Port of the Nomad agents' HTTP API."
  type        = number
  default     = 4646
}
