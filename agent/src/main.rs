fn main() -> std::process::ExitCode {
    trellis_agent::cli::main()
}
