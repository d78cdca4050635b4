//! The `tally` command line (`docs/cli.md`): clap definitions and one small function per command.
//! `main.rs` only parses and prints the error; everything testable lives here and below.

use crate::bench::{self, BenchConfig, Mix};
use crate::cluster;
use crate::output::{self, Output};
use crate::repl;
use crate::up::{self, UpOptions};
use tally_client::client::{check_json, split_addrs, Client, ClientOptions, Committed};
use tally_client::error::ClientError;
use tally_client::keyfile::{self, generate_key, load_key, load_or_create, public_of};
use tally_client::receipt_file::{
    parse_cluster_id, parse_operator_key, save_receipt, verified_summary, verify_receipt_file_for, ReceiptFile,
};

use clap::{Parser, Subcommand};
use ed25519_dalek::SigningKey;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tally_codec::{DocKey, Operation, PublicKey, RequestId};

/// The environment variables the CLI reads (each stands for the option of the same name).
pub const ENV_VARS: [&str; 5] = ["TALLY_ADDR", "TALLY_KEY", "TALLY_CA", "TALLY_CLUSTER_DIR", "TALLY_ADMIN_KEY"];

impl Cli {
    /// Parses the command line, an empty `TALLY_*` variable counting as unset (the shell
    /// convention: `TALLY_CLUSTER_DIR= tally status` means "no cluster directory"). clap alone
    /// would take the empty value and refuse it.
    pub fn parse_env_aware() -> Cli {
        for var in ENV_VARS {
            if std::env::var_os(var).is_some_and(|v| v.is_empty()) {
                // Before any thread starts: nothing else reads the environment yet.
                std::env::remove_var(var);
            }
        }
        <Cli as Parser>::parse()
    }
}

/// tally: client for the tally replicated operator server.
#[derive(Debug, Parser)]
#[command(name = "tally", version, about)]
pub struct Cli {
    /// Node address HOST:PORT; repeat or separate with commas to list several.
    #[arg(long, global = true, env = "TALLY_ADDR", value_delimiter = ',')]
    pub addr: Vec<String>,
    /// Signing key file (default: one in your config directory, created on first use).
    #[arg(long, global = true, env = "TALLY_KEY")]
    pub key: Option<PathBuf>,
    /// The cluster CA (PEM): connect with TLS and check each node against it.
    #[arg(long, global = true, env = "TALLY_CA")]
    pub ca: Option<PathBuf>,
    /// A `tally cluster init` directory: supplies the addresses, the CA and the admin key.
    #[arg(long, global = true, env = "TALLY_CLUSTER_DIR")]
    pub cluster_dir: Option<PathBuf>,
    /// Admin key file for cluster operations (default: admin.key of --cluster-dir).
    #[arg(long, global = true, env = "TALLY_ADMIN_KEY")]
    pub admin_key: Option<PathBuf>,
    /// Talk plaintext to a non-loopback address (anyone on the path can read and change it).
    #[arg(long, global = true)]
    pub insecure_plaintext: bool,
    /// Output format: text, or json (one JSON document on stdout; fields in docs/cli.md).
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Cmd,
}

