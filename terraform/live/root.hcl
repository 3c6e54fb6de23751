# Root Terragrunt configuration, included by every unit under live/.
# Layout: live/<environment>/<unit>/terragrunt.hcl; the environment is the
# first directory below live/.

locals {
  environment = split("/", path_relative_to_include())[0]
  aws_region  = get_env("AWS_REGION", "eu-west-1")
  account_id  = get_aws_account_id()
  project     = "agent-orchestrator"
}

# State in S3 (encrypted, versioned) with a DynamoDB lock table; Terragrunt
# creates both on first use.
remote_state {
  backend = "s3"

  generate = {
    path      = "backend.tf"
    if_exists = "overwrite_terragrunt"
  }

  config = {
    bucket         = "${local.project}-tfstate-${local.account_id}-${local.aws_region}"
    key            = "${path_relative_to_include()}/terraform.tfstate"
    region         = local.aws_region
    encrypt        = true
    dynamodb_table = "${local.project}-tfstate-lock"
  }
}

# The provider, pinned, with default tags on every resource.
generate "provider" {
  path      = "provider.tf"
  if_exists = "overwrite_terragrunt"
  contents  = <<-EOF
    terraform {
      required_providers {
        aws = {
          source  = "hashicorp/aws"
          version = "= 5.82.2"
        }
      }
    }

    provider "aws" {
      region = "${local.aws_region}"

      default_tags {
        tags = {
          project     = "${local.project}"
          environment = "${local.environment}"
          managed-by  = "terragrunt"
        }
      }
    }
  EOF
}

inputs = {
  environment = local.environment
}
