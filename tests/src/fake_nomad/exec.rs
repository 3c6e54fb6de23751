//! The fake Nomad client: runs an allocation's task under bubblewrap the way the docker
//! driver lays a container out (`/local`, `/secrets`, `/alloc`, tmpfs mounts, the image's
//! files, `work_dir`), renders the job's templates (the `nomadVar` subset the sandbox job
//! uses), captures stdout and stderr as the task's logs, and serves the log and file
//! endpoints.

use super::{now_ns, stream_body, text, Kill, State};
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

/// Host directories never shown in a sandbox (the rest of `/` is, read-only).
const HOST_SKIP: &[&str] = &[
    "proc",
    "dev",
    "sys",
    "tmp",
    "run",
    "home",
    "root",
    "mnt",
    "media",
    "lost+found",
    "var",
];

fn event(kind: &str, message: &str) -> Value {
    json!({ "Type": kind, "Time": now_ns(), "DisplayMessage": message, "Message": "",
            "Details": {}, "FailsTask": false, "ExitCode": 0, "Signal": 0 })
}

fn push_event(v: &mut Value, task: &str, e: Value) {
    if v["TaskStates"][task].is_null() {
        v["TaskStates"][task] = json!({ "State": "pending", "Failed": false, "Restarts": 0,
            "StartedAt": "0001-01-01T00:00:00Z", "FinishedAt": "0001-01-01T00:00:00Z", "Events": [] });
    }
    if let Some(list) = v["TaskStates"][task]["Events"].as_array_mut() {
        list.push(e);
    }
}

fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Replaces `${NAME}` with values of `env`.
fn interpolate(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        match rest[start..].find('}') {
            Some(end) => {
                let name = &rest[start + 2..start + end];
                out.push_str(env.get(name).map(String::as_str).unwrap_or(""));
                rest = &rest[start + end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Renders the template subset the sandbox job uses: `{{ with nomadVar "PATH" }}…{{ end }}`
/// with `{{ .key }}` inside; a missing variable renders nothing.
fn render(tmpl: &str, vars: &BTreeMap<String, Value>) -> String {
    let mut out = String::new();
    let mut rest = tmpl;
    while let Some(start) = rest.find("{{ with nomadVar \"") {
        out.push_str(&rest[..start]);
        let after = &rest[start + "{{ with nomadVar \"".len()..];
        let Some(q) = after.find('"') else { break };
        let path = &after[..q];
        let Some(open_end) = after.find("}}") else {
            break;
        };
        let inner_start = &after[open_end + 2..];
        let Some(end) = inner_start.find("{{ end }}") else {
            break;
        };
        let body = &inner_start[..end];
        if let Some(items) = vars.get(path).map(|v| v["Items"].clone()) {
            let mut b = body.to_string();
            if let Some(o) = items.as_object() {
                for (k, v) in o {
                    b = b.replace(&format!("{{{{ .{k} }}}}"), v.as_str().unwrap_or_default());
                }
            }
            out.push_str(&b);
        }
        rest = &inner_start[end + "{{ end }}".len()..];
    }
    out.push_str(rest);
    out
}

/// Reads `NAME=value` lines of an env template.
fn env_lines(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let (k, v) = l.split_once('=')?;
            (!k.is_empty() && !k.starts_with('#'))
                .then(|| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        })
        .collect()
}

fn fail_start(state: &State, id: &str, task: &str, kind: &str, msg: &str) {
    let mut inner = state.inner.lock();
    inner.set_alloc(id, |v| {
        let mut e = event(kind, msg);
        e["FailsTask"] = json!(true);
        push_event(v, task, e);
        v["TaskStates"][task]["State"] = json!("dead");
        v["TaskStates"][task]["Failed"] = json!(true);
        v["ClientStatus"] = json!("failed");
        v["ClientDescription"] = json!("Failed tasks");
    });
}

/// Runs one allocation to its end.
pub(crate) async fn run(state: Arc<State>, id: String) {
    let (job, dir) = {
        let inner = state.inner.lock();
        let Some(a) = inner.allocs.get(&id) else {
            return;
        };
        (a.value["Job"].clone(), a.dir.clone())
    };
    let task = job["TaskGroups"][0]["Tasks"][0].clone();
    let name = task["Name"].as_str().unwrap_or("task").to_string();
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel();
    {
        let mut inner = state.inner.lock();
        if let Some(a) = inner.allocs.get_mut(&id) {
            a.kill = Some(kill_tx);
        }
        inner.set_alloc(&id, |v| {
            push_event(v, &name, event("Received", "Task received by client"));
            push_event(v, &name, event("Task Setup", "Building Task Directory"));
        });
    }
    state.notify();
    tokio::time::sleep(Duration::from_millis(50)).await;

    // Directories, as the docker driver mounts them.
    let alloc_dir = dir.join("alloc");
    let task_dir = dir.join(&name);
    for d in [
        alloc_dir.join("logs"),
        alloc_dir.join("data"),
        alloc_dir.join("tmp"),
        task_dir.join("local"),
        task_dir.join("secrets"),
        task_dir.join("tmp"),
    ] {
        let _ = std::fs::create_dir_all(d);
    }
    let _ = std::process::Command::new("chmod")
        .args(["-R", "0777"])
        .arg(&dir)
        .status();
    let payload = base64::engine::general_purpose::STANDARD
        .decode(job["Payload"].as_str().unwrap_or_default())
        .unwrap_or_default();
    if let Some(file) = task["DispatchPayload"]["File"].as_str() {
        let _ = std::fs::write(task_dir.join("local").join(file), &payload);
    }
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in [
        ("NOMAD_ALLOC_DIR", "/alloc"),
        ("NOMAD_TASK_DIR", "/local"),
        ("NOMAD_SECRETS_DIR", "/secrets"),
    ] {
        env.insert(k.into(), v.into());
    }
    env.insert("NOMAD_ALLOC_ID".into(), id.clone());
    env.insert("NOMAD_TASK_NAME".into(), name.clone());
    env.insert(
        "NOMAD_JOB_ID".into(),
        job["ID"].as_str().unwrap_or_default().into(),
    );
    env.insert(
        "NOMAD_JOB_PARENT_ID".into(),
        job["ParentID"].as_str().unwrap_or_default().into(),
    );
    env.insert(
        "NOMAD_NAMESPACE".into(),
        job["Namespace"].as_str().unwrap_or_default().into(),
    );
    for (k, v) in job["Meta"].as_object().into_iter().flatten() {
        env.insert(
            format!("NOMAD_META_{k}"),
            v.as_str().unwrap_or_default().into(),
        );
    }
    let vars = state.inner.lock().vars.clone();
    let mut template_env = Vec::new();
    for t in task["Templates"].as_array().into_iter().flatten() {
        let rendered = render(t["EmbeddedTmpl"].as_str().unwrap_or_default(), &vars);
        let dest = t["DestPath"].as_str().unwrap_or_default();
        if dest.is_empty() || dest.contains("..") {
            continue;
        }
        let _ = std::fs::write(task_dir.join(dest), &rendered);
        if t["Envvars"] == json!(true) {
            template_env.extend(env_lines(&rendered));
        }
    }
    // Workload identities, as the client writes them before the task starts.
    for issued in state.keyring.issue(&job, &task, &id) {
        if issued.file {
            let _ = std::fs::write(
                task_dir
                    .join("secrets")
                    .join(format!("nomad_{}.jwt", issued.name)),
                &issued.jwt,
            );
        }
        if issued.env {
            template_env.push((format!("NOMAD_TOKEN_{}", issued.name), issued.jwt));
        }
    }
    let config = &task["Config"];
    let image = config["image"].as_str().unwrap_or_default();
    let Some(img) = state.opts.images.get(image).cloned() else {
        fail_start(
            &state,
            &id,
            &name,
            "Driver Failure",
            &format!("failed to pull image {image}"),
        );
        state.notify();
        return;
    };
    let mut full_env = env.clone();
    full_env.insert("PATH".into(), img.path.clone());
    for (k, v) in task["Env"].as_object().into_iter().flatten() {
        full_env.insert(k.clone(), interpolate(v.as_str().unwrap_or_default(), &env));
    }
    full_env.extend(template_env);

    // bubblewrap: a fresh root with the host's system directories read-only.
    let uid = task["User"]
        .as_str()
        .and_then(|u| u.parse::<u32>().ok())
        .unwrap_or(65534);
    let mut args: Vec<String> = vec![
        "--unshare-user".into(),
        "--unshare-pid".into(),
        "--unshare-ipc".into(),
        "--unshare-uts".into(),
        "--die-with-parent".into(),
        "--uid".into(),
        uid.to_string(),
        "--gid".into(),
        uid.to_string(),
        "--hostname".into(),
        "sandbox".into(),
    ];
    if let Ok(entries) = std::fs::read_dir("/") {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if HOST_SKIP.contains(&n.as_str()) {
                continue;
            }
            let p = format!("/{n}");
            match std::fs::read_link(&p) {
                Ok(target) => args.extend(["--symlink".into(), target.display().to_string(), p]),
                Err(_) if e.path().is_dir() => args.extend(["--ro-bind".into(), p.clone(), p]),
                Err(_) => {}
            }
        }
    }
    args.extend([
        "--proc".into(),
        "/proc".into(),
        "--dev".into(),
        "/dev".into(),
    ]);
    args.extend([
        "--tmpfs".into(),
        "/tmp".into(),
        "--tmpfs".into(),
        "/var".into(),
    ]);
    for m in config["mount"].as_array().into_iter().flatten() {
        if m["type"] == json!("tmpfs") {
            if let Some(t) = m["target"].as_str() {
                args.extend(["--tmpfs".into(), t.into()]);
            }
        }
    }
    for (host, inside) in &img.binds {
        args.extend([
            "--ro-bind".into(),
            host.display().to_string(),
            inside.display().to_string(),
        ]);
    }
    for (host, rw) in &state.opts.volumes {
        let flag = if *rw { "--bind" } else { "--ro-bind" };
        args.extend([
            flag.into(),
            host.display().to_string(),
            host.display().to_string(),
        ]);
    }
    args.extend([
        "--bind".into(),
        task_dir.join("local").display().to_string(),
        "/local".into(),
    ]);
    args.extend([
        "--bind".into(),
        task_dir.join("secrets").display().to_string(),
        "/secrets".into(),
    ]);
    args.extend([
        "--bind".into(),
        alloc_dir.display().to_string(),
        "/alloc".into(),
    ]);
    args.extend([
        "--chdir".into(),
        config["work_dir"].as_str().unwrap_or("/").into(),
        "--".into(),
    ]);
    args.push(config["command"].as_str().unwrap_or("true").into());
    for a in config["args"].as_array().into_iter().flatten() {
        args.push(interpolate(a.as_str().unwrap_or_default(), &env));
    }
    let stdout = std::fs::File::create(alloc_dir.join("logs").join(format!("{name}.stdout.0")));
    let stderr = std::fs::File::create(alloc_dir.join("logs").join(format!("{name}.stderr.0")));
    let (Ok(stdout), Ok(stderr)) = (stdout, stderr) else {
        fail_start(
            &state,
            &id,
            &name,
            "Setup Failure",
            "cannot create the log files",
        );
        state.notify();
        return;
    };
    let mut cmd = tokio::process::Command::new("bwrap");
    cmd.args(&args)
        .env_clear()
        .envs(&full_env)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            fail_start(&state, &id, &name, "Driver Failure", &format!("bwrap: {e}"));
            state.notify();
            return;
        }
    };
    let pid = child.id().map(|p| p as i32);
    {
        let mut inner = state.inner.lock();
        if let Some(a) = inner.allocs.get_mut(&id) {
            a.pid = pid;
        }
        inner.set_alloc(&id, |v| {
            push_event(v, &name, event("Started", "Task started by client"));
            v["TaskStates"][&name]["State"] = json!("running");
            v["TaskStates"][&name]["StartedAt"] = json!(rfc3339_now());
            v["ClientStatus"] = json!("running");
            v["ClientDescription"] = json!("Tasks are running");
        });
    }
    state.notify();

    let kill_timeout = Duration::from_nanos(task["KillTimeout"].as_u64().unwrap_or(5_000_000_000))
        .min(state.opts.kill_timeout_cap);
    let group = |sig| {
        if let Some(p) = pid {
            let _ = killpg(Pid::from_raw(p), sig);
        }
    };
    let exited = tokio::select! {
        s = child.wait() => Ok(s),
        k = kill_rx => Err(k.unwrap_or(Kill::Stop)),
    };
    match exited {
        Ok(status) => {
            let code = status.ok().and_then(|s| s.code()).unwrap_or(-1);
            let mut inner = state.inner.lock();
            inner.set_alloc(&id, |v| {
                let mut e = event("Terminated", &format!("Exit Code: {code}"));
                e["ExitCode"] = json!(code);
                e["Details"] = json!({ "exit_code": code.to_string(), "oom_killed": "false" });
                push_event(v, &name, e);
                if code != 0 {
                    let mut nr = event("Not Restarting", "Error was unrecoverable");
                    nr["FailsTask"] = json!(true);
                    push_event(v, &name, nr);
                }
                v["TaskStates"][&name]["State"] = json!("dead");
                v["TaskStates"][&name]["Failed"] = json!(code != 0);
                v["TaskStates"][&name]["FinishedAt"] = json!(rfc3339_now());
                v["ClientStatus"] = json!(if code == 0 { "complete" } else { "failed" });
                v["ClientDescription"] = json!(if code == 0 {
                    "All tasks have completed"
                } else {
                    "Failed tasks"
                });
            });
        }
        Err(Kill::Stop) => {
            {
                let mut inner = state.inner.lock();
                inner.set_alloc(&id, |v| {
                    push_event(
                        v,
                        &name,
                        event("Killing", "Sent interrupt. Waiting 5s before force killing"),
                    );
                });
            }
            state.notify();
            group(Signal::SIGTERM);
            if tokio::time::timeout(kill_timeout, child.wait())
                .await
                .is_err()
            {
                group(Signal::SIGKILL);
                let _ = child.wait().await;
            }
            let mut inner = state.inner.lock();
            inner.set_alloc(&id, |v| {
                push_event(v, &name, event("Killed", "Task successfully killed"));
                v["TaskStates"][&name]["State"] = json!("dead");
                v["TaskStates"][&name]["FinishedAt"] = json!(rfc3339_now());
                v["ClientStatus"] = json!("complete");
                v["ClientDescription"] = json!("All tasks have completed");
            });
        }
        Err(Kill::Lost) => {
            group(Signal::SIGKILL);
            let _ = child.wait().await;
            let mut inner = state.inner.lock();
            inner.set_alloc(&id, |v| {
                v["DesiredStatus"] = json!("stop");
                v["DesiredDescription"] = json!("alloc is lost since its node is down");
                v["ClientStatus"] = json!("lost");
                v["ClientDescription"] = json!("alloc is lost since its node is down");
            });
        }
    }
    let started = {
        let mut inner = state.inner.lock();
        if let Some(a) = inner.allocs.get_mut(&id) {
            a.pid = None;
            a.kill = None;
        }
        inner.unblock(&state.root)
    };
    state.start_allocs(started);
    state.notify();
}

