terraform {
  # optional() object attributes with defaults (1.3), strcontains() (1.5).
  required_version = ">= 1.5.0, < 2.0.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.80"
    }
  }
}
