//! The metrics of a live run: the real coordinator and worker on the SQLite backends, a
//! script agent that takes a few seconds, and `/metrics` scraped from both while tasks
//! wait, run and end. Then every metric the Grafana dashboard, the alert rules and the
//! Nomad autoscaler policy use must be in those scrapes, and
//! `tests/infra/exported_metrics.txt` (the fast pre-check of the Python infra tests) must
//! list exactly what the services export.

use ao_tests::{bare_repo, free_port, script, Cluster};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Metric families the monitoring files use that the services do not export yet, because
/// the code that feeds them is still being written. None now: the GitHub App's webhook,
/// API and budget metrics have landed. A name here must NOT be in the scrape: when one
/// lands, the test fails and says to drop it.
const PENDING: &[&str] = &[];

const LIMIT: Duration = Duration::from_secs(90);

/// A stand-in for Claude Code (`agent.kind = claude`): it reads the prompt on standard
/// input and prints stream-json like the CLI: init, one assistant message a second for
/// four seconds (long enough to be seen in flight and to need heartbeats), then a
/// `result` with its cost — an error result when the prompt asks for it.
const AGENT: &str = r#"
prompt=$(cat)
echo '{"type":"system","subtype":"init","session_id":"s1","model":"claude-sonnet-4-5","tools":["Bash","Write"],"mcp_servers":[]}'
for i in 1 2 3 4; do
  echo "{\"type\":\"assistant\",\"message\":{\"id\":\"m$i\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[{\"type\":\"text\",\"text\":\"step $i\"}],\"usage\":{\"input_tokens\":100,\"output_tokens\":10}}}"
  sleep 1
done
case "$prompt" in *please-fail*)
  echo '{"type":"result","subtype":"error_during_execution","is_error":true,"num_turns":4,"total_cost_usd":0.01,"duration_ms":4000,"result":"giving up"}'
  exit 1;;
esac
echo "$AO_CAPABILITY" > "$AO_CAPABILITY.txt"
echo '{"type":"result","subtype":"success","is_error":false,"num_turns":4,"total_cost_usd":0.0125,"duration_ms":4000,"result":"done","usage":{"input_tokens":400,"output_tokens":40,"cache_read_input_tokens":0,"cache_creation_input_tokens":0}}'
"#;

// ---- the Prometheus text format ---------------------------------------------------

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One scrape: samples, and the families declared by `# TYPE` lines.
#[derive(Debug, Clone, Default)]
struct Scrape {
    text: String,
    samples: Vec<Sample>,
    families: BTreeSet<String>,
}

fn parse_labels(s: &str) -> (BTreeMap<String, String>, &str) {
    // `s` starts after `{`; returns the labels and what follows `}`.
    let mut labels = BTreeMap::new();
    let mut chars = s.char_indices().peekable();
    loop {
        while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
            chars.next();
        }
        match chars.peek() {
            Some((i, '}')) => return (labels, &s[i + 1..]),
            None => return (labels, ""),
            _ => {}
        }
        let mut key = String::new();
        for (_, c) in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        chars.next(); // opening quote
        let mut value = String::new();
        while let Some((_, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim().to_string(), value);
    }
}

