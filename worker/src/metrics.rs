//! The worker's Prometheus metrics.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub slots: IntGaugeVec,
    pub runs: IntCounterVec,
    pub heartbeats: IntCounterVec,
    pub receive_latency: Histogram,
    pub sandbox_start: Histogram,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    if let Err(e) = registry.register(Box::new(metric.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    metric
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        Ok(Self {
            slots: register(
                &r,
                IntGaugeVec::new(
                    Opts::new("ao_worker_slots", "Subtask slots by state (busy, free)"),
                    &["state"],
                )?,
            ),
            runs: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "ao_worker_runs_total",
                        "Subtask runs by capability and outcome",
                    ),
                    &["capability", "outcome"],
                )?,
            ),
            heartbeats: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "ao_worker_heartbeats_total",
                        "Visibility extensions by result",
                    ),
                    &["result"],
                )?,
            ),
            receive_latency: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "ao_worker_receive_latency_seconds",
                        "Duration of queue receives that returned work",
                    )
                    .buckets(vec![
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                    ]),
                )?,
            ),
            sandbox_start: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "ao_worker_sandbox_start_seconds",
                        "Time from receiving a subtask to its sandbox's first event",
                    )
                    .buckets(vec![
                        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ]),
                )?,
            ),
            registry: r,
        })
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
