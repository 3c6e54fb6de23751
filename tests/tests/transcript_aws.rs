//! A long, talkative run on the AWS backends (SQS, DynamoDB on moto_server): an agent that
//! speaks Claude Code's stream-json for 500 turns and about 1 MB of text completes, and its
//! whole transcript reads back through the API, page by page (`?after=&limit=`).

use ao_tests::moto::{unique, Moto};
use ao_tests::scenario::{cluster_with, start_agent_worker, submit_code, wait_succeeded};
use ao_tests::{bare_repo, git, script};
use serde_json::Value;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);
const TURNS: usize = 500;
/// Text per turn: 500 turns of it make a megabyte.
const TURN_BYTES: usize = 2100;

#[tokio::test(flavor = "multi_thread")]
async fn a_megabyte_of_output_in_500_turns_completes_and_reads_back_whole_on_dynamodb() {
    let moto = Moto::shared();
    let mut c = cluster_with(
        &moto.env(&unique("transcript")),
        &[
            ("AO__AGENT__KIND", "claude"),
            // Claude Code refuses `bypassPermissions` as root; the script does not care.
            ("AO__AGENT__PROFILES__CODER__PERMISSION_MODE", "acceptEdits"),
            ("AO__WORKER__CAPABILITIES", "coder"),
        ],
    );
    let agent = script(
        c.dir.path(),
        "agent.sh",
        &format!(
            "cat > /dev/null || true\n\
             pad=$(head -c {TURN_BYTES} /dev/zero | tr '\\0' t)\n\
             echo '{{\"type\":\"system\",\"subtype\":\"init\",\"model\":\"claude-sonnet-4-5\"}}'\n\
             for i in $(seq 1 {TURNS}); do\n\
               printf '{{\"type\":\"assistant\",\"message\":{{\"id\":\"m%s\",\"role\":\"assistant\",\
\"model\":\"claude-sonnet-4-5\",\"content\":[{{\"type\":\"text\",\"text\":\"turn-%s %s\"}}],\
\"usage\":{{\"input_tokens\":10,\"output_tokens\":5}}}}}}\\n' \"$i\" \"$i\" \"$pad\"\n\
             done\n\
             echo done > done.txt\n\
             echo '{{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":false,\
\"result\":\"all done\",\"num_turns\":{TURNS},\"total_cost_usd\":0.5}}'"
        ),
    );
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.expect("coordinator");
    start_agent_worker(&mut c, &agent);
    let id = submit_code(&c, &repo, "talk for long", "agent/long").await;
    let done = wait_succeeded(&c, &id, LIMIT).await;
    assert_eq!(done["subtasks"][0]["outcome"]["summary"], "all done");
    assert_eq!(git(&repo, &["show", "agent/long:done.txt"]), "done");

    // The transcript, 100 events a page, each page after the last one's sequence number.
    let mut all: Vec<Value> = Vec::new();
    let mut after: Option<u64> = None;
    loop {
        let path = match after {
            Some(seq) => format!("/api/v1/tasks/{id}/events?limit=100&after={seq}"),
            None => format!("/api/v1/tasks/{id}/events?limit=100"),
        };
        let (status, page) = c.get_json(&path).await.expect("events");
        assert_eq!(status, 200, "{page}");
        let events = page["events"].as_array().cloned().unwrap_or_default();
        let Some(last) = events.last() else { break };
        after = Some(last["seq"].as_u64().expect("seq"));
        all.extend(events);
        assert!(all.len() < 10_000, "the pages do not end");
    }
    let seqs: Vec<u64> = all.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "pages overlap or go back: {seqs:?}"
    );
    let texts: Vec<String> = all.iter().map(|e| e["data"].to_string()).collect();
    let pad = "t".repeat(TURN_BYTES);
    let mut missing = Vec::new();
    for i in 1..=TURNS {
        let turn = format!("turn-{i} {pad}");
        match texts.iter().filter(|t| t.contains(&turn)).count() {
            1 => {}
            n => missing.push((i, n)),
        }
    }
    assert!(
        missing.is_empty(),
        "turns not stored exactly once and whole, (turn, copies): {missing:?}\n{} events",
        all.len()
    );
    let total: usize = texts.iter().map(String::len).sum();
    assert!(total > 1_000_000, "{total} bytes of transcript");
}