fn task_of(state: &State, alloc: &str) -> Option<(PathBuf, String, Value)> {
    let inner = state.inner.lock();
    let a = inner.allocs.get(alloc)?;
    let name = a.value["Job"]["TaskGroups"][0]["Tasks"][0]["Name"]
        .as_str()?
        .to_string();
    Some((
        a.dir.clone(),
        name.clone(),
        a.value["TaskStates"][&name].clone(),
    ))
}

fn q<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `/v1/client/fs/logs/{alloc}`: framed (`{"Offset","Data","File"}` objects, `{}` as
/// heartbeat) or plain; follows until the task is dead and its log read.
pub(crate) fn logs(state: Arc<State>, alloc: &str, query: &[(String, String)]) -> Response {
    let Some((dir, name, _)) = task_of(&state, alloc) else {
        return text(StatusCode::NOT_FOUND, "Unknown allocation");
    };
    let kind = q(query, "type").unwrap_or("stdout");
    if !matches!(kind, "stdout" | "stderr") || q(query, "task") != Some(name.as_str()) {
        return text(StatusCode::BAD_REQUEST, "invalid task or log type");
    }
    let file = format!("alloc/logs/{name}.{kind}.0");
    let path = dir.join(&file);
    let Ok(len) = std::fs::metadata(&path).map(|m| m.len()) else {
        return text(
            StatusCode::NOT_FOUND,
            "log file not found: task not started",
        );
    };
    let offset: u64 = q(query, "offset").and_then(|o| o.parse().ok()).unwrap_or(0);
    let pos = if q(query, "origin") == Some("end") {
        len.saturating_sub(offset)
    } else {
        offset
    };
    let follow = q(query, "follow") == Some("true");
    let plain = q(query, "plain") == Some("true");
    let alloc = alloc.to_string();
    let st = (
        state,
        alloc,
        name,
        path,
        file,
        pos,
        follow,
        plain,
        false,
        std::time::Instant::now(),
    );
    let stream = futures::stream::unfold(st, |mut s| async move {
        loop {
            let (state, alloc, name, path, file, pos, follow, plain, done, idle) = &mut s;
            if *done {
                return None;
            }
            let dead = {
                let inner = state.inner.lock();
                inner.allocs.get(alloc.as_str()).is_none_or(|a| {
                    a.value["TaskStates"][name.as_str()]["State"] == json!("dead")
                        || matches!(
                            a.value["ClientStatus"].as_str(),
                            Some("complete" | "failed" | "lost")
                        )
                })
            };
            let mut buf = vec![0u8; 64 * 1024];
            let n = std::fs::File::open(&*path)
                .and_then(|mut f| {
                    f.seek(SeekFrom::Start(*pos))?;
                    f.read(&mut buf)
                })
                .unwrap_or(0);
            if n > 0 {
                buf.truncate(n);
                let out = if *plain {
                    buf
                } else {
                    serde_json::to_vec(&json!({
                        "Offset": *pos,
                        "Data": base64::engine::general_purpose::STANDARD.encode(&buf),
                        "File": file,
                    }))
                    .unwrap_or_default()
                };
                *pos += n as u64;
                *idle = std::time::Instant::now();
                return Some((Ok::<Bytes, std::io::Error>(Bytes::from(out)), s));
            }
            if !*follow || dead {
                *done = true;
                return None;
            }
            if idle.elapsed() > Duration::from_secs(1) && !*plain {
                *idle = std::time::Instant::now();
                return Some((Ok(Bytes::from_static(b"{}")), s));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (StatusCode::OK, stream_body(stream)).into_response()
}

/// `/v1/client/fs/cat/{alloc}?path=`: a file of the allocation directory.
pub(crate) fn cat(state: &State, alloc: &str, query: &[(String, String)]) -> Response {
    let Some((dir, _, _)) = task_of(state, alloc) else {
        return text(StatusCode::NOT_FOUND, "Unknown allocation");
    };
    let rel = q(query, "path").unwrap_or_default().trim_start_matches('/');
    if rel.split('/').any(|c| c == "..") {
        return text(StatusCode::BAD_REQUEST, "invalid path");
    }
    match std::fs::read(Path::new(&dir).join(rel)) {
        Ok(bytes) => (StatusCode::OK, bytes).into_response(),
        Err(_) => text(StatusCode::NOT_FOUND, format!("file {rel} not found")),
    }
}
