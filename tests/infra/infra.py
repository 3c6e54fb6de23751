"""Loading and evaluating the repository's Terraform, Terragrunt and Nomad files."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import hcl2

from hcl_eval import (
    EvalError,
    Scope,
    TypeSpec,
    Unknown,
    convert,
    eval_parsed,
    evaluate,
    parsed_to_ast,
    template_ast,
    to_str,
)

REPO = Path(__file__).resolve().parents[2]
TERRAFORM = REPO / "terraform"
MODULE = TERRAFORM / "modules" / "agent-orchestrator"
LIVE = TERRAFORM / "live"
DEV_UNIT = LIVE / "dev" / "agent-orchestrator"
NOMAD = REPO / "nomad"
MONITORING = NOMAD / "monitoring"
HERE = Path(__file__).resolve().parent

CAPABILITIES = ["planner", "coder", "tester", "reviewer", "docs"]
JOB_FILES = ["coordinator.nomad.hcl", "worker.nomad.hcl", "sandbox.nomad.hcl"]

# Roots of references that are only known after apply.
UNKNOWN_ROOTS = (
    "aws_sqs_queue",
    "aws_iam_role",
    "aws_secretsmanager_secret",
    "aws_cloudwatch_log_group",
    "aws_dynamodb_table",
    "aws_vpc_endpoint",
    "data",
)


@functools.lru_cache(maxsize=None)
def load(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return hcl2.load(f)


def exported_metrics() -> set[str]:
    lines = (HERE / "exported_metrics.txt").read_text().splitlines()
    return {l.strip() for l in lines if l.strip() and not l.startswith("#")}


def unquote(label: str) -> str:
    return label[1:-1] if label.startswith('"') and label.endswith('"') else label


def blocks(doc: dict, kind: str) -> list[dict]:
    return [b for b in doc.get(kind, [])]


def labelled(doc: dict, kind: str) -> dict[str, dict]:
    """Blocks with one label: {label: body}."""
    out = {}
    for b in doc.get(kind, []):
        for label, body in b.items():
            if not label.startswith("__"):
                out[unquote(label)] = body
    return out


def labelled2(doc: dict, kind: str) -> dict[tuple[str, str], dict]:
    """Blocks with two labels (resource, data): {(type, name): body}."""
    out = {}
    for b in doc.get(kind, []):
        for t, inner in b.items():
            if t.startswith("__"):
                continue
            for name, body in inner.items():
                if not name.startswith("__"):
                    out[(unquote(t), unquote(name))] = body
    return out


def strip_comments(text: str) -> str:
    """Drop # and // line comments (outside strings, good enough for these files)."""
    out = []
    for line in text.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("#") or stripped.startswith("//"):
            continue
        out.append(line)
    return "\n".join(out)


def module_tf_files() -> list[Path]:
    return sorted(MODULE.glob("*.tf"))


@functools.lru_cache(maxsize=None)
def module_docs() -> dict[str, dict]:
    return {p.name: load(p) for p in module_tf_files()}


def module_all(kind: str) -> list[dict]:
    out = []
    for doc in module_docs().values():
        out.extend(doc.get(kind, []))
    return out


def module_variables() -> dict[str, dict]:
    return labelled({"variable": module_all("variable")}, "variable")


def module_outputs() -> dict[str, dict]:
    return labelled({"output": module_all("output")}, "output")


def module_resources() -> dict[tuple[str, str], dict]:
    return labelled2({"resource": module_all("resource")}, "resource")


def module_data() -> dict[tuple[str, str], dict]:
    return labelled2({"data": module_all("data")}, "data")


def module_locals() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for b in module_all("locals"):
        for k, v in b.items():
            if not k.startswith("__"):
                assert k not in out, f"local.{k} defined twice"
                out[k] = v
    return out


# --------------------------------------------------------------------------
# Terragrunt example inputs
# --------------------------------------------------------------------------


def terragrunt_functions(unit_dir: Path) -> dict:
    rel = unit_dir.relative_to(LIVE).as_posix()
    return {
        "path_relative_to_include": lambda: rel,
        "get_env": lambda name, default="": default,
        "get_aws_account_id": lambda: "123456789012",
        "get_repo_root": lambda: str(REPO),
        "find_in_parent_folders": lambda name="terragrunt.hcl": str(LIVE / name),
    }


