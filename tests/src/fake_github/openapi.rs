//! Checks the fake GitHub's traffic against GitHub's own REST description
//! (`@octokit/openapi`, `generated/api.github.com.json`, OpenAPI 3.0.3), installed by
//! `scripts/install-deps.sh` under `tests/github-examples/node_modules` (or found through
//! `$GITHUB_OPENAPI`, see [`spec_path`]).
//!
//! A request must be an operation of the description (method and path template), every
//! query parameter one the operation declares (with the right type), every required query
//! parameter present, and a JSON body valid against the operation's `requestBody` schema.
//! Every JSON answer of the fake is checked against the operation's response schema for
//! its status. The fake fills only the fields the project reads (plus identifying ones);
//! before the check, [`RestApi::complete`] adds each *required* field the fake does not
//! model with a placeholder the schema allows (`null` where the field is nullable, else
//! an empty value of its type), so the fields the fake does fill are checked for real.
//!
//! OpenAPI 3.0's `nullable: true` is rewritten as JSON Schema (`type: [t, "null"]`, or
//! `anyOf` with `{"type": "null"}`) once at load; schemas are then checked as draft 4.
//!
//! The description is 13 MB: it is read once per test process ([`rest`]). Without it (a
//! plain `cargo test` in a clone where `make deps-test` did not run), the fake still
//! serves every request; only the check is skipped, which [`rest`] says in one line.

use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

#[derive(Clone, Debug)]
struct Param {
    name: String,
    location: String,
    kind: String,
    required: bool,
}

/// One operation of the description.
pub struct Operation {
    /// GitHub's `operationId`, e.g. `issues/create-comment`.
    pub id: String,
    /// Lower case, e.g. `post`.
    pub method: String,
    /// E.g. `/repos/{owner}/{repo}/issues/{issue_number}/comments`.
    pub template: String,
    segments: Vec<String>,
    params: Vec<Param>,
    body_schema: Option<Value>,
    body_required: bool,
    responses: HashMap<String, Value>,
    validators: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

/// GitHub's REST description, ready to check requests and answers.
pub struct RestApi {
    /// `{"components": {"schemas": …}}` with `nullable` rewritten: the root every
    /// operation's schema is checked under.
    root: Value,
    ops: Vec<Operation>,
}

/// Where the description is: `$GITHUB_OPENAPI` when set, else where
/// `scripts/install-deps.sh` installs it; `None` when there is no such file.
pub fn spec_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GITHUB_OPENAPI").filter(|p| !p.is_empty()) {
        return Some(p.into());
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("github-examples/node_modules/@octokit/openapi/generated/api.github.com.json");
    p.is_file().then_some(p)
}

/// The description, read once per process; `None` (said once on standard error) when it
/// is not installed. A description that is there but unreadable is a panic: the check
/// must not be skipped silently.
pub fn rest() -> Option<&'static RestApi> {
    static REST: OnceLock<Option<RestApi>> = OnceLock::new();
    REST.get_or_init(|| match spec_path() {
        Some(path) => Some(
            RestApi::load(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e:#}", path.display())),
        ),
        None => {
            eprintln!(
                "GitHub's REST description not found (run `make deps-test`, or set \
                 $GITHUB_OPENAPI): the fake GitHub's contract check is skipped"
            );
            None
        }
    })
    .as_ref()
}

/// Operations called in this process (by any fake GitHub), as `operationId METHOD
/// template` lines.
pub fn called() -> BTreeSet<String> {
    CALLED.lock().clone()
}

static CALLED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Notes that a fake GitHub served `op` in this process (see [`called`]).
pub fn note_called(op: &Operation) {
    CALLED.lock().insert(format!(
        "{} {} {}",
        op.id,
        op.method.to_ascii_uppercase(),
        op.template
    ));
}

/// The record of the operations called by the test processes of this build
/// (`github-operations.txt` beside the test binaries, in `target/debug`), one
/// `operationId METHOD template` line each.
pub fn record_path() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    // target/debug/deps/<test binary>
    Some(exe.parent()?.parent()?.join("github-operations.txt"))
}

