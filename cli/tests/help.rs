//! `tally --help` and each subcommand's `--help` run, exit 0 and show that command's usage.
//! (Being an integration test of the `tally-cli` package, it also makes `cargo test --workspace`
//! build the `tally` binary that the `tallyd` tests run: one build serves the whole suite.)

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tally")).args(args).arg("--help").output().expect("run tally");
    assert!(out.status.success(), "tally {args:?} --help failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The subcommands a help text lists under "Commands:".
fn commands(text: &str) -> Vec<String> {
    let Some(list) = text.split("Commands:\n").nth(1) else { return Vec::new() };
    list.lines()
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_command_has_its_help() {
    let top = help(&[]);
    let names = commands(&top);
    for expected in ["transfer", "status", "receipt", "verify", "cluster", "bench", "up"] {
        assert!(names.iter().any(|n| n == expected), "`tally --help` lists {expected}: {names:?}");
    }
    // `tally sim --help` and `tally chaos --help` are the companion programs' own help
    // (chaos/tests/cli_help.rs).
    for name in names.iter().filter(|n| !["sim", "chaos"].contains(&n.as_str())) {
        let text = help(&[name]);
        assert!(text.contains(&format!("Usage: tally {name}")), "tally {name} --help:\n{text}");
        for sub in commands(&text) {
            let text = help(&[name, &sub]);
            assert!(text.contains(&format!("Usage: tally {name} {sub}")), "tally {name} {sub} --help:\n{text}");
        }
    }
}
