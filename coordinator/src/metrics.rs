//! The coordinator's Prometheus metrics. Names carry their unit and follow the
//! `_total` / `_seconds` conventions; `nomad/monitoring/` and the alert rules use them.

use ao_shared::capability::Capability;
use ao_shared::metrics::register;
use ao_shared::task::OutcomeKind;
use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// Buckets for agent run times: seconds to hours.
const RUN_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
];

/// The `kind` label of `ao_agent_tokens_total`, one per field of `TokenUsage`.
pub const TOKEN_KINDS: [&str; 4] = ["input", "output", "cache_read", "cache_creation"];
/// The `kind` label of `ao_results_applied_total`: the worker reports ([`ResultMessage`]
/// variants), besides `undecodable` for a message that is none of them.
///
/// [`ResultMessage`]: ao_shared::message::ResultMessage
pub const REPORT_KINDS: [&str; 4] = ["started", "events", "finished", "spent"];
/// The `result` label of `ao_results_applied_total` for a decoded report.
pub const REPORT_RESULTS: [&str; 4] = ["applied", "ignored", "unknown_task", "error"];

/// Every metric the coordinator exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub queue_messages: IntGaugeVec,
    pub queue_oldest_age: GaugeVec,
    pub queue_poll_age: Gauge,
    pub tasks: IntGaugeVec,
    pub subtasks: IntGaugeVec,
    pub subtask_duration: HistogramVec,
    pub trigger_to_start: HistogramVec,
    pub agent_cost: prometheus::CounterVec,
    pub agent_tokens: IntCounterVec,
    pub results_applied: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub webhook_deliveries: IntCounterVec,
    pub github_api_calls: IntCounterVec,
    pub github_rate_limit_remaining: prometheus::IntGauge,
    pub budget_used_ratio: GaugeVec,
    /// Deaths (panic or early return) of each background loop; see `supervisor`.
    pub loop_restarts: IntCounterVec,
    /// 1 while a background loop runs, 0 while it waits to be restarted.
    pub loop_up: IntGaugeVec,
    /// 1 while this replica holds the lease of a singleton loop.
    pub lease_held: IntGaugeVec,
    /// Times this replica took a lease (at start-up or over from a replica that died).
    pub lease_takeovers: IntCounterVec,
    /// Times this replica lost a lease it held (renewal refused or not confirmed in time).
    pub lease_lost: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        let m = Self {
            queue_messages: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "ao_queue_messages",
                        "Messages per queue by state (visible, in_flight, dead)",
                    ),
                    &["queue", "state"],
                )?,
            ),
            queue_oldest_age: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "ao_queue_oldest_message_age_seconds",
                        "Age of the oldest message not yet deleted",
                    ),
                    &["queue"],
                )?,
            ),
            queue_poll_age: register(
                &r,
                Gauge::new(
                    "ao_queue_depth_poll_age_seconds",
                    "Seconds since the queue depths were last read",
                )?,
            ),
            tasks: register(
                &r,
                IntGaugeVec::new(Opts::new("ao_tasks", "Tasks by status"), &["status"])?,
            ),
            subtasks: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "ao_subtasks",
                        "Subtasks of active tasks by capability and status",
                    ),
                    &["capability", "status"],
                )?,
            ),
            subtask_duration: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "ao_subtask_duration_seconds",
                        "Duration of subtask attempts",
                    )
                    .buckets(RUN_BUCKETS.to_vec()),
                    &["capability", "outcome"],
                )?,
            ),
            trigger_to_start: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "ao_trigger_to_start_seconds",
                        "Time from a task's creation to a worker starting its subtask",
                    )
                    .buckets(vec![
                        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                    ]),
                    &["capability"],
                )?,
            ),
            agent_cost: register(
                &r,
                prometheus::CounterVec::new(
                    Opts::new("ao_agent_cost_usd_total", "Agent cost in US dollars"),
                    &["capability", "repository"],
                )?,
            ),
            agent_tokens: register(
                &r,
                IntCounterVec::new(
                    Opts::new("ao_agent_tokens_total", "Agent tokens by kind"),
                    &["capability", "repository", "kind"],
                )?,
            ),
            results_applied: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "ao_results_applied_total",
                        "Worker reports by kind and what applying them did",
                    ),
                    &["kind", "result"],
                )?,
            ),
            http_requests: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "ao_http_requests_total",
                        "HTTP requests by route and status",
                    ),
                    &["route", "status"],
                )?,
            ),
            webhook_deliveries: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "ao_webhook_deliveries_total",
                        "GitHub webhook deliveries by event and what became of them",
                    ),
                    &["event", "result"],
                )?,
            ),
            github_api_calls: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "ao_github_api_calls_total",
                        "GitHub API calls by route template, status and result",
                    ),
                    &["route", "status", "result"],
                )?,
            ),
            github_rate_limit_remaining: register(
                &r,
                prometheus::IntGauge::new(
                    "ao_github_rate_limit_remaining",
                    "GitHub API requests left in the current rate-limit window (last seen)",
                )?,
            ),
            budget_used_ratio: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "ao_budget_used_ratio",
                        "Share of the monthly cost budget used, per GitHub installation",
                    ),
                    &["installation"],
                )?,
            ),
            loop_restarts: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "ao_background_loop_restarts_total",
                        "Background loops that died (panicked or returned) and were restarted",
                    ),
                    &["loop"],
                )?,
            ),
            loop_up: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "ao_background_loop_up",
                        "1 while a background loop runs, 0 while it waits to be restarted",
                    ),
                    &["loop"],
                )?,
            ),
            lease_held: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "ao_lease_held",
                        "1 while this replica holds the lease of a singleton loop",
                    ),
                    &["lease"],
                )?,
            ),
            lease_takeovers: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "ao_lease_takeovers_total",
                        "Times this replica took the lease of a singleton loop",
                    ),
                    &["lease"],
                )?,
            ),
            lease_lost: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "ao_lease_lost_total",
                        "Times this replica lost the lease of a singleton loop it held",
                    ),
                    &["lease"],
                )?,
            ),
            registry: r,
        };
        // Every family shows in /metrics from start-up, before its first event, and the
        // label sets known in advance start at zero (Prometheus' instrumentation guide,
        // "Avoid missing metrics"): a fresh deployment's panels and alerts read zeros,
        // not "no data". Cost and tokens get an empty `repository` (which Prometheus
        // stores as no label) until a repository's first run.
        for capability in Capability::ALL {
            let cap = capability.as_str();
            for outcome in OutcomeKind::ALL {
                m.subtask_duration
                    .with_label_values(&[cap, outcome.as_str()]);
            }
            m.trigger_to_start.with_label_values(&[cap]);
            m.agent_cost.with_label_values(&[cap, ""]);
            for kind in TOKEN_KINDS {
                m.agent_tokens.with_label_values(&[cap, "", kind]);
            }
        }
        for kind in REPORT_KINDS {
            for result in REPORT_RESULTS {
                m.results_applied.with_label_values(&[kind, result]);
            }
        }
        m.results_applied
            .with_label_values(&["undecodable", "rejected"]);
        m.webhook_deliveries
            .with_label_values(&["ping", "accepted"]);
        m.github_api_calls.with_label_values(&["none", "0", "ok"]);
        m.github_rate_limit_remaining.set(5000);
        m.budget_used_ratio.with_label_values(&["none"]).set(0.0);
        Ok(m)
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        ao_shared::metrics::render(&self.registry)
    }
}
