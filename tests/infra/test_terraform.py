"""The Terraform module and its Terragrunt example, checked by parsing and evaluating them."""

import json
import re

import pytest

import infra
from infra import CAPABILITIES, MODULE, Module, dev_module, terragrunt_inputs

REQUIRED_OUTPUTS = {
    "task_queue_url",
    "task_queue_urls",
    "result_queue_url",
    "dead_letter_queue_urls",
    "task_table_name",
    "coordinator_role_arn",
    "worker_role_arns",
    "coordinator_job_file",
    "agent_job_files",
}

REQUIRED_INPUTS = {
    "cluster_name", "environment", "vpc_id", "subnet_ids", "security_group_ids", "webhook_url",
    "github_app_id", "github_installation_id", "github_private_key_secret_arn", "agent_types",
    "coordinator_cpu_limit", "coordinator_memory_limit", "task_queue_size", "agent_timeout", "tags",
}

CONCERN_FILES = {"versions.tf", "variables.tf", "outputs.tf", "sqs.tf", "dynamodb.tf", "secrets.tf",
                 "iam.tf", "logs.tf", "nomad.tf", "locals.tf"}


def all_hcl_files():
    files = sorted(infra.TERRAFORM.rglob("*.tf")) + sorted(infra.TERRAFORM.rglob("*.hcl"))
    files += sorted(infra.NOMAD.rglob("*.hcl"))
    return [f for f in files if ".terragrunt-cache" not in f.parts and ".terraform" not in f.parts]


@pytest.mark.parametrize("path", all_hcl_files(), ids=lambda p: str(p.relative_to(infra.REPO)))
def test_every_hcl_file_parses(path):
    doc = infra.load(path)
    assert isinstance(doc, dict) and doc


def test_module_is_split_by_concern():
    present = {p.name for p in infra.module_tf_files()}
    assert CONCERN_FILES <= present, CONCERN_FILES - present


def test_provider_and_terraform_versions_are_pinned():
    (tf,) = infra.load(MODULE / "versions.tf")["terraform"]
    assert re.search(r">=\s*1\.\d+", tf["required_version"])
    (providers,) = tf["required_providers"]
    aws = providers["aws"]
    assert infra.unquote(aws["source"]) == "hashicorp/aws"
    assert re.fullmatch(r'"(~>|=)\s*\d+\.\d+(\.\d+)?"', aws["version"]), aws["version"]


def referenced_vars(text):
    return set(re.findall(r"\bvar\.([A-Za-z_][A-Za-z0-9_]*)", infra.strip_comments(text)))


def test_every_referenced_variable_is_declared_and_every_declared_one_used():
    declared = set(infra.module_variables())
    used = set()
    for path in infra.module_tf_files():
        refs = referenced_vars(path.read_text())
        assert refs <= declared, f"{path.name} uses undeclared {sorted(refs - declared)}"
        if path.name != "variables.tf":  # validations only refer to their own variable
            used |= refs
    assert declared - used == set(), f"declared but unused: {sorted(declared - used)}"


def test_variables_have_type_and_description_and_the_known_inputs_exist():
    variables = infra.module_variables()
    assert REQUIRED_INPUTS <= set(variables), REQUIRED_INPUTS - set(variables)
    for name, body in variables.items():
        assert "type" in body, f"variable {name} has no type"
        desc = infra.unquote(str(body.get("description", "")))
        assert len(desc) > 10, f"variable {name} has no description"


def test_validations_exist_where_inputs_can_be_wrong():
    variables = infra.module_variables()
    for name in ["cluster_name", "environment", "agent_types", "agent_timeout", "max_receive_count",
                 "github_private_key_secret_arn", "webhook_url", "log_retention_days"]:
        assert variables[name].get("validation"), f"variable {name} has no validation"


def test_every_required_output_exists_and_is_described():
    outputs = infra.module_outputs()
    assert REQUIRED_OUTPUTS <= set(outputs), REQUIRED_OUTPUTS - set(outputs)
    for name, body in outputs.items():
        assert "value" in body and "description" in body, name


def test_dev_example_passes_the_module_validations():
    assert dev_module().validation_failures() == []


@pytest.mark.parametrize("change, needle", [
    (lambda i: i["agent_types"].pop("docs"), "all five"),
    (lambda i: i["agent_types"].__setitem__("painter", dict(i["agent_types"]["docs"])), "capability names"),
    (lambda i: i.__setitem__("agent_timeout", 5), "agent_timeout"),
    (lambda i: i.__setitem__("max_receive_count", 1), "max_receive_count"),
    (lambda i: i["agent_types"]["coder"].__setitem__("env_vars", {"X": "${oops}"}), "env_vars"),
])
def test_validations_reject_bad_inputs(change, needle):
    inputs = json.loads(json.dumps(terragrunt_inputs()))
    change(inputs)
    failures = Module(inputs).validation_failures()
    assert any(needle in f for f in failures), failures


def resource(kind, name):
    return infra.module_resources()[(kind, name)]


def test_each_agent_type_gets_a_queue_and_a_dead_letter_queue_with_redrive():
    m = dev_module()
    assert resource("aws_sqs_queue", "task")["for_each"] == "${var.agent_types}"
    assert resource("aws_sqs_queue", "task_dlq")["for_each"] == "${var.agent_types}"
    assert m.vars["max_receive_count"] >= 2
    for kind_name, dlq in [("task", "task_dlq"), ("result", "result_dlq")]:
        body = resource("aws_sqs_queue", kind_name)
        for k in (CAPABILITIES if kind_name == "task" else [None]):
            each = {"key": k, "value": m.vars["agent_types"].get(k)} if k else None
            policy = json.loads(m.eval(body["redrive_policy"], **({"each": each} if each else {})))
            assert policy["maxReceiveCount"] >= 2
            target = f"<aws_sqs_queue.{dlq}[{k}].arn>" if k else f"<aws_sqs_queue.{dlq}.arn>"
            assert policy["deadLetterTargetArn"] == target


