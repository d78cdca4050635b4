//! The REPL session (`tally repl`, `docs/cli.md`) against a real 3-node cluster: the `tally` binary
//! reads commands from a pipe; the node it talks to is killed (it reconnects by itself and the next
//! command succeeds), then a second node (it warns that writes need a majority).

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// `tally` sits next to `tallyd` in the target directory (`cargo test --workspace` builds it for
/// `cli/tests/help.rs`). A missing binary fails the test rather than skipping.
/// The `tally repl` child: its stdin, its stdout lines on a channel, killed by PID on drop.
struct Repl {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    transcript: Vec<String>,
}

impl Repl {
    fn send(&mut self, line: &str) {
        self.transcript.push(format!("> {line}"));
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to the repl");
        stdin.flush().expect("flush");
    }

    /// Reads lines until one satisfies `pred`, for at most `timeout`; panics with the transcript.
    fn expect(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.transcript.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no {what} within {timeout:?}; transcript:\n{}", self.transcript.join("\n"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the repl exited before {what}; transcript:\n{}", self.transcript.join("\n"))
                }
            }
        }
    }
}

impl Drop for Repl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const KEY: &str = "0d5d3807-5fbf-4228-a657-5a091c4e497f";
const KEY2: &str = "6f1c2f4e-8a3b-4c5d-9e7f-0123456789ab";
const DOC: &str = r#"{"name": "Chapayev's Mustache comb"}"#;

/// `Created (durable on N replicas)` with N at least 2 of 3: a majority holds every commit.
fn created(l: &str) -> bool {
    l.strip_prefix("Created (durable on ")
        .and_then(|r| r.strip_suffix(" replicas)"))
        .and_then(|n| n.parse::<u32>().ok())
        .is_some_and(|n| n >= 2)
}

#[test]
fn repl_session_survives_two_kills() {
    let bin = tally_bin();
    let (_dir, layout) = init_cluster(3, 1);
    let mut nodes = start_all(&layout);
    let mut child = Command::new(bin)
        .arg("--addr")
        .arg(&layout.configs[0].listen)
        .arg("--key")
        .arg(&layout.account_keys[0])
        .arg("--ca")
        .arg(layout.dir.join("ca.pem"))
        .arg("repl")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(layout.dir.join("repl.err")).expect("stderr file")))
        .spawn()
        .expect("spawn tally repl");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let stdin = child.stdin.take();
    let mut repl = Repl { child, stdin, lines, transcript: Vec::new() };
    let t = Duration::from_secs(5);

    repl.expect("the banner", t, |l| l.starts_with("Connected to tally cluster at "));
    repl.send(&format!("SET 12345 '{DOC}'"));
    repl.expect("the UUID error", t, |l| l == "Error: Key is not a proper UUID4");
    repl.send(&format!("SET {KEY} '{DOC}'"));
    repl.expect("Created (durable on N replicas)", t, created);
    repl.send(&format!("GET {KEY}"));
    repl.expect("the document", t, |l| l == format!("'{DOC}'"));
    repl.send(&format!("DELETE {KEY}"));
    repl.expect("Deleted", t, |l| l.starts_with("Deleted (") && l.contains(" replica"));
    repl.send(&format!("GET {KEY}"));
    repl.expect("Not found", t, |l| l == "Not found");

    // The node the session talks to dies; the next command still succeeds.
    nodes[0].kill9();
    std::thread::sleep(Duration::from_secs(2));
    repl.send(&format!("SET {KEY2} '{DOC}'"));
    let mut reconnected = None;
    let mut done = false;
    while reconnected.is_none() || !done {
        let l = repl.expect("Reconnected and Created", Duration::from_secs(10), |l| {
            l.starts_with("Reconnected to tally cluster at ") || created(l) || l.starts_with("Error")
        });
        if let Some(rest) = l.strip_prefix("Reconnected to tally cluster at ") {
            reconnected = Some(rest.split_whitespace().next().unwrap_or_default().to_string());
        } else {
            assert!(created(&l), "the command after the kill failed: {l}\n{}", repl.transcript.join("\n"));
            done = true;
        }
    }
    let now_at = reconnected.expect("reconnected");
    assert_ne!(now_at, layout.configs[0].listen, "reconnected to the dead node");
    repl.send(&format!("GET {KEY2}"));
    repl.expect("the second document", t, |l| l == format!("'{DOC}'"));

    // One more dies: the one it talks to now. One of three is left; writes need two.
    let second = nodes.iter().position(|d| d.addr == now_at).expect("a known node");
    nodes[second].kill9();
    repl.expect("the minority warning", Duration::from_secs(10), |l| {
        l.starts_with("WARNING: 1 of 3 replicas reachable; writes need 2")
    });
    eprintln!("transcript:\n{}", repl.transcript.join("\n"));
    repl.send("QUIT");
}

