//! The guts of the `tally` command line: commands, REPL, bench, `up`, `cluster init`/`add`
//! files and output formatting, on top of the `tally_client` library.
//!
//! ```text
//!  tally (main.rs) ─▶ cli ─▶ tally_client::Client ──▶ tallyd
//!                       ├─▶ repl    (line parsing + session output, docs/cli.md)
//!                       ├─▶ bench   (load signed as it is sent, hdrhistogram, JSON + PNG via tally_plot)
//!                       ├─▶ cluster (cluster init / add: configs, keys, CA, certificates)
//!                       ├─▶ up      (a local cluster + demo load)
//!                       └─▶ output  (`-o json` documents)
//! ```
//! `cluster` and `up::find_tallyd` are also what the tallyd tests and the chaos monkey use to lay
//! out and start real clusters.
#![forbid(unsafe_code)]

pub mod bench;
pub mod cli;
pub mod cluster;
pub mod output;
pub mod repl;
pub mod up;

pub use cluster::{cluster_init, ClusterLayout};
