"""A small evaluator for the HCL2 expressions the infrastructure files use.

python-hcl2 parses the files but leaves every expression as text. To check
what the Terraform module and the Terragrunt example *produce* (queue names,
the values handed to templatefile), this module evaluates that text: literals,
template strings, references, operators, conditionals, `for` expressions and
the handful of functions the files call. References it cannot know before an
apply (resource attributes, data sources) evaluate to `Unknown` placeholders
that print as `<reference>`. Anything outside the supported subset raises
`EvalError`, so that a change in the files fails the tests loudly instead of
being skipped.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable


class EvalError(Exception):
    pass


@dataclass(frozen=True)
class Unknown:
    """A value known only after apply, e.g. aws_iam_role.coordinator.arn."""

    ref: str

    def __str__(self) -> str:
        return f"<{self.ref}>"


@dataclass(frozen=True)
class Runtime:
    """A reference Nomad leaves for run time (NOMAD_ALLOC_DIR, attr.*, meta.*)."""

    ref: str

    def __str__(self) -> str:
        return "${" + self.ref + "}"


@dataclass(frozen=True)
class TypeSpec:
    """A type constraint: string, number, bool, any, list(T), map(T), object({...}), optional(T, default)."""

    kind: str
    elem: Any = None
    default: Any = None


# --------------------------------------------------------------------------
# Parser: expression text -> small AST of tuples
# --------------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")


class _Parser:
    def __init__(self, text: str):
        self.s = text
        self.i = 0

    # -- low level ---------------------------------------------------------
    def ws(self) -> None:
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif s.startswith("#", self.i) or s.startswith("//", self.i):
                while self.i < len(s) and s[self.i] != "\n":
                    self.i += 1
            elif s.startswith("/*", self.i):
                end = s.find("*/", self.i)
                if end < 0:
                    raise EvalError("unterminated comment")
                self.i = end + 2
            else:
                break

    def peek(self, tok: str) -> bool:
        self.ws()
        return self.s.startswith(tok, self.i)

    def take(self, tok: str) -> bool:
        if self.peek(tok):
            self.i += len(tok)
            return True
        return False

    def expect(self, tok: str) -> None:
        if not self.take(tok):
            raise EvalError(f"expected {tok!r} at {self.i} in {self.s!r}")

    def ident(self) -> str | None:
        self.ws()
        m = _IDENT.match(self.s, self.i)
        if not m:
            return None
        self.i = m.end()
        return m.group(0)

    def at_end(self) -> bool:
        self.ws()
        return self.i >= len(self.s)

    # -- expressions -------------------------------------------------------
    def expr(self):
        cond = self.binary(0)
        if self.peek("?"):
            self.i += 1
            a = self.expr()
            self.expect(":")
            b = self.expr()
            return ("cond", cond, a, b)
        return cond

    _LEVELS = [["||"], ["&&"], ["==", "!="], ["<=", ">=", "<", ">"], ["+", "-"], ["*", "/", "%"]]

    def binary(self, level: int):
        if level == len(self._LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while True:
            self.ws()
            op = next((o for o in self._LEVELS[level] if self.s.startswith(o, self.i)), None)
            # "=>" and "==" must not be read as "=" things, "<<" heredocs are not "<".
            if op is None or (op == ">" and self.s.startswith("=>", self.i - 1)):
                return left
            self.i += len(op)
            right = self.binary(level + 1)
            left = ("op", op, left, right)

    def unary(self):
        if self.peek("!") and not self.peek("!="):
            self.i += 1
            return ("not", self.unary())
        if self.peek("-"):
            self.i += 1
            return ("neg", self.unary())
        return self.postfix(self.primary())

    def postfix(self, node):
        while True:
            if self.peek("[*]"):
                raise EvalError("splat expressions are not supported")
            if self.peek(".") and not self.peek("..."):
                self.i += 1
                name = self.ident()
                if name is None:
                    m = _NUMBER.match(self.s, self.i)
                    if not m:
                        raise EvalError(f"bad attribute access in {self.s!r}")
                    self.i = m.end()
                    node = ("index", node, ("lit", int(m.group(0))))
                else:
                    node = ("attr", node, name)
            elif self.peek("["):
                self.i += 1
                key = self.expr()
                self.expect("]")
                node = ("index", node, key)
            else:
                return node

    def primary(self):
        self.ws()
        s = self.s
        if self.i >= len(s):
            raise EvalError(f"unexpected end of {s!r}")
        c = s[self.i]
        if c == "(":
            self.i += 1
            e = self.expr()
            self.expect(")")
            return e
        if c == '"':
            return self.quoted()
        if s.startswith("<<", self.i):
            return self.heredoc()
        if c == "[":
            return self.tuple_or_for()
        if c == "{":
            return self.object_or_for()
        m = _NUMBER.match(s, self.i)
        if m:
            self.i = m.end()
            txt = m.group(0)
            return ("lit", float(txt) if ("." in txt or "e" in txt.lower()) else int(txt))
        name = self.ident()
        if name is None:
            raise EvalError(f"unexpected {s[self.i:self.i + 20]!r} in {s!r}")
        if name == "true":
            return ("lit", True)
        if name == "false":
            return ("lit", False)
        if name == "null":
            return ("lit", None)
        if self.peek("("):
            self.i += 1
            args = []
            while not self.take(")"):
                args.append(self.expr())
                if self.take("..."):
                    raise EvalError("argument expansion is not supported")
                self.take(",")
            return ("call", name, args)
        return ("ref", name)

    def tuple_or_for(self):
        self.expect("[")
        save = self.i
        if self.ident() == "for":
            return self.for_expr("]", is_object=False)
        self.i = save
        items = []
        while not self.take("]"):
            items.append(self.expr())
            self.take(",")
        return ("tuple", items)

    def object_or_for(self):
        self.expect("{")
        save = self.i
        if self.ident() == "for":
            return self.for_expr("}", is_object=True)
        self.i = save
        items = []
        while not self.take("}"):
            self.ws()
            save = self.i
            key_name = self.ident()
            if key_name is not None and (self.peek("=") and not self.peek("==") or self.peek(":")):
                key = ("lit", key_name)
            else:
                self.i = save
                key = self.expr()
            if not (self.take("=") or self.take(":")):
                raise EvalError(f"expected = in object in {self.s!r}")
            items.append((key, self.expr()))
            self.take(",")
        return ("object", items)

    def for_expr(self, close: str, is_object: bool):
        names = [self.ident()]
        if self.take(","):
            names.append(self.ident())
        if self.ident() != "in":
            raise EvalError(f"expected 'in' in {self.s!r}")
        coll = self.expr()
        self.expect(":")
        key = self.expr()
        value = None
        if is_object:
            self.expect("=>")
            value = self.expr()
            if self.take("..."):
                raise EvalError("grouping for expressions are not supported")
        cond = None
        save = self.i
        if self.ident() == "if":
            cond = self.expr()
        else:
            self.i = save
        self.expect(close)
        return ("for", is_object, names, coll, key, value, cond)

    # -- templates ---------------------------------------------------------
    def quoted(self):
        self.expect('"')
        parts: list = []
        buf = []
        s = self.s
        while True:
            if self.i >= len(s):
                raise EvalError(f"unterminated string in {s!r}")
            c = s[self.i]
            if c == '"':
                self.i += 1
                break
            if c == "\\":
                nxt = s[self.i + 1]
                if nxt == "u":
                    buf.append(chr(int(s[self.i + 2:self.i + 6], 16)))
                    self.i += 6
                    continue
                buf.append({"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}[nxt])
                self.i += 2
                continue
            if s.startswith("$${", self.i):
                buf.append("${")
                self.i += 3
                continue
            if s.startswith("%%{", self.i):
                buf.append("%{")
                self.i += 3
                continue
            if s.startswith("%{", self.i):
                raise EvalError("template directives are not supported")
            if s.startswith("${", self.i):
                self.i += 2
                if buf:
                    parts.append(("lit", "".join(buf)))
                    buf = []
                self.take("~")
                parts.append(("interp", self.expr()))
                self.take("~")
                self.expect("}")
                continue
            buf.append(c)
            self.i += 1
        if buf or not parts:
            parts.append(("lit", "".join(buf)))
        return ("template", parts)

    def heredoc(self):
        m = re.compile(r"<<(-?)([A-Za-z_]+)\n").match(self.s, self.i)
        if not m:
            raise EvalError(f"bad heredoc in {self.s!r}")
        strip, marker = m.group(1) == "-", m.group(2)
        end = re.compile(r"\n[ \t]*" + marker + r"(?![A-Za-z0-9_])").search(self.s, m.end() - 1)
        if not end:
            raise EvalError("unterminated heredoc")
        body = self.s[m.end():end.start() + 1]
        self.i = end.end()
        lines = body.split("\n")[:-1]
        if strip:
            indents = [len(l) - len(l.lstrip(" \t")) for l in lines if l.strip()]
            cut = min(indents) if indents else 0
            lines = [l[cut:] for l in lines]
        text = "".join(l + "\n" for l in lines)
        return template_ast(text)


def template_ast(text: str):
    """The AST of a bare template (a heredoc body or a templatefile file)."""
    p = _Parser(text)
    parts: list = []
    buf: list = []
    s = text
    while p.i < len(s):
        if s.startswith("$${", p.i):
            buf.append("${")
            p.i += 3
        elif s.startswith("%%{", p.i):
            buf.append("%{")
            p.i += 3
        elif s.startswith("%{", p.i):
            raise EvalError("template directives are not supported")
        elif s.startswith("${", p.i):
            p.i += 2
            if buf:
                parts.append(("lit", "".join(buf)))
                buf = []
            p.take("~")
            parts.append(("interp", p.expr()))
            p.take("~")
            p.expect("}")
        else:
            buf.append(s[p.i])
            p.i += 1
    if buf or not parts:
        parts.append(("lit", "".join(buf)))
    return ("template", parts)


def parse_expression(text: str):
    p = _Parser(text)
    node = p.expr()
    if not p.at_end():
        raise EvalError(f"trailing text {text[p.i:]!r} in {text!r}")
    return node


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def to_str(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, str):
        return v
    if isinstance(v, (Unknown, Runtime)):
        return str(v)
    raise EvalError(f"cannot use {type(v).__name__} {v!r} in a string template")


def _truthy(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v in ("true", "false"):
        return v == "true"
    raise EvalError(f"{v!r} is not a bool")


def _num(v: Any):
    if isinstance(v, bool):
        raise EvalError("bool is not a number")
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, str):
        return float(v) if "." in v else int(v)
    raise EvalError(f"{v!r} is not a number")


def _coalesce(*args):
    for a in args:
        if a is not None and a != "":
            return a
    raise EvalError("coalesce: no non-null, non-empty argument")


def _merge(*maps):
    out: dict = {}
    for m in maps:
        if m is None:
            continue
        if not isinstance(m, dict):
            raise EvalError(f"merge of non-map {m!r}")
        out.update(m)
    return out


def _lookup(m, k, *default):
    if k in m:
        return m[k]
    if default:
        return default[0]
    raise EvalError(f"lookup: no key {k!r}")


def _min(*a):
    return min(_num(x) for x in a)


def _max(*a):
    return max(_num(x) for x in a)


def _types(kind):
    def make(elem=None, default=None):
        return TypeSpec(kind, elem, default)

    return make


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "coalesce": _coalesce,
    "merge": _merge,
    "keys": lambda m: sorted(m.keys()),
    "values": lambda m: [m[k] for k in sorted(m.keys())],
    "lookup": _lookup,
    "join": lambda sep, items: sep.join(to_str(x) for x in items),
    "split": lambda sep, s: s.split(sep),
    "element": lambda items, i: items[_num(i) % len(items)],
    "length": lambda x: len(x),
    "contains": lambda items, x: x in items,
    "concat": lambda *lists: [x for l in lists for x in l],
    "flatten": lambda items: [y for x in items for y in (x if isinstance(x, list) else [x])],
    "sort": lambda items: sorted(items),
    "distinct": lambda items: list(dict.fromkeys(items)),
    "toset": lambda items: sorted(dict.fromkeys(items)),
    "tolist": lambda items: list(items),
    "tostring": to_str,
    "tonumber": _num,
    "lower": lambda s: s.lower(),
    "upper": lambda s: s.upper(),
    "replace": lambda s, a, b: s.replace(a, b),
    "format": lambda f, *a: _format(f, *a),
    "min": _min,
    "max": _max,
    "ceil": lambda x: math.ceil(_num(x)),
    "floor": lambda x: math.floor(_num(x)),
    "startswith": lambda s, p: s.startswith(p),
    "endswith": lambda s, p: s.endswith(p),
    "strcontains": lambda s, p: p in s,
    "alltrue": lambda items: all(_truthy(x) for x in items),
    "anytrue": lambda items: any(_truthy(x) for x in items),
    "regex": lambda pattern, s: _regex(pattern, s),
    "jsonencode": lambda v: json.dumps(v, separators=(",", ":"), sort_keys=True, default=str),
    "string": TypeSpec("string"),
    "number": TypeSpec("number"),
    "bool": TypeSpec("bool"),
    "any": TypeSpec("any"),
    "list": _types("list"),
    "set": _types("list"),
    "map": _types("map"),
    "object": _types("object"),
    "optional": _types("optional"),
}


def _regex(pattern: str, s: str):
    m = re.search(pattern, s)
    if not m:
        raise EvalError(f"regex {pattern!r} does not match {s!r}")
    return m.group(0)


def _format(fmt: str, *args):
    out, ai = [], 0
    parts = re.split(r"(%[sd%])", fmt)
    for p in parts:
        if p == "%%":
            out.append("%")
        elif p in ("%s", "%d"):
            out.append(to_str(args[ai]))
            ai += 1
        else:
            out.append(p)
    return "".join(out)


class Scope:
    """Names visible to an expression: var, local, each, path, module outputs ..."""

    def __init__(self, roots: dict[str, Any], functions: dict[str, Callable] | None = None,
                 unknown_roots: tuple[str, ...] = (), runtime_refs: bool = False):
        self.roots = roots
        self.runtime_refs = runtime_refs
        self.functions = dict(FUNCTIONS)
        if functions:
            self.functions.update(functions)
        self.unknown_roots = unknown_roots

    def child(self, extra: dict[str, Any]) -> "Scope":
        s = Scope(dict(self.roots), None, self.unknown_roots, self.runtime_refs)
        s.functions = self.functions
        s.roots.update(extra)
        return s


def evaluate(node, scope: Scope) -> Any:
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "template":
        parts = node[1]
        if len(parts) == 1 and parts[0][0] == "interp":
            return evaluate(parts[0][1], scope)  # "${x}" alone keeps x's type
        return "".join(p[1] if p[0] == "lit" else to_str(evaluate(p[1], scope)) for p in parts)
    if kind == "ref":
        name = node[1]
        if name in scope.roots:
            v = scope.roots[name]
            return v() if callable(v) else v
        if name in scope.unknown_roots:
            return Unknown(name)
        if name in ("string", "number", "bool", "any"):
            return FUNCTIONS[name]
        if scope.runtime_refs:
            return Runtime(name)
        raise EvalError(f"unknown reference {name!r}")
    if kind == "attr":
        base = evaluate(node[1], scope)
        if isinstance(base, Unknown):
            return Unknown(f"{base.ref}.{node[2]}")
        if isinstance(base, Runtime):
            return Runtime(f"{base.ref}.{node[2]}")
        if isinstance(base, dict):
            if node[2] not in base:
                raise EvalError(f"no attribute {node[2]!r} in {sorted(base)}")
            v = base[node[2]]
            return v() if callable(v) and not isinstance(v, TypeSpec) else v
        raise EvalError(f"attribute {node[2]!r} of {base!r}")
    if kind == "index":
        base = evaluate(node[1], scope)
        key = evaluate(node[2], scope)
        if isinstance(base, Unknown):
            return Unknown(f"{base.ref}[{to_str(key)}]")
        if isinstance(base, list):
            return base[_num(key)]
        if isinstance(base, dict):
            if key not in base:
                raise EvalError(f"no key {key!r} in {sorted(base)}")
            return base[key]
        raise EvalError(f"index into {base!r}")
    if kind == "call" and node[1] in ("can", "try"):
        for i, arg in enumerate(node[2]):
            try:
                v = evaluate(arg, scope)
                return True if node[1] == "can" else v
            except (EvalError, KeyError, IndexError, ValueError, TypeError):
                if node[1] == "can":
                    return False
        raise EvalError("try: no argument succeeded")
    if kind == "call":
        fn = scope.functions.get(node[1])
        if fn is None:
            raise EvalError(f"unsupported function {node[1]}()")
        args = [evaluate(a, scope) for a in node[2]]
        if isinstance(fn, TypeSpec):
            raise EvalError(f"{node[1]} is not a function")
        return fn(*args)
    if kind == "tuple":
        return [evaluate(x, scope) for x in node[1]]
    if kind == "object":
        out = {}
        for k, v in node[1]:
            out[to_str(evaluate(k, scope))] = evaluate(v, scope)
        return out
    if kind == "cond":
        return evaluate(node[2], scope) if _truthy(evaluate(node[1], scope)) else evaluate(node[3], scope)
    if kind == "not":
        return not _truthy(evaluate(node[1], scope))
    if kind == "neg":
        return -_num(evaluate(node[1], scope))
    if kind == "op":
        op = node[1]
        a = evaluate(node[2], scope)
        if op == "&&":
            return _truthy(a) and _truthy(evaluate(node[3], scope))
        if op == "||":
            return _truthy(a) or _truthy(evaluate(node[3], scope))
        b = evaluate(node[3], scope)
        if op == "==":
            return a == b
        if op == "!=":
            return a != b
        a, b = _num(a), _num(b)
        ops = {"<": lambda: a < b, ">": lambda: a > b, "<=": lambda: a <= b, ">=": lambda: a >= b,
               "+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b,
               "%": lambda: a % b}
        return ops[op]()
    if kind == "for":
        _, is_object, names, coll_node, key_node, value_node, cond = node
        coll = evaluate(coll_node, scope)
        if isinstance(coll, dict):
            pairs = [(k, coll[k]) for k in sorted(coll)]
        elif isinstance(coll, list):
            pairs = list(enumerate(coll))
        else:
            raise EvalError(f"for over {coll!r}")
        out_map: dict = {}
        out_list: list = []
        for k, v in pairs:
            binding = {names[0]: v} if len(names) == 1 else {names[0]: k, names[1]: v}
            inner = scope.child(binding)
            if cond is not None and not _truthy(evaluate(cond, inner)):
                continue
            if is_object:
                out_map[to_str(evaluate(key_node, inner))] = evaluate(value_node, inner)
            else:
                out_list.append(evaluate(key_node, inner))
        return out_map if is_object else out_list
    raise EvalError(f"cannot evaluate {kind}")


# --------------------------------------------------------------------------
# python-hcl2 values -> evaluated values
# --------------------------------------------------------------------------


def parsed_to_ast(value: Any):
    """Turn one value as python-hcl2 (quotes kept) gives it into an AST."""
    if isinstance(value, str):
        if value.startswith('"<<') and value.endswith('"'):
            return _Parser(value[1:-1]).heredoc()
        if value.startswith('"'):
            p = _Parser(value)
            node = p.quoted()
            if not p.at_end():
                raise EvalError(f"trailing text in {value!r}")
            return node
        if value.startswith("${") and value.endswith("}"):
            return parse_expression(value[2:-1])
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            return parse_expression(value)  # a bare keyword such as a type name
        raise EvalError(f"unrecognised value {value!r}")
    if isinstance(value, bool) or value is None or isinstance(value, (int, float)):
        return ("lit", value)
    if isinstance(value, list):
        return ("tuple", [parsed_to_ast(v) for v in value])
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if k.startswith("__"):
                continue
            key = k[1:-1] if k.startswith('"') else k
            items.append((("lit", key), parsed_to_ast(v)))
        return ("object", items)
    raise EvalError(f"unrecognised value {value!r}")


def eval_parsed(value: Any, scope: Scope) -> Any:
    return evaluate(parsed_to_ast(value), scope)


def convert(value: Any, spec: TypeSpec | None) -> Any:
    """Apply a variable's type constraint: fill optional() object attributes with their defaults."""
    if spec is None or value is None or isinstance(value, Unknown):
        return value
    if spec.kind == "optional":
        return convert(value, spec.elem)
    if spec.kind == "map":
        return {k: convert(v, spec.elem) for k, v in value.items()}
    if spec.kind == "list":
        return [convert(v, spec.elem) for v in value]
    if spec.kind == "object":
        out = {}
        for name, attr in spec.elem.items():
            if name in value:
                out[name] = convert(value[name], attr)
            elif isinstance(attr, TypeSpec) and attr.kind == "optional":
                out[name] = convert(attr.default, attr.elem)
            else:
                raise EvalError(f"missing required attribute {name!r}")
        extra = set(value) - set(spec.elem)
        if extra:
            raise EvalError(f"unexpected attributes {sorted(extra)}")
        return out
    if spec.kind == "number":
        return _num(value)
    if spec.kind == "string":
        return to_str(value)
    return value
