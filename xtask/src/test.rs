//! `cargo xtask test`: the README's test command. Everything runs, nothing is skipped.
use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, setup};

pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    cmd::require_root("cargo xtask test")?;
    cmd::run(cmd::cargo().args(["fmt", "--all", "--check"]))?;
    // Binaries first: the end-to-end tests run the real agent and test-pod programs.
    cmd::run(cmd::cargo().args(["build", "--bins"]))?;
    cmd::run(cmd::cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    let (mut passed, mut failed, mut failures) = cargo_test(args)?;
    // The README's main command, end to end, and a short run of each fuzz target (not when a
    // test filter was given).
    if args.is_empty() {
        eprintln!("$ cargo xtask demo --once");
        match crate::demo::run(true) {
            Ok(()) => passed += 1,
            Err(e) => {
                eprintln!("demo --once FAILED: {e:#}");
                failed += 1;
                failures.push("cargo xtask demo --once".to_string());
            }
        }
        let (p, f) = crate::fuzz::smoke();
        passed += p;
        failed += f.len() as u64;
        failures.extend(f.into_iter().map(|t| format!("fuzz target {t}")));
    }
    // One total for the whole run (cargo prints one line per test binary), and the failures
    // named last, where a reader of the log's tail finds them.
    println!("summary: {passed} passed, {failed} failed");
    for name in &failures {
        println!("FAILED: {name}");
    }
    if failed > 0 || passed == 0 {
        bail!("{failed} test(s) failed, {passed} passed");
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and adds up its "test result:" lines; returns the
/// counts and the names of the failed tests. Every test binary runs even after one fails.
fn cargo_test(args: &[String]) -> Result<(u64, u64, Vec<String>)> {
    eprintln!("$ cargo test --no-fail-fast -- {}", args.join(" "));
    let mut child = cmd::cargo()
        .args(["test", "--no-fail-fast", "--"])
        .args(args)
        .current_dir(cmd::root())
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed, mut failures) = (0, 0, Vec::new());
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count(rest, "passed");
            failed += count(rest, "failed");
        } else if let Some(name) = failed_test(&line) {
            failures.push(name.to_string());
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("cargo test failed ({status}) before reporting failures (build error?)");
    }
    Ok((passed, failed, failures))
}

/// The test named by a libtest line `test NAME ... FAILED`.
fn failed_test(line: &str) -> Option<&str> {
    line.strip_prefix("test ")?.strip_suffix(" ... FAILED")
}

/// `count("ok. 3 passed; 1 failed; …", "passed")` is 3.
fn count(result: &str, what: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(what)
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::{count, failed_test};

    #[test]
    fn adds_up_cargo_result_lines() {
        let line =
            "ok. 6 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2.19s";
        assert_eq!((count(line, "passed"), count(line, "failed")), (6, 0));
        let line =
            "FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s";
        assert_eq!((count(line, "passed"), count(line, "failed")), (3, 2));
    }

    #[test]
    fn names_failed_tests() {
        assert_eq!(
            failed_test("test authz::deny_wins ... FAILED"),
            Some("authz::deny_wins")
        );
        assert_eq!(failed_test("test authz::deny_wins ... ok"), None);
    }
}
