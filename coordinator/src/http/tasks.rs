//! The REST API for tasks under `/api/v1`: create, list, get, events, cancel, retry,
//! approve, reject. Input is validated here, at the edge; the rules live in `orchestrator`.

use super::error::ApiError;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use crate::context::Coordinator;
use crate::orchestrator::{self, ChangeError, NewTask};
use ao_shared::capability::Capability;
use ao_shared::ids::TaskId;
use ao_shared::state::TaskQuery;
use ao_shared::status::TaskStatus;
use ao_shared::task::AGENT_BRANCH_PREFIX;
use ao_shared::task::{Applied, Approval, Task, TaskSource, MAX_REJECT_FEEDBACK_BYTES};
use ao_shared::validate;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Longest accepted prompt, in bytes.
pub const MAX_PROMPT_BYTES: usize = 32 * 1024;
/// Longest accepted title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;

/// A pipeline given by name or as a list of capabilities.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PipelineSpec {
    Name(String),
    Steps(Vec<String>),
}

/// `POST /api/v1/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTask {
    pub repository: String,
    pub prompt: String,
    #[serde(default)]
    pub branch: Option<String>,
    #[serde(default)]
    pub base_branch: Option<String>,
    #[serde(default)]
    pub pipeline: Option<PipelineSpec>,
    #[serde(default)]
    pub title: Option<String>,
}

/// A task as the API shows it.
#[derive(Serialize)]
pub struct TaskView<'a> {
    #[serde(flatten)]
    pub task: &'a Task,
    pub cost_usd: f64,
}

pub fn view(task: &Task) -> TaskView<'_> {
    TaskView {
        task,
        cost_usd: task.cost_usd(),
    }
}

fn resolve_pipeline(
    cx: &Coordinator,
    spec: Option<PipelineSpec>,
) -> Result<(String, Vec<Capability>), ApiError> {
    match spec {
        None => {
            let name = cx.settings.api.default_pipeline.clone();
            let steps = cx
                .settings
                .pipelines
                .get(&name)
                .cloned()
                .unwrap_or_default();
            Ok((name, steps))
        }
        Some(PipelineSpec::Name(name)) => match cx.settings.pipelines.get(&name) {
            Some(steps) => Ok((name, steps.clone())),
            None => {
                let known: Vec<&str> = cx.settings.pipelines.keys().map(String::as_str).collect();
                Err(ApiError::unprocessable(format!(
                    "unknown pipeline {name:?}; configured pipelines: {}",
                    known.join(", ")
                )))
            }
        },
        Some(PipelineSpec::Steps(steps)) => {
            if steps.is_empty() || steps.len() > 20 {
                return Err(ApiError::unprocessable("pipeline must have 1 to 20 steps"));
            }
            let caps = steps
                .iter()
                .map(|s| s.parse::<Capability>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ApiError::unprocessable(e.to_string()))?;
            let name = steps.join(",");
            Ok((name, caps))
        }
    }
}

/// Creates a task: 202 with the task.
pub async fn create(
    State(cx): State<Arc<Coordinator>>,
    ApiJson(body): ApiJson<CreateTask>,
) -> Result<Response, ApiError> {
    validate::repository(&body.repository).map_err(|e| ApiError::unprocessable(e.0))?;
    let prompt = body.prompt.trim();
    if prompt.is_empty() {
        return Err(ApiError::unprocessable("prompt must not be empty"));
    }
    if prompt.len() > MAX_PROMPT_BYTES {
        return Err(ApiError::unprocessable(format!(
            "prompt is longer than {MAX_PROMPT_BYTES} bytes; put long material in the repository"
        )));
    }
    let title = match body.title.as_deref().map(str::trim) {
        Some("") => {
            return Err(ApiError::unprocessable(
                "title must not be empty when given",
            ))
        }
        Some(t) if t.chars().count() > MAX_TITLE_CHARS => {
            return Err(ApiError::unprocessable(format!(
                "title is longer than {MAX_TITLE_CHARS} characters"
            )))
        }
        Some(t) => t.to_string(),
        None => prompt
            .lines()
            .next()
            .unwrap_or(prompt)
            .chars()
            .take(80)
            .collect(),
    };
    if let Some(base) = &body.base_branch {
        validate::branch(base).map_err(|e| ApiError::unprocessable(e.0))?;
    }
    let (pipeline_name, pipeline) = resolve_pipeline(&cx, body.pipeline)?;
    let branch = match body.branch {
        Some(b) => {
            validate::branch(&b).map_err(|e| ApiError::unprocessable(e.0))?;
            b
        }
        None => {
            let slug = validate::slug(&title);
            let short = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
            if slug.is_empty() {
                format!("{AGENT_BRANCH_PREFIX}{short}")
            } else {
                format!("{AGENT_BRANCH_PREFIX}{short}-{slug}")
            }
        }
    };
    let task = orchestrator::create_task(
        &cx,
        NewTask {
            title,
            prompt: prompt.to_string(),
            repository: body.repository,
            branch,
            base_branch: body.base_branch,
            pipeline_name,
            pipeline,
            source: TaskSource::Api,
            approval: Approval::NotRequired,
            review_round: None,
            ci_rounds: Vec::new(),
            profiles: Default::default(),
            planner: None,
        },
        None,
    )
    .await?;
    let location = format!("/api/v1/tasks/{}", task.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(view(&task)),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    status: Option<String>,
    repository: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// Lists tasks, newest first, a page at a time.
pub async fn list(
    State(cx): State<Arc<Coordinator>>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Response, ApiError> {
    let status = params
        .status
        .as_deref()
        .map(|s| s.parse::<TaskStatus>())
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid_status", e))?;
    let limit = params.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            "limit must be between 1 and 200",
        ));
    }
    let page = cx
        .store
        .list_tasks(&TaskQuery {
            status,
            repository: params.repository,
            limit,
            cursor: params.cursor,
        })
        .await
        .map_err(|e| match e {
            ao_shared::state::StoreError::InvalidCursor => {
                ApiError::bad_request("invalid_cursor", "cursor is not one this API returned")
            }
            other => ApiError::store(other),
        })?;
    let tasks: Vec<_> = page.tasks.iter().map(view).collect();
    Ok(
        Json(serde_json::json!({ "tasks": tasks, "next_cursor": page.next_cursor }))
            .into_response(),
    )
}

