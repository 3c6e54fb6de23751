# The secrets are created empty: set their values out of band
# (aws secretsmanager put-secret-value ...) so they never sit in Terraform
# state. The GitHub App private key is not created here at all: pass the ARN of
# the secret that holds it (github_private_key_secret_arn).

resource "aws_secretsmanager_secret" "webhook" {
  name                    = "${local.name_prefix}/github-webhook-secret"
  description             = "Webhook secret of the GitHub App ${var.github_app_id} delivering to ${var.webhook_url} (github.webhook_secret)."
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = var.secret_recovery_window_days
  tags                    = local.tags
}

resource "aws_secretsmanager_secret" "anthropic_api_key" {
  name                    = "${local.name_prefix}/anthropic-api-key"
  description             = "API key the agents (Claude Code) use, read by the workers."
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = var.secret_recovery_window_days
  tags                    = local.tags
}

resource "aws_secretsmanager_secret" "api_token" {
  name                    = "${local.name_prefix}/api-token"
  description             = "Bearer token of the coordinator's REST API (api.token)."
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = var.secret_recovery_window_days
  tags                    = local.tags
}
