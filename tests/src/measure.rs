//! Measurement helpers for the benchmarks: percentiles, and the memory of processes as
//! the kernel reports it in `/proc`.

/// The `p` quantile (0..=1) of sorted values, nearest rank; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A field of `/proc/<pid>/status` given in kB, in MiB (NaN when the process is gone).
fn status_mib(pid: i32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Resident memory now, in MiB.
pub fn rss_mib(pid: i32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// The highest resident memory the process has had, in MiB.
pub fn peak_rss_mib(pid: i32) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// The process and all its descendants.
pub fn process_tree(root: i32) -> Vec<i32> {
    let mut parents: Vec<(i32, i32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // The parent pid is the 2nd field after the parenthesised command name.
        if let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) {
            if let Some(ppid) = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok())
            {
                parents.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// Resident memory of a process and all its descendants, in MiB.
pub fn tree_rss_mib(root: i32) -> f64 {
    process_tree(root)
        .into_iter()
        .map(rss_mib)
        .filter(|m| m.is_finite())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_own_memory() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert_eq!(percentile(&v, 0.99), 5.0);
        assert!(percentile(&[], 0.5).is_nan());
        let me = std::process::id() as i32;
        assert!(rss_mib(me) > 0.0);
        assert!(peak_rss_mib(me) >= rss_mib(me) - 1.0);
        assert!(process_tree(me).contains(&me));
        assert!(rss_mib(-1).is_nan());
    }
}