def test_queues_are_encrypted_long_polled_and_sized_explicitly():
    m = dev_module()
    for name in ["task", "result", "task_dlq", "result_dlq"]:
        body = resource("aws_sqs_queue", name)
        assert "max_message_size" in body, name
        assert body.get("sqs_managed_sse_enabled") is not None and "kms_master_key_id" in body, name
    for name in ["task", "result"]:
        body = resource("aws_sqs_queue", name)
        assert m.eval(body["receive_wait_time_seconds"]) == 20
    # Visibility covers one agent run: derived from agent_timeout.
    task = resource("aws_sqs_queue", "task")
    assert task["visibility_timeout_seconds"] == "${local.task_visibility_timeout}"
    visibility = m.local("task_visibility_timeout")
    assert m.vars["agent_timeout"] < visibility <= 43200
    longer = Module({**terragrunt_inputs(), "agent_timeout": 7200})
    assert longer.local("task_visibility_timeout") > visibility


def test_dynamodb_table_is_the_single_table_design():
    t = resource("aws_dynamodb_table", "tasks")
    m = dev_module()
    assert m.eval(t["billing_mode"]) == "PAY_PER_REQUEST"
    assert (m.eval(t["hash_key"]), m.eval(t["range_key"])) == ("pk", "sk")
    assert t["name"] == "${local.table_name}"
    attrs = {m.eval(a["name"]): m.eval(a["type"]) for a in t["attribute"]}
    assert attrs == {"pk": "S", "sk": "S", "task_status": "S", "task_repository": "S", "created_at": "S",
                     "gsi_all": "S"}
    gsis = {m.eval(g["name"]): (m.eval(g["hash_key"]), m.eval(g["range_key"]), m.eval(g["projection_type"]))
            for g in t["global_secondary_index"]}
    assert gsis == {
        "status-index": ("task_status", "created_at", "KEYS_ONLY"),
        "repository-index": ("task_repository", "created_at", "INCLUDE"),
        "all-index": ("gsi_all", "created_at", "KEYS_ONLY"),
    }
    # The same index names as the Rust DynamoDB store uses.
    rust = (infra.REPO / "shared/src/state/dynamo.rs").read_text()
    for name in gsis:
        assert f'"{name}"' in rust, name
    (ttl,) = t["ttl"]
    assert m.eval(ttl["attribute_name"]) == "expires_at" and ttl["enabled"] is True
    assert t["point_in_time_recovery"][0]["enabled"] is True
    assert t["server_side_encryption"][0]["enabled"] is True


def test_secrets_are_created_without_values_and_the_github_key_only_referenced():
    resources = infra.module_resources()
    secrets = {name for (kind, name) in resources if kind == "aws_secretsmanager_secret"}
    assert secrets == {"webhook", "anthropic_api_key", "api_token"}
    assert not [r for r in resources if r[0] == "aws_secretsmanager_secret_version"], "secret values would sit in state"
    text = (MODULE / "secrets.tf").read_text()
    assert "github" not in " ".join(n for n in secrets)
    assert "var.github_private_key_secret_arn" not in infra.strip_comments(text)


def test_log_group_retention_comes_from_a_variable():
    lg = resource("aws_cloudwatch_log_group", "this")
    assert lg["retention_in_days"] == "${var.log_retention_days}"
    assert dev_module().vars["log_retention_days"] in (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365)


def test_job_files_are_rendered_from_nomad_dir_with_templatefile():
    text = infra.strip_comments((MODULE / "nomad.tf").read_text())
    for name in infra.JOB_FILES:
        assert re.search(r'templatefile\("\$\{local\.nomad_jobs_dir\}/' + re.escape(name) + r'", \{ var = ', text), name
    m = dev_module()
    assert set(m.local("worker_job_files")) == set(CAPABILITIES)
    assert set(m.local("sandbox_job_files")) == set(CAPABILITIES)


def test_terragrunt_example_includes_root_and_mocks_its_dependencies():
    unit = infra.load(infra.DEV_UNIT / "terragrunt.hcl")
    assert "root" in infra.labelled(unit, "include")
    deps = infra.labelled(unit, "dependency")
    assert {"vpc", "nomad_cluster"} <= set(deps)
    for name, body in deps.items():
        assert body.get("mock_outputs"), f"dependency {name} has no mock_outputs"
    text = (infra.DEV_UNIT / "terragrunt.hcl").read_text()
    used = set(re.findall(r"dependency\.(\w+)\.outputs\.(\w+)", text))
    for dep, out in used:
        mocks = infra.eval_parsed(deps[dep]["mock_outputs"], infra.Scope({}))
        assert out in mocks, f"dependency.{dep}.outputs.{out} has no mock"
    inputs = terragrunt_inputs()
    missing = {n for n, b in infra.module_variables().items() if "default" not in b} - set(inputs)
    assert not missing, f"required inputs missing from the example: {missing}"


def test_root_hcl_has_locked_remote_state_and_generates_the_provider():
    root = infra.load(infra.LIVE / "root.hcl")
    (state,) = root["remote_state"]
    assert infra.unquote(state["backend"]) == "s3"
    cfg = state["config"]
    assert cfg["encrypt"] is True and "dynamodb_table" in cfg and "bucket" in cfg
    gens = infra.labelled(root, "generate")
    assert "provider" in gens
    assert 'provider "aws"' in gens["provider"]["contents"]
