# Interface endpoints, so that the workers and the coordinator reach the AWS
# APIs from private subnets without a NAT gateway.

locals {
  endpoint_services = var.create_vpc_endpoints ? toset(["sqs", "secretsmanager", "sts", "logs"]) : toset([])
}

resource "aws_vpc_endpoint" "this" {
  for_each = local.endpoint_services

  vpc_id              = var.vpc_id
  service_name        = "com.amazonaws.${data.aws_region.current.name}.${each.key}"
  vpc_endpoint_type   = "Interface"
  subnet_ids          = var.subnet_ids
  security_group_ids  = var.security_group_ids
  private_dns_enabled = true
  tags                = merge(local.tags, { Name = "${local.name_prefix}-${each.key}" })
}
