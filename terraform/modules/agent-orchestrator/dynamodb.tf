# Single-table design (see the Rust state store):
#   task            pk = TASK#<id>      sk = TASK
#   event           pk = TASK#<id>      sk = EVENT#<seq>
#   webhook delivery pk = DELIVERY#<id>  (expires_at: TTL, for idempotency)
#   lease           pk = LEASE#<name>
# status-index and repository-index list tasks by status or repository, newest
# first by created_at; only task items carry task_status / task_repository.

resource "aws_dynamodb_table" "tasks" {
  name                        = local.table_name
  billing_mode                = "PAY_PER_REQUEST"
  hash_key                    = "pk"
  range_key                   = "sk"
  deletion_protection_enabled = var.deletion_protection

  attribute {
    name = "pk"
    type = "S"
  }

  attribute {
    name = "sk"
    type = "S"
  }

  attribute {
    name = "task_status"
    type = "S"
  }

  attribute {
    name = "task_repository"
    type = "S"
  }

  attribute {
    name = "created_at"
    type = "S"
  }

  global_secondary_index {
    name            = "status-index"
    hash_key        = "task_status"
    range_key       = "created_at"
    projection_type = "ALL"
  }

  global_secondary_index {
    name            = "repository-index"
    hash_key        = "task_repository"
    range_key       = "created_at"
    projection_type = "ALL"
  }

  ttl {
    attribute_name = "expires_at"
    enabled        = true
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled     = true
    kms_key_arn = var.kms_key_arn
  }

  tags = local.tags
}
