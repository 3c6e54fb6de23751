//! The report of the fake GitHub's contract check: how many distinct REST operations the
//! project called through the fake GitHub in the test runs of this build, each checked
//! against GitHub's REST description (`@octokit/openapi`). Every fake GitHub adds the
//! operations it served to `target/debug/github-operations.txt` when it is dropped; this
//! binary is named to run after every other one of `cargo test --workspace` (which runs
//! them in name order), so in `make test` it reports the whole GitHub test set. The count
//! of webhook fields is printed by `github_contract`.

use ao_tests::fake_github::openapi;

#[test]
fn every_rest_operation_the_project_called_is_in_githubs_description() {
    let Some(api) = openapi::rest() else { return };
    let Some(path) = openapi::record_path() else {
        return;
    };
    let Ok(text) = std::fs::read_to_string(&path) else {
        println!(
            "no GitHub test has run in this build yet ({} is missing): nothing to report",
            path.display()
        );
        return;
    };
    let mut unknown = Vec::new();
    let mut count = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        count += 1;
        let mut words = line.split(' ');
        let (Some(id), Some(method), Some(template)) = (words.next(), words.next(), words.next())
        else {
            unknown.push(line.to_string());
            continue;
        };
        let described = api
            .operation(id)
            .is_some_and(|op| op.method.eq_ignore_ascii_case(method) && op.template == template);
        if !described {
            unknown.push(line.to_string());
        }
        println!("  {line}");
    }
    println!(
        "REST operations the project called through the fake GitHub: {count} distinct, all \
         checked against GitHub's description ({} not in it)",
        unknown.len()
    );
    assert!(unknown.is_empty(), "{unknown:#?}");
}
