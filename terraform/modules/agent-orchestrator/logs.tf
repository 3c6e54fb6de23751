# Container logs of the coordinator and the workers (Docker awslogs driver,
# see the job files). The Nomad clients' Docker daemon writes them, with the
# node's own instance role: attach output log_writer_policy_json to it.

resource "aws_cloudwatch_log_group" "this" {
  name              = "/${var.cluster_name}/${var.environment}/agent-orchestrator"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
  tags              = local.tags
}