/// Adds the operations called in this process to [`record_path`] (a union: each line
/// once). Errors are ignored: the record is a report, not a check.
pub fn save_called() {
    static WRITING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = WRITING.lock();
    let Some(path) = record_path() else { return };
    let mut all: BTreeSet<String> = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    let before = all.len();
    all.extend(called());
    if all.len() != before {
        let text: String = all.iter().map(|l| format!("{l}\n")).collect();
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
}

/// Rewrites OpenAPI 3.0's `nullable: true` as JSON Schema, everywhere under `v`.
pub fn rewrite_nullable(v: &mut Value) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(rewrite_nullable),
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                // Examples are data, not schemas.
                if k != "example" && k != "examples" && k != "default" && k != "enum" {
                    rewrite_nullable(child);
                }
            }
            if map.get("nullable") != Some(&Value::Bool(true)) {
                return;
            }
            map.remove("nullable");
            if let Some(Value::Array(e)) = map.get_mut("enum") {
                if !e.contains(&Value::Null) {
                    e.push(Value::Null);
                }
            }
            match map.get("type").cloned() {
                Some(Value::String(t)) => {
                    map.insert("type".into(), json!([t, "null"]));
                }
                _ => {
                    let inner = Value::Object(std::mem::take(map));
                    map.insert("anyOf".into(), json!([{ "type": "null" }, inner]));
                }
            }
        }
        _ => {}
    }
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    let mut v = v;
    for _ in 0..8 {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => match doc.pointer(r.trim_start_matches('#')) {
                Some(target) => v = target,
                None => return v,
            },
            None => return v,
        }
    }
    v
}

