//! The names of cloud resources derived from configuration. The Terraform module derives
//! the same names; `coordinator resource-names` prints these so the two can be compared.

use crate::capability::Capability;
use crate::queue::QueueId;
use serde::Serialize;
use std::collections::BTreeMap;

/// The SQS queue name for a logical queue.
pub fn queue_name(prefix: &str, queue: QueueId) -> String {
    format!("{prefix}-{}", queue.as_str())
}

/// The dead-letter queue name of a logical queue.
pub fn dead_letter_queue_name(prefix: &str, queue: QueueId) -> String {
    format!("{}-dlq", queue_name(prefix, queue))
}

/// Every name the AWS backends use, as printed by `coordinator resource-names`.
#[derive(Debug, Serialize)]
pub struct ResourceNames {
    pub queues: BTreeMap<String, String>,
    pub result_queue: String,
    pub dead_letter_queues: BTreeMap<String, String>,
    pub table: String,
}

impl ResourceNames {
    pub fn derive(prefix: &str, table: &str) -> Self {
        let queues = Capability::ALL
            .iter()
            .map(|c| (c.to_string(), queue_name(prefix, QueueId::Capability(*c))))
            .collect();
        let dead_letter_queues = QueueId::all()
            .map(|q| (q.as_str().to_string(), dead_letter_queue_name(prefix, q)))
            .collect();
        Self {
            queues,
            result_queue: queue_name(prefix, QueueId::Results),
            dead_letter_queues,
            table: table.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let n = ResourceNames::derive("acme-prod", "acme-prod-tasks");
        assert_eq!(n.queues["coder"], "acme-prod-coder");
        assert_eq!(n.result_queue, "acme-prod-results");
        assert_eq!(n.dead_letter_queues["results"], "acme-prod-results-dlq");
        assert_eq!(n.dead_letter_queues.len(), 6);
    }
}
