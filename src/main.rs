fn main() {
    std::process::exit(tangle::cli::main());
}
