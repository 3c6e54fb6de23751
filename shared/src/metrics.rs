//! Prometheus helpers both daemons use: registering a collector and rendering a
//! registry in the text exposition format.

use prometheus::core::Collector;
use prometheus::{Encoder, Registry, TextEncoder};

/// Registers `metric` and hands it back. Registration fails only for a duplicate name,
/// which each daemon's fixed set of names rules out; it is logged, not fatal.
pub fn register<T: Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    if let Err(e) = registry.register(Box::new(metric.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    metric
}

/// The registry's metrics as Prometheus text.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    String::from_utf8(buf).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_metrics_render() {
        let r = Registry::new();
        let c = register(
            &r,
            prometheus::IntCounter::new("ao_test_total", "a test counter").unwrap(),
        );
        c.inc();
        // A second registration of the same name is refused, and the first one stays.
        register(
            &r,
            prometheus::IntCounter::new("ao_test_total", "again").unwrap(),
        );
        let text = render(&r);
        assert!(text.contains("ao_test_total 1"), "{text}");
    }
}