def _eval_locals(raw: dict[str, Any], scope: Scope) -> dict[str, Any]:
    """Evaluate a locals map lazily, in whatever order references need."""
    done: dict[str, Any] = {}
    busy: set[str] = set()

    class Lazy(dict):
        def __contains__(self, key):
            return key in raw

        def __getitem__(self, key):
            if key not in done:
                if key in busy:
                    raise EvalError(f"local.{key} refers to itself")
                if key not in raw:
                    raise EvalError(f"no local.{key}")
                busy.add(key)
                done[key] = eval_parsed(raw[key], scope)
                busy.discard(key)
            return done[key]

        def keys(self):
            return raw.keys()

    lazy = Lazy()
    scope.roots["local"] = lazy
    return lazy


@functools.lru_cache(maxsize=None)
def terragrunt_inputs(unit_dir: Path = DEV_UNIT) -> dict[str, Any]:
    """The inputs Terragrunt hands the module: root.hcl's inputs, then the unit's (mocks for dependencies)."""
    funcs = terragrunt_functions(unit_dir)
    root = load(LIVE / "root.hcl")
    unit = load(unit_dir / "terragrunt.hcl")

    root_scope = Scope({}, funcs)
    root_locals_raw = {k: v for b in root.get("locals", []) for k, v in b.items() if not k.startswith("__")}
    root_locals = _eval_locals(root_locals_raw, root_scope)
    root_inputs = {}
    for b in root.get("inputs", []) if isinstance(root.get("inputs"), list) else [root.get("inputs", {})]:
        root_inputs.update(eval_parsed(b, root_scope) if b else {})

    deps = {}
    for name, body in labelled(unit, "dependency").items():
        mocks = body.get("mock_outputs", {})
        deps[name] = {"outputs": eval_parsed(mocks, Scope({}, funcs))}
    unit_scope = Scope({"dependency": deps, "include": {"root": {"locals": {k: root_locals[k] for k in root_locals_raw}}}}, funcs)
    unit_raw = unit.get("inputs", {})
    unit_inputs = eval_parsed(unit_raw, unit_scope)
    return {**root_inputs, **unit_inputs}


# --------------------------------------------------------------------------
# The module, evaluated for some inputs
# --------------------------------------------------------------------------


class Module:
    """The module's variables and locals evaluated for given inputs.

    templatefile() is the Python implementation below, so local.*_job_file(s)
    hold the rendered job files.
    """

    def __init__(self, inputs: dict[str, Any]):
        self.inputs = inputs
        type_scope = Scope({})
        values: dict[str, Any] = {}
        for name, body in module_variables().items():
            spec = eval_parsed(body["type"], type_scope) if "type" in body else None
            if name in inputs:
                raw = inputs[name]
            elif "default" in body:
                raw = eval_parsed(body["default"], Scope({}))
            else:
                raise EvalError(f"required variable {name} has no input")
            values[name] = convert(raw, spec) if isinstance(spec, TypeSpec) else raw
        unknown = set(inputs) - set(values)
        if unknown:
            raise EvalError(f"inputs for undeclared variables: {sorted(unknown)}")
        self.vars = values
        self.scope = Scope(
            {"var": values, "path": {"module": str(MODULE), "root": str(MODULE)}},
            {"templatefile": templatefile},
            UNKNOWN_ROOTS,
        )
        self.locals = _eval_locals(module_locals(), self.scope)
        # Resources: a for_each resource is a map of its instances, so that
        # `for k, q in aws_sqs_queue.task` and `aws_sqs_queue.task["coder"].arn` work.
        by_type: dict[str, dict[str, Any]] = {}
        for (kind, name), body in module_resources().items():
            by_type.setdefault(kind, {})[name] = self._instances(kind, name, body)
        self.scope.roots.update(by_type)

    def _instances(self, kind: str, name: str, body: dict):
        def make():
            if "for_each" not in body:
                return Unknown(f"{kind}.{name}")
            keys = self.eval(body["for_each"])
            return {k: Unknown(f"{kind}.{name}[{k}]") for k in (keys if isinstance(keys, list) else sorted(keys))}
        return make

    def local(self, name: str) -> Any:
        return self.locals[name]

    def eval(self, parsed_value: Any, **extra: Any) -> Any:
        scope = self.scope.child(extra) if extra else self.scope
        return eval_parsed(parsed_value, scope)

    def validation_failures(self) -> list[str]:
        """Messages of the variable validations that the inputs fail."""
        failed = []
        for name, body in module_variables().items():
            for v in body.get("validation", []):
                ok = eval_parsed(v["condition"], self.scope)
                if ok is not True:
                    failed.append(f"{name}: {eval_parsed(v['error_message'], self.scope)}")
        return failed


