# One standard queue per agent type (capability) plus the result queue, each
# with its own dead-letter queue. Names: <queue_prefix>-<capability>,
# <queue_prefix>-results, and <name>-dlq.

resource "aws_sqs_queue" "task_dlq" {
  for_each = var.agent_types

  name                      = local.dlq_names[each.key]
  message_retention_seconds = 1209600
  max_message_size          = var.max_message_size
  sqs_managed_sse_enabled   = var.kms_key_arn == null ? true : null
  kms_master_key_id         = var.kms_key_arn
  tags                      = merge(local.tags, { capability = each.key, role = "dead-letter" })
}

resource "aws_sqs_queue" "task" {
  for_each = var.agent_types

  name                       = local.task_queue_names[each.key]
  visibility_timeout_seconds = local.task_visibility_timeout
  receive_wait_time_seconds  = 20
  max_message_size           = var.max_message_size
  message_retention_seconds  = var.message_retention_seconds
  sqs_managed_sse_enabled    = var.kms_key_arn == null ? true : null
  kms_master_key_id          = var.kms_key_arn

  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.task_dlq[each.key].arn
    maxReceiveCount     = var.max_receive_count
  })

  tags = merge(local.tags, { capability = each.key, role = "task" })
}

resource "aws_sqs_queue" "result_dlq" {
  name                      = local.dlq_names["results"]
  message_retention_seconds = 1209600
  max_message_size          = var.max_message_size
  sqs_managed_sse_enabled   = var.kms_key_arn == null ? true : null
  kms_master_key_id         = var.kms_key_arn
  tags                      = merge(local.tags, { role = "dead-letter" })
}

resource "aws_sqs_queue" "result" {
  name                       = local.result_queue_name
  visibility_timeout_seconds = local.result_visibility_timeout
  receive_wait_time_seconds  = 20
  max_message_size           = var.max_message_size
  message_retention_seconds  = var.message_retention_seconds
  sqs_managed_sse_enabled    = var.kms_key_arn == null ? true : null
  kms_master_key_id          = var.kms_key_arn

  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.result_dlq.arn
    maxReceiveCount     = var.max_receive_count
  })

  tags = merge(local.tags, { role = "result" })
}

# Only the queue itself may send its failures to its dead-letter queue.
resource "aws_sqs_queue_redrive_allow_policy" "task_dlq" {
  for_each = var.agent_types

  queue_url = aws_sqs_queue.task_dlq[each.key].id
  redrive_allow_policy = jsonencode({
    redrivePermission = "byQueue"
    sourceQueueArns   = [aws_sqs_queue.task[each.key].arn]
  })
}

resource "aws_sqs_queue_redrive_allow_policy" "result_dlq" {
  queue_url = aws_sqs_queue.result_dlq.id
  redrive_allow_policy = jsonencode({
    redrivePermission = "byQueue"
    sourceQueueArns   = [aws_sqs_queue.result.arn]
  })
}

# Backlog alarms (Prometheus alerts in nomad/monitoring/alerts.yml cover the
# same from the coordinator's metrics; these fire even when it is down).
resource "aws_cloudwatch_metric_alarm" "task_backlog" {
  for_each = var.agent_types

  alarm_name          = "${local.task_queue_names[each.key]}-backlog"
  alarm_description   = "More than ${var.task_queue_size} ${each.key} subtasks waiting for a worker."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = aws_sqs_queue.task[each.key].name }
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 2
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.task_queue_size
  treat_missing_data  = "notBreaching"
  alarm_actions       = var.alarm_actions
  ok_actions          = var.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "dead_letters" {
  for_each = local.dlq_names

  alarm_name          = "${each.value}-not-empty"
  alarm_description   = "Messages in the dead-letter queue ${each.value}."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = each.value }
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  treat_missing_data  = "notBreaching"
  alarm_actions       = var.alarm_actions
  ok_actions          = var.alarm_actions
  tags                = local.tags

  depends_on = [aws_sqs_queue.task_dlq, aws_sqs_queue.result_dlq]
}
