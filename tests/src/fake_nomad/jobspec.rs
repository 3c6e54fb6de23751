//! Reads a Nomad job file (HCL2 with `variable` blocks, as in `nomad/`) into the JSON job
//! of Nomad's API, as `nomad job run` would send it: variables from their defaults and
//! the values given, `$${...}` kept as Nomad runtime interpolations. Only the blocks the
//! sandbox job uses are mapped (job, parameterized, meta, group, restart, reschedule,
//! ephemeral_disk, task, dispatch_payload, config, env, template, resources).

use anyhow::{anyhow, bail, Context as _, Result};
use hcl::eval::{Context, Evaluate};
use hcl::{Block, Body};
use serde_json::{json, Map, Value};
use std::path::Path;

fn to_json(v: &hcl::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn attr(body: &Body, key: &str) -> Option<Value> {
    body.attributes()
        .find(|a| a.key() == key)
        .map(|a| hcl::Value::from(a.expr().clone()))
        .map(|v| to_json(&v))
}

fn blocks<'a>(body: &'a Body, ident: &'a str) -> impl Iterator<Item = &'a Block> + 'a {
    body.blocks().filter(move |b| b.identifier() == ident)
}

fn label(block: &Block) -> String {
    block
        .labels()
        .first()
        .map(|l| l.as_str().to_string())
        .unwrap_or_default()
}

/// A block's body as a JSON object: attributes, and nested blocks as lists of objects
/// (how Nomad passes a driver's `config` blocks).
fn object(body: &Body) -> Value {
    let mut m = Map::new();
    for a in body.attributes() {
        let v = hcl::Value::from(a.expr().clone());
        m.insert(a.key().to_string(), to_json(&v));
    }
    for b in body.blocks() {
        let entry = m
            .entry(b.identifier().to_string())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = entry {
            list.push(object(b.body()));
        }
    }
    Value::Object(m)
}

fn int(v: Option<Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        Value::Bool(b) => Some(b as i64),
        _ => None,
    }
}

fn boolean(v: Option<Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(b),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A Nomad duration ("20s", "1m", "500ms") in nanoseconds.
pub fn duration_ns(s: &str) -> Option<i64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().ok()?;
    let ns = match unit {
        "ns" => 1,
        "us" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    };
    Some(n * ns)
}

fn string_map(v: Option<Value>) -> Value {
    let mut m = Map::new();
    if let Some(Value::Object(o)) = v {
        for (k, v) in o {
            let s = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            m.insert(k, Value::String(s));
        }
    }
    Value::Object(m)
}

fn block_map(body: &Body, ident: &str) -> Value {
    match blocks(body, ident).next() {
        Some(b) => string_map(Some(object(b.body()))),
        None => json!({}),
    }
}

fn task(block: &Block) -> Result<Value> {
    let b = block.body();
    let mut t = Map::new();
    t.insert("Name".into(), json!(label(block)));
    t.insert("Driver".into(), attr(b, "driver").unwrap_or(json!("")));
    if let Some(u) = attr(b, "user") {
        t.insert(
            "User".into(),
            json!(u.as_str().map(String::from).unwrap_or(u.to_string())),
        );
    }
    if let Some(p) = blocks(b, "dispatch_payload").next() {
        t.insert(
            "DispatchPayload".into(),
            json!({ "File": attr(p.body(), "file") }),
        );
    }
    if let Some(sig) = attr(b, "kill_signal") {
        t.insert("KillSignal".into(), sig);
    }
    if let Some(kt) = attr(b, "kill_timeout").and_then(|v| v.as_str().and_then(duration_ns)) {
        t.insert("KillTimeout".into(), json!(kt));
    }
    let identities: Vec<Value> = blocks(b, "identity")
        .map(|i| {
            let ib = i.body();
            let mut v = json!({
                "Name": attr(ib, "name").unwrap_or(json!("default")),
                "Audience": attr(ib, "aud").unwrap_or(json!([])),
                "Env": boolean(attr(ib, "env")).unwrap_or(false),
                "File": boolean(attr(ib, "file")).unwrap_or(false),
            });
            if let Some(ttl) = attr(ib, "ttl").and_then(|v| v.as_str().and_then(duration_ns)) {
                v["TTL"] = json!(ttl);
            }
            if let Some(m) = attr(ib, "change_mode") {
                v["ChangeMode"] = m;
            }
            v
        })
        .collect();
    if !identities.is_empty() {
        t.insert("Identities".into(), Value::Array(identities));
    }
    let config = blocks(b, "config")
        .next()
        .map(|c| object(c.body()))
        .unwrap_or(json!({}));
    t.insert("Config".into(), config);
    t.insert("Env".into(), block_map(b, "env"));
    let templates: Vec<Value> = blocks(b, "template")
        .map(|tpl| {
            let tb = tpl.body();
            json!({
                "DestPath": attr(tb, "destination").unwrap_or(json!("")),
                "EmbeddedTmpl": attr(tb, "data").unwrap_or(json!("")),
                "Envvars": boolean(attr(tb, "env")).unwrap_or(false),
                "ChangeMode": attr(tb, "change_mode").unwrap_or(json!("restart")),
            })
        })
        .collect();
    t.insert("Templates".into(), Value::Array(templates));
    if let Some(r) = blocks(b, "resources").next() {
        let rb = r.body();
        t.insert(
            "Resources".into(),
            json!({ "CPU": int(attr(rb, "cpu")).unwrap_or(100),
                    "MemoryMB": int(attr(rb, "memory")).unwrap_or(300) }),
        );
    }
    Ok(Value::Object(t))
}

