# Roles and least-privilege policies for the coordinator and for each worker
# type.
#
# Who assumes them: the tasks' Nomad workload identities. Each job file has an
# `identity "aws"` (audience sts.amazonaws.com, written to
# secrets/nomad_aws.jwt) and sets AWS_ROLE_ARN / AWS_WEB_IDENTITY_TOKEN_FILE,
# so the AWS SDK calls AssumeRoleWithWebIdentity against the IAM OIDC provider
# of the Nomad cluster (nomad_oidc_provider_arn). The trust policy pins the
# audience and the `sub` claim, <region>:<namespace>:<job id>:<group>:<task>:<identity>,
# to the one job allowed to use the role. This was chosen over EC2 instance
# profiles, which every task on a host would share. trusted_principal_arns can
# add ordinary IAM principals (for hosts outside Nomad).
#
# Every action and resource is named; a wildcard resource appears only where
# AWS requires one, with the reason written right above it.

data "aws_iam_policy_document" "coordinator_trust" {
  statement {
    sid     = "NomadWorkloadIdentity"
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [var.nomad_oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = [var.nomad_oidc_audience]
    }

    condition {
      test     = "StringLike"
      variable = "${local.oidc_issuer}:sub"
      values   = ["*:${var.nomad_namespace}:${local.coordinator_job_id}:coordinator:coordinator:aws"]
    }
  }

  dynamic "statement" {
    for_each = length(var.trusted_principal_arns) > 0 ? [1] : []
    content {
      sid     = "TrustedPrincipals"
      effect  = "Allow"
      actions = ["sts:AssumeRole"]

      principals {
        type        = "AWS"
        identifiers = var.trusted_principal_arns
      }
    }
  }
}

data "aws_iam_policy_document" "worker_trust" {
  for_each = var.agent_types

  statement {
    sid     = "NomadWorkloadIdentity"
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [var.nomad_oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = [var.nomad_oidc_audience]
    }

    condition {
      test     = "StringLike"
      variable = "${local.oidc_issuer}:sub"
      values   = ["*:${var.nomad_namespace}:${local.worker_job_ids[each.key]}:worker:worker:aws"]
    }
  }

  dynamic "statement" {
    for_each = length(var.trusted_principal_arns) > 0 ? [1] : []
    content {
      sid     = "TrustedPrincipals"
      effect  = "Allow"
      actions = ["sts:AssumeRole"]

      principals {
        type        = "AWS"
        identifiers = var.trusted_principal_arns
      }
    }
  }
}

# ---------------------------------------------------------------------------
# Coordinator
# ---------------------------------------------------------------------------

