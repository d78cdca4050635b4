//! The interactive session (`tally repl`, `docs/cli.md`): line parsing, command execution and the
//! exact output.
//!
//! Parsing is pure ([`parse_line`]) so the session text can be tested without a server; running a
//! command ([`execute`]) writes to any `Write`, so a fake node can drive it in tests.

use std::io::{BufRead, IsTerminal, Write};
use tally_client::client::{check_json, Client, ClientEvent};
use tally_client::error::ClientError;
use tally_codec::{DocKey, ErrorCode, Operation, Outcome, PublicKey};

/// One parsed REPL line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplCommand {
    Set {
        key: DocKey,
        json: String,
    },
    Get {
        key: DocKey,
    },
    Delete {
        key: DocKey,
    },
    Transfer {
        to: PublicKey,
        amount: u64,
    },
    /// `None` is the session's own account.
    Balance(Option<PublicKey>),
    /// A coordination request (`SET`/`DELETE` with options, `LEASE`, `CLAIM`).
    Op(Operation),
    Status,
    Help,
    Quit,
    /// A blank line or a comment: nothing to do.
    Nothing,
}

/// Shown by `HELP`.
pub const HELP: &str = "\
Commands (case-insensitive):
  SET <uuid4> <json>         create or replace a document (the JSON may be wrapped in '...')
  GET <uuid4>                read a document
  DELETE <uuid4>             delete a document you own
  TRANSFER <pubkey> <amount> move money from your account
  BALANCE [pubkey]           show a balance (yours by default)
  SET <uuid4> [--if-revision R] [--lease ID] <json>
                             compare-and-set (R = 0: only if absent); attach to a lease
  DELETE <uuid4> --if-revision R
                             delete only at revision R
  LEASE GRANT <ttl_ms> | LEASE KEEPALIVE <id> | LEASE REVOKE <id>
                             leases with a TTL in batch time
  CLAIM <domain> <slot> [lease]
                             the first claim of a slot is granted, later ones denied
  STATUS                     show the cluster's members, leader and term
  HELP                       this text
  QUIT                       leave";

/// Splits off the first whitespace-separated word.
fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim_start()),
        None => (s, ""),
    }
}

/// Removes one outer pair of single quotes; inner apostrophes stay (`'{"a": "it's"}'`).
pub fn strip_single_quotes(s: &str) -> &str {
    let s = s.trim();
    match s.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')) {
        Some(inner) => inner,
        None => s,
    }
}

fn parse_key(word: &str, usage: &str) -> Result<DocKey, String> {
    if word.is_empty() {
        return Err(format!("usage: {usage}"));
    }
    DocKey::parse(word).map_err(|e| e.to_string())
}

/// `--if-revision R` and `--lease ID` in any order before the rest of the line.
fn set_options<'a>(mut rest: &'a str, usage: &str) -> Result<(Option<u64>, Option<u64>, &'a str), String> {
    let (mut if_revision, mut lease) = (None, None);
    loop {
        let (word, after) = split_word(rest);
        let slot = match word {
            "--if-revision" => &mut if_revision,
            "--lease" => &mut lease,
            _ => return Ok((if_revision, lease, rest)),
        };
        let (n, after) = split_word(after);
        *slot = Some(n.parse::<u64>().map_err(|_| format!("{word} needs a number; usage: {usage}"))?);
        rest = after;
    }
}

fn no_more(rest: &str, usage: &str) -> Result<(), String> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(format!("unexpected '{rest}'; usage: {usage}"))
    }
}

fn parse_pubkey(word: &str) -> Result<PublicKey, String> {
    PublicKey::from_hex(word).map_err(|_| format!("'{word}' is not a public key (64 hex digits)"))
}