fn decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&segment[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A JSON value the schema allows where nothing is known: `null` when allowed, else the
/// first `enum` value, else an empty value of the type (objects with their required
/// fields filled the same way).
fn placeholder(root: &Value, schema: &Value, depth: u32) -> Value {
    let s = resolve(root, schema);
    if depth > 16 {
        return Value::Null;
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        return e.first().cloned().unwrap_or(Value::Null);
    }
    if let Some(branches) = s
        .get("anyOf")
        .or_else(|| s.get("oneOf"))
        .and_then(Value::as_array)
    {
        if branches
            .iter()
            .any(|b| b.get("type") == Some(&json!("null")))
        {
            return Value::Null;
        }
        return branches
            .first()
            .map(|b| placeholder(root, b, depth + 1))
            .unwrap_or(Value::Null);
    }
    if let Some(parts) = s.get("allOf").and_then(Value::as_array) {
        let mut v = Value::Object(Map::new());
        for p in parts {
            complete_with(root, p, &mut v, depth + 1);
        }
        return v;
    }
    let types: Vec<&str> = match s.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if types.contains(&"null") {
        return Value::Null;
    }
    match types.first().copied() {
        Some("string") => match s.get("format").and_then(Value::as_str) {
            Some("date-time") => json!("2026-01-01T00:00:00Z"),
            Some("date") => json!("2026-01-01"),
            Some("uri") | Some("url") => json!("https://github.com/"),
            Some("email") => json!("noreply@github.com"),
            _ => json!(""),
        },
        Some("integer") | Some("number") => json!(0),
        Some("boolean") => json!(false),
        Some("array") => json!([]),
        _ => {
            let mut v = Value::Object(Map::new());
            complete_with(root, s, &mut v, depth + 1);
            v
        }
    }
}

/// Whether a branch of `anyOf`/`oneOf` is of the kind of `value` (an object or an array).
fn admits(root: &Value, schema: &Value, value: &Value, depth: u32) -> bool {
    let s = resolve(root, schema);
    if depth > 16 {
        return false;
    }
    match s.get("type").and_then(Value::as_str) {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some(_) => false,
        None => {
            if s.get("properties").is_some() {
                return value.is_object();
            }
            s.get("allOf")
                .or_else(|| s.get("anyOf"))
                .or_else(|| s.get("oneOf"))
                .and_then(Value::as_array)
                .is_some_and(|bs| bs.iter().any(|b| admits(root, b, value, depth + 1)))
        }
    }
}

/// Adds the required fields of `schema` missing from `value`, recursively.
fn complete_with(root: &Value, schema: &Value, value: &mut Value, depth: u32) {
    let s = resolve(root, schema);
    if depth > 16 {
        return;
    }
    for p in s
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        complete_with(root, p, value, depth + 1);
    }
    if let Some(branches) = s
        .get("anyOf")
        .or_else(|| s.get("oneOf"))
        .and_then(Value::as_array)
    {
        if value.is_null() {
            return;
        }
        // The first branch of the value's kind.
        if let Some(b) = branches.iter().find(|b| admits(root, b, value, depth)) {
            complete_with(root, b, value, depth + 1);
        }
        return;
    }
    match value {
        Value::Object(map) => {
            let props = s.get("properties").and_then(Value::as_object);
            for name in s
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(name) = name.as_str() else { continue };
                if !map.contains_key(name) {
                    let mut v = props
                        .and_then(|p| p.get(name))
                        .map(|p| placeholder(root, p, depth + 1))
                        .unwrap_or(Value::Null);
                    // GitHub's URL templates (`review_comment_url`) and links (`href`)
                    // carry no `format`, yet clients read them as URLs.
                    if (name.ends_with("url") || name == "href") && v == json!("") {
                        v = json!("https://github.com/");
                    }
                    map.insert(name.to_string(), v);
                }
            }
            if let Some(props) = props {
                for (name, child) in map.iter_mut() {
                    if let Some(p) = props.get(name) {
                        complete_with(root, p, child, depth + 1);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = s.get("items") {
                for v in items {
                    complete_with(root, item, v, depth + 1);
                }
            }
        }
        _ => {}
    }
}

impl RestApi {
    /// Reads the description (JSON, with `$ref`s into `#/components`).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read(path)?;
        let mut doc: Value = serde_json::from_slice(&text)?;
        let mut ops = Vec::new();
        let paths = doc["paths"].as_object().cloned().unwrap_or_default();
        for (template, item) in &paths {
            let Some(methods) = item.as_object() else {
                continue;
            };
            for (method, op) in methods {
                if !matches!(
                    method.as_str(),
                    "get" | "put" | "post" | "delete" | "patch" | "head"
                ) {
                    continue;
                }
                let mut params = Vec::new();
                let shared = item.get("parameters").and_then(Value::as_array);
                for p in op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .chain(shared.into_iter().flatten())
                {
                    let p = resolve(&doc, p);
                    let schema = resolve(&doc, &p["schema"]);
                    params.push(Param {
                        name: p["name"].as_str().unwrap_or_default().to_string(),
                        location: p["in"].as_str().unwrap_or_default().to_string(),
                        kind: schema["type"].as_str().unwrap_or("string").to_string(),
                        required: p["required"].as_bool().unwrap_or(false),
                    });
                }
                let body = op.get("requestBody").map(|b| resolve(&doc, b));
                let mut body_schema = body
                    .and_then(|b| b.pointer("/content/application~1json/schema"))
                    .cloned();
                if let Some(s) = &mut body_schema {
                    rewrite_nullable(s);
                }
                let mut responses = HashMap::new();
                for (code, r) in op["responses"].as_object().into_iter().flatten() {
                    let r = resolve(&doc, r);
                    if let Some(s) = r.pointer("/content/application~1json/schema") {
                        let mut s = s.clone();
                        rewrite_nullable(&mut s);
                        responses.insert(code.clone(), s);
                    }
                }
                ops.push(Operation {
                    id: op["operationId"].as_str().unwrap_or_default().to_string(),
                    method: method.clone(),
                    template: template.clone(),
                    segments: template
                        .trim_start_matches('/')
                        .split('/')
                        .map(String::from)
                        .collect(),
                    params,
                    body_schema,
                    body_required: body.and_then(|b| b["required"].as_bool()).unwrap_or(false),
                    responses,
                    validators: Default::default(),
                });
            }
        }
        let mut schemas = doc["components"]["schemas"].take();
        rewrite_nullable(&mut schemas);
        Ok(Self {
            root: json!({ "components": { "schemas": schemas } }),
            ops,
        })
    }

    /// Every operation, by `operationId`.
    pub fn operation(&self, id: &str) -> Option<&Operation> {
        self.ops.iter().find(|o| o.id == id)
    }

    /// The operation of `method` and `path` (raw, percent-encoded) and its path
    /// parameters. A template with more literal segments wins; a last parameter named
    /// `path` (`/repos/{owner}/{repo}/contents/{path}`) may take several segments.
    pub fn find(&self, method: &str, path: &str) -> Option<(&Operation, HashMap<String, String>)> {
        let raw: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let method = method.to_ascii_lowercase();
        let mut best: Option<(usize, &Operation, HashMap<String, String>)> = None;
        for op in self.ops.iter().filter(|o| o.method == method) {
            let n = op.segments.len();
            let greedy = n > 0 && op.segments[n - 1] == "{path}" && raw.len() > n;
            if raw.len() != n && !greedy {
                continue;
            }
            let mut params = HashMap::new();
            let mut literals = 0;
            let mut ok = true;
            for (i, seg) in op.segments.iter().enumerate() {
                let value = if i == n - 1 && greedy {
                    raw[i..]
                        .iter()
                        .map(|s| decode(s))
                        .collect::<Vec<_>>()
                        .join("/")
                } else {
                    decode(raw[i])
                };
                if seg.starts_with('{') {
                    if value.is_empty() {
                        ok = false;
                        break;
                    }
                    params.insert(seg.trim_matches(['{', '}']).to_string(), value);
                } else if *seg == value {
                    literals += 1;
                } else {
                    ok = false;
                    break;
                }
            }
            if ok && best.as_ref().is_none_or(|(l, _, _)| literals > *l) {
                best = Some((literals, op, params));
            }
        }
        best.map(|(_, op, p)| (op, p))
    }

    fn validator(
        &self,
        op: &Operation,
        key: &str,
        schema: &Value,
    ) -> Result<Arc<jsonschema::Validator>, String> {
        if let Some(v) = op.validators.lock().get(key) {
            return Ok(v.clone());
        }
        // Only the component schemas this one reaches: compiling under all of them
        // costs a tenth of a second per operation.
        let all = &self.root["components"]["schemas"];
        let mut reached = Map::new();
        let mut todo = vec![schema];
        while let Some(s) = todo.pop() {
            match s {
                Value::Object(m) => {
                    if let Some(name) = m
                        .get("$ref")
                        .and_then(Value::as_str)
                        .and_then(|r| r.strip_prefix("#/components/schemas/"))
                    {
                        if !reached.contains_key(name) {
                            if let Some(target) = all.get(name) {
                                reached.insert(name.to_string(), target.clone());
                                todo.push(target);
                            }
                        }
                    }
                    todo.extend(m.values());
                }
                Value::Array(items) => todo.extend(items.iter()),
                _ => {}
            }
        }
        let root = json!({ "components": { "schemas": reached }, "allOf": [schema] });
        let v = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .should_validate_formats(true)
            .build(&root)
            .map_err(|e| format!("cannot compile the schema of {}: {e}", op.id))?;
        let v = Arc::new(v);
        op.validators.lock().insert(key.to_string(), v.clone());
        Ok(v)
    }

    fn check(&self, op: &Operation, key: &str, schema: &Value, instance: &Value) -> Vec<String> {
        match self.validator(op, key, schema) {
            Ok(v) => v
                .iter_errors(instance)
                .take(10)
                .map(|e| format!("{} {key} at {:?}: {e}", op.id, e.instance_path().as_str()))
                .collect(),
            Err(e) => vec![e],
        }
    }

    /// What is wrong with a request (empty when it is valid).
    pub fn check_request(
        &self,
        op: &Operation,
        query: &[(String, String)],
        body: Option<&Value>,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        for (name, value) in query {
            match op
                .params
                .iter()
                .find(|p| p.name == *name && p.location == "query")
            {
                None => errors.push(format!("{} has no query parameter {name:?}", op.id)),
                Some(p) => {
                    let ok = match p.kind.as_str() {
                        "integer" => value.parse::<i64>().is_ok(),
                        "boolean" => matches!(value.as_str(), "true" | "false"),
                        _ => true,
                    };
                    if !ok {
                        errors.push(format!("{}: {name}={value:?} is not a {}", op.id, p.kind));
                    }
                }
            }
        }
        for p in op
            .params
            .iter()
            .filter(|p| p.required && p.location == "query")
        {
            if !query.iter().any(|(n, _)| *n == p.name) {
                errors.push(format!("{}: missing query parameter {}", op.id, p.name));
            }
        }
        match (&op.body_schema, body) {
            (Some(schema), Some(b)) => errors.extend(self.check(op, "request", schema, b)),
            (Some(_), None) if op.body_required => {
                errors.push(format!("{}: a JSON body is required", op.id))
            }
            (None, Some(_)) => errors.push(format!("{}: takes no body", op.id)),
            _ => {}
        }
        errors
    }

    /// Adds to one of the fake's answers the required fields it does not model (see the
    /// module's doc); nothing when the status has no JSON schema.
    pub fn complete(&self, op: &Operation, status: u16, body: &mut Value) {
        if let Some(schema) = op.responses.get(&status.to_string()) {
            complete_with(&self.root, schema, body, 0);
        }
    }

    /// What is wrong with one of the fake's JSON answers (empty when it is valid, or
    /// when the description has no JSON schema for the status).
    pub fn check_response(&self, op: &Operation, status: u16, body: &Value) -> Vec<String> {
        match op.responses.get(&status.to_string()) {
            Some(schema) => self.check(op, &format!("response {status}"), schema, body),
            None => Vec::new(),
        }
    }
}

/// GitHub's webhook schemas (`@octokit/openapi-webhooks`,
/// `generated/api.github.com.json`, OpenAPI 3.1: plain JSON Schema), read once per
/// process; `None` (said once) when they are not installed (`$GITHUB_OPENAPI_WEBHOOKS`
/// overrides the place).
pub fn webhook_schemas() -> Option<&'static Value> {
    static DOC: OnceLock<Option<Value>> = OnceLock::new();
    DOC.get_or_init(|| {
        let path = std::env::var_os("GITHUB_OPENAPI_WEBHOOKS")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join(
                    "github-examples/node_modules/@octokit/openapi-webhooks/generated/api.github.com.json",
                )
            });
        if !path.is_file() {
            eprintln!(
                "GitHub's webhook schemas not found (run `make deps-test`): the webhook \
                 contract check is skipped"
            );
            return None;
        }
        let text = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        Some(
            serde_json::from_slice(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display())),
        )
    })
    .as_ref()
}

