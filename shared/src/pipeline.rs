//! The deterministic planner: a pipeline (a list of capabilities) becomes a chain of
//! subtasks, each depending on the one before it.

use crate::capability::Capability;
use crate::task::Subtask;

/// Subtasks for a pipeline, each waiting for its predecessor.
pub fn plan_subtasks(pipeline: &[Capability]) -> Vec<Subtask> {
    let mut subtasks: Vec<Subtask> = Vec::with_capacity(pipeline.len());
    for capability in pipeline {
        let depends_on = subtasks.last().map(|s| vec![s.id]).unwrap_or_default();
        subtasks.push(Subtask::new(*capability, depends_on));
    }
    subtasks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_depends_on_predecessor() {
        let s = plan_subtasks(&[Capability::Coder, Capability::Tester, Capability::Docs]);
        assert_eq!(s.len(), 3);
        assert!(s[0].depends_on.is_empty());
        assert_eq!(s[1].depends_on, vec![s[0].id]);
        assert_eq!(s[2].depends_on, vec![s[1].id]);
        assert_eq!(s[2].capability, Capability::Docs);
    }
}
