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
    let (mut passed, mut failed) = cargo_test(args)?;
    // The README's main command, end to end, and a short run of each fuzz target (not when a
    // test filter was given).
    if args.is_empty() {
        eprintln!("$ cargo xtask demo --once");
        match crate::demo::run(true) {
            Ok(()) => passed += 1,
            Err(e) => {
                eprintln!("demo --once FAILED: {e:#}");
                failed += 1;
            }
        }
        let (p, f) = crate::fuzz::smoke();
        passed += p;
        failed += f;
    }
    // One total for the whole run (cargo prints one line per test binary).
    println!("summary: {passed} passed, {failed} failed");
    if failed > 0 || passed == 0 {
        bail!("{failed} test(s) failed, {passed} passed");
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and adds up its "test result:" lines.
fn cargo_test(args: &[String]) -> Result<(u64, u64)> {
    eprintln!("$ cargo test -- {}", args.join(" "));
    let mut child = cmd::cargo()
        .arg("test")
        .arg("--")
        .args(args)
        .current_dir(cmd::root())
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count(rest, "passed");
            failed += count(rest, "failed");
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("cargo test failed ({status}) before reporting failures (build error?)");
    }
    Ok((passed, failed))
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
    use super::count;

    #[test]
    fn adds_up_cargo_result_lines() {
        let line =
            "ok. 6 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2.19s";
        assert_eq!((count(line, "passed"), count(line, "failed")), (6, 0));
        let line =
            "FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s";
        assert_eq!((count(line, "passed"), count(line, "failed")), (3, 2));
    }
}