/// Parses one line. The error is the text after `Error: `.
///
/// # Errors
/// A message naming what is wrong: `Key is not a proper UUID4`, `value is not valid JSON`, a
/// usage line, or an unknown command.
pub fn parse_line(line: &str) -> Result<ReplCommand, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(ReplCommand::Nothing);
    }
    let (cmd, rest) = split_word(line);
    match cmd.to_ascii_uppercase().as_str() {
        "SET" => parse_set(rest),
        "LEASE" => parse_lease(rest),
        "CLAIM" => parse_claim(rest),
        "GET" => {
            let (key, more) = split_word(rest);
            let key = parse_key(key, "GET <uuid4>")?;
            no_more(more, "GET <uuid4>")?;
            Ok(ReplCommand::Get { key })
        }
        "DELETE" | "DEL" => parse_delete(rest),
        "TRANSFER" => parse_transfer(rest),
        "BALANCE" => {
            let (who, more) = split_word(rest);
            no_more(more, "BALANCE [pubkey]")?;
            if who.is_empty() {
                Ok(ReplCommand::Balance(None))
            } else {
                Ok(ReplCommand::Balance(Some(parse_pubkey(who)?)))
            }
        }
        "STATUS" => no_more(rest, "STATUS").map(|()| ReplCommand::Status),
        "HELP" | "?" => Ok(ReplCommand::Help),
        "QUIT" | "EXIT" => Ok(ReplCommand::Quit),
        _ => Err(format!("unknown command '{cmd}'; type HELP for the list")),
    }
}

/// `SET`'s arguments: a plain set, or a conditional one with `--if-revision` or `--lease`.
fn parse_set(rest: &str) -> Result<ReplCommand, String> {
    const USAGE: &str = "SET <uuid4> [--if-revision R] [--lease ID] <json>";
    let (key, value) = split_word(rest);
    let key = parse_key(key, USAGE)?;
    let (if_revision, lease, value) = set_options(value, USAGE)?;
    let json = strip_single_quotes(value);
    if json.is_empty() {
        return Err(format!("usage: {USAGE}"));
    }
    check_json(json).map_err(|e| e.to_string())?;
    if if_revision.is_none() && lease.is_none() {
        return Ok(ReplCommand::Set { key, json: json.to_string() });
    }
    Ok(ReplCommand::Op(Operation::SetIf { key, value: json.as_bytes().to_vec(), if_revision, lease }))
}

/// `LEASE`'s arguments: a verb and a number (a TTL to grant, a lease id otherwise).
fn parse_lease(rest: &str) -> Result<ReplCommand, String> {
    const USAGE: &str = "LEASE GRANT <ttl_ms> | LEASE KEEPALIVE <id> | LEASE REVOKE <id>";
    let (verb, rest) = split_word(rest);
    let (n, more) = split_word(rest);
    no_more(more, USAGE)?;
    let n = n.parse::<u64>().map_err(|_| format!("usage: {USAGE}"))?;
    match verb.to_ascii_uppercase().as_str() {
        "GRANT" => Ok(ReplCommand::Op(Operation::LeaseGrant { ttl_ms: n })),
        "KEEPALIVE" => Ok(ReplCommand::Op(Operation::LeaseKeepAlive { lease: n })),
        "REVOKE" => Ok(ReplCommand::Op(Operation::LeaseRevoke { lease: n })),
        _ => Err(format!("usage: {USAGE}")),
    }
}

fn parse_claim(rest: &str) -> Result<ReplCommand, String> {
    const USAGE: &str = "CLAIM <domain> <slot> [lease]";
    let (domain, rest) = split_word(rest);
    let (slot, rest) = split_word(rest);
    let (lease, more) = split_word(rest);
    no_more(more, USAGE)?;
    if domain.is_empty() {
        return Err(format!("usage: {USAGE}"));
    }
    let slot = slot.parse::<u64>().map_err(|_| format!("usage: {USAGE}"))?;
    let lease = if lease.is_empty() {
        None
    } else {
        Some(lease.parse::<u64>().map_err(|_| format!("'{lease}' is not a lease id; usage: {USAGE}"))?)
    };
    Ok(ReplCommand::Op(Operation::Claim { domain: domain.to_string(), slot, lease }))
}