/// The schema of one webhook (`issues-labeled`, `issue-comment-created`, …) in
/// [`webhook_schemas`], `$ref` resolved.
pub fn webhook_schema<'a>(doc: &'a Value, name: &str) -> Option<&'a Value> {
    let s = doc.pointer(&format!(
        "/webhooks/{name}/post/requestBody/content/application~1json/schema"
    ))?;
    Some(resolve(doc, s))
}

/// Whether the dotted `field` (`issue.user.login`; `[]` for array items, as in
/// `issue.labels[].name`) is described by `schema` (through `allOf`/`anyOf`/`oneOf`).
pub fn describes(doc: &Value, schema: &Value, field: &str) -> bool {
    fn walk(doc: &Value, s: &Value, parts: &[&str], depth: u32) -> bool {
        let s = resolve(doc, s);
        let Some((first, rest)) = parts.split_first() else {
            return true;
        };
        if depth > 32 {
            return false;
        }
        let branches = ["allOf", "anyOf", "oneOf"]
            .iter()
            .filter_map(|k| s.get(*k).and_then(Value::as_array))
            .flatten();
        for b in branches {
            if walk(doc, b, parts, depth + 1) {
                return true;
            }
        }
        if let Some(name) = first.strip_suffix("[]") {
            match s.pointer(&format!("/properties/{name}")) {
                Some(p) => {
                    let p = resolve(doc, p);
                    let items = p.get("items").map(|i| walk(doc, i, rest, depth + 1));
                    items.unwrap_or(false)
                        || ["allOf", "anyOf", "oneOf"]
                            .iter()
                            .filter_map(|k| p.get(*k).and_then(Value::as_array))
                            .flatten()
                            .filter_map(|b| resolve(doc, b).get("items"))
                            .any(|i| walk(doc, i, rest, depth + 1))
                }
                None => false,
            }
        } else {
            match s.pointer(&format!("/properties/{first}")) {
                Some(p) => walk(doc, p, rest, depth + 1),
                None => false,
            }
        }
    }
    let parts: Vec<&str> = field.split('.').collect();
    walk(doc, schema, &parts, 0)
}

