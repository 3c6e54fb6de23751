data "aws_region" "current" {}

data "aws_caller_identity" "current" {}

locals {
  # The capabilities the Rust code knows (shared/src/capability.rs).
  capabilities = ["planner", "coder", "tester", "reviewer", "docs"]

  name_prefix = "${var.cluster_name}-${var.environment}"

  # aws.queue_prefix and aws.table: the coordinator and the workers derive
  # every queue name from the prefix, exactly as below
  # (`coordinator resource-names` prints them).
  queue_prefix = coalesce(var.queue_prefix, local.name_prefix)
  table_name   = coalesce(var.table_name, local.name_prefix)

  task_queue_names  = { for k, t in var.agent_types : k => "${local.queue_prefix}-${k}" }
  result_queue_name = "${local.queue_prefix}-results"

  # Every queue, by the key used in the dead-letter outputs: capability or "results".
  all_queue_names = merge(local.task_queue_names, { results = local.result_queue_name })
  dlq_names       = { for k, name in local.all_queue_names : k => "${name}-dlq" }

  # The queues each worker type receives from (worker.capabilities).
  worker_capabilities = { for k, t in var.agent_types : k => coalesce(t.capabilities, [k]) }

  # A message stays invisible for one agent run plus a margin before another
  # worker may take it; workers extend it by heartbeat. SQS allows 12 h.
  task_visibility_timeout   = min(var.agent_timeout + 300, 43200)
  result_visibility_timeout = 120

  nomad_jobs_dir = coalesce(var.nomad_jobs_dir, "${path.module}/../../../nomad")

  coordinator_job_id = "${var.nomad_job_prefix}-coordinator"
  worker_job_ids     = { for k, t in var.agent_types : k => "${var.nomad_job_prefix}-worker-${k}" }

  oidc_issuer = element(split("oidc-provider/", var.nomad_oidc_provider_arn), 1)

  tags = merge(var.tags, {
    "app"                 = "agent-orchestrator"
    "cluster"             = var.cluster_name
    "environment"         = var.environment
    "github-app-id"       = var.github_app_id
    "github-installation" = var.github_installation_id
  })
}
