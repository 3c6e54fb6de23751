"""The Nomad job files: variables, one source of truth with the module, resources, hardening, autoscaling."""

import re

import pytest

import infra
from infra import CAPABILITIES, NOMAD, dev_module, job_body, find_blocks

JOBS = {name: NOMAD / name for name in infra.JOB_FILES}


def rendered_cases():
    yield "coordinator", None
    for c in CAPABILITIES:
        yield "worker", c
        yield "sandbox", c


def rendered(kind, capability):
    m = dev_module()
    if kind == "coordinator":
        return m.local("coordinator_job_file"), m.local("coordinator_job_vars")
    return m.local(f"{kind}_job_files")[capability], m.local(f"{kind}_job_vars")[capability]


@pytest.mark.parametrize("name", infra.JOB_FILES)
def test_every_variable_used_is_declared_and_every_declared_one_used(name):
    text = JOBS[name].read_text()
    declared = set(infra.job_variables(infra.load(JOBS[name])))
    used = set(re.findall(r"\bvar\.([a-z_][a-z0-9_]*)", infra.strip_comments(text.split("\njob ", 1)[1])))
    assert used <= declared, f"undeclared: {used - declared}"
    assert declared <= used, f"declared but unused: {declared - used}"


@pytest.mark.parametrize("name", infra.JOB_FILES)
def test_job_files_keep_to_what_templatefile_and_nomad_read_alike(name):
    text = JOBS[name].read_text()
    head, body = text.split("\njob ", 1)
    # Variable declarations: no interpolation at all (templatefile would touch it).
    assert infra.interpolations(head) == [], "interpolation in a variable block or comment"
    for expr in infra.interpolations(body):
        assert infra.ALLOWED_INTERPOLATION.match(expr), f"${{{expr}}}: only var.NAME or var.MAP[var.NAME]"
    # No bare var.x (templatefile would leave it, Nomad would then use the default).
    for line in infra.strip_comments(body).splitlines():
        outside = re.sub(r"\$\{[^}]*\}", "", line)
        assert not re.search(r"\bvar\.", outside), f"bare variable reference: {line.strip()}"
    assert "%{" not in text.replace("%%{", ""), "template directives are not allowed"


@pytest.mark.parametrize("kind,capability", list(rendered_cases()))
def test_rendered_job_equals_the_job_nomad_reads_with_the_same_values(kind, capability):
    text, values = rendered(kind, capability)
    declared = set(infra.job_variables(infra.load(JOBS[f"{kind}.nomad.hcl"])))
    assert set(values) <= declared, f"the module passes undeclared variables: {set(values) - declared}"
    as_rendered = infra.nomad_job_rendered(text)
    as_nomad = infra.nomad_job_as_parsed_by_nomad(JOBS[f"{kind}.nomad.hcl"], values)
    assert as_rendered == as_nomad


def test_a_bare_reference_would_be_caught(tmp_path):
    """The equivalence check above is able to fail: a bare var.x renders differently."""
    src = JOBS["sandbox.nomad.hcl"].read_text().replace('runtime         = "${var.runtime}"', "runtime = var.runtime")
    path = tmp_path / "sandbox.nomad.hcl"
    path.write_text(src)
    values = dict(dev_module().local("sandbox_job_vars")["coder"], runtime="runsc")
    text = infra.templatefile(str(path), {"var": values})
    assert infra.nomad_job_rendered(text) != infra.nomad_job_as_parsed_by_nomad(path, values)


def job(kind, capability="coder"):
    text, _ = rendered(kind, capability)
    return job_body(infra.nomad_job_rendered(text))


def test_every_capability_has_its_worker_and_sandbox_job():
    ids = set()
    for c in CAPABILITIES:
        w, s = job("worker", c), job("sandbox", c)
        assert w["id"] == f"ao-worker-{c}" and s["id"] == f"ao-sandbox-{c}"
        env = find_blocks(w, "env")[0]
        assert env["AO__WORKER__CAPABILITIES"] == c
        assert env["AO__SANDBOX__DRIVER"] == "nomad"
        ids |= {w["id"], s["id"]}
    assert len(ids) == 2 * len(CAPABILITIES)


def readme_defaults():
    """The sandbox resource table of nomad/README.md: {capability: (cpu, memory)}."""
    rows = re.findall(r"^\|\s*`?(\w+)`?\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|", (NOMAD / "README.md").read_text(), re.M)
    return {c: (int(cpu), int(mem)) for c, cpu, mem in rows if c in CAPABILITIES}


def test_sandbox_resource_defaults_match_the_documented_ones():
    documented = {"coder": (1000, 2048), "tester": (500, 1024), "reviewer": (500, 1024),
                  "docs": (300, 512), "planner": (500, 1024)}
    assert readme_defaults() == documented
    variables = infra.job_variables(infra.load(JOBS["sandbox.nomad.hcl"]))
    cpu = infra.eval_parsed(variables["cpu_mhz"]["default"], infra.Scope({}))
    mem = infra.eval_parsed(variables["memory_mb"]["default"], infra.Scope({}))
    assert {c: (cpu[c], mem[c]) for c in CAPABILITIES} == documented
    # Nomad run without -var: each capability gets its documented size.
    for c in CAPABILITIES:
        body = job_body(infra.nomad_job_as_parsed_by_nomad(JOBS["sandbox.nomad.hcl"], {"capability": c}))
        (res,) = find_blocks(body, "resources")
        assert (int(res["cpu"]), int(res["memory"])) == documented[c]


def test_module_sizes_sandboxes_from_agent_types():
    for c in CAPABILITIES:
        (res,) = find_blocks(job("sandbox", c), "resources")
        t = dev_module().vars["agent_types"][c]
        assert (int(res["cpu"]), int(res["memory"])) == (t["cpu_limit"], t["memory_limit"])