/// The subcommands (`docs/cli.md`, "Commands").
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Write a new signing key file.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Create or replace a JSON document.
    Set {
        #[arg(value_name = "UUID4")]
        doc: String,
        json: String,
        /// Save the receipt to FILE.
        #[arg(long)]
        receipt: Option<PathBuf>,
        /// Attach the document to this lease (yours): it is deleted when the lease ends.
        #[arg(long, value_name = "ID")]
        lease: Option<u64>,
        /// Only if the document has this revision; 0: only if it does not exist.
        #[arg(long, value_name = "R")]
        if_revision: Option<u64>,
    },
    /// Read a document.
    Get {
        #[arg(value_name = "UUID4")]
        doc: String,
        /// Allow a follower to answer from possibly stale state.
        #[arg(long)]
        stale: bool,
    },
    /// Delete a document you own.
    Delete {
        #[arg(value_name = "UUID4")]
        doc: String,
        #[arg(long)]
        receipt: Option<PathBuf>,
        /// Only if the document has this revision.
        #[arg(long, value_name = "R")]
        if_revision: Option<u64>,
    },
    /// Leases: a TTL in batch time; documents and claims may be attached (docs/coordination.md).
    Lease {
        #[command(subcommand)]
        command: LeaseCmd,
    },
    /// Claim a slot of a domain: granted to the first claimant only, forever (or until --lease
    /// ends). Exit 0 only if granted.
    Claim {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        slot: u64,
        #[arg(long, value_name = "ID")]
        lease: Option<u64>,
        #[arg(long)]
        receipt: Option<PathBuf>,
    },
    /// Follow committed changes, one line per change in commit order, until Ctrl-C (or --count).
    /// Exactly one of UUID4, --all, --domain, --leases.
    Watch {
        #[arg(value_name = "UUID4")]
        doc: Option<String>,
        /// Every document.
        #[arg(long)]
        all: bool,
        /// The claims of one domain.
        #[arg(long)]
        domain: Option<String>,
        /// Leases granted, renewed and ended.
        #[arg(long)]
        leases: bool,
        /// From this batch height (default: the next batch).
        #[arg(long)]
        from_height: Option<u64>,
        /// Stop after this many changes.
        #[arg(long)]
        count: Option<u64>,
    },
    /// An atomic transaction from a JSON file: compares, then, else (format in docs/coordination.md).
    Txn {
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        receipt: Option<PathBuf>,
    },
    /// Move money from your account.
    Transfer {
        #[arg(long)]
        to: String,
        #[arg(long)]
        amount: u64,
        #[arg(long)]
        receipt: Option<PathBuf>,
    },
    /// Show a balance (yours by default).
    Balance {
        pubkey: Option<String>,
        #[arg(long)]
        stale: bool,
    },
    /// Members, leader, term, lag, operator key and warnings.
    Status,
    /// Fetch the receipt of an executed request. By id alone until the request's expiry
    /// passes (a few minutes); give the batch height for any older one.
    Receipt {
        request_id: String,
        /// The height of the batch that executed it (in its receipt, confirmation or watch
        /// event): finds receipts of any age.
        #[arg(long)]
        height: Option<u64>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check a receipt file offline; exit 0 only if it is valid.
    Verify {
        receipt_file: PathBuf,
        /// Operator public key: hex, or a file holding it (e.g. operator.pub).
        #[arg(long)]
        operator_key: String,
        /// Require a receipt of this cluster (hex, as `tally status` prints it); clusters may
        /// share an operator key.
        #[arg(long)]
        cluster_id: Option<String>,
    },
    /// Create or change a cluster.
    Cluster {
        #[command(subcommand)]
        command: ClusterCmd,
    },
    /// Interactive session (also reads commands from stdin).
    Repl,
    /// Load generator (closed loop, open loop at a rate, or a sweep).
    Bench(BenchArgs),
    /// Init and start a local cluster, run a demo load, stay until Ctrl-C.
    Up {
        #[arg(long, default_value_t = cluster::DEFAULT_NODES)]
        nodes: usize,
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = cluster::DEFAULT_ACCOUNTS)]
        accounts: usize,
        #[arg(long, default_value_t = cluster::DEFAULT_BASE_PORT)]
        base_port: u16,
        /// Stop the cluster right after the demo.
        #[arg(long)]
        no_wait: bool,
    },
    /// The deterministic whole-cluster simulator (runs `tally-sim`, built with `cargo build -p
    /// tally-sim`): `tally sim --seeds 1000`, `tally sim --seed 634`, `--plant ack-before-commit`.
    #[command(disable_help_flag = true)]
    Sim {
        /// `tally-sim`'s arguments (`tally sim --help` shows them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Print a shell completion script: `tally completions bash > /etc/bash_completion.d/tally`.
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// The chaos monkey over real tallyd processes (runs `tally-chaos`, built with `cargo build
    /// -p tally-chaos`): `tally chaos --nodes 3 --duration 60 --seed 7`.
    #[command(disable_help_flag = true)]
    Chaos {
        /// `tally-chaos`'s arguments (`tally chaos --help` shows them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// `tally lease ...`.
#[derive(Debug, Subcommand)]
pub enum LeaseCmd {
    /// Grant a lease; prints its id.
    Grant {
        #[arg(long)]
        ttl_ms: u64,
    },
    /// Renew once, or with --every-ms keep renewing until Ctrl-C (or until the lease is gone).
    Keepalive {
        id: u64,
        #[arg(long)]
        every_ms: Option<u64>,
    },
    /// End a lease now, with what is attached to it.
    Revoke { id: u64 },
}

/// Shells `tally completions` writes scripts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// Writes the completion script of `tally` for `shell` to `out`.
pub fn completions(shell: CompletionShell, out: &mut dyn std::io::Write) {
    use clap::CommandFactory;
    let shell = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut Cli::command(), "tally", out);
}

/// `tally cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Write node configs, keys and genesis for a new cluster.
    Init {
        #[arg(long)]
        nodes: usize,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = cluster::DEFAULT_ACCOUNTS)]
        accounts: usize,
        #[arg(long, default_value_t = cluster::DEFAULT_BASE_PORT)]
        base_port: u16,
        /// For containers (deploy/compose.yaml): one host name per node, e.g.
        /// tally-1,tally-2,tally-3. Nodes listen on 0.0.0.0, name peers HOST:PORT, keep data in
        /// /data and read DIR mounted at /config; DIR/client.toml says where the host reaches
        /// them.
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        /// With --hosts: node i's client port is published on 127.0.0.1:(this + i) (default:
        /// --base-port, so the published ports equal the container ports).
        #[arg(long, requires = "hosts")]
        published_base_port: Option<u16>,
    },
    /// Add a replica at runtime (admin-signed). With --cluster-dir it first writes
    /// node-N.toml and the node's certificate there, ready for `tallyd --config`.
    Add {
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        client: String,
        #[arg(long)]
        peer: String,
        /// Only write the node's files (start it, then run the command again without this).
        #[arg(long)]
        files_only: bool,
    },
    /// Remove a replica at runtime.
    Remove { node_id: u64 },
    /// Remove node N (if it is a member) and revoke its certificate on every replica
    /// (admin-signed): for a leaked node key. `cluster add` brings the node back with a new
    /// certificate. With --cluster-dir, node-N's files are moved aside afterwards.
    RevokeNode {
        node_id: u64,
        /// The certificate to revoke (default: node-N.pem in --cluster-dir).
        #[arg(long)]
        cert: Option<PathBuf>,
    },
}

/// `tally bench` flags.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Client threads, each with its own connection.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    #[arg(long, value_enum, default_value_t = Mix::Transfer)]
    pub mix: Mix,
    /// Write the JSON summary here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a PNG plot of throughput and latency over time here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Requests per frame.
    #[arg(long, default_value_t = 1024)]
    pub batch: usize,
    /// Frames in flight per client.
    #[arg(long, default_value_t = 4)]
    pub inflight: usize,
    /// Pre-sign at most this many requests per second of --duration.
    #[arg(long, default_value_t = 150_000)]
    pub rate_max: u64,
    /// Open loop: offer this many requests/s in all, on a fixed schedule; latency counts from
    /// each frame's scheduled time (default: closed loop, --inflight frames per client).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Step the open-loop rate up from --sweep-start by --sweep-step, each step --duration long,
    /// until p99 passes --p99-limit-ms (or the cluster falls behind); JSON and PNG of the points.
    #[arg(long)]
    pub sweep: bool,
    #[arg(long, default_value_t = 10_000)]
    pub sweep_start: u64,
    #[arg(long, default_value_t = 10_000)]
    pub sweep_step: u64,
    #[arg(long, default_value_t = 12)]
    pub sweep_steps_max: usize,
    #[arg(long, default_value_t = 250.0)]
    pub p99_limit_ms: f64,
    /// Funded account keys (accounts/*.key from `cluster init`, or the cluster directory).
    #[arg(long)]
    pub accounts_dir: Option<PathBuf>,
}

