fn main() {
    // Before any thread starts: candle reads it when its pool is first used.
    tangle::train::configure_cpu_threads();
    std::process::exit(tangle::cli::main());
}