pub fn parse_id(id: &str) -> Result<TaskId, ApiError> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("task {id:?} not found")))
}

/// One task.
pub async fn get(
    State(cx): State<Arc<Coordinator>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let task = cx
        .store
        .get_task(id)
        .await
        .map_err(ApiError::store)?
        .ok_or_else(|| ApiError::not_found(format!("task {id} not found")))?;
    Ok(Json(view(&task)).into_response())
}

async fn change(
    cx: &Coordinator,
    id: &str,
    f: impl FnMut(&mut Task, ao_shared::timefmt::Timestamp) -> Result<Applied, ChangeError>,
) -> Result<Response, ApiError> {
    let id = parse_id(id)?;
    let (task, _) = orchestrator::mutate(cx, id, f).await?;
    Ok(Json(view(&task)).into_response())
}

/// Cancels a task and every unfinished subtask.
pub async fn cancel(
    State(cx): State<Arc<Coordinator>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    change(&cx, &id, |task, now| {
        if task.status == TaskStatus::Cancelled {
            return Ok(Applied::Ignored("already cancelled".into()));
        }
        task.cancel("cancelled through the API", now)?;
        Ok(Applied::Changed)
    })
    .await
}

/// Runs a failed or cancelled task again from its first unfinished subtask.
pub async fn retry(
    State(cx): State<Arc<Coordinator>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    change(&cx, &id, |task, now| {
        if !matches!(task.status, TaskStatus::Failed | TaskStatus::Cancelled) {
            return Err(ChangeError::Refused(format!(
                "only failed or cancelled tasks can be retried; this one is {}",
                task.status
            )));
        }
        task.retry(now)?;
        Ok(Applied::Changed)
    })
    .await
}

/// Lets a task that waits for approval go ahead.
pub async fn approve(
    State(cx): State<Arc<Coordinator>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    change(&cx, &id, |task, now| {
        if task.status != TaskStatus::AwaitingApproval {
            return Err(ChangeError::Refused(format!(
                "task is {}, not awaiting approval",
                task.status
            )));
        }
        task.status = task.status.transition(TaskStatus::Queued)?;
        task.updated_at = now;
        Ok(Applied::Changed)
    })
    .await
}

/// `POST /api/v1/tasks/{id}/reject`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RejectPlan {
    /// What to change in the plan: the planner is given it with the rejected plan.
    pub feedback: String,
}

/// Rejects the plan a task waits with: the planner makes a new one from the feedback,
/// which waits for approval in turn. 409 when the task waits for no plan; 422 when the
/// feedback is empty or too long.
pub async fn reject(
    State(cx): State<Arc<Coordinator>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<RejectPlan>,
) -> Result<Response, ApiError> {
    let feedback = body.feedback.trim().to_string();
    if feedback.is_empty() {
        return Err(ApiError::unprocessable(
            "feedback must say what to change in the plan",
        ));
    }
    if feedback.len() > MAX_REJECT_FEEDBACK_BYTES {
        return Err(ApiError::unprocessable(format!(
            "feedback is longer than {MAX_REJECT_FEEDBACK_BYTES} bytes"
        )));
    }
    change(&cx, &id, |task, now| {
        task.reject_plan(&feedback, now)
            .map_err(|e| ChangeError::Refused(e.to_string()))?;
        Ok(Applied::Changed)
    })
    .await
}