@functools.lru_cache(maxsize=None)
def dev_module() -> Module:
    return Module(terragrunt_inputs())


# --------------------------------------------------------------------------
# templatefile() and the Nomad side of a job file
# --------------------------------------------------------------------------

# What a job file may contain between ${ and }: a variable, or a map
# variable indexed by a variable. Anything else would make templatefile and
# Nomad read the file differently or fail.
ALLOWED_INTERPOLATION = re.compile(r"^var\.[a-z_][a-z0-9_]*(\[var\.[a-z_][a-z0-9_]*\])?$")


def interpolations(text: str) -> list[str]:
    """The ${...} interpolations templatefile would evaluate (not $${ escapes)."""
    found = []
    i = 0
    while True:
        i = text.find("${", i)
        if i < 0:
            return found
        if i > 0 and text[i - 1] == "$":
            i += 2
            continue
        j = text.find("}", i)
        found.append(text[i + 2:j])
        i = j + 1


def templatefile(path: str, variables: dict[str, Any]) -> str:
    """Terraform's templatefile(): ${expr} is evaluated, $${ is a literal ${, %%{ a literal %{.

    Everything else, backslashes and quotes included, is copied as is.
    """
    text = Path(path).read_text(encoding="utf-8")
    ast = template_ast(text)
    scope = Scope(dict(variables))
    parts = ast[1]
    return "".join(p[1] if p[0] == "lit" else to_str(evaluate(p[1], scope)) for p in parts)


def _is_block(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    if value.get("__is_block__"):
        return True
    inner = [v for k, v in value.items() if not k.startswith("__")]
    return bool(inner) and all(_is_block(v) for v in inner)


def canon(value: Any) -> Any:
    """Values as Nomad stores them after decoding: scalars compared as strings."""
    if isinstance(value, dict):
        return {k: canon(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canon(v) for v in value]
    if value is None:
        return None
    return to_str(value)


def evaluate_body(body: dict, scope: Scope) -> dict:
    """Evaluate every attribute of an HCL body, keeping the block structure."""
    out = {}
    for key, value in body.items():
        if key.startswith("__"):
            continue
        key = unquote(key)
        if isinstance(value, list) and value and all(_is_block(v) for v in value):
            out[key] = [evaluate_body(v, scope) for v in value]
        elif _is_block(value):
            out[key] = evaluate_body(value, scope)
        else:
            out[key] = canon(eval_parsed(value, scope))
    return out


def job_variables(doc: dict) -> dict[str, dict]:
    return labelled(doc, "variable")


def nomad_job_as_parsed_by_nomad(path: Path, values: dict[str, Any]) -> dict:
    """The job block of a job file as Nomad's HCL2 parser sees it with `values` for its variables.

    Unknown references (NOMAD_*, attr.*) are kept for run time, as Nomad does.
    """
    doc = load(path)
    declared = job_variables(doc)
    env = {}
    for name, body in declared.items():
        if name in values:
            env[name] = values[name]
        else:
            env[name] = eval_parsed(body["default"], Scope({}))
    scope = Scope({"var": env}, runtime_refs=True)
    return evaluate_body({"job": doc["job"]}, scope)


def nomad_job_rendered(rendered_text: str) -> dict:
    """The job block of a rendered job file, as Nomad's HCL2 parser sees it."""
    doc = hcl2.loads(rendered_text)
    scope = Scope({}, runtime_refs=True)
    return evaluate_body({"job": doc["job"]}, scope)


def find_blocks(body: Any, name: str) -> list[dict]:
    """Every block called `name` anywhere below an evaluated body."""
    found = []
    if isinstance(body, dict):
        for k, v in body.items():
            if k == name:
                found.extend(x for x in (v if isinstance(v, list) else [v]) if isinstance(x, dict))
            found.extend(find_blocks(v, name))
    elif isinstance(body, list):
        for v in body:
            found.extend(find_blocks(v, name))
    return found


def job_body(evaluated: dict) -> dict:
    """The body of the single job block, below its label."""
    (job,) = evaluated["job"]
    (label,) = list(job)
    return job[label]
