//! `ftvm-checkpoint`: the Level 3 engine of one protected VM (see `docs/LEVEL3.md`).

fn main() {
    eprintln!("ftvm-checkpoint: not built yet (issue 11)");
    std::process::exit(2);
}
