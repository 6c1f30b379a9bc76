fn main() {
    // Before any thread starts and before candle's first op (see `cpu`).
    tangle::cpu::configure();
    std::process::exit(tangle::cli::main());
}