/// Runs a parsed command line.
///
/// # Errors
/// Any [`ClientError`]; `main` prints it as `Error: ...` and exits 1.
pub fn run(cli: Cli) -> Result<ExitCode, ClientError> {
    if cli.output == Output::Json {
        if let Some(name) = text_only_command(&cli.command) {
            // Refused rather than ignored: a script asking for JSON must not get text.
            return Err(ClientError::Invalid(format!("-o json is not available for tally {name} (see docs/cli.md)")));
        }
    }
    // Offline commands need no address, CA or key: a stale TALLY_CA must not break them.
    let addrs = if is_offline(&cli.command) { Target::offline() } else { Target::resolve(&cli)? };
    let key_path = cli.key.as_deref();
    let out = cli.output;
    match cli.command {
        Cmd::Keygen { out } => keygen_cmd(&out),
        Cmd::Set { doc, json, receipt, lease, if_revision } => {
            let op = set_op(&doc, json, lease, if_revision)?;
            submit(&addrs, key_path, op, receipt.as_deref(), out)
        }
        Cmd::Delete { doc, receipt, if_revision } => {
            let key = DocKey::parse(&doc)?;
            let op = match if_revision {
                Some(r) => Operation::DeleteIf { key, if_revision: Some(r) },
                None => Operation::Delete { key },
            };
            submit(&addrs, key_path, op, receipt.as_deref(), out)
        }
        Cmd::Lease { command } => lease_cmd(&addrs, key_path, command, out),
        Cmd::Claim { domain, slot, lease, receipt } => {
            submit(&addrs, key_path, Operation::Claim { domain, slot, lease }, receipt.as_deref(), out)
        }
        Cmd::Watch { doc, all, domain, leases, from_height, count } => {
            let filter = watch_filter(doc, all, domain, leases)?;
            watch_cmd(&addrs, key_path, filter, from_height, count, out)
        }
        Cmd::Txn { file, receipt } => {
            let txn = tally_client::txn_file::read(&file)?;
            submit(&addrs, key_path, Operation::Txn(txn), receipt.as_deref(), out)
        }
        Cmd::Transfer { to, amount, receipt } => {
            let to = parse_pubkey(&to)?;
            submit(&addrs, key_path, Operation::Transfer { to, amount }, receipt.as_deref(), out)
        }
        Cmd::Get { doc, stale } => get_cmd(&addrs, key_path, &doc, stale, out),
        Cmd::Balance { pubkey, stale } => balance_cmd(&addrs, key_path, pubkey.as_deref(), stale, out),
        Cmd::Status => status(&addrs, key_path, out),
        Cmd::Receipt { request_id, height, out: file } => {
            receipt(&addrs, key_path, &request_id, height, file.as_deref(), out)
        }
        Cmd::Verify { receipt_file, operator_key, cluster_id } => {
            verify_cmd(&receipt_file, &operator_key, cluster_id.as_deref())
        }
        Cmd::Cluster { command } => cluster_cmd(&addrs, key_path, command, out),
        Cmd::Repl => repl_cmd(&addrs, key_path),
        Cmd::Bench(args) => bench_cmd(&addrs, key_path, args),
        Cmd::Up { nodes, dir, accounts, base_port, no_wait } => {
            up::run_up(&UpOptions { nodes, dir, accounts, base_port, no_wait })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Sim { args } => run_sibling("tally-sim", &args),
        Cmd::Chaos { args } => run_sibling("tally-chaos", &args),
        Cmd::Completions { shell } => {
            completions(shell, &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Commands that talk to no node, so they resolve no address, CA or key.
fn is_offline(cmd: &Cmd) -> bool {
    matches!(
        cmd,
        Cmd::Keygen { .. }
            | Cmd::Verify { .. }
            | Cmd::Up { .. }
            | Cmd::Chaos { .. }
            | Cmd::Sim { .. }
            | Cmd::Completions { .. }
            | Cmd::Cluster { command: ClusterCmd::Init { .. } }
    )
}

/// The name `-o json` is refused with, for commands that only print text.
fn text_only_command(cmd: &Cmd) -> Option<&'static str> {
    match cmd {
        Cmd::Keygen { .. } => Some("keygen"),
        Cmd::Verify { .. } => Some("verify"),
        Cmd::Repl => Some("repl"),
        Cmd::Bench(_) => Some("bench (its --json FILE writes the summary)"),
        Cmd::Up { .. } => Some("up"),
        Cmd::Sim { .. } => Some("sim"),
        Cmd::Chaos { .. } => Some("chaos"),
        Cmd::Completions { .. } => Some("completions"),
        _ => None,
    }
}

fn keygen_cmd(path: &Path) -> Result<ExitCode, ClientError> {
    let key = keyfile::keygen(path)?;
    println!("Wrote a new key to {}", path.display());
    println!("Public key: {}", public_of(&key));
    Ok(ExitCode::SUCCESS)
}

/// `tally set`: a plain set, or a conditional one when a lease or an expected revision is given.
fn set_op(doc: &str, json: String, lease: Option<u64>, if_revision: Option<u64>) -> Result<Operation, ClientError> {
    let key = DocKey::parse(doc)?;
    check_json(&json)?;
    Ok(if lease.is_some() || if_revision.is_some() {
        Operation::SetIf { key, value: json.into_bytes(), if_revision, lease }
    } else {
        Operation::Set { key, value: json.into_bytes() }
    })
}

/// Connects with the user's key (created on first use), signs `op` and submits it as [`write`].
fn submit(
    t: &Target,
    key_path: Option<&Path>,
    op: Operation,
    receipt: Option<&Path>,
    out: Output,
) -> Result<ExitCode, ClientError> {
    let client = connect(t, load_or_create(key_path)?)?;
    write(&client, client.sign(op)?, receipt, out)
}

fn lease_cmd(t: &Target, key_path: Option<&Path>, command: LeaseCmd, out: Output) -> Result<ExitCode, ClientError> {
    let client = connect(t, load_or_create(key_path)?)?;
    match command {
        LeaseCmd::Grant { ttl_ms } => write(&client, client.sign(Operation::LeaseGrant { ttl_ms })?, None, out),
        LeaseCmd::Revoke { id } => write(&client, client.sign(Operation::LeaseRevoke { lease: id })?, None, out),
        LeaseCmd::Keepalive { id, every_ms: None } => {
            write(&client, client.sign(Operation::LeaseKeepAlive { lease: id })?, None, out)
        }
        LeaseCmd::Keepalive { id, every_ms: Some(every) } => loop {
            let code = write(&client, client.sign(Operation::LeaseKeepAlive { lease: id })?, None, out)?;
            if code != ExitCode::SUCCESS {
                return Ok(code);
            }
            std::thread::sleep(Duration::from_millis(every.max(1)));
        },
    }
}

/// `tally watch` takes exactly one of a document, `--all`, `--domain NAME` and `--leases`.
fn watch_filter(
    doc: Option<String>,
    all: bool,
    domain: Option<String>,
    leases: bool,
) -> Result<tally_codec::wire::WatchFilter, ClientError> {
    use tally_codec::wire::WatchFilter;
    Ok(match (doc, all, domain, leases) {
        (Some(d), false, None, false) => WatchFilter::Doc(DocKey::parse(&d)?),
        (None, true, None, false) => WatchFilter::AllDocs,
        (None, false, Some(d), false) => WatchFilter::Domain(d),
        (None, false, None, true) => WatchFilter::Leases,
        _ => {
            return Err(ClientError::Invalid("watch: give exactly one of UUID4, --all, --domain NAME, --leases".into()))
        }
    })
}

/// Prints each event of the watch, as text or one JSON document a line, until `count` of them.
fn watch_cmd(
    t: &Target,
    key_path: Option<&Path>,
    filter: tally_codec::wire::WatchFilter,
    from_height: Option<u64>,
    count: Option<u64>,
    out: Output,
) -> Result<ExitCode, ClientError> {
    let client = connect(t, read_key(key_path)?)?;
    for (seen, event) in (1u64..).zip(client.watch(filter, from_height)?) {
        let event = event?;
        match out {
            Output::Json => println!("{}", output::watch_event(&event)),
            Output::Text => println!("{}", repl::watch_line(&event)),
        }
        if count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the document (exit 0) or "Not found" (exit 1).
fn get_cmd(t: &Target, key_path: Option<&Path>, doc: &str, stale: bool, out: Output) -> Result<ExitCode, ClientError> {
    let doc = DocKey::parse(doc)?;
    let client = connect(t, read_key(key_path)?)?;
    let view = client.get(doc, stale)?;
    if out == Output::Json {
        output::print(&output::get(&doc.to_string(), view.as_ref()));
        return Ok(if view.is_some() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    match view {
        Some(d) => {
            println!("{}", String::from_utf8_lossy(&d.value));
            Ok(ExitCode::SUCCESS)
        }
        None => {
            println!("Not found");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The balance of `pubkey`, or of the user's own key when none is given.
fn balance_cmd(
    t: &Target,
    key_path: Option<&Path>,
    pubkey: Option<&str>,
    stale: bool,
    out: Output,
) -> Result<ExitCode, ClientError> {
    let (who, key) = match pubkey {
        Some(p) => (parse_pubkey(p)?, read_key(key_path)?),
        None => {
            let key = load_or_create(key_path)?;
            (public_of(&key), key)
        }
    };
    let client = connect(t, key)?;
    let balance = client.balance(who, stale)?.unwrap_or(0);
    match out {
        Output::Json => output::print(&output::balance(&who, balance)),
        Output::Text => println!("{balance}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `tally verify`, offline: exit 0 only if the receipt verifies (and is of `cluster_id`, if given).
fn verify_cmd(receipt_file: &Path, operator_key: &str, cluster_id: Option<&str>) -> Result<ExitCode, ClientError> {
    let operator = parse_operator_key(operator_key)?;
    let cluster_id = cluster_id.map(parse_cluster_id).transpose()?;
    let r = verify_receipt_file_for(receipt_file, &operator, cluster_id.as_ref())?;
    println!("{}", verified_summary(&r, &operator));
    if cluster_id.is_none() {
        println!("Cluster not checked: pass --cluster-id to require yours");
    }
    Ok(ExitCode::SUCCESS)
}

/// The interactive session, with a heartbeat so it notices a failover while idle.
fn repl_cmd(t: &Target, key_path: Option<&Path>) -> Result<ExitCode, ClientError> {
    let opts = ClientOptions { heartbeat: Some(Duration::from_secs(1)), ..t.options() };
    let client = Client::connect(&t.addrs, load_or_create(key_path)?, opts)?;
    repl::run(&client)?;
    Ok(ExitCode::SUCCESS)
}

/// Runs a companion program (`tally-sim`, `tally-chaos`): they are programs of their own so
/// that no product crate depends on the test tooling.
fn run_sibling(name: &str, args: &[String]) -> Result<ExitCode, ClientError> {
    let path = up::find_sibling(name);
    let status = std::process::Command::new(&path).args(args).status().map_err(|e| {
        ClientError::Invalid(format!(
            "cannot run {}: {e} (build it with `cargo build --release -p {name}`)",
            path.display()
        ))
    })?;
    Ok(ExitCode::from(u8::try_from(status.code().unwrap_or(1)).unwrap_or(1)))
}

/// Where the client connects and how: from `--addr`, `--ca`, `--cluster-dir` and the flags.
#[derive(Debug, Clone)]
pub struct Target {
    pub addrs: Vec<String>,
    pub dial: tally_net::Dial,
    pub admin_key: Option<PathBuf>,
    pub cluster_dir: Option<PathBuf>,
    /// Advertised → dialled addresses (`client.toml` of a `--hosts` cluster directory).
    pub addr_map: std::collections::BTreeMap<String, String>,
}

impl Target {
    /// # Errors
    /// An unreadable CA or cluster directory, or plaintext to a non-loopback address without
    /// `--insecure-plaintext`.
    pub fn resolve(cli: &Cli) -> Result<Target, ClientError> {
        let mut addrs = split_addrs(&cli.addr);
        let dir = cli.cluster_dir.clone();
        let mut addr_map = std::collections::BTreeMap::new();
        if let Some(d) = &dir {
            // A directory for containers (`cluster init --hosts`) says where the nodes are
            // published; their own configs hold container addresses.
            let published = cluster::PublishedAddrs::load(d)?;
            if addrs.is_empty() {
                addrs = match &published {
                    Some(p) => p.dial_addrs(),
                    None => cluster_addrs(d)?,
                };
            }
            addr_map = published.map(|p| p.addr_map()).unwrap_or_default();
        }
        let ca = cli.ca.clone().or_else(|| dir.as_ref().map(|d| d.join(cluster::CA_FILE)));
        let dial = match &ca {
            Some(ca) => tally_net::Dial::cluster(ca).map_err(|e| ClientError::Invalid(format!("cluster CA: {e}")))?,
            None => {
                let loopback = addrs.iter().all(|a| tally_net::tls::is_loopback(a));
                if !loopback && !cli.insecure_plaintext {
                    return Err(ClientError::Invalid(
                        "no cluster CA: give --ca FILE or --cluster-dir DIR (TALLY_CA / TALLY_CLUSTER_DIR); \
                         plaintext to a non-loopback address needs --insecure-plaintext"
                            .into(),
                    ));
                }
                tally_net::Dial::Plain
            }
        };
        let admin_key = cli.admin_key.clone().or_else(|| dir.as_ref().map(|d| d.join(cluster::ADMIN_KEY_FILE)));
        Ok(Target { addrs, dial, admin_key, cluster_dir: dir, addr_map })
    }

    /// For commands that talk to no node.
    pub fn offline() -> Target {
        Target {
            addrs: Vec::new(),
            dial: tally_net::Dial::Plain,
            admin_key: None,
            cluster_dir: None,
            addr_map: Default::default(),
        }
    }

    pub fn options(&self) -> ClientOptions {
        ClientOptions {
            dial: self.dial.clone(),
            addr_map: std::sync::Arc::new(self.addr_map.clone()),
            ..ClientOptions::default()
        }
    }

    /// # Errors
    /// No admin key given, or an unreadable one.
    pub fn admin(&self) -> Result<SigningKey, ClientError> {
        let path = self.admin_key.as_ref().ok_or_else(|| {
            ClientError::Invalid("cluster operations need the admin key: --admin-key FILE or --cluster-dir DIR".into())
        })?;
        load_key(path)
    }
}

/// Client addresses of the `node-*.toml` files of a cluster directory.
fn cluster_addrs(dir: &Path) -> Result<Vec<String>, ClientError> {
    let mut nodes: Vec<(u64, String)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| ClientError::file(dir, e))? {
        let path = entry.map_err(|e| ClientError::file(dir, e))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with("node-") && name.ends_with(".toml") {
            let text = std::fs::read_to_string(&path).map_err(|e| ClientError::file(&path, e))?;
            let cfg: tally_codec::config::NodeConfig =
                toml::from_str(&text).map_err(|e| ClientError::Invalid(format!("{}: {e}", path.display())))?;
            nodes.push((cfg.node_id, cfg.listen));
        }
    }
    nodes.sort();
    if nodes.is_empty() {
        return Err(ClientError::Invalid(format!("{} holds no node-*.toml", dir.display())));
    }
    Ok(nodes.into_iter().map(|(_, a)| a).collect())
}

fn connect(t: &Target, key: SigningKey) -> Result<Client, ClientError> {
    Client::connect(&t.addrs, key, t.options())
}

/// Reads need no identity; don't create a key file just for them.
fn read_key(path: Option<&Path>) -> Result<SigningKey, ClientError> {
    match path {
        Some(p) => load_key(p),
        None => Ok(generate_key()),
    }
}

fn parse_pubkey(s: &str) -> Result<PublicKey, ClientError> {
    PublicKey::from_hex(s).map_err(|_| ClientError::Invalid(format!("'{s}' is not a public key (64 hex digits)")))
}

fn save_if_asked(client: &Client, path: Option<&Path>, c: &Committed, out: Output) -> Result<(), ClientError> {
    if let Some(p) = path {
        save_receipt(p, &c.receipt, client.operator_key())?;
        if out == Output::Text {
            println!("Receipt saved to {}", p.display());
        }
    }
    Ok(())
}

/// Submits one write; prints its outcome, then its id and height (what `tally receipt` needs
/// once the request has expired), saves the receipt (even of a rejection). A write that did not
/// commit names its id on stderr, to look it up later.
fn write(
    client: &Client,
    req: tally_codec::SignedRequest,
    receipt: Option<&Path>,
    out: Output,
) -> Result<ExitCode, ClientError> {
    let id = req.id();
    match client.submit_one(req) {
        Ok(c) => {
            match out {
                Output::Text => {
                    println!("{}", repl::outcome_line(&c.receipt.outcome, c.durable_replicas));
                    println!("{}", request_line(&c));
                    save_if_asked(client, receipt, &c, out)?;
                }
                Output::Json => {
                    save_if_asked(client, receipt, &c, out)?;
                    output::print(&output::write(&c, receipt));
                }
            }
            // A compare-and-set that did not match and a denied claim are committed refusals.
            Ok(if c.receipt.outcome.is_success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Err(ClientError::Rejected { code, committed }) => {
            save_if_asked(client, receipt, &committed, out)?;
            if out == Output::Json {
                // Executed and refused: the outcome is the document; the error goes to stderr.
                output::print(&output::write(&committed, receipt));
                eprintln!("Error: {code}");
                return Ok(ExitCode::FAILURE);
            }
            println!("{}", request_line(&committed));
            Err(ClientError::Rejected { code, committed })
        }
        Err(e) => {
            if out == Output::Text {
                eprintln!("Request id: {id} (not known to be committed: `tally receipt {id}` tells)");
            }
            Err(e)
        }
    }
}

/// "Request id: ID, height H (`tally receipt ID --height H` fetches its receipt at any time)".
fn request_line(c: &tally_client::client::Committed) -> String {
    let (id, height) = (c.request_id, c.receipt.header.height);
    format!(
        "Request id: {id}, height {height} (`tally receipt {id} --height {height}` fetches its receipt at any time)"
    )
}

/// How long `status` waits for each member's answer.
const STATUS_PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// One Status round trip on a fresh connection.
fn status_at(addr: &str, dial: &tally_net::Dial) -> Option<tally_codec::wire::StatusInfo> {
    use tally_codec::wire::{ClientMessage, ServerMessage};
    let conn = tally_client::connection::Connection::connect_with(addr, dial, STATUS_PROBE_TIMEOUT).ok()?;
    match conn.call_timeout(ClientMessage::Status, STATUS_PROBE_TIMEOUT).ok()? {
        ServerMessage::Status(s) => Some(s),
        _ => None,
    }
}

fn status(addrs: &Target, key_path: Option<&Path>, out: Output) -> Result<ExitCode, ClientError> {
    let client = connect(addrs, read_key(key_path)?)?;
    // Addresses as the cluster advertises them, dialled as this host reaches them (the map of
    // a `--hosts` directory's client.toml; the same address elsewhere).
    let dialled = |a: &str| addrs.addr_map.get(a).cloned().unwrap_or_else(|| a.to_string());
    // The leader's view (match indexes are only known there); the first answer's when the
    // leader can't be reached from here.
    let first = client.status()?;
    let view = match (&first.leader_addr, first.leader_id) {
        (Some(a), Some(l)) if l != first.node_id => {
            status_at(&dialled(a), &addrs.dial).unwrap_or_else(|| first.clone())
        }
        _ => first.clone(),
    };
    // Every member probed from here, the same way for the text and the JSON.
    let reachable: Vec<bool> = std::thread::scope(|sc| {
        let probes: Vec<_> = view
            .members
            .iter()
            .map(|m| {
                let (dial, addr) = (&addrs.dial, dialled(&m.client_addr));
                sc.spawn(move || status_at(&addr, dial).is_some_and(|s| s.node_id == m.node_id))
            })
            .collect();
        probes.into_iter().map(|h| h.join().unwrap_or(false)).collect()
    });
    if out == Output::Json {
        output::print(&output::status(&view, first.node_id, &reachable));
        return Ok(ExitCode::SUCCESS);
    }
    for line in repl::status_info_lines(&view) {
        println!("{line}");
    }
    let (voters_reachable, configured) = output::voters_reachable(&view, &reachable);
    println!("Reachable from here: {voters_reachable} of {configured} replicas");
    let needed = configured / 2 + 1;
    if voters_reachable < needed {
        let warning =
            tally_client::client::ClientEvent::MinorityWarning { reachable: voters_reachable, configured, needed };
        println!("{warning}");
    }
    Ok(ExitCode::SUCCESS)
}

fn receipt(
    addrs: &Target,
    key_path: Option<&Path>,
    id: &str,
    height: Option<u64>,
    file: Option<&Path>,
    out: Output,
) -> Result<ExitCode, ClientError> {
    let id = RequestId::from_hex(id)
        .map_err(|_| ClientError::Invalid(format!("'{id}' is not a request id (64 hex digits)")))?;
    let client = connect(addrs, read_key(key_path)?)?;
    let found = match height {
        Some(h) => client.receipt_at(id, h)?,
        None => client.receipt(id)?,
    };
    let r = found.ok_or_else(|| match height {
        Some(h) => ClientError::Invalid(format!("no receipt for request {id} in batch {h}")),
        None => ClientError::Invalid(format!(
            "no receipt for request {id}: unknown, or past its expiry (give --height, the batch that executed it)"
        )),
    })?;
    if out == Output::Json {
        if let Some(path) = file {
            save_receipt(path, &r, client.operator_key())?;
        }
        let body = serde_json::to_value(ReceiptFile::new(&r, client.operator_key()))
            .map_err(|e| ClientError::Invalid(e.to_string()))?;
        output::print(&output::receipt(&id, &r, &body, file));
        return Ok(ExitCode::SUCCESS);
    }
    match file {
        Some(path) => {
            save_receipt(path, &r, client.operator_key())?;
            println!(
                "Receipt for request {id}: height {}, outcome {:?}; saved to {}",
                r.header.height,
                r.outcome,
                path.display()
            );
        }
        None => {
            let file = ReceiptFile::new(&r, client.operator_key());
            println!("{}", serde_json::to_string_pretty(&file).map_err(|e| ClientError::Invalid(e.to_string()))?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cluster_cmd(addrs: &Target, key_path: Option<&Path>, cmd: ClusterCmd, out: Output) -> Result<ExitCode, ClientError> {
    match cmd {
        ClusterCmd::Init { nodes, dir, accounts, base_port, hosts, published_base_port } => {
            let containers = (!hosts.is_empty()).then(|| cluster::ContainerHosts {
                hosts,
                published_base_port: published_base_port.unwrap_or(base_port),
            });
            let layout = cluster::cluster_init_with(nodes, &dir, accounts, base_port, containers.as_ref())?;
            match out {
                Output::Json => output::print(&output::cluster_init(&layout)),
                Output::Text => print_cluster_init(&layout),
            }
            Ok(ExitCode::SUCCESS)
        }
        ClusterCmd::Add { node_id, client, peer, files_only } => {
            cluster_add(addrs, key_path, node_id, (&client, &peer), files_only, out)
        }
        ClusterCmd::Remove { node_id } => {
            let admin = addrs.admin()?;
            let client = connect(addrs, read_key(key_path)?)?;
            client.cluster_remove(&admin, node_id)?;
            match out {
                Output::Text => println!("Node {node_id} removed"),
                Output::Json => output::print(&serde_json::json!({ "node_id": node_id, "removed": true })),
            }
            Ok(ExitCode::SUCCESS)
        }
        ClusterCmd::RevokeNode { node_id, cert } => revoke_node(addrs, key_path, out, node_id, cert),
    }
}

/// What `cluster init` wrote, and how clients and containers use it.
fn print_cluster_init(layout: &cluster::ClusterLayout) {
    println!("Wrote a {}-node cluster to {}", layout.configs.len(), layout.dir.display());
    println!("Cluster id: {}", layout.cluster_id);
    println!("Operator key: {} ({})", layout.operator_public, layout.operator_pub_path.display());
    for (cfg, path) in layout.configs.iter().zip(&layout.config_paths) {
        println!("  node {}: client {}  peer {}  config {}", cfg.node_id, cfg.listen, cfg.peer_listen, path.display());
    }
    println!("Funded accounts: {} in {}", layout.account_keys.len(), layout.dir.join("accounts").display());
    println!(
        "Cluster CA: {} (clients: --ca, or --cluster-dir {})",
        layout.dir.join(cluster::CA_FILE).display(),
        layout.dir.display()
    );
    println!("Admin key: {} (signs cluster add/remove and scans)", layout.dir.join(cluster::ADMIN_KEY_FILE).display());
    if let Some(p) = &layout.published {
        println!(
            "For containers: mount {} at {} (read-only) and a volume at {} in each; this host reaches \
             them at {} ({}; tally --cluster-dir {} dials these)",
            layout.dir.display(),
            cluster::CONTAINER_CONFIG_DIR,
            cluster::CONTAINER_DATA_DIR,
            p.dial_addrs().join(","),
            layout.dir.join(cluster::CLIENT_FILE).display(),
            layout.dir.display()
        );
    }
}

/// `tally cluster add`: node N's config and certificate in the cluster directory (unless there
/// already), then the admin-signed add (unless `files_only`). `(client, peer)` are its addresses.
fn cluster_add(
    addrs: &Target,
    key_path: Option<&Path>,
    node_id: u64,
    (client_addr, peer): (&str, &str),
    files_only: bool,
    out: Output,
) -> Result<ExitCode, ClientError> {
    let text = out == Output::Text;
    // The admin key and a connection first: without them nothing is written.
    let adding = if files_only { None } else { Some((addrs.admin()?, connect(addrs, read_key(key_path)?)?)) };
    let existed: Vec<PathBuf> = match &addrs.cluster_dir {
        Some(dir) => cluster::node_files(dir, node_id).into_iter().filter(|f| f.exists()).collect(),
        None => Vec::new(),
    };
    let (config_file, config_written) = match &addrs.cluster_dir {
        Some(dir) => {
            let (file, written) = node_config_file(dir, node_id, client_addr, peer, text)?;
            (Some(file), written)
        }
        None => (None, false),
    };
    if let Some((admin, client)) = adding {
        if let Err(e) = client.cluster_add(&admin, node_id, client_addr, peer) {
            // Refused: what this run wrote goes (a certificate signed by the CA for a node that
            // is not added must not lie around).
            if let (true, Some(dir)) = (config_written, &addrs.cluster_dir) {
                cluster::remove_node_files(dir, node_id, &existed)?;
                eprintln!(
                    "Removed node-{node_id}.toml and node {node_id}'s certificate written by this run: the add failed \
                     (to start the node first, write them with --files-only)"
                );
            }
            return Err(e);
        }
        if text {
            println!("Node {node_id} added (client {client_addr}, peer {peer})");
        }
    }
    if !text {
        output::print(&serde_json::json!({
            "node_id": node_id,
            "client_addr": client_addr,
            "peer_addr": peer,
            "config_file": config_file.map(|p| p.display().to_string()),
            "config_written": config_written,
            "added": !files_only,
        }));
    }
    Ok(ExitCode::SUCCESS)
}

/// Node N's `node-N.toml` in `dir`: the one already there, or a new one written with the node's
/// certificate. True when this call wrote it.
fn node_config_file(
    dir: &Path,
    node_id: u64,
    client_addr: &str,
    peer: &str,
    text: bool,
) -> Result<(PathBuf, bool), ClientError> {
    let config = dir.join(format!("node-{node_id}.toml"));
    if config.exists() {
        if text {
            println!("Using {}", config.display());
        }
        return Ok((config, false));
    }
    let (path, _) = cluster::add_node_files(dir, node_id, client_addr, peer)?;
    if text {
        println!(
            "Wrote {} and node {node_id}'s certificate; start it with: tallyd --config {}",
            path.display(),
            path.display()
        );
    }
    Ok((path, true))
}

/// `tally cluster revoke-node`: the certificate's fingerprint, the admin command, then the
/// node's files moved aside in the cluster directory.
fn revoke_node(
    addrs: &Target,
    key_path: Option<&Path>,
    out: Output,
    node_id: u64,
    cert: Option<PathBuf>,
) -> Result<ExitCode, ClientError> {
    let cert = match (cert, &addrs.cluster_dir) {
        (Some(c), _) => c,
        (None, Some(dir)) => dir.join(format!("node-{node_id}.pem")),
        (None, None) => {
            return Err(ClientError::Invalid("name the certificate to revoke: --cert FILE or --cluster-dir DIR".into()))
        }
    };
    let fingerprint = cluster::cert_fingerprint_of(&cert)?;
    let admin = addrs.admin()?;
    let client = connect(addrs, read_key(key_path)?)?;
    client.cluster_revoke(&admin, node_id, fingerprint)?;
    let moved = match &addrs.cluster_dir {
        Some(dir) => cluster::retire_node_files(dir, node_id, &fingerprint)?,
        None => Vec::new(),
    };
    let hex: String = fingerprint.iter().map(|b| format!("{b:02x}")).collect();
    match out {
        Output::Text => {
            println!("Node {node_id} removed; its certificate {hex} is refused by every replica");
            for m in &moved {
                println!("Moved aside: {}", m.display());
            }
            println!("To bring it back: a new certificate with `tally cluster add --node-id {node_id} ...`");
        }
        Output::Json => output::print(&serde_json::json!({
            "node_id": node_id,
            "revoked_certificate": hex,
            "moved": moved.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        })),
    }
    Ok(ExitCode::SUCCESS)
}

/// Loads `DIR/*.key`, or `DIR/accounts/*.key` when given a cluster directory.
///
/// # Errors
/// [`ClientError::File`] or [`ClientError::KeyFile`].
pub fn load_accounts(dir: &Path) -> Result<Vec<SigningKey>, ClientError> {
    let dir = if dir.join("accounts").is_dir() { dir.join("accounts") } else { dir.to_path_buf() };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| ClientError::file(&dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "key"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(ClientError::Invalid(format!("no *.key files in {}", dir.display())));
    }
    paths.iter().map(|p| load_key(p)).collect()
}

fn bench_cmd(t: &Target, key_path: Option<&Path>, a: BenchArgs) -> Result<ExitCode, ClientError> {
    let addr = t.addrs.first().cloned().ok_or(ClientError::NoAddress)?;
    let accounts = match &a.accounts_dir {
        Some(d) => load_accounts(d)?,
        None => Vec::new(),
    };
    if accounts.is_empty() && a.mix != Mix::Doc {
        eprintln!("WARNING: no --accounts-dir; transfers are signed by your own key and may be rejected for insufficient funds");
    }
    let doc_key = load_or_create(key_path)?;
    let accounts = if accounts.is_empty() { vec![doc_key.clone()] } else { accounts };
    use std::io::IsTerminal;
    let cfg = BenchConfig {
        addr,
        duration: Duration::from_secs(a.duration.max(1)),
        clients: a.clients,
        mix: a.mix,
        batch: a.batch,
        inflight: a.inflight,
        rate_max: a.rate_max,
        rate: a.rate,
        accounts,
        doc_key,
        json: a.json,
        plot: a.plot,
        progress: std::io::stderr().is_terminal(),
        dial: t.dial.clone(),
    };
    if a.sweep {
        let sweep = bench::Sweep {
            start_per_s: a.sweep_start,
            step_per_s: a.sweep_step,
            steps_max: a.sweep_steps_max,
            p99_limit_ms: a.p99_limit_ms,
        };
        let s = bench::run_sweep(&cfg, sweep)?;
        for p in &s.points {
            println!(
                "offered {:>7}/s: committed {:>9.0}/s, p50 {:.1} ms, p99 {:.1} ms, p999 {:.1} ms, errors {}",
                p.offered_per_s, p.throughput_per_s, p.latency_ms_p50, p.latency_ms_p99, p.latency_ms_p999, p.errors
            );
        }
        match s.max_rate_within_limit_per_s {
            Some(r) => println!("highest rate within p99 {} ms: {r}/s", s.p99_limit_ms),
            None => println!("no rate stayed within p99 {} ms", s.p99_limit_ms),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let summary = bench::run_bench(&cfg)?;
    println!("{}", bench::summary_text(&summary));
    if let Some(p) = &cfg.json {
        println!("JSON summary: {}", p.display());
    }
    if let Some(p) = &cfg.plot {
        println!("Plot: {}", p.display());
    }
    Ok(if summary.committed > 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::cluster_init;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Found by CI: a stale `TALLY_CA` (another cluster's, since deleted) broke the offline
    /// `tally verify`.
    #[test]
    fn offline_commands_ignore_the_connection_settings() {
        let dir = tempfile::tempdir().expect("tmp");
        let missing = dir.path().join("no-such-ca.pem");
        let receipt = dir.path().join("no-such-receipt.json");
        let cli = Cli::try_parse_from([
            "tally",
            "--ca",
            missing.to_str().expect("utf8"),
            "verify",
            receipt.to_str().expect("utf8"),
            "--operator-key",
            &"ab".repeat(32),
        ])
        .expect("parse");
        let e = run(cli).expect_err("no receipt file");
        assert!(e.to_string().contains("no-such-receipt"), "fails on the receipt, not the CA: {e}");
        let cli = Cli::try_parse_from(["tally", "--ca", missing.to_str().expect("utf8"), "status"]).expect("parse");
        let e = run(cli).expect_err("no CA");
        assert!(e.to_string().contains("no-such-ca"), "{e}");
    }

    #[test]
    fn flags_parse_as_designed() {
        let cli = Cli::try_parse_from([
            "tally",
            "--addr",
            "a:1,b:2",
            "--addr",
            "c:3",
            "set",
            "k",
            "{}",
            "--receipt",
            "r.json",
        ])
        .expect("parse");
        assert_eq!(split_addrs(&cli.addr), vec!["a:1", "b:2", "c:3"]);
        assert!(matches!(cli.command, Cmd::Set { receipt: Some(_), .. }));
        let cli = Cli::try_parse_from([
            "tally",
            "bench",
            "--addr",
            "a:1",
            "--duration",
            "5",
            "--clients",
            "2",
            "--mix",
            "mixed",
        ])
        .expect("bench");
        match cli.command {
            Cmd::Bench(b) => {
                assert_eq!(b.mix, Mix::Mixed);
                assert_eq!(b.batch, 1024);
                assert_eq!(b.inflight, 4);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(cli.addr, vec!["a:1"]);
        let cli = Cli::try_parse_from(["tally", "cluster", "init", "--nodes", "3", "--dir", "/tmp/x"]).expect("init");
        assert!(matches!(cli.command, Cmd::Cluster { command: ClusterCmd::Init { accounts: 4, base_port: 7000, .. } }));
        assert!(Cli::try_parse_from(["tally", "verify", "r.json", "--operator-key", "op.pub"]).is_ok());
        assert!(Cli::try_parse_from(["tally", "chaos", "--nodes", "3", "--seed", "1"]).is_ok());
        assert!(Cli::try_parse_from(["tally", "transfer", "--to", "ab", "--amount", "5"]).is_ok());
        assert!(Cli::try_parse_from(["tally", "up", "--no-wait"]).is_ok());
        let cli = Cli::try_parse_from(["tally", "status", "-o", "json"]).expect("-o after the command");
        assert_eq!(cli.output, Output::Json);
        let cli = Cli::try_parse_from(["tally", "--output", "json", "cluster", "remove", "3"]).expect("--output");
        assert_eq!(cli.output, Output::Json);
        assert_eq!(Cli::try_parse_from(["tally", "status"]).expect("default").output, Output::Text);
        assert!(Cli::try_parse_from(["tally", "-o", "yaml", "status"]).is_err());
    }

    #[test]
    fn json_output_is_refused_where_a_command_has_none() {
        let cli = Cli::try_parse_from(["tally", "-o", "json", "keygen", "--out", "/nonexistent/k"]).expect("parse");
        let e = run(cli).expect_err("keygen has no JSON output");
        assert!(e.to_string().contains("-o json is not available for tally keygen"), "{e}");
    }

    #[test]
    fn init_with_hosts_parses_and_a_hosts_cluster_dir_dials_the_published_ports() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("c");
        let d = dir.to_str().expect("utf8");
        let cli = Cli::try_parse_from([
            "tally",
            "cluster",
            "init",
            "--nodes",
            "3",
            "--dir",
            d,
            "--hosts",
            "tally-1,tally-2,tally-3",
            "--published-base-port",
            "27000",
        ])
        .expect("parse");
        match &cli.command {
            Cmd::Cluster { command: ClusterCmd::Init { hosts, published_base_port, .. } } => {
                assert_eq!(hosts, &["tally-1", "tally-2", "tally-3"]);
                assert_eq!(*published_base_port, Some(27000));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(run(cli).expect("init"), ExitCode::SUCCESS);
        // --published-base-port means nothing without --hosts.
        assert!(Cli::try_parse_from([
            "tally",
            "cluster",
            "init",
            "--nodes",
            "3",
            "--dir",
            d,
            "--published-base-port",
            "1"
        ])
        .is_err());

        let cli = Cli::try_parse_from(["tally", "--cluster-dir", d, "status"]).expect("parse");
        let t = Target::resolve(&cli).expect("resolve");
        assert_eq!(t.addrs, vec!["127.0.0.1:27001", "127.0.0.1:27002", "127.0.0.1:27003"]);
        assert!(matches!(t.dial, tally_net::Dial::Tls { .. }));
        let o = t.options();
        assert_eq!(o.dial_addr("tally-3:7003"), "127.0.0.1:27003");
        assert_eq!(o.addr_map.len(), 3);
        // --addr still wins over the file.
        let cli = Cli::try_parse_from(["tally", "--cluster-dir", d, "--addr", "127.0.0.1:9", "status"]).expect("parse");
        assert_eq!(Target::resolve(&cli).expect("resolve").addrs, vec!["127.0.0.1:9"]);

        // Without --hosts: the nodes' own addresses, no map.
        let plain = tmp.path().join("p");
        cluster_init(2, &plain, 1, 9100).expect("init");
        let cli = Cli::try_parse_from(["tally", "--cluster-dir", plain.to_str().expect("utf8"), "status"]).expect("p");
        let t = Target::resolve(&cli).expect("resolve");
        assert_eq!(t.addrs, vec!["127.0.0.1:9101", "127.0.0.1:9102"]);
        assert!(t.addr_map.is_empty());
    }

    #[test]
    fn accounts_dir_accepts_cluster_dir_or_accounts_dir() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = cluster_init(1, tmp.path(), 3, 9000).expect("init");
        assert_eq!(load_accounts(&layout.dir).expect("cluster dir").len(), 3);
        assert_eq!(load_accounts(&layout.dir.join("accounts")).expect("accounts dir").len(), 3);
        assert!(load_accounts(&tmp.path().join("node-1")).is_err());
    }

    /// `tally verify FILE --operator-key KEY --cluster-id ID` binds the receipt to one cluster
    /// (the library side: `receipt_file`'s `cluster_id_binds_the_receipt_to_its_cluster`).
    #[test]
    fn verify_with_a_cluster_id_accepts_only_that_cluster() {
        let dir = tempfile::tempdir().expect("tempdir");
        let operator = SigningKey::from_bytes(&[1; 32]);
        let op_pub = public_of(&operator);
        let receipt = tally_client::testkit::sample_receipt(&operator);
        let own = receipt.header.cluster_id;
        let other = tally_codec::ClusterId([4; 16]);
        let path = dir.path().join("r.json");
        save_receipt(&path, &receipt, Some(op_pub)).expect("save");
        let tally = |cluster: &str| {
            let args = ["tally", "verify", path.to_str().expect("utf8"), "--operator-key", &op_pub.to_hex()];
            let cli = Cli::try_parse_from(args.into_iter().chain(["--cluster-id", cluster]));
            run(cli.expect("parse"))
        };
        assert!(tally(&own.to_hex()).is_ok());
        let err = tally(&other.to_hex()).expect_err("another cluster");
        assert!(err.to_string().contains(&format!("not of cluster {other}")), "{err}");
        assert!(tally("xyz").expect_err("bad id").to_string().contains("cluster id 'xyz'"));
    }
}
