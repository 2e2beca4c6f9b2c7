//! `cargo xtask test`: the README's test command. Everything runs, nothing is skipped.
use anyhow::Result;

use crate::{cmd, setup};

pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    cmd::require_root("cargo xtask test")?;
    cmd::run(cmd::cargo().args(["fmt", "--all", "--check"]))?;
    // Binaries first: the end-to-end tests run the real agent and test-pod programs.
    cmd::run(cmd::cargo().args(["build", "--bins"]))?;
    cmd::run(cmd::cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    cmd::run(cmd::cargo().arg("test").arg("--").args(args))
}