/// `value` with every field `schema` does not require removed, recursively (through
/// `allOf`; for `anyOf`/`oneOf`, the first branch of the value's kind whose required
/// fields are all present): the least a sender following the schema may send.
pub fn strip_optional(doc: &Value, schema: &Value, value: &mut Value) {
    fn required_of(doc: &Value, s: &Value, out: &mut Vec<String>, props: &mut Map<String, Value>) {
        let s = resolve(doc, s);
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(r) = r.as_str() {
                out.push(r.to_string());
            }
        }
        for (k, v) in s
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            props.entry(k.clone()).or_insert_with(|| v.clone());
        }
        for p in s
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            required_of(doc, p, out, props);
        }
    }
    let s = resolve(doc, schema);
    if let Some(branches) = s
        .get("anyOf")
        .or_else(|| s.get("oneOf"))
        .and_then(Value::as_array)
    {
        let fits = |b: &&Value| {
            if !admits(doc, b, value, 0) {
                return false;
            }
            let (mut req, mut props) = (Vec::new(), Map::new());
            required_of(doc, b, &mut req, &mut props);
            value
                .as_object()
                .is_none_or(|m| req.iter().all(|r| m.contains_key(r)))
        };
        if let Some(b) = branches.iter().find(fits).cloned() {
            strip_optional(doc, &b, value);
        }
        return;
    }
    match value {
        Value::Object(map) => {
            let (mut req, mut props) = (Vec::new(), Map::new());
            required_of(doc, s, &mut req, &mut props);
            if req.is_empty() && props.is_empty() {
                return;
            }
            map.retain(|k, _| req.contains(k));
            for (k, v) in map.iter_mut() {
                if let Some(p) = props.get(k) {
                    strip_optional(doc, p, v);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = s.get("items") {
                for v in items {
                    strip_optional(doc, item, v);
                }
            }
        }
        _ => {}
    }
}
