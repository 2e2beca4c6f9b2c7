//! `cargo xtask fuzz`: the cargo-fuzz (libFuzzer) targets in fuzz/, each run for a fixed time or
//! number of executions against its committed corpus. See docs/fuzzing.md.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

pub const TARGETS: [&str; 7] = [
    "istio_yaml",
    "config_apply",
    "http_route",
    "authz",
    "hbone_connect",
    "orig_dst",
    "dns_answer",
];

/// How long each target runs.
#[derive(Clone, Copy, Debug)]
pub enum Limit {
    Secs(u64),
    Runs(u64),
}

/// Runs `target` (or every target), printing the executions of each; fails on the first crash.
pub fn run(target: Option<&str>, limit: Limit) -> Result<()> {
    crate::setup::cargo_fuzz()?;
    let targets: Vec<&str> = match target {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!(
            "no fuzz target {t:?}; the targets are {}",
            TARGETS.join(", ")
        ),
        None => TARGETS.to_vec(),
    };
    build()?;
    let mut total = Vec::new();
    for t in targets {
        let runs = run_one(t, limit)?;
        total.push(format!("{t}: {runs} executions"));
    }
    println!("{}", total.join("\n"));
    Ok(())
}

/// Builds every target, as the runs below do.
pub fn build() -> Result<()> {
    let start = Instant::now();
    cmd::run(&mut fuzz_command("build", None))?;
    eprintln!("fuzz: targets built in {:.0?}", start.elapsed());
    Ok(())
}

/// Runs one target from its committed corpus, writing new inputs only to a scratch directory
/// under fuzz/target/ (the committed corpus is minimized by hand, see docs/fuzzing.md); a crash input is kept in
/// fuzz/artifacts/<target>/. Returns how many inputs were executed.
pub fn run_one(target: &str, limit: Limit) -> Result<u64> {
    let scratch = cmd::root().join("fuzz/target/new-inputs").join(target);
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let mut cmd = fuzz_command("run", Some(target));
    cmd.arg(&scratch)
        .arg(format!("corpus/{target}"))
        .arg("--")
        .arg("-print_final_stats=1");
    match limit {
        Limit::Secs(s) => cmd.arg(format!("-max_total_time={s}")),
        Limit::Runs(n) => cmd.arg(format!("-runs={n}")),
    };
    eprintln!("fuzz: {target} ({limit:?})");
    let start = Instant::now();
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running fuzz target {target}"))?;
    let mut runs = None;
    // libFuzzer reports on stderr; echo it, keeping the count from its final statistics.
    // Progress lines (`#123 NEW …`) and the recommended dictionary are left out: thousands of
    // them would push a failure earlier in the run out of a log's tail.
    for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
        let line = line?;
        if !is_chatter(&line) {
            eprintln!("{line}");
        }
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            runs = n.trim().parse().ok();
        }
    }
    let status = child.wait()?;
    let secs = start.elapsed().as_secs_f64();
    if !status.success() {
        bail!("fuzz target {target} failed ({status}): its input is in fuzz/artifacts/{target}/");
    }
    let runs = runs.with_context(|| format!("fuzz target {target} printed no statistics"))?;
    eprintln!(
        "fuzz: {target}: {runs} executions in {secs:.0} s ({:.0}/s)",
        runs as f64 / secs
    );
    Ok(runs)
}

/// libFuzzer's progress (`#4096 pulse …`) and dictionary (`"\001…" # Uses: 3`) lines.
fn is_chatter(line: &str) -> bool {
    let progress = line.starts_with('#') && line[1..].starts_with(|c: char| c.is_ascii_digit());
    progress || (line.starts_with('"') && line.contains("# Uses:"))
}

/// `cargo +nightly fuzz <sub> [target]` in fuzz/, built the same way for build and run: with
/// debug assertions (so arithmetic overflows panic) and without a sanitizer (the code under test
/// is safe Rust, and ASAN slows the targets down; docs/fuzzing.md has the numbers).
fn fuzz_command(sub: &str, target: Option<&str>) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz", sub])
        .args(target)
        .args(["--debug-assertions", "--sanitizer", "none"])
        .current_dir(cmd::root().join("fuzz"));
    cmd
}

/// Seconds each target runs in `cargo xtask test`: a smoke test that the targets build and
/// their corpora still pass, not a search.
const SMOKE_SECS: u64 = 10;

/// `cargo xtask test`'s share: each target is one test. Returns how many passed and the
/// targets that failed.
pub fn smoke() -> (u64, Vec<&'static str>) {
    if let Err(e) = build() {
        eprintln!("fuzz build FAILED: {e:#}");
        return (0, TARGETS.to_vec());
    }
    let (mut passed, mut failed) = (0, Vec::new());
    for t in TARGETS {
        match run_one(t, Limit::Secs(SMOKE_SECS)) {
            Ok(_) => passed += 1,
            Err(e) => {
                eprintln!("fuzz {t} FAILED: {e:#}");
                failed.push(t);
            }
        }
    }
    (passed, failed)
}

#[cfg(test)]
mod tests {
    use super::is_chatter;

    #[test]
    fn leaves_out_only_progress_and_dictionary() {
        assert!(is_chatter(
            "#798392\tNEW    cov: 1685 ft: 3853 corp: 1138/78Kb"
        ));
        assert!(is_chatter("\"\\001\\000\" # Uses: 1806"));
        assert!(!is_chatter("#### End of recommended dictionary. ####"));
        assert!(!is_chatter("==123== ERROR: libFuzzer: deadly signal"));
        assert!(!is_chatter("stat::number_of_executed_units: 798532"));
    }
}
