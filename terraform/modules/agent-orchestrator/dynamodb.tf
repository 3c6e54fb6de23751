# Single-table design (see the Rust state store):
#   task            pk = TASK#<id>      sk = TASK
#   event           pk = TASK#<id>      sk = EVENT#<seq>
#   webhook delivery pk = DELIVERY#<id>  (expires_at: TTL, for idempotency)
#   lease           pk = LEASE#<name>
# status-index and repository-index list tasks by status or repository, all-index
# lists every task (gsi_all is always "TASK"), newest first by created_at; only task
# items carry these attributes. The indexes hold keys only (repository-index adds the
# status): listing reads the documents with BatchGetItem, so a task write does not
# rewrite its whole document into every index.

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

  attribute {
    name = "gsi_all"
    type = "S"
  }

  global_secondary_index {
    name            = "status-index"
    hash_key        = "task_status"
    range_key       = "created_at"
    projection_type = "KEYS_ONLY"
  }

  global_secondary_index {
    name               = "repository-index"
    hash_key           = "task_repository"
    range_key          = "created_at"
    projection_type    = "INCLUDE"
    non_key_attributes = ["task_status"]
  }

  global_secondary_index {
    name            = "all-index"
    hash_key        = "gsi_all"
    range_key       = "created_at"
    projection_type = "KEYS_ONLY"
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
