# The sandbox of ONE capability: a parameterized batch job that a worker
# dispatches per subtask attempt (POST /v1/job/<job id>/dispatch). The dispatch
# carries no payload and nothing secret: its meta names the attempt and the
# dispatching worker's hand-over address; the runner presents the task's
# workload identity (identity "ao_handover") there and receives the run spec and
# the attempt's secrets once (docs/sandbox.md), the model key not among them:
# the agent's model calls and every other way out go through the worker's
# per-attempt proxy (docs/sandbox-network.md, "Nomad"). It clones the repository, runs
# the agent, commits, pushes and writes the result JSON into the allocation
# directory, where the worker reads it.
#
#   nomad job run -var capability=coder sandbox.nomad.hcl
#
# Rendered once per agent type by the Terraform module with templatefile().
# Rules (see nomad/README.md): variables only as interpolations of var.NAME
# inside strings, Nomad runtime interpolations with a doubled dollar sign.

variable "job_prefix" {
  type        = string
  description = "Prefix of every job ID; workers dispatch <job_prefix>-sandbox-<capability>."
  default     = "ao"
}

variable "datacenter" {
  type        = string
  description = "Datacenter (glob) the sandboxes may run in."
  default     = "*"
}

variable "namespace" {
  type        = string
  description = "Nomad namespace of the sandbox jobs."
  default     = "default"
}

variable "capability" {
  type        = string
  description = "The capability (agent type) this sandbox job serves."
  default     = "coder"

  validation {
    condition     = contains(["planner", "coder", "tester", "reviewer", "docs"], var.capability)
    error_message = "The capability must be one of planner, coder, tester, reviewer, docs."
  }
}

variable "sandbox_image" {
  type        = string
  description = "Sandbox image (git, Claude Code CLI, the worker binary as runner), pinned."
  default     = "ghcr.io/agent-orchestrator/sandbox:0.1.0"
}

variable "cpu_mhz" {
  type        = map(number)
  description = "CPU of one sandbox, in MHz, by capability."
  default = {
    planner  = 500
    coder    = 1000
    tester   = 500
    reviewer = 500
    docs     = 300
  }
}

variable "memory_mb" {
  type        = map(number)
  description = "Memory of one sandbox, in MB, by capability (the tmpfs mounts count against it)."
  default = {
    planner  = 1024
    coder    = 2048
    tester   = 1024
    reviewer = 1024
    docs     = 512
  }
}

variable "pids_limit" {
  type        = number
  description = "Most processes the sandbox may run at once."
  default     = 512
}

variable "workspace_tmpfs_bytes" {
  type        = number
  description = "Size of the tmpfs mounted at /workspace (the clone), in bytes."
  default     = 1073741824
}

variable "tmp_tmpfs_bytes" {
  type        = number
  description = "Size of the tmpfs mounted at /tmp and at the agent's home, in bytes."
  default     = 268435456
}

variable "runtime" {
  type        = string
  description = "OCI runtime: runc, or runsc (gVisor) where the Docker plugin allows it (allow_runtimes)."
  default     = "runc"

  validation {
    condition     = contains(["runc", "runsc"], var.runtime)
    error_message = "The runtime must be runc or runsc."
  }
}

variable "extra_env" {
  type        = string
  description = "Extra plain environment of the sandbox, as env-file lines NAME=\"value\" (agent_types[*].env_vars)."
  default     = ""
}

variable "network_mode" {
  type        = string
  description = "Docker network mode of the sandbox. It needs to reach the worker (hand-over and proxy port) only; close the rest with the cluster's network policy (docs/sandbox-network.md)."
  default     = "bridge"
}

job "ao-sandbox" {
  id          = "${var.job_prefix}-sandbox-${var.capability}"
  name        = "${var.job_prefix}-sandbox-${var.capability}"
  type        = "batch"
  namespace   = "${var.namespace}"
  datacenters = ["${var.datacenter}"]

  meta {
    capability = "${var.capability}"
  }

  parameterized {
    payload       = "forbidden"
    meta_required = ["task_id", "subtask_id", "attempt", "handover_url"]
    meta_optional = ["repository"]
  }

  group "sandbox" {
    count = 1

    # One attempt only: the worker owns retries (a new dispatch per attempt),
    # so Nomad must neither restart nor reschedule a failed sandbox.
    restart {
      attempts = 0
      mode     = "fail"
    }

    reschedule {
      attempts  = 0
      unlimited = false
    }

    ephemeral_disk {
      size = 300
    }

    task "runner" {
      driver = "docker"
      user   = "10001"

      # The identity the runner presents to the worker's hand-over: signed by the
      # cluster, naming this job, allocation and task; written to
      # secrets/nomad_ao_handover.jwt (never the environment, which the agent sees).
      identity {
        name        = "ao_handover"
        aud         = ["agent-orchestrator-handover"]
        file        = true
        env         = false
        ttl         = "1h"
        change_mode = "noop"
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "20s"

      config {
        image    = "${var.sandbox_image}"
        command  = "worker"
        args     = ["runner", "--handover", "--result", "$${NOMAD_ALLOC_DIR}/result.json"]
        work_dir = "/"

        runtime         = "${var.runtime}"
        network_mode    = "${var.network_mode}"
        readonly_rootfs = true
        cap_drop        = ["ALL"]
        security_opt    = ["no-new-privileges"]
        pids_limit      = "${var.pids_limit}"
        init            = true

        mount {
          type     = "tmpfs"
          target   = "/workspace"
          readonly = false
          tmpfs_options {
            size = "${var.workspace_tmpfs_bytes}"
            mode = 1023 # 01777: sticky, world-writable
          }
        }

        mount {
          type     = "tmpfs"
          target   = "/tmp"
          readonly = false
          tmpfs_options {
            size = "${var.tmp_tmpfs_bytes}"
            mode = 1023 # 01777: sticky, world-writable
          }
        }

        mount {
          type     = "tmpfs"
          target   = "/home/agent"
          readonly = false
          tmpfs_options {
            size = "${var.tmp_tmpfs_bytes}"
            mode = 1023 # 01777: sticky, world-writable
          }
        }
      }

      env {
        HOME                                     = "/home/agent"
        TMPDIR                                   = "/tmp"
        AO_WORKSPACE_DIR                         = "/workspace"
        AO_CAPABILITY                            = "${var.capability}"
        AO_TASK_ID                               = "$${NOMAD_META_task_id}"
        AO_SUBTASK_ID                            = "$${NOMAD_META_subtask_id}"
        AO_ATTEMPT                               = "$${NOMAD_META_attempt}"
        AO_HANDOVER_URL                          = "$${NOMAD_META_handover_url}"
        AO__AGENT__COMMAND                       = "claude"
        AO__LOG__FORMAT                          = "json"
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC = "1"
        DISABLE_AUTOUPDATER                      = "1"
      }

      # No model key here: it stays with the worker (agent.api_key). The runner
      # receives, by the hand-over, the address of the worker's per-attempt proxy
      # and a token for it; the proxy adds the key to the agent's model calls,
      # meters them and allows only the run's destinations (docs/sandbox-network.md).

      # Plain, non-secret extra environment of this agent type.
      template {
        destination = "local/extra.env"
        env         = true
        change_mode = "noop"
        data        = <<EOT
${var.extra_env}
EOT
      }

      resources {
        cpu    = "${var.cpu_mhz[var.capability]}"
        memory = "${var.memory_mb[var.capability]}"
      }
    }
  }
}
