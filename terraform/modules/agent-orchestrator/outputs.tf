# The names below feed the services' configuration (terraform/README.md):
#   AO__AWS__QUEUE_PREFIX = queue_prefix, AO__AWS__TABLE = task_table_name,
#   AO__AWS__REGION = aws_region. The services derive every queue name from
#   the prefix; the URLs are here for operators and tooling.

output "aws_region" {
  description = "Region of all resources (aws.region)."
  value       = data.aws_region.current.name
}

output "queue_prefix" {
  description = "aws.queue_prefix of the coordinator and the workers."
  value       = local.queue_prefix
}

output "task_queue_url" {
  description = "URL of the first agent type's task queue (coder when present); see task_queue_urls for all."
  value       = aws_sqs_queue.task[contains(keys(var.agent_types), "coder") ? "coder" : sort(keys(var.agent_types))[0]].url
}

output "task_queue_urls" {
  description = "Task queue URL by agent type."
  value       = { for k, q in aws_sqs_queue.task : k => q.url }
}

output "task_queue_names" {
  description = "Task queue name by agent type (<queue_prefix>-<capability>)."
  value       = { for k, q in aws_sqs_queue.task : k => q.name }
}

output "result_queue_url" {
  description = "URL of the result queue."
  value       = aws_sqs_queue.result.url
}

output "dead_letter_queue_urls" {
  description = "Dead-letter queue URL by agent type, plus \"results\"."
  value       = merge({ for k, q in aws_sqs_queue.task_dlq : k => q.url }, { results = aws_sqs_queue.result_dlq.url })
}

output "task_table_name" {
  description = "DynamoDB table (aws.table)."
  value       = aws_dynamodb_table.tasks.name
}

output "task_table_arn" {
  description = "ARN of the DynamoDB table."
  value       = aws_dynamodb_table.tasks.arn
}

output "coordinator_role_arn" {
  description = "IAM role of the coordinator (AWS_ROLE_ARN of its job)."
  value       = aws_iam_role.coordinator.arn
}

output "worker_role_arns" {
  description = "IAM role by worker agent type (AWS_ROLE_ARN of each worker job)."
  value       = { for k, r in aws_iam_role.worker : k => r.arn }
}

output "secret_arns" {
  description = "Secrets to fill in after apply (aws secretsmanager put-secret-value), and the GitHub App key given."
  value = {
    webhook_secret     = aws_secretsmanager_secret.webhook.arn
    anthropic_api_key  = aws_secretsmanager_secret.anthropic_api_key.arn
    api_token          = aws_secretsmanager_secret.api_token.arn
    github_private_key = var.github_private_key_secret_arn
  }
}

output "log_group_name" {
  description = "CloudWatch log group of the containers."
  value       = aws_cloudwatch_log_group.this.name
}

output "log_writer_policy_json" {
  description = "IAM policy to attach to the Nomad clients' instance role so Docker can ship container logs."
  value       = data.aws_iam_policy_document.log_writer.json
}

output "github_app" {
  description = "Settings to enter in the GitHub App: webhook URL, app and installation."
  value = {
    app_id          = var.github_app_id
    installation_id = var.github_installation_id
    webhook_url     = var.webhook_url
  }
}

output "coordinator_env" {
  description = "AO__ environment of the coordinator outside Nomad (the job file sets the same)."
  value = {
    AO__BACKEND__KIND          = "aws"
    AO__AWS__REGION            = data.aws_region.current.name
    AO__AWS__QUEUE_PREFIX      = local.queue_prefix
    AO__AWS__TABLE             = aws_dynamodb_table.tasks.name
    AO__GITHUB__APP_ID         = var.github_app_id
    AO__GITHUB__API_URL        = var.github_api_url
    AO__GITHUB__PRIVATE_KEY    = "aws-sm:${var.github_private_key_secret_arn}"
    AO__GITHUB__WEBHOOK_SECRET = "aws-sm:${aws_secretsmanager_secret.webhook.arn}"
    AO__API__TOKEN             = "aws-sm:${aws_secretsmanager_secret.api_token.arn}"
  }
}

output "coordinator_job_file" {
  description = "Rendered nomad/coordinator.nomad.hcl (nomad job run -)."
  value       = local.coordinator_job_file
}

output "agent_job_files" {
  description = "Rendered job files by agent type: its worker job and its sandbox (parameterized) job."
  value = {
    for k, t in var.agent_types : k => {
      worker  = local.worker_job_files[k]
      sandbox = local.sandbox_job_files[k]
    }
  }
}
