//! Checks requests (and the fake's own answers) against Nomad's OpenAPI description
//! (from hashicorp/nomad-openapi; not part of this repository: found through
//! `$NOMAD_OPENAPI`, or at `../shared/specs/nomad-openapi.yaml` beside the clone, see
//! [`spec_path`]): the path and method must be an operation of
//! the spec, every query parameter one of its parameters with the right type, and a JSON
//! body valid against the operation's request schema (with `#/components/...` references
//! resolved). Two documented gaps of the spec are filled here:
//! - `index` is declared as a header (`IndexHeader`), but Nomad reads it from the query
//!   string (`parseWait` in `command/agent/http.go`), as every Nomad client sends it; it
//!   is accepted in the query for operations that declare it.
//! - `/client/fs/logs/{alloc}` and `/client/fs/cat/{alloc}` are not in the spec; their
//!   parameters are checked against Nomad's API documentation instead (table below).
//!
//! Without the description the fake still routes the operations it implements
//! ([`ROUTES`], their paths as the description gives them) and every behaviour test runs;
//! only the contract check is skipped, which [`OpenApi::load_or_routes`] says in one line.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Operations outside the spec, from Nomad's documentation: (method, path, parameters as
/// (name, type, required)).
/// A documented query parameter: name, type, required.
type DocParam = (&'static str, &'static str, bool);

const DOCUMENTED: &[(&str, &str, &[DocParam])] = &[
    (
        "get",
        "/client/fs/logs/{allocID}",
        &[
            ("task", "string", true),
            ("type", "string", true),
            ("follow", "boolean", false),
            ("offset", "integer", false),
            ("origin", "string", false),
            ("plain", "boolean", false),
            ("namespace", "string", false),
            ("region", "string", false),
        ],
    ),
    (
        "get",
        "/client/fs/cat/{allocID}",
        &[
            ("path", "string", true),
            ("namespace", "string", false),
            ("region", "string", false),
        ],
    ),
];

/// The operations the fake implements, as Nomad's OpenAPI description names and places
/// them: (method, path template without `/v1`, operationId). Used to route requests when
/// the description itself is not at hand.
pub const ROUTES: &[(&str, &str, &str)] = &[
    ("get", "/allocation/{allocID}", "GetAllocation"),
    ("get", "/evaluation/{evalID}", "GetEvaluation"),
    ("delete", "/job/{jobName}", "DeleteJob"),
    ("get", "/job/{jobName}", "GetJob"),
    ("post", "/job/{jobName}", "PostJob"),
    ("get", "/job/{jobName}/allocations", "GetJobAllocations"),
    ("post", "/job/{jobName}/dispatch", "PostJobDispatch"),
    ("post", "/jobs", "RegisterJob"),
    ("get", "/var/{path}", "GetVariableQuery"),
    ("put", "/var/{path}", "PutVariable"),
];

#[derive(Clone, Debug)]
struct Param {
    name: String,
    location: String,
    kind: String,
    required: bool,
}

/// One operation of the spec.
pub struct Operation {
    pub id: String,
    pub method: String,
    /// The path template without `/v1`, e.g. `/job/{jobName}/dispatch`.
    pub template: String,
    segments: Vec<String>,
    params: Vec<Param>,
    body_schema: Option<Value>,
    responses: HashMap<String, Value>,
    validators: parking_lot::Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

/// A matched request: the operation and the path parameters (decoded).
pub struct Matched<'a> {
    pub op: &'a Operation,
    pub path_params: HashMap<String, String>,
}

/// The spec, ready to check requests.
pub struct OpenApi {
    components: Value,
    ops: Vec<Operation>,
    /// False when built from [`ROUTES`] alone: requests are routed, nothing is checked.
    contract: bool,
}

fn operation(id: &str, method: &str, template: &str, params: Vec<Param>) -> Operation {
    Operation {
        id: id.to_string(),
        method: method.to_string(),
        template: template.to_string(),
        segments: template
            .trim_start_matches('/')
            .split('/')
            .map(String::from)
            .collect(),
        params,
        body_schema: None,
        responses: HashMap::new(),
        validators: Default::default(),
    }
}