/// `DELETE`'s arguments: a plain delete, or a conditional one with `--if-revision` (a delete
/// takes no lease).
fn parse_delete(rest: &str) -> Result<ReplCommand, String> {
    const USAGE: &str = "DELETE <uuid4> [--if-revision R]";
    let (key, more) = split_word(rest);
    let key = parse_key(key, USAGE)?;
    let (if_revision, lease, more) = set_options(more, USAGE)?;
    no_more(more, USAGE)?;
    if lease.is_some() {
        return Err(format!("usage: {USAGE}"));
    }
    match if_revision {
        None => Ok(ReplCommand::Delete { key }),
        Some(r) => Ok(ReplCommand::Op(Operation::DeleteIf { key, if_revision: Some(r) })),
    }
}

fn parse_transfer(rest: &str) -> Result<ReplCommand, String> {
    const USAGE: &str = "TRANSFER <pubkey> <amount>";
    let (to, rest) = split_word(rest);
    let (amount, more) = split_word(rest);
    if to.is_empty() || amount.is_empty() {
        return Err(format!("usage: {USAGE}"));
    }
    no_more(more, USAGE)?;
    let to = parse_pubkey(to)?;
    let amount = amount.parse::<u64>().map_err(|_| format!("'{amount}' is not an amount (a whole number)"))?;
    Ok(ReplCommand::Transfer { to, amount })
}

/// "durable on 1 replica" / "durable on 3 replicas": the replicas that had the batch on disk
/// when the leader answered (a majority at least; the others catch up).
pub fn replicas(n: u8) -> String {
    if n == 1 {
        "durable on 1 replica".to_string()
    } else {
        format!("durable on {n} replicas")
    }
}

/// The line printed for a committed document write or transfer.
pub fn outcome_line(outcome: &Outcome, durable_replicas: u8) -> String {
    let r = replicas(durable_replicas);
    match outcome {
        Outcome::DocCreated { .. } => format!("Created ({r})"),
        Outcome::DocUpdated { .. } => format!("Updated ({r})"),
        Outcome::DocDeleted => format!("Deleted ({r})"),
        Outcome::Transferred { sender_balance } => format!("Transferred ({r}); your balance is {sender_balance}"),
        Outcome::Rejected(code) => format!("Error: {code}"),
        Outcome::RevisionMismatch { current: 0 } => "Error: revision mismatch: the document does not exist".into(),
        Outcome::RevisionMismatch { current } => {
            format!("Error: revision mismatch: the document is at revision {current}")
        }
        Outcome::LeaseGranted { lease, expires_at_ms } => {
            format!("Lease {lease} granted ({r}); it ends at {} unless kept alive", crate::output::utc(*expires_at_ms))
        }
        Outcome::LeaseRenewed { expires_at_ms } => {
            format!("Renewed ({r}) until {}", crate::output::utc(*expires_at_ms))
        }
        Outcome::LeaseRevoked => format!("Revoked ({r})"),
        Outcome::ClaimGranted { height } => format!("Granted ({r}) at height {height}"),
        Outcome::ClaimDenied { holder, height } => format!("Denied: held by {holder} since height {height}"),
        Outcome::TxnApplied { then, outcomes } => {
            let each: Vec<String> = outcomes.iter().map(|o| outcome_line(o, durable_replicas)).collect();
            let branch = if *then { "then" } else { "else" };
            if each.is_empty() {
                format!("Transaction: {branch} ran, nothing to do ({r})")
            } else {
                format!("Transaction: {branch} ran ({r}): {}", each.join("; "))
            }
        }
    }
}