def test_sandbox_is_parameterized_single_attempt_and_hardened():
    s = job("sandbox")
    (p,) = s["parameterized"]
    # What the nomad driver sends (worker/src/sandbox/nomad): exactly these meta keys, no
    # payload (the run spec and secrets come by the worker's hand-over).
    assert p["payload"] == "forbidden"
    assert p["meta_required"] == ["task_id", "subtask_id", "attempt", "handover_url"]
    (group,) = s["group"][0].values()
    assert group["restart"][0]["attempts"] == "0"
    assert group["reschedule"][0]["attempts"] == "0" and group["reschedule"][0]["unlimited"] == "false"
    ((task_name, task),) = group["task"][0].items()
    assert task_name == "runner", "the nomad driver follows the task named runner"
    assert "dispatch_payload" not in task
    (ident,) = task["identity"]
    assert ident["name"] == "ao_handover" and ident["aud"] == ["agent-orchestrator-handover"]
    assert ident["file"] == "true" and ident.get("env", "false") == "false"
    assert task["env"][0]["AO_HANDOVER_URL"] == "${NOMAD_META_handover_url}"
    assert task["user"] not in ("root", "0", "")
    (cfg,) = task["config"]
    assert cfg["args"] == ["runner", "--handover", "--result", "${NOMAD_ALLOC_DIR}/result.json"]
    assert cfg["cap_drop"] == ["ALL"]
    assert "no-new-privileges" in cfg["security_opt"]
    assert cfg["readonly_rootfs"] == "true"
    assert int(cfg["pids_limit"]) > 0
    assert cfg["runtime"] in ("runc", "runsc") and cfg["network_mode"]
    tmpfs = {mnt["target"] for mnt in cfg["mount"] if mnt["type"] == "tmpfs"}
    assert {"/workspace", "/tmp"} <= tmpfs
    runsc = job_body(infra.nomad_job_as_parsed_by_nomad(JOBS["sandbox.nomad.hcl"], {"runtime": "runsc"}))
    assert find_blocks(runsc, "config")[0]["runtime"] == "runsc"


SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PRIVATE_KEY|API_KEY)", re.I)
SECRET_REF = re.compile(r"^(env:[A-Z0-9_]+|file:/\S+|aws-sm:\S+)$")


@pytest.mark.parametrize("kind", ["coordinator", "worker", "sandbox"])
def test_secrets_come_from_templates_never_from_plain_env(kind):
    body = job(kind)
    for env in find_blocks(body, "env"):
        for key, value in env.items():
            if SECRET_NAME.search(key) and key != "AWS_WEB_IDENTITY_TOKEN_FILE":
                assert key.startswith("AO__") and SECRET_REF.match(value), f"{key} = {value!r} is not a secret ref"
    templates = find_blocks(body, "template")
    if kind == "sandbox":
        # The model key stays with the worker's proxy (docs/sandbox-network.md, "Nomad"):
        # no Nomad Variable and no key reach the sandbox job.
        assert not any("nomadVar" in t["data"] or "ANTHROPIC_API_KEY" in t["data"] for t in templates), \
            "the sandbox job must not read the model key"
    else:
        assert any("nomadVar" in t["data"] for t in templates)


def test_coordinator_service_checks_and_metrics_tag():
    c = job("coordinator")
    (service,) = find_blocks(c, "service")
    paths = {chk["path"] for chk in service["check"]}
    assert paths == {"/healthz", "/readyz"}
    assert service["provider"] == "consul"
    assert "prometheus" in service["tags"]
    assert find_blocks(service, "meta")[0]["metrics_path"] == "/metrics"
    env = find_blocks(c, "env")[0]
    assert env["AO__SERVER__LISTEN"].startswith("0.0.0.0:")
    assert env["AO__BACKEND__KIND"] == "aws"
    m = dev_module()
    assert env["AO__AWS__QUEUE_PREFIX"] == m.local("queue_prefix")
    assert env["AO__AWS__TABLE"] == m.local("table_name")


def test_two_coordinators_run_by_default():
    """docs/operations.md: replicas share the backend and hold the singleton loops through
    leases; the job, the module and the job as Nomad reads it without -var run two."""
    variables = infra.job_variables(infra.load(JOBS["coordinator.nomad.hcl"]))
    assert variables["coordinator_count"]["default"] == 2
    assert infra.module_variables()["coordinator_count"]["default"] == 2
    (group,) = find_blocks(job("coordinator"), "group")
    assert int(group["coordinator"]["count"]) == 2
    body = job_body(infra.nomad_job_as_parsed_by_nomad(JOBS["coordinator.nomad.hcl"], {}))
    (group,) = find_blocks(body, "group")
    assert int(group["coordinator"]["count"]) == 2


def test_worker_scaling_follows_queue_depth_of_its_capability():
    metrics = infra.exported_metrics()
    for c in CAPABILITIES:
        w = job("worker", c)
        (scaling,) = find_blocks(w, "scaling")
        t = dev_module().vars["agent_types"][c]
        assert (int(scaling["min"]), int(scaling["max"])) == (t["min_instances"], t["max_instances"])
        (check,) = find_blocks(scaling, "check")
        (queue_depth,) = check.values()
        assert queue_depth["source"] == "prometheus"
        assert "target-value" in queue_depth["strategy"][0]
        query = queue_depth["query"]
        names = set(re.findall(r"\b(ao_[a-z_]+)\b", query))
        assert "ao_queue_messages" in names and names <= metrics, names - metrics
        assert f'queue="{c}"' in query
