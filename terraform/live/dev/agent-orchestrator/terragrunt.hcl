# agent-orchestrator in dev: queues, table, secrets, roles, and the rendered
# Nomad job files (terragrunt output -raw coordinator_job_file | nomad job run -).

include "root" {
  path   = find_in_parent_folders("root.hcl")
  expose = true
}

terraform {
  source = "${get_repo_root()}/terraform/modules/agent-orchestrator"
}

dependency "vpc" {
  config_path = "../vpc"

  mock_outputs_allowed_terraform_commands = ["init", "validate", "plan"]
  mock_outputs = {
    vpc_id                     = "vpc-0123456789abcdef0"
    private_subnet_ids         = ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"]
    endpoint_security_group_id = "sg-0123456789abcdef0"
  }
}

dependency "nomad_cluster" {
  config_path = "../nomad-cluster"

  mock_outputs_allowed_terraform_commands = ["init", "validate", "plan"]
  mock_outputs = {
    oidc_provider_arn = "arn:aws:iam::123456789012:oidc-provider/nomad.dev.example.com"
  }
}

inputs = {
  cluster_name = "ao"

  vpc_id                  = dependency.vpc.outputs.vpc_id
  subnet_ids              = dependency.vpc.outputs.private_subnet_ids
  security_group_ids      = [dependency.vpc.outputs.endpoint_security_group_id]
  nomad_oidc_provider_arn = dependency.nomad_cluster.outputs.oidc_provider_arn

  # Read by the Terraform module from the repository, rendered with templatefile.
  nomad_jobs_dir = "${get_repo_root()}/nomad"

  webhook_url                   = "https://agents.dev.example.com/webhooks/github"
  github_app_id                 = "123456"
  github_installation_id        = "7654321"
  github_private_key_secret_arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:ao-dev/github-app-private-key-AbCdEf"

  coordinator_image        = "ghcr.io/agent-orchestrator/coordinator:0.1.0"
  worker_image             = "ghcr.io/agent-orchestrator/worker:0.1.0"
  coordinator_cpu_limit    = 500
  coordinator_memory_limit = 512

  agent_types = {
    planner = {
      image         = "ghcr.io/agent-orchestrator/sandbox:0.1.0"
      cpu_limit     = 500
      memory_limit  = 1024
      max_instances = 2
      capabilities  = ["planner"]
      env_vars      = {}
    }
    coder = {
      image         = "ghcr.io/agent-orchestrator/sandbox:0.1.0"
      cpu_limit     = 1000
      memory_limit  = 2048
      max_instances = 5
      capabilities  = ["coder"]
      env_vars      = { CARGO_HOME = "/workspace/.cargo" }
    }
    tester = {
      image         = "ghcr.io/agent-orchestrator/sandbox:0.1.0"
      cpu_limit     = 500
      memory_limit  = 1024
      max_instances = 3
      capabilities  = ["tester"]
      env_vars      = {}
    }
    reviewer = {
      image         = "ghcr.io/agent-orchestrator/sandbox:0.1.0"
      cpu_limit     = 500
      memory_limit  = 1024
      max_instances = 2
      capabilities  = ["reviewer"]
      env_vars      = {}
    }
    docs = {
      image         = "ghcr.io/agent-orchestrator/sandbox:0.1.0"
      cpu_limit     = 300
      memory_limit  = 512
      max_instances = 1
      capabilities  = ["docs"]
      env_vars      = {}
    }
  }

  task_queue_size = 50
  agent_timeout   = 1800

  tags = {
    owner = "platform"
  }
}
