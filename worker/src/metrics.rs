//! The worker's Prometheus metrics.

use ao_shared::metrics::register;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub slots: IntGaugeVec,
    pub runs: IntCounterVec,
    pub heartbeats: IntCounterVec,
    pub receive_latency: Histogram,
    pub sandbox_start: Histogram,
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
        ao_shared::metrics::render(&self.registry)
    }
}