/// The operations outside the spec ([`DOCUMENTED`]), with their documented parameters.
fn documented() -> Vec<Operation> {
    DOCUMENTED
        .iter()
        .map(|(method, template, params)| {
            let params = params
                .iter()
                .map(|(n, k, r)| Param {
                    name: n.to_string(),
                    location: "query".into(),
                    kind: k.to_string(),
                    required: *r,
                })
                .collect();
            operation(&format!("documented {template}"), method, template, params)
        })
        .collect()
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    let mut v = v;
    for _ in 0..8 {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let pointer = r.trim_start_matches('#');
                match doc.pointer(pointer) {
                    Some(target) => v = target,
                    None => return v,
                }
            }
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

/// Percent-decoding of one path segment or query value.
pub fn percent_decode(s: &str) -> String {
    decode(s)
}

impl OpenApi {
    /// Reads the YAML description.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        let doc: Value = serde_yaml::from_str(&text)?;
        let mut ops = Vec::new();
        let paths = doc["paths"].as_object().cloned().unwrap_or_default();
        for (template, item) in &paths {
            let Some(methods) = item.as_object() else {
                continue;
            };
            for (method, op) in methods {
                let mut params = Vec::new();
                for p in op["parameters"].as_array().into_iter().flatten() {
                    let p = resolve(&doc, p);
                    params.push(Param {
                        name: p["name"].as_str().unwrap_or_default().to_string(),
                        location: p["in"].as_str().unwrap_or_default().to_string(),
                        kind: p["schema"]["type"].as_str().unwrap_or("string").to_string(),
                        required: p["required"].as_bool().unwrap_or(false),
                    });
                }
                let body_schema = op
                    .pointer("/requestBody/content/application~1json/schema")
                    .cloned();
                let mut responses = HashMap::new();
                for (code, r) in op["responses"].as_object().into_iter().flatten() {
                    let r = resolve(&doc, r);
                    if let Some(s) = r.pointer("/content/application~1json/schema") {
                        responses.insert(code.clone(), s.clone());
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
                    responses,
                    validators: Default::default(),
                });
            }
        }
        ops.extend(documented());
        Ok(Self {
            components: doc["components"].clone(),
            ops,
            contract: true,
        })
    }

    /// The description from [`spec_path`] when there is one; otherwise routes only
    /// ([`ROUTES`] and the documented operations), with one line on standard error saying
    /// that the contract check is skipped.
    pub fn load_or_routes() -> anyhow::Result<Self> {
        match spec_path() {
            Some(path) => Self::load(&path),
            None => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    eprintln!(
                        "Nomad's OpenAPI description not found (set $NOMAD_OPENAPI or put it at \
                         ../shared/specs/nomad-openapi.yaml): the Nomad contract check is skipped"
                    )
                });
                Ok(Self::routes_only())
            }
        }
    }

    /// Routing for the operations the fake implements, without any schema.
    pub fn routes_only() -> Self {
        let mut ops: Vec<Operation> = ROUTES
            .iter()
            .map(|(method, template, id)| operation(id, method, template, Vec::new()))
            .collect();
        ops.extend(documented());
        for op in &mut ops {
            // Without the description any query parameter is accepted.
            op.params.clear();
        }
        Self {
            components: Value::Null,
            ops,
            contract: false,
        }
    }

    /// Whether requests are checked against the description (false: routed only).
    pub fn checks_contract(&self) -> bool {
        self.contract
    }

    /// The operation of `method` and `path` (raw, without `/v1`, percent-encoded). A
    /// template with more literal segments wins; a last parameter (`/var/{path}`) may
    /// take several segments.
    pub fn find(&self, method: &str, path: &str) -> Option<Matched<'_>> {
        let raw: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let method = method.to_ascii_lowercase();
        let mut best: Option<(usize, Matched<'_>)> = None;
        for op in self.ops.iter().filter(|o| o.method == method) {
            let n = op.segments.len();
            let greedy_last = n > 0 && op.segments[n - 1].starts_with('{') && raw.len() > n;
            if raw.len() != n && !greedy_last {
                continue;
            }
            let mut params = HashMap::new();
            let mut literals = 0;
            let mut ok = true;
            for (i, seg) in op.segments.iter().enumerate() {
                let value = if i == n - 1 && greedy_last {
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
            // A greedy parameter only where the spec's path ends with one.
            if ok && greedy_last && !op.template.starts_with("/var/") {
                ok = false;
            }
            if ok && best.as_ref().is_none_or(|(l, _)| literals > *l) {
                best = Some((
                    literals,
                    Matched {
                        op,
                        path_params: params,
                    },
                ));
            }
        }
        best.map(|(_, m)| m)
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
        let root = json!({ "components": self.components, "allOf": [schema] });
        let v = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
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
                .map(|e| format!("{} at {}: {e}", op.id, e.instance_path()))
                .collect(),
            Err(e) => vec![e],
        }
    }

    /// Checks a request; returns what is wrong with it (empty when it is valid).
    pub fn check_request(
        &self,
        m: &Matched<'_>,
        query: &[(String, String)],
        body: Option<&Value>,
    ) -> Vec<String> {
        let op = m.op;
        let mut errors = Vec::new();
        if !self.contract {
            return errors;
        }
        for (name, value) in query {
            let declared = op.params.iter().find(|p| {
                p.name == *name
                    && (p.location == "query" || (p.name == "index" && p.location == "header"))
            });
            match declared {
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
            (Some(_), None) => errors.push(format!("{}: a JSON body is required", op.id)),
            (None, Some(_)) => errors.push(format!("{}: takes no body", op.id)),
            (None, None) => {}
        }
        errors
    }

    /// Checks one of the fake's own JSON answers against the response schema.
    pub fn check_response(&self, op: &Operation, status: u16, body: &Value) -> Vec<String> {
        if !self.contract {
            return Vec::new();
        }
        match op.responses.get(&status.to_string()) {
            Some(schema) => self.check(op, &format!("response {status}"), schema, body),
            None => Vec::new(),
        }
    }

    /// The request schema of an operation, for tests that check a document directly.
    pub fn check_body(&self, operation_id: &str, body: &Value) -> Vec<String> {
        if !self.contract {
            return Vec::new();
        }
        match self.ops.iter().find(|o| o.id == operation_id) {
            Some(op) => match &op.body_schema {
                Some(schema) => self.check(op, "request", schema, body),
                None => vec![format!("{operation_id} takes no body")],
            },
            None => vec![format!("no operation {operation_id}")],
        }
    }
}

/// Where Nomad's OpenAPI description is: `$NOMAD_OPENAPI` when set (an error to set it to
/// a missing file is reported by [`OpenApi::load`]), else `../shared/specs/nomad-openapi.yaml`
/// beside the workspace, else `shared/specs/nomad-openapi.yaml` inside it; `None` when
/// there is none.
pub fn spec_path() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("NOMAD_OPENAPI").filter(|p| !p.is_empty()) {
        return Some(p.into());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    [
        root.join("../shared/specs/nomad-openapi.yaml"),
        root.join("shared/specs/nomad-openapi.yaml"),
    ]
    .into_iter()
    .find(|candidate| candidate.is_file())
}