/// A committed write is on a majority, so the count a receipt reports is at least 2 of 3; with
/// one node down, too.
#[test]
fn durable_replicas_counts_at_least_a_majority() {
    let (_dir, layout) = init_cluster(3, 1);
    let mut nodes = start_all(&layout);
    let c = client(&layout, 0);
    let mut counts = Vec::new();
    for round in 0..2 {
        if round == 1 {
            let (li, _) = wait_leader(&nodes, Duration::from_secs(10));
            nodes[(li + 1) % 3].kill9();
        }
        for _ in 0..60 {
            counts.push((round, c.transfer(fresh_key(), 1).expect("transfer").durable_replicas));
        }
    }
    eprintln!("durable_replicas per write (round 0: 3 up, round 1: 2 up): {counts:?}");
    let low: Vec<_> = counts.iter().filter(|(_, n)| *n < 2).collect();
    assert!(
        low.is_empty(),
        "{} of {} committed writes reported fewer than 2 durable replicas",
        low.len(),
        counts.len()
    );
}

/// Drives `argv` in a pseudo-terminal (python3's `pty`): writes the lines of `input` with `gap`
/// seconds between them (0: all at once, before the first prompt, typed ahead), and prints what
/// the terminal showed; exit 0 if the program ended within `timeout` seconds.
const PTY_DRIVER: &str = r#"
import os, pty, select, sys, time
timeout, gap, lines, argv = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3].encode().splitlines(True), sys.argv[4:]
pid, fd = pty.fork()
if pid == 0:
    os.execv(argv[0], argv)
out, deadline, done = b"", time.time() + timeout, False
for line in lines:
    if gap:
        time.sleep(gap)
        while select.select([fd], [], [], 0)[0]:
            out += os.read(fd, 65536)
    os.write(fd, line)
while time.time() < deadline and not done:
    r, _, _ = select.select([fd], [], [], 0.2)
    if fd in r:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        out += chunk
        if not chunk:
            done = True
    elif os.waitpid(pid, os.WNOHANG)[0]:
        done = True
if not done:
    os.kill(pid, 9)
sys.stdout.buffer.write(out)
sys.exit(0 if done else 3)
"#;

/// The REPL on a terminal with input typed ahead (`help`, `status` and `quit` written before
/// the first prompt, as a fast typist or a paste does), and typed slowly (through rustyline's
/// line editing): every command runs and the session ends. With rustyline reading typed-ahead
/// input it showed `> h` and waited for another key.
#[test]
fn typed_ahead_input_on_a_terminal_is_read_whole() {
    let (_dir, layout) = init_cluster(3, 1);
    let _nodes = start_all(&layout);
    let bin = tally_bin();
    for gap in ["0", "0.7"] {
        let o = Command::new("python3")
            .args(["-c", PTY_DRIVER, "20", gap, "help\nstatus\nquit\n"])
            .arg(&bin)
            .args(["--cluster-dir", layout.dir.to_str().expect("utf-8"), "--key"])
            .arg(&layout.account_keys[0])
            .arg("repl")
            .output()
            .expect("python3 drives the pty");
        let shown = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "gap {gap}: the session did not end within 20 s; the terminal showed:\n{shown}");
        assert!(shown.contains("Commands (case-insensitive)"), "gap {gap}: HELP ran:\n{shown}");
        assert!(shown.contains("Answered by node"), "gap {gap}: STATUS ran:\n{shown}");
    }
}