fn group(block: &Block) -> Result<Value> {
    let b = block.body();
    let mut g = Map::new();
    g.insert("Name".into(), json!(label(block)));
    g.insert("Count".into(), json!(int(attr(b, "count")).unwrap_or(1)));
    if let Some(r) = blocks(b, "restart").next() {
        g.insert(
            "RestartPolicy".into(),
            json!({ "Attempts": int(attr(r.body(), "attempts")).unwrap_or(0),
                    "Mode": attr(r.body(), "mode").unwrap_or(json!("fail")) }),
        );
    }
    if let Some(r) = blocks(b, "reschedule").next() {
        g.insert(
            "ReschedulePolicy".into(),
            json!({ "Attempts": int(attr(r.body(), "attempts")).unwrap_or(0),
                    "Unlimited": boolean(attr(r.body(), "unlimited")).unwrap_or(false) }),
        );
    }
    if let Some(d) = blocks(b, "ephemeral_disk").next() {
        g.insert(
            "EphemeralDisk".into(),
            json!({ "SizeMB": int(attr(d.body(), "size")).unwrap_or(300) }),
        );
    }
    let tasks: Result<Vec<Value>> = blocks(b, "task").map(task).collect();
    g.insert("Tasks".into(), Value::Array(tasks?));
    Ok(Value::Object(g))
}

/// The API job of the job file at `path` with these variable values.
pub fn load(path: &Path, vars: &[(&str, &str)]) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let body = hcl::parse(&text).with_context(|| format!("parse {}", path.display()))?;
    let empty = Context::new();
    let mut values = hcl::Map::new();
    for v in blocks(&body, "variable") {
        if let Some(a) = v.body().attributes().find(|a| a.key() == "default") {
            let value = a
                .expr()
                .evaluate(&empty)
                .map_err(|e| anyhow!("variable {}: {e}", label(v)))?;
            values.insert(label(v), value);
        }
    }
    for (k, v) in vars {
        values.insert(k.to_string(), hcl::Value::from(*v));
    }
    let mut ctx = Context::new();
    ctx.declare_var("var", hcl::Value::Object(values));
    let Some(job) = blocks(&body, "job").next() else {
        bail!("{}: no job block", path.display());
    };
    let jb = job
        .body()
        .evaluate(&ctx)
        .map_err(|e| anyhow!("evaluate {}: {e}", path.display()))?;
    let mut j = Map::new();
    let id = attr(&jb, "id").unwrap_or(json!(label(job)));
    j.insert("ID".into(), id.clone());
    j.insert("Name".into(), attr(&jb, "name").unwrap_or(id));
    j.insert("Type".into(), attr(&jb, "type").unwrap_or(json!("service")));
    j.insert(
        "Namespace".into(),
        attr(&jb, "namespace").unwrap_or(json!("default")),
    );
    j.insert(
        "Datacenters".into(),
        attr(&jb, "datacenters").unwrap_or(json!(["*"])),
    );
    j.insert("Meta".into(), block_map(&jb, "meta"));
    if let Some(p) = blocks(&jb, "parameterized").next() {
        let pb = p.body();
        j.insert(
            "ParameterizedJob".into(),
            json!({
                "Payload": attr(pb, "payload").unwrap_or(json!("optional")),
                "MetaRequired": attr(pb, "meta_required").unwrap_or(json!([])),
                "MetaOptional": attr(pb, "meta_optional").unwrap_or(json!([])),
            }),
        );
    }
    let groups: Result<Vec<Value>> = blocks(&jb, "group").map(group).collect();
    j.insert("TaskGroups".into(), Value::Array(groups?));
    Ok(Value::Object(j))
}
