"""IAM: named actions and resources only, and each worker limited to its own queues."""

import re

import pytest

import infra
from infra import CAPABILITIES, MODULE, dev_module, module_data

IAM_TF = MODULE / "iam.tf"


def statements(doc_name, key=None, module=None):
    """The evaluated statements of data.aws_iam_policy_document.<doc_name> (for_each key `key`)."""
    m = module or dev_module()
    body = module_data()[("aws_iam_policy_document", doc_name)]
    extra = {}
    if key is not None:
        extra["each"] = {"key": key, "value": m.vars["agent_types"][key]}
    out = []
    for st in body.get("statement", []):
        out.append({k: infra.canon(m.eval(v, **extra)) for k, v in st.items() if not k.startswith("__") and k not in ("principals", "condition")})
    for dyn in body.get("dynamic", []):
        for label, d in dyn.items():
            if label.startswith("__") or infra.unquote(label) != "statement":
                continue
            for value in m.eval(d["for_each"], **extra):
                (content,) = d["content"]
                scope_extra = dict(extra, statement={"value": value, "key": value})
                out.append({k: infra.canon(m.eval(v, **scope_extra)) for k, v in content.items()
                            if not k.startswith("__") and k not in ("principals", "condition")})
    return out


def policy_docs():
    return sorted(name for (kind, name) in module_data() if kind == "aws_iam_policy_document")


def doc_instances():
    for name in policy_docs():
        body = module_data()[("aws_iam_policy_document", name)]
        if body.get("for_each"):
            for k in CAPABILITIES:
                yield name, k
        else:
            yield name, None


@pytest.mark.parametrize("doc,key", list(doc_instances()))
def test_no_wildcard_action(doc, key):
    with_kms = infra.Module({**infra.terragrunt_inputs(),
                             "kms_key_arn": "arn:aws:kms:eu-west-1:123456789012:key/0000",
                             "trusted_principal_arns": ["arn:aws:iam::123456789012:role/ops"]})
    for m in (dev_module(), with_kms):
        for st in statements(doc, key, m):
            for action in st.get("actions", []):
                assert "*" not in action, f"{doc}: wildcard action {action}"
                assert re.fullmatch(r"[a-z0-9-]+:[A-Za-z]+", action), action
            assert "not_actions" not in st and "not_resources" not in st


def test_every_wildcard_resource_is_commented_right_above():
    lines = IAM_TF.read_text().splitlines()
    wildcard_lines = [i for i, l in enumerate(lines)
                      if re.search(r'"[^"]*\*[^"]*"', l) and not l.lstrip().startswith("#")
                      and "sub\"" not in l and ":sub" not in l]
    # Resources with a wildcard, as evaluated, must each come from one of those lines.
    evaluated = [r for d, k in doc_instances() for st in statements(d, k) for r in st.get("resources", [])
                 if "*" in str(r)]
    assert all(":log-stream:*" in r for r in evaluated), evaluated
    for i in wildcard_lines:
        if "resources" not in lines[i]:
            continue
        above = lines[i - 1].strip()
        assert above.startswith("#"), f"iam.tf:{i + 1}: wildcard resource without a comment above: {lines[i]!r}"