/// One line of `tally watch`.
pub fn watch_line(e: &tally_codec::wire::WatchEvent) -> String {
    use tally_codec::wire::Change;
    let what = match &e.change {
        Change::DocSet { key, owner, revision, lease, value } => {
            let lease = lease.map(|l| format!(" lease {l}")).unwrap_or_default();
            format!("set {key} revision {revision} by {owner}{lease}: {}", String::from_utf8_lossy(value))
        }
        Change::DocDeleted { key } => format!("deleted {key}"),
        Change::ClaimGranted { domain, slot, holder, lease } => {
            let lease = lease.map(|l| format!(" under lease {l}")).unwrap_or_default();
            format!("claim {domain}/{slot} granted to {holder}{lease}")
        }
        Change::ClaimReleased { domain, slot } => format!("claim {domain}/{slot} released"),
        Change::LeaseSet { lease, owner, expires_at_ms } => {
            format!("lease {lease} of {owner} until {}", crate::output::utc(*expires_at_ms))
        }
        Change::LeaseEnded { lease } => format!("lease {lease} ended"),
    };
    format!("height {} at {}: {what}", e.height, crate::output::utc(e.time_ms))
}

/// Status as a few readable lines (shared with `tally status`).
pub fn status_lines(client: &Client) -> Result<Vec<String>, ClientError> {
    Ok(status_info_lines(&client.status()?))
}

/// The lines of one node's Status (match indexes are meaningful in the leader's).
pub fn status_info_lines(s: &tally_codec::wire::StatusInfo) -> Vec<String> {
    let mut out = Vec::new();
    let leader = match (s.leader_id, &s.leader_addr) {
        (Some(id), Some(a)) => format!("node {id} at {a}"),
        (Some(id), None) => format!("node {id}"),
        _ => "none".to_string(),
    };
    out.push(format!("Cluster {} (operator key {})", s.cluster_id, s.operator_key));
    out.push(format!("Answered by node {}; leader: {leader}; term {}", s.node_id, s.term));
    out.push(format!(
        "Committed height {}, applied height {}; replicas configured: {}",
        s.committed_height, s.applied_height, s.replicas_configured
    ));
    let top = s.members.iter().map(|m| m.matched_index).max().unwrap_or(0);
    if !s.members.is_empty() {
        out.push("Members:".to_string());
    }
    for m in &s.members {
        let role = if Some(m.node_id) == s.leader_id {
            "leader"
        } else if m.is_voter {
            "voter"
        } else {
            "learner"
        };
        out.push(format!(
            "  node {}  client {}  peer {}  {role}  matched {} (lag {})",
            m.node_id,
            m.client_addr,
            m.peer_addr,
            m.matched_index,
            top - m.matched_index
        ));
    }
    for w in &s.warnings {
        out.push(format!("WARNING: {w}"));
    }
    out
}

/// Runs one command; returns false when the session should end.
///
/// # Errors
/// Only when writing to `out` fails; command failures are printed as `Error: ...`.
pub fn execute(client: &Client, cmd: ReplCommand, out: &mut dyn Write) -> std::io::Result<bool> {
    let line = match cmd {
        ReplCommand::Nothing => return Ok(true),
        ReplCommand::Quit => return Ok(false),
        ReplCommand::Help => HELP.to_string(),
        ReplCommand::Set { key, json } => match client.set(key, &json) {
            Ok(c) => outcome_line(&c.receipt.outcome, c.durable_replicas),
            Err(e) => format!("Error: {e}"),
        },
        ReplCommand::Delete { key } => match client.delete(key) {
            Ok(c) => outcome_line(&c.receipt.outcome, c.durable_replicas),
            Err(ClientError::Rejected { code: ErrorCode::NotFound, .. }) => "Not found".to_string(),
            Err(e) => format!("Error: {e}"),
        },
        ReplCommand::Get { key } => match client.get(key, false) {
            Ok(Some(doc)) => format!("'{}'", String::from_utf8_lossy(&doc.value)),
            Ok(None) => "Not found".to_string(),
            Err(e) => format!("Error: {e}"),
        },
        ReplCommand::Transfer { to, amount } => match client.transfer(to, amount) {
            Ok(c) => outcome_line(&c.receipt.outcome, c.durable_replicas),
            Err(e) => format!("Error: {e}"),
        },
        ReplCommand::Balance(who) => {
            let who = who.unwrap_or_else(|| client.public_key());
            match client.balance(who, false) {
                Ok(b) => b.unwrap_or(0).to_string(),
                Err(e) => format!("Error: {e}"),
            }
        }
        ReplCommand::Op(op) => match client.sign(op).and_then(|r| client.submit_one(r)) {
            Ok(c) => outcome_line(&c.receipt.outcome, c.durable_replicas),
            Err(e) => format!("Error: {e}"),
        },
        ReplCommand::Status => match status_lines(client) {
            Ok(lines) => lines.join("\n"),
            Err(e) => format!("Error: {e}"),
        },
    };
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(true)
}

