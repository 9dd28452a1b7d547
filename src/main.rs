fn main() -> std::process::ExitCode {
    pbxgate::cli::main()
}