fn parse(text: &str) -> Scrape {
    let mut scrape = Scrape {
        text: text.to_string(),
        ..Default::default()
    };
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.split_whitespace().next() {
                scrape.families.insert(name.to_string());
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = line[..end].to_string();
        let (labels, rest) = if line[end..].starts_with('{') {
            parse_labels(&line[end + 1..])
        } else {
            (BTreeMap::new(), &line[end..])
        };
        let value = match rest.split_whitespace().next() {
            Some("+Inf") => f64::INFINITY,
            Some("-Inf") => f64::NEG_INFINITY,
            Some(v) => v.parse().unwrap_or(f64::NAN),
            None => f64::NAN,
        };
        scrape.samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    scrape
}

impl Scrape {
    /// The sum of the samples of `name` whose labels include `labels`; 0 when none.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    fn series_names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }
}

// ---- metric names in the monitoring files -----------------------------------------

/// Our metric names (`ao_…`) in a PromQL expression. String literals are dropped first so
/// that label values are never taken for names; `$variables` are not names.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut code = String::new();
    let mut chars = expr.chars();
    while let Some(c) = chars.next() {
        if c == '"' || c == '\'' || c == '`' {
            let quote = c;
            while let Some(d) = chars.next() {
                if d == '\\' {
                    chars.next();
                } else if d == quote {
                    break;
                }
            }
            code.push(' ');
        } else {
            code.push(c);
        }
    }
    let mut names = BTreeSet::new();
    let mut word = String::new();
    let mut prev = ' ';
    let mut word_prev = ' ';
    for c in code.chars().chain([' ']) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            if word.is_empty() {
                word_prev = prev;
            }
            word.push(c);
        } else {
            if word.starts_with("ao_") && word_prev != '$' && word_prev != '.' {
                names.insert(std::mem::take(&mut word));
            }
            word.clear();
        }
        prev = c;
    }
    names
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every PromQL expression of the Grafana dashboard (panels, rows' panels, templating).
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", Value::String(s)) => out.push(s.clone()),
                        ("query", Value::String(s)) if s.contains("ao_") => out.push(s.clone()),
                        ("definition", Value::String(s)) if s.contains("ao_") => {
                            out.push(s.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// The alert and recording rules of a Prometheus rules file: `(expressions, recorded
/// names)`. Reads the `expr:` values (one line, or a `|`/`>` block) and `record:` names;
/// counts rules so that an expression the reader missed fails the test.
fn rules(yaml: &str) -> (Vec<String>, BTreeSet<String>) {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut records = BTreeSet::new();
    let mut rule_count = 0;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let item = trimmed.strip_prefix("- ").unwrap_or(trimmed);
        if trimmed.starts_with("- alert:") || trimmed.starts_with("- record:") {
            rule_count += 1;
        }
        if let Some(name) = item.strip_prefix("record:") {
            records.insert(name.trim().trim_matches(['"', '\'']).to_string());
        }
        if let Some(value) = item.strip_prefix("expr:") {
            let value = value.trim();
            if value.starts_with('|') || value.starts_with('>') {
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    block.push(next.trim());
                    i += 1;
                }
                exprs.push(block.join("\n"));
            } else {
                exprs.push(value.trim_matches(['"', '\'']).to_string());
            }
        }
        i += 1;
    }
    assert_eq!(exprs.len(), rule_count, "one expression per rule in {yaml}");
    (exprs, records)
}

/// The Nomad autoscaler's queries (`query = "…"` in the job files).
fn nomad_queries() -> Vec<String> {
    let mut out = Vec::new();
    for file in ["nomad/worker.nomad.hcl", "nomad/coordinator.nomad.hcl"] {
        for line in read(file).lines() {
            let t = line.trim();
            if let Some(rest) = t.strip_prefix("query") {
                if let Some(q) = rest.trim_start().strip_prefix('=') {
                    out.push(q.trim().replace("\\\"", "'"));
                }
            }
        }
    }
    out
}

/// Every PromQL expression of the monitoring files, with the file it comes from, and the
/// names the alert rules record (which the services do not export).
fn monitoring_queries() -> (Vec<(String, String)>, BTreeSet<String>) {
    let dashboard: Value = serde_json::from_str(&read("nomad/monitoring/grafana-dashboard.json"))
        .expect("the dashboard is JSON");
    let (alert_exprs, recorded) = rules(&read("nomad/monitoring/alerts.yml"));
    let mut sources: Vec<(String, String)> = Vec::new();
    sources.extend(
        dashboard_exprs(&dashboard)
            .into_iter()
            .map(|e| ("grafana-dashboard.json".to_string(), e)),
    );
    sources.extend(
        alert_exprs
            .into_iter()
            .map(|e| ("alerts.yml".to_string(), e)),
    );
    sources.extend(
        nomad_queries()
            .into_iter()
            .map(|e| ("nomad autoscaler".to_string(), e)),
    );
    (sources, recorded)
}

/// The names `tests/infra/exported_metrics.txt` lists.
fn exported_list() -> BTreeSet<String> {
    read("tests/infra/exported_metrics.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names(r#"sum by (queue) (rate(ao_nope_total{a="ao_label_value"}[5m])) / ao_tasks"#),
        BTreeSet::from(["ao_nope_total".to_string(), "ao_tasks".to_string()])
    );
    assert_eq!(
        metric_names(
            "histogram_quantile(0.9, sum by (le) (rate(ao_subtask_duration_seconds_bucket[$__rate_interval])))"
        ),
        BTreeSet::from(["ao_subtask_duration_seconds_bucket".to_string()])
    );
    assert!(metric_names("up{job=\"x\"} * $ao_var").is_empty());
}

#[test]
fn rules_are_read_whole() {
    let (exprs, records) = rules(
        "groups:\n  - name: g\n    rules:\n      - record: ao:depth:sum\n        expr: sum(ao_queue_messages)\n      - alert: A\n        expr: |\n          ao_tasks > 1\n          and ao_worker_slots == 0\n        for: 5m\n",
    );
    assert_eq!(
        exprs,
        vec![
            "sum(ao_queue_messages)".to_string(),
            "ao_tasks > 1\nand ao_worker_slots == 0".to_string()
        ]
    );
    assert_eq!(records, BTreeSet::from(["ao:depth:sum".to_string()]));
}

#[test]
fn scrapes_are_parsed() {
    let s = parse(
        "# HELP ao_x x\n# TYPE ao_x counter\nao_x{a=\"1\",b=\"q\\\"uote\"} 3\nao_x{a=\"2\"} 4\nao_y 1.5\nao_h_bucket{le=\"+Inf\"} 2\n",
    );
    assert_eq!(s.sum("ao_x", &[]), 7.0);
    assert_eq!(s.sum("ao_x", &[("b", "q\"uote")]), 3.0);
    assert_eq!(s.sum("ao_y", &[]), 1.5);
    assert_eq!(s.sum("ao_h_bucket", &[("le", "+Inf")]), 2.0);
    assert_eq!(s.families, BTreeSet::from(["ao_x".to_string()]));
}

// ---- the live run -----------------------------------------------------------------

struct Scraper<'a> {
    cluster: &'a Cluster,
    worker: String,
}