/// Prints the banner (and a minority warning) the session starts with.
fn banner(client: &Client) -> String {
    let mut s = client.report().to_string();
    if let Some(w) = client.majority_warning() {
        s.push('\n');
        s.push_str(&w.to_string());
    }
    s
}

/// Runs the session: rustyline on a terminal, plain lines otherwise (scriptable).
///
/// # Errors
/// Terminal or stdout failures.
pub fn run(client: &Client) -> Result<(), ClientError> {
    let io_err = |e: std::io::Error| ClientError::Io { addr: "terminal".into(), source: e };
    println!("{}", banner(client));
    let events = client.events();
    if std::io::stdin().is_terminal() {
        return run_terminal(client, events);
    }
    std::thread::spawn(move || {
        for ev in events.iter() {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{ev}");
            let _ = out.flush();
        }
    });
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line.map_err(io_err)?;
        let keep_going = match parse_line(&line) {
            Ok(cmd) => execute(client, cmd, &mut out).map_err(io_err)?,
            Err(msg) => {
                writeln!(out, "Error: {msg}").map_err(io_err)?;
                true
            }
        };
        if !keep_going {
            break;
        }
    }
    Ok(())
}

/// The session on a terminal (rustyline: line editing, history). Lines already waiting when a
/// prompt is due (typed ahead while a command ran, or before the first prompt) are read as the
/// terminal delivers them, one whole line at a time, and not through rustyline: its reader keeps
/// what it read past the first line and drops it when `readline` returns (rustyline issue #690;
/// typed-ahead `help` showed `> h` and waited). A paste into the prompt (one multi-line string
/// with bracketed paste) runs line by line. What happened in the background (`Reconnected …`,
/// a minority warning) is printed before the next prompt.
fn run_terminal(client: &Client, events: crossbeam::channel::Receiver<ClientEvent>) -> Result<(), ClientError> {
    use rustyline::error::ReadlineError;
    let term_err = |e: ReadlineError| ClientError::Invalid(format!("terminal: {e}"));
    let io_err = |e: std::io::Error| ClientError::Io { addr: "terminal".into(), source: e };
    let mut rl = rustyline::DefaultEditor::new().map_err(term_err)?;
    let mut out = std::io::stdout();
    loop {
        for ev in events.try_iter() {
            println!("{ev}");
        }
        let input = if line_waiting() {
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).map_err(io_err)? == 0 {
                return Ok(()); // end of input
            }
            line
        } else {
            match rl.readline("> ") {
                Ok(line) => line,
                Err(ReadlineError::Interrupted) => continue,
                Err(ReadlineError::Eof) => return Ok(()),
                Err(e) => return Err(term_err(e)),
            }
        };
        for line in input.lines() {
            if !line.trim().is_empty() {
                let _ = rl.add_history_entry(line);
            }
            let keep_going = match parse_line(line) {
                Ok(cmd) => execute(client, cmd, &mut out).map_err(io_err)?,
                Err(msg) => {
                    println!("Error: {msg}");
                    true
                }
            };
            if !keep_going {
                return Ok(());
            }
        }
    }
}