data "aws_iam_policy_document" "coordinator" {
  statement {
    sid       = "SendSubtasks"
    effect    = "Allow"
    actions   = ["sqs:SendMessage", "sqs:GetQueueUrl"]
    resources = [for k, q in aws_sqs_queue.task : q.arn]
  }

  statement {
    sid    = "ConsumeResults"
    effect = "Allow"
    actions = [
      "sqs:ReceiveMessage",
      "sqs:DeleteMessage",
      "sqs:ChangeMessageVisibility",
      "sqs:GetQueueAttributes",
      "sqs:GetQueueUrl",
    ]
    resources = [aws_sqs_queue.result.arn]
  }

  statement {
    sid     = "QueueDepth"
    effect  = "Allow"
    actions = ["sqs:GetQueueAttributes", "sqs:GetQueueUrl"]
    resources = concat(
      [for k, q in aws_sqs_queue.task : q.arn],
      [for k, q in aws_sqs_queue.task_dlq : q.arn],
      [aws_sqs_queue.result_dlq.arn],
    )
  }

  statement {
    sid     = "DeadLetters"
    effect  = "Allow"
    actions = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"]
    resources = concat(
      [for k, q in aws_sqs_queue.task_dlq : q.arn],
      [aws_sqs_queue.result_dlq.arn],
    )
  }

  statement {
    sid    = "StateStore"
    effect = "Allow"
    actions = [
      "dynamodb:DescribeTable",
      "dynamodb:GetItem",
      "dynamodb:BatchGetItem",
      "dynamodb:PutItem",
      "dynamodb:UpdateItem",
      "dynamodb:DeleteItem",
      "dynamodb:ConditionCheckItem",
      "dynamodb:Query",
    ]
    resources = [
      aws_dynamodb_table.tasks.arn,
      "${aws_dynamodb_table.tasks.arn}/index/status-index",
      "${aws_dynamodb_table.tasks.arn}/index/repository-index",
      "${aws_dynamodb_table.tasks.arn}/index/all-index",
    ]
  }

  statement {
    sid     = "Secrets"
    effect  = "Allow"
    actions = ["secretsmanager:GetSecretValue"]
    resources = [
      aws_secretsmanager_secret.webhook.arn,
      aws_secretsmanager_secret.api_token.arn,
      var.github_private_key_secret_arn,
    ]
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]
    content {
      sid       = "CustomerManagedKey"
      effect    = "Allow"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_role" "coordinator" {
  name                 = "${local.name_prefix}-coordinator"
  description          = "agent-orchestrator coordinator (${local.coordinator_job_id})"
  assume_role_policy   = data.aws_iam_policy_document.coordinator_trust.json
  max_session_duration = 3600
  tags                 = local.tags
}

resource "aws_iam_role_policy" "coordinator" {
  name   = "agent-orchestrator-coordinator"
  role   = aws_iam_role.coordinator.id
  policy = data.aws_iam_policy_document.coordinator.json
}

# ---------------------------------------------------------------------------
# Workers: one role per agent type. A worker receives only from the queues of
# its own capabilities and sends only to the result queue.
# ---------------------------------------------------------------------------

data "aws_iam_policy_document" "worker" {
  for_each = var.agent_types

  statement {
    sid    = "ReceiveOwnSubtasks"
    effect = "Allow"
    actions = [
      "sqs:ReceiveMessage",
      "sqs:DeleteMessage",
      "sqs:ChangeMessageVisibility",
      "sqs:GetQueueAttributes",
      "sqs:GetQueueUrl",
    ]
    resources = [for c in local.worker_capabilities[each.key] : aws_sqs_queue.task[c].arn]
  }

  statement {
    sid       = "SendResults"
    effect    = "Allow"
    actions   = ["sqs:SendMessage", "sqs:GetQueueUrl"]
    resources = [aws_sqs_queue.result.arn]
  }

  # Read-only: a running subtask reads its task to notice a cancel.
  statement {
    sid       = "ReadTaskState"
    effect    = "Allow"
    actions   = ["dynamodb:DescribeTable", "dynamodb:GetItem"]
    resources = [aws_dynamodb_table.tasks.arn]
  }

  statement {
    sid     = "Secrets"
    effect  = "Allow"
    actions = ["secretsmanager:GetSecretValue"]
    resources = [
      var.github_private_key_secret_arn,
      aws_secretsmanager_secret.anthropic_api_key.arn,
    ]
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]
    content {
      sid       = "CustomerManagedKey"
      effect    = "Allow"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_role" "worker" {
  for_each = var.agent_types

  name                 = "${local.name_prefix}-worker-${each.key}"
  description          = "agent-orchestrator ${each.key} worker (${local.worker_job_ids[each.key]})"
  assume_role_policy   = data.aws_iam_policy_document.worker_trust[each.key].json
  max_session_duration = 3600
  tags                 = merge(local.tags, { capability = each.key })
}

resource "aws_iam_role_policy" "worker" {
  for_each = var.agent_types

  name   = "agent-orchestrator-worker-${each.key}"
  role   = aws_iam_role.worker[each.key].id
  policy = data.aws_iam_policy_document.worker[each.key].json
}

# ---------------------------------------------------------------------------
# Log writing, for the Nomad clients' instance role (Docker awslogs driver).
# ---------------------------------------------------------------------------

data "aws_iam_policy_document" "log_writer" {
  statement {
    sid     = "WriteContainerLogs"
    effect  = "Allow"
    actions = ["logs:CreateLogStream", "logs:PutLogEvents"]
    # Log streams are created per container at run time with names AWS cannot
    # know in advance; CloudWatch Logs authorizes both actions on the stream
    # ARN, which must therefore end in the log-stream wildcard of this group.
    resources = ["${aws_cloudwatch_log_group.this.arn}:log-stream:*"]
  }
}