def test_trust_policies_pin_audience_and_job():
    for doc in ["coordinator_trust", "worker_trust"]:
        body = module_data()[("aws_iam_policy_document", doc)]
        (st,) = body["statement"]
        tests = {infra.unquote(c["test"]): c for c in st["condition"]}
        assert {"StringEquals", "StringLike"} <= set(tests)
        assert tests["StringEquals"]["variable"].endswith(':aud"')
        assert tests["StringLike"]["variable"].endswith(':sub"')


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_worker_receives_only_from_its_own_queue_and_sends_only_results(capability):
    sts = statements("worker", capability)
    own = f"<aws_sqs_queue.task[{capability}].arn>"
    result = "<aws_sqs_queue.result.arn>"
    receive_resources = set()
    send_resources = set()
    for st in sts:
        actions = set(st["actions"])
        if actions & {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"}:
            receive_resources |= set(st["resources"])
        if "sqs:SendMessage" in actions:
            send_resources |= set(st["resources"])
        for r in st.get("resources", []):
            if r.startswith("<aws_sqs_queue."):
                assert r in (own, result), f"{capability} worker names another queue: {r}"
    assert receive_resources == {own}
    assert send_resources == {result}
    secrets = {r for st in sts if "secretsmanager:GetSecretValue" in st["actions"] for r in st["resources"]}
    assert secrets == {dev_module().vars["github_private_key_secret_arn"],
                       "<aws_secretsmanager_secret.anthropic_api_key.arn>"}
    # The state store is read, never written, and only to notice a cancel.
    dynamo = {a for st in sts for a in st["actions"] if a.startswith("dynamodb:")}
    assert dynamo == {"dynamodb:DescribeTable", "dynamodb:GetItem"}
    tables = {r for st in sts if "dynamodb:GetItem" in st["actions"] for r in st["resources"]}
    assert tables == {"<aws_dynamodb_table.tasks.arn>"}


def test_worker_serving_two_capabilities_receives_from_both_only():
    inputs = infra.terragrunt_inputs()
    types = {k: dict(v) for k, v in inputs["agent_types"].items()}
    types["tester"]["capabilities"] = ["tester", "reviewer"]
    m = infra.Module({**inputs, "agent_types": types})
    receive = {r for st in statements("worker", "tester", m) if "sqs:ReceiveMessage" in st["actions"]
               for r in st["resources"]}
    assert receive == {"<aws_sqs_queue.task[tester].arn>", "<aws_sqs_queue.task[reviewer].arn>"}


def test_coordinator_permissions():
    sts = statements("coordinator")
    by_action = {}
    for st in sts:
        for a in st["actions"]:
            by_action.setdefault(a, set()).update(st["resources"])
    tasks = {f"<aws_sqs_queue.task[{c}].arn>" for c in CAPABILITIES}
    dlqs = {f"<aws_sqs_queue.task_dlq[{c}].arn>" for c in CAPABILITIES} | {"<aws_sqs_queue.result_dlq.arn>"}
    result = "<aws_sqs_queue.result.arn>"
    assert by_action["sqs:SendMessage"] == tasks
    assert by_action["sqs:ReceiveMessage"] == {result} | dlqs
    assert by_action["sqs:GetQueueAttributes"] == tasks | dlqs | {result}
    table = "<aws_dynamodb_table.tasks.arn>"
    assert by_action["dynamodb:Query"] == {table, f"{table}/index/status-index", f"{table}/index/repository-index",
                                       f"{table}/index/all-index"}
    assert by_action["secretsmanager:GetSecretValue"] == {
        "<aws_secretsmanager_secret.webhook.arn>", "<aws_secretsmanager_secret.api_token.arn>",
        dev_module().vars["github_private_key_secret_arn"]}
    assert not any(a.startswith("sqs:") and "Purge" in a or a == "dynamodb:Scan" for a in by_action)


def test_trust_subjects_name_the_jobs_groups_tasks_and_identity():
    """The sub claim the roles accept is the one the rendered jobs' identities will carry."""
    m = dev_module()
    cases = [("coordinator_trust", None, m.local("coordinator_job_file"))]
    cases += [("worker_trust", c, m.local("worker_job_files")[c]) for c in CAPABILITIES]
    for doc, key, text in cases:
        body = module_data()[("aws_iam_policy_document", doc)]
        (st,) = body["statement"]
        (like,) = [c for c in st["condition"] if infra.unquote(c["test"]) == "StringLike"]
        extra = {"each": {"key": key, "value": m.vars["agent_types"][key]}} if key else {}
        (sub,) = m.eval(like["values"], **extra)
        _, namespace, job_id, group, task, identity = sub.split(":")
        job = infra.job_body(infra.nomad_job_rendered(text))
        assert (job["id"], job["namespace"]) == (job_id, namespace)
        (groups,) = job["group"]
        assert group in groups
        (tasks,) = groups[group]["task"]
        assert task in tasks
        names = [i.get("name") for i in tasks[task]["identity"]]
        assert identity in names
        env = infra.find_blocks(tasks[task], "env")[0]
        assert env["AWS_WEB_IDENTITY_TOKEN_FILE"] == "${NOMAD_SECRETS_DIR}/nomad_" + identity + ".jwt"
        role = "coordinator" if key is None else f"worker[{key}]"
        assert env["AWS_ROLE_ARN"] == f"<aws_iam_role.{role}.arn>"