impl Scraper<'_> {
    async fn both(&self) -> (Scrape, Scrape) {
        let coordinator = self.cluster.metrics().await.unwrap_or_default();
        let worker = match self.cluster.http.get(&self.worker).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        (parse(&coordinator), parse(&worker))
    }

    /// Scrapes both until `cond` holds; panics with the scrapes and logs after `LIMIT`.
    async fn until(&self, what: &str, cond: impl Fn(&Scrape, &Scrape) -> bool) -> (Scrape, Scrape) {
        let deadline = Instant::now() + LIMIT;
        loop {
            let (c, w) = self.both().await;
            if cond(&c, &w) {
                return (c, w);
            }
            if Instant::now() > deadline {
                panic!(
                    "metrics never showed: {what}\n--- coordinator /metrics ---\n{}\n--- worker /metrics ---\n{}\n{}",
                    c.text,
                    w.text,
                    self.cluster.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

const CODER_VISIBLE: (&str, &[(&str, &str)]) = (
    "ao_queue_messages",
    &[("queue", "coder"), ("state", "visible")],
);
const CODER_IN_FLIGHT: (&str, &[(&str, &str)]) = (
    "ao_queue_messages",
    &[("queue", "coder"), ("state", "in_flight")],
);

#[tokio::test(flavor = "multi_thread")]
async fn metrics_follow_a_live_run_and_cover_the_monitoring_files() {
    let mut c = Cluster::new(&[
        ("AO__QUEUE__HEARTBEAT_SECS", "1"),
        ("AO__QUEUE__VISIBILITY_TIMEOUT_SECS", "10"),
    ]);
    let agent = script(c.dir.path(), "agent.sh", AGENT);
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();

    // No worker yet: the tasks wait on the coder queue.
    let mut ids = Vec::new();
    for prompt in ["first note", "second note", "please-fail this one"] {
        let (status, task) = c
            .submit(
                json!({ "repository": repo.display().to_string(), "prompt": prompt,
                            "pipeline": ["coder"] }),
            )
            .await
            .unwrap();
        assert_eq!(status, 202, "{task}");
        ids.push(task["id"].as_str().unwrap().to_string());
    }
    let worker_listen = format!("127.0.0.1:{}", free_port());
    let scraper = Scraper {
        cluster: &c,
        worker: format!("http://{worker_listen}/metrics"),
    };
    let (before, _) = scraper
        .until(
            "three coder messages waiting, three queued tasks",
            |c, _| {
                c.sum(CODER_VISIBLE.0, CODER_VISIBLE.1) == 3.0
                    && c.sum("ao_tasks", &[("status", "queued")]) == 3.0
                    && c.sum(
                        "ao_subtasks",
                        &[("capability", "coder"), ("status", "queued")],
                    ) == 3.0
            },
        )
        .await;
    assert_eq!(before.sum(CODER_IN_FLIGHT.0, CODER_IN_FLIGHT.1), 0.0);
    assert_eq!(
        before.sum(
            "ao_subtask_duration_seconds_count",
            &[("capability", "coder")]
        ),
        0.0,
        "nothing has run yet"
    );
    assert!(
        before.sum("ao_queue_oldest_message_age_seconds", &[("queue", "coder")]) >= 0.0,
        "{}",
        before.text
    );
    // Every coordinator series the monitoring files read exists before the first task
    // ran (known label sets start at zero), so a fresh deployment's panels and alerts
    // see values, not "no data".
    let (sources, recorded) = monitoring_queries();
    let first = before.series_names();
    let mut absent: Vec<String> = sources
        .iter()
        .flat_map(|(source, expr)| {
            metric_names(expr)
                .into_iter()
                .filter(|n| !n.starts_with("ao_worker_") && !recorded.contains(n))
                .filter(|n| !first.contains(n))
                .map(move |n| format!("{n} (in {source})"))
        })
        .collect();
    absent.sort();
    absent.dedup();
    assert!(
        absent.is_empty(),
        "absent from the coordinator's first scrape:\n{}\n{}",
        absent.join("\n"),
        before.text
    );

    // A worker with two slots takes them.
    drop(scraper);
    c.start_worker(&[
        ("AO__AGENT__KIND", "claude"),
        ("AO__AGENT__COMMAND", agent.to_str().unwrap()),
        ("AO__WORKER__LISTEN", worker_listen.as_str()),
        ("AO__WORKER__CAPABILITIES", "coder"),
        ("AO__WORKER__CONCURRENCY", "2"),
    ]);
    let scraper = Scraper {
        cluster: &c,
        worker: format!("http://{worker_listen}/metrics"),
    };
    scraper
        .until("coder messages in flight", |c, _| {
            c.sum(CODER_IN_FLIGHT.0, CODER_IN_FLIGHT.1) >= 1.0
        })
        .await;
    scraper
        .until("a running task", |c, _| {
            c.sum("ao_tasks", &[("status", "running")]) >= 1.0
        })
        .await;
    scraper
        .until("busy worker slots", |_, w| {
            w.sum("ao_worker_slots", &[("state", "busy")]) >= 1.0
        })
        .await;

    for id in &ids {
        c.wait_for_status(id, &["succeeded", "failed"], LIMIT)
            .await
            .unwrap();
    }
    let (after, worker) = scraper
        .until("the queue drained and every task ended", |c, w| {
            c.sum(CODER_VISIBLE.0, CODER_VISIBLE.1) == 0.0
                && c.sum(CODER_IN_FLIGHT.0, CODER_IN_FLIGHT.1) == 0.0
                && c.sum("ao_tasks", &[("status", "succeeded")]) == 2.0
                && c.sum("ao_tasks", &[("status", "failed")]) == 1.0
                && w.sum("ao_worker_slots", &[("state", "busy")]) == 0.0
        })
        .await;
    // Tasks by state.
    for status in ["queued", "running", "awaiting_approval", "cancelled"] {
        assert_eq!(
            after.sum("ao_tasks", &[("status", status)]),
            0.0,
            "{status}"
        );
    }
    assert_eq!(
        after.sum(
            "ao_subtasks",
            &[("capability", "coder"), ("status", "queued")]
        ),
        0.0
    );
    // Runs counted by outcome, on the worker.
    let runs = "ao_worker_runs_total";
    assert_eq!(
        worker.sum(runs, &[("capability", "coder"), ("outcome", "succeeded")]),
        2.0,
        "{}",
        worker.text
    );
    assert_eq!(
        worker.sum(runs, &[("capability", "coder"), ("outcome", "agent_error")]),
        1.0,
        "{}",
        worker.text
    );
    assert_eq!(worker.sum("ao_worker_slots", &[("state", "free")]), 2.0);
    assert!(worker.sum("ao_worker_heartbeats_total", &[("result", "ok")]) >= 1.0);
    assert_eq!(
        worker.sum("ao_worker_sandbox_start_seconds_count", &[]),
        3.0
    );
    assert!(worker.sum("ao_worker_receive_latency_seconds_count", &[]) >= 1.0);
    // Durations: one observation per attempt, each at least the agent's four seconds.
    let count = "ao_subtask_duration_seconds_count";
    assert_eq!(
        after.sum(count, &[("capability", "coder"), ("outcome", "succeeded")]),
        2.0
    );
    assert_eq!(
        after.sum(
            count,
            &[("capability", "coder"), ("outcome", "agent_error")]
        ),
        1.0
    );
    assert!(
        after.sum(
            "ao_subtask_duration_seconds_sum",
            &[("capability", "coder")]
        ) >= 3.0 * 3.5,
        "{}",
        after.text
    );
    assert_eq!(
        after.sum(
            "ao_trigger_to_start_seconds_count",
            &[("capability", "coder")]
        ),
        3.0
    );
    assert_eq!(
        after.sum(
            "ao_results_applied_total",
            &[("kind", "finished"), ("result", "applied")]
        ),
        3.0
    );
    assert_eq!(
        after.sum(
            "ao_http_requests_total",
            &[("route", "/api/v1/tasks"), ("status", "202")]
        ),
        3.0
    );
    assert!(after.sum("ao_queue_depth_poll_age_seconds", &[]) < 30.0);
    // Cost and tokens as the agent's results reported them.
    let cost = after.sum("ao_agent_cost_usd_total", &[("capability", "coder")]);
    assert!((cost - 0.035).abs() < 1e-9, "cost {cost}\n{}", after.text);
    assert!(
        after.sum(
            "ao_agent_tokens_total",
            &[("capability", "coder"), ("kind", "input")]
        ) >= 800.0,
        "{}",
        after.text
    );

    // Everything the monitoring files use is in these scrapes.
    let mut series = after.series_names();
    series.extend(worker.series_names());
    let mut families = after.families.clone();
    families.extend(worker.families.iter().cloned());
    let (sources, recorded) = monitoring_queries();
    assert!(sources.len() >= 20, "{sources:?}");
    let pending: BTreeSet<&str> = PENDING.iter().copied().collect();
    let family_of = |name: &str| -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if families.contains(base) || pending.contains(base) {
                    return base.to_string();
                }
            }
        }
        name.to_string()
    };
    let mut missing = Vec::new();
    let mut used = BTreeSet::new();
    for (source, expr) in &sources {
        for name in metric_names(expr) {
            if recorded.contains(&name) {
                continue;
            }
            used.insert(family_of(&name));
            if !series.contains(&name) && !pending.contains(family_of(&name).as_str()) {
                missing.push(format!("{name} (in {source}: {expr})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the monitoring files use metrics the services do not export:\n{}\n\
         --- coordinator ---\n{}\n--- worker ---\n{}",
        missing.join("\n"),
        after.text,
        worker.text
    );
    // The pending list only holds what is still missing and still used.
    for name in PENDING {
        assert!(
            !families.contains(*name),
            "{name} is exported now: remove it from PENDING"
        );
        assert!(
            used.contains(*name),
            "{name} is not used any more: remove it from PENDING"
        );
    }
    // The Python infra tests' list is exactly what the services export (+ pending).
    let mut expected: BTreeSet<String> = families
        .iter()
        .filter(|f| f.starts_with("ao_"))
        .cloned()
        .collect();
    expected.extend(PENDING.iter().map(|s| s.to_string()));
    let listed = exported_list();
    assert_eq!(
        listed,
        expected,
        "tests/infra/exported_metrics.txt differs from the live scrape: listed but not \
         exported {:?}, exported but not listed {:?}",
        listed.difference(&expected).collect::<Vec<_>>(),
        expected.difference(&listed).collect::<Vec<_>>()
    );
}
