//! `tally chaos --help` is the monkey's own help, with every flag it takes (`--faults`, `--out`
//! …), not clap's one-line stub of a pass-through command. `tally` sits next to `tally-chaos`:
//! `cargo test --workspace` builds both.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn tally_chaos_help_shows_the_monkeys_flags() {
    let tally = PathBuf::from(env!("CARGO_BIN_EXE_tally-chaos")).with_file_name("tally");
    assert!(tally.exists(), "{} is missing: run the suite with `cargo test --workspace`", tally.display());
    let out = Command::new(&tally).args(["chaos", "--help"]).output().expect("run tally chaos --help");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for flag in ["--faults", "--out", "--nodes", "--duration", "--seed"] {
        assert!(text.contains(flag), "`tally chaos --help` lists {flag}:\n{text}");
    }
}