/// Whether the terminal holds a whole line (or the end of input) not read yet: in the
/// terminal's line mode, between prompts, stdin is readable only then.
fn line_waiting() -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let stdin = std::io::stdin();
    let mut fds = [PollFd::new(&stdin, PollFlags::IN)];
    matches!(poll(&mut fds, Some(&Timespec { tv_sec: 0, tv_nsec: 0 })), Ok(n) if n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "0d5d3807-5fbf-4228-a657-5a091c4e497f";

    #[test]
    fn set_with_quoted_json_keeps_the_inner_apostrophe() {
        let line = format!(r#"SET {UUID} '{{"name": "Chapayev's Mustache comb"}}'"#);
        match parse_line(&line).expect("parses") {
            ReplCommand::Set { key, json } => {
                assert_eq!(key.to_string(), UUID);
                assert_eq!(json, r#"{"name": "Chapayev's Mustache comb"}"#);
            }
            other => panic!("unexpected {other:?}"),
        }
        // Unquoted JSON works too, with extra spaces.
        let line = format!(r#"  set   {UUID}    {{"a": 1}}  "#);
        assert_eq!(
            parse_line(&line),
            Ok(ReplCommand::Set { key: DocKey::parse(UUID).expect("uuid"), json: r#"{"a": 1}"#.into() })
        );
    }

    #[test]
    fn bad_keys_and_values_give_the_session_errors() {
        let line = r#"SET 12345 '{"name": "Chapayev's Mustache comb"}'"#;
        assert_eq!(parse_line(line), Err("Key is not a proper UUID4".to_string()));
        assert_eq!(parse_line("GET 12345"), Err("Key is not a proper UUID4".to_string()));
        assert_eq!(parse_line(&format!("SET {UUID} '{{nope'")), Err("value is not valid JSON".to_string()));
        assert!(parse_line(&format!("SET {UUID}")).expect_err("usage").starts_with("usage"));
        assert!(parse_line("FROB").expect_err("unknown").contains("unknown command 'FROB'"));
        assert!(parse_line("TRANSFER abc 5").expect_err("bad key").contains("not a public key"));
        assert!(parse_line(&format!("TRANSFER {} x", "ab".repeat(32))).expect_err("amount").contains("amount"));
    }

    #[test]
    fn commands_are_case_insensitive() {
        let key = DocKey::parse(UUID).expect("uuid");
        for word in ["GET", "get", "Get", "gEt"] {
            assert_eq!(parse_line(&format!("{word} {UUID}")), Ok(ReplCommand::Get { key }));
        }
        assert_eq!(
            parse_line("delete ".to_string().as_str()).map(|_| ()),
            Err("usage: DELETE <uuid4> [--if-revision R]".into())
        );
        assert_eq!(parse_line(&format!("Delete {UUID}")), Ok(ReplCommand::Delete { key }));
        assert_eq!(parse_line("quit"), Ok(ReplCommand::Quit));
        assert_eq!(
            parse_line(&format!("set {UUID} --if-revision 0 --lease 9 '{{\"a\": 1}}'")),
            Ok(ReplCommand::Op(Operation::SetIf {
                key,
                value: br#"{"a": 1}"#.to_vec(),
                if_revision: Some(0),
                lease: Some(9)
            }))
        );
        assert_eq!(
            parse_line(&format!("DELETE {UUID} --if-revision 3")),
            Ok(ReplCommand::Op(Operation::DeleteIf { key, if_revision: Some(3) }))
        );
        assert_eq!(parse_line("lease grant 5000"), Ok(ReplCommand::Op(Operation::LeaseGrant { ttl_ms: 5000 })));
        assert_eq!(parse_line("LEASE keepalive 7"), Ok(ReplCommand::Op(Operation::LeaseKeepAlive { lease: 7 })));
        assert_eq!(parse_line("lease revoke 7"), Ok(ReplCommand::Op(Operation::LeaseRevoke { lease: 7 })));
        assert_eq!(
            parse_line("claim slots 42 7"),
            Ok(ReplCommand::Op(Operation::Claim { domain: "slots".into(), slot: 42, lease: Some(7) }))
        );
        assert!(parse_line("claim slots x").expect_err("slot").contains("usage: CLAIM"));
        assert!(parse_line(&format!("set {UUID} --if-revision x {{}}"))
            .expect_err("number")
            .contains("--if-revision needs a number"));
        assert_eq!(parse_line("Status"), Ok(ReplCommand::Status));
        assert_eq!(parse_line("balance"), Ok(ReplCommand::Balance(None)));
        assert_eq!(parse_line("help"), Ok(ReplCommand::Help));
        assert_eq!(parse_line("   "), Ok(ReplCommand::Nothing));
        let pk = "cd".repeat(32);
        assert_eq!(
            parse_line(&format!("transfer {pk} 10")),
            Ok(ReplCommand::Transfer { to: PublicKey::from_hex(&pk).expect("pk"), amount: 10 })
        );
    }

    #[test]
    fn outcome_lines_match_the_session() {
        assert_eq!(outcome_line(&Outcome::DocCreated { revision: 1 }, 3), "Created (durable on 3 replicas)");
        assert_eq!(outcome_line(&Outcome::DocCreated { revision: 1 }, 1), "Created (durable on 1 replica)");
        assert_eq!(outcome_line(&Outcome::DocUpdated { revision: 2 }, 2), "Updated (durable on 2 replicas)");
        assert_eq!(outcome_line(&Outcome::DocDeleted, 3), "Deleted (durable on 3 replicas)");
        assert_eq!(outcome_line(&Outcome::Rejected(ErrorCode::InsufficientFunds), 3), "Error: insufficient funds");
    }

    #[test]
    fn quote_stripping_takes_one_pair_only() {
        assert_eq!(strip_single_quotes("'x'"), "x");
        assert_eq!(strip_single_quotes("''x''"), "'x'");
        assert_eq!(strip_single_quotes("'x"), "'x");
        assert_eq!(strip_single_quotes("x"), "x");
    }
}

#[cfg(test)]
mod session_tests {
    use super::*;
    use tally_client::client::ClientOptions;
    use tally_client::testkit::{cluster, FakeNode};

    #[test]
    fn design_session_output_against_a_fake_node() {
        let a = FakeNode::start(1);
        cluster(&[&a], &[], Some(&a));
        let key = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
        let client = Client::connect(std::slice::from_ref(&a.addr), key, ClientOptions::default()).expect("connect");
        let script = [
            r#"SET 12345 '{"name": "Chapayev's Mustache comb"}'"#,
            r#"SET 0d5d3807-5fbf-4228-a657-5a091c4e497f '{"name": "Chapayev's Mustache comb"}'"#,
            "GET 0d5d3807-5fbf-4228-a657-5a091c4e497f",
            r#"set 0d5d3807-5fbf-4228-a657-5a091c4e497f {"v": 2}"#,
            "DELETE 0d5d3807-5fbf-4228-a657-5a091c4e497f",
            "GET 0d5d3807-5fbf-4228-a657-5a091c4e497f",
            "delete 0d5d3807-5fbf-4228-a657-5a091c4e497f",
            "BALANCE",
        ];
        let mut out = Vec::new();
        for line in script {
            match parse_line(line) {
                Ok(cmd) => {
                    execute(&client, cmd, &mut out).expect("write");
                }
                Err(msg) => writeln!(out, "Error: {msg}").expect("write"),
            }
        }
        let text = String::from_utf8(out).expect("utf8");
        assert_eq!(
            text,
            "Error: Key is not a proper UUID4\n\
             Created (durable on 3 replicas)\n\
             '{\"name\": \"Chapayev's Mustache comb\"}'\n\
             Updated (durable on 3 replicas)\n\
             Deleted (durable on 3 replicas)\n\
             Not found\n\
             Not found\n\
             5\n"
        );
        assert!(!execute(&client, ReplCommand::Quit, &mut Vec::new()).expect("quit"));
    }
}
