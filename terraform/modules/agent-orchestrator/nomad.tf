# The job files in nomad/ are the one source of truth: Nomad can run them
# directly (nomad job run -var ...), and this module renders the very same
# files with templatefile(). templatefile is given an object whose only key is
# `var`, so each "${var.name}" in a job file renders to the value below, while
# $${NOMAD_...} runtime interpolations render to a literal ${NOMAD_...} that
# Nomad keeps for run time. The rendered files still declare their variables;
# Nomad uses the rendered values, the declarations' defaults no longer matter.

locals {
  nomad_common_vars = {
    job_prefix             = var.nomad_job_prefix
    datacenter             = var.nomad_datacenter
    namespace              = var.nomad_namespace
    aws_region             = data.aws_region.current.name
    queue_prefix           = local.queue_prefix
    table_name             = local.table_name
    log_group              = aws_cloudwatch_log_group.this.name
    github_app_id          = var.github_app_id
    github_api_url         = var.github_api_url
    github_private_key_ref = "aws-sm:${var.github_private_key_secret_arn}"
  }

  coordinator_job_vars = merge(local.nomad_common_vars, {
    coordinator_image  = var.coordinator_image
    coordinator_count  = var.coordinator_count
    coordinator_cpu    = var.coordinator_cpu_limit
    coordinator_memory = var.coordinator_memory_limit
    aws_role_arn       = aws_iam_role.coordinator.arn
    webhook_secret_ref = "aws-sm:${aws_secretsmanager_secret.webhook.arn}"
    api_token_ref      = "aws-sm:${aws_secretsmanager_secret.api_token.arn}"
  })

  worker_job_vars = {
    for k, t in var.agent_types : k => merge(local.nomad_common_vars, {
      capability              = k
      capabilities            = join(",", local.worker_capabilities[k])
      agent_api_key_ref       = "aws-sm:${aws_secretsmanager_secret.anthropic_api_key.arn}"
      worker_image            = var.worker_image
      worker_cpu              = var.worker_cpu_limit
      worker_memory           = var.worker_memory_limit
      nomad_scheme            = var.nomad_api_scheme
      nomad_port              = var.nomad_api_port
      concurrency             = t.concurrency
      min_instances           = t.min_instances
      max_instances           = t.max_instances
      queue_target_per_worker = t.concurrency
      aws_role_arn            = aws_iam_role.worker[k].arn
    })
  }

  sandbox_job_vars = {
    for k, t in var.agent_types : k => {
      job_prefix            = var.nomad_job_prefix
      datacenter            = var.nomad_datacenter
      namespace             = var.nomad_namespace
      capability            = k
      sandbox_image         = t.image
      cpu_mhz               = { for c, u in var.agent_types : c => u.cpu_limit }
      memory_mb             = { for c, u in var.agent_types : c => u.memory_limit }
      runtime               = var.sandbox_runtime
      network_mode          = var.sandbox_network_mode
      pids_limit            = var.sandbox_pids_limit
      workspace_tmpfs_bytes = var.sandbox_workspace_mb * 1048576
      tmp_tmpfs_bytes       = var.sandbox_tmp_mb * 1048576
      extra_env             = join("", [for name in sort(keys(t.env_vars)) : "${name}=\"${t.env_vars[name]}\"\n"])
    }
  }

  coordinator_job_file = templatefile("${local.nomad_jobs_dir}/coordinator.nomad.hcl", { var = local.coordinator_job_vars })

  worker_job_files = {
    for k, t in var.agent_types : k => templatefile("${local.nomad_jobs_dir}/worker.nomad.hcl", { var = local.worker_job_vars[k] })
  }

  sandbox_job_files = {
    for k, t in var.agent_types : k => templatefile("${local.nomad_jobs_dir}/sandbox.nomad.hcl", { var = local.sandbox_job_vars[k] })
  }
}
