//! Test support: real `tallyd` processes on loopback ports, killed by PID when dropped.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tally_client::cluster::{cluster_init, ClusterLayout};
use tally_client::{Client, ClientOptions};

/// A `tallyd` child process. Dropping it sends SIGKILL to its PID and reaps it.
pub struct Daemon {
    child: Option<Child>,
    pub config: PathBuf,
    pub addr: String,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(config: &Path, addr: &str, log: &Path) -> Daemon {
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open log");
        let child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn tallyd");
        let d =
            Daemon { child: Some(child), config: config.to_path_buf(), addr: addr.to_string(), log: log.to_path_buf() };
        d.wait_ready(Duration::from_secs(20));
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Polls `Status` until the node answers and knows a leader.
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(conn) = tally_client::Connection::connect_timeout(&self.addr, Duration::from_millis(500)) {
                if let Ok(tally_codec::wire::ServerMessage::Status(s)) =
                    conn.call_timeout(tally_codec::wire::ClientMessage::Status, Duration::from_secs(2))
                {
                    if s.leader_id.is_some() {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "tallyd at {} not ready; log:\n{}", self.addr, self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY-free: kill(2) by PID through the std API sends SIGKILL on Unix.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = c.try_wait() {
                    assert!(status.success(), "tallyd exited with {status} on SIGTERM");
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("tallyd did not stop on SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A base port P such that P+1..=P+n, P+101.., P+201.. are all free right now.
pub fn free_base_port(n: usize) -> u16 {
    let seed = (std::process::id() as u64).wrapping_mul(2654435761) ^ Instant::now().elapsed().as_nanos() as u64;
    for attempt in 0..200u64 {
        let base = 20_000 + ((seed.wrapping_add(attempt * 7919)) % 40_000) as u16 / 10 * 10;
        let ok = (1..=n as u16).all(|i| {
            [base + i, base + 100 + i, base + 200 + i].iter().all(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        });
        if ok {
            return base;
        }
    }
    panic!("no free port range found");
}

/// A fresh cluster layout in a temp dir.
pub fn init_cluster(nodes: usize, accounts: usize) -> (tempfile::TempDir, ClusterLayout) {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = free_base_port(nodes);
    let layout = cluster_init(nodes, dir.path(), accounts, base).expect("cluster init");
    (dir, layout)
}

pub fn start_all(layout: &ClusterLayout) -> Vec<Daemon> {
    layout
        .config_paths
        .iter()
        .zip(&layout.configs)
        .enumerate()
        .map(|(i, (p, c))| Daemon::start(p, &c.listen, &layout.dir.join(format!("node-{}.log", i + 1))))
        .collect()
}

pub fn account_key(layout: &ClusterLayout, j: usize) -> ed25519_dalek::SigningKey {
    tally_client::keyfile::load_key(&layout.account_keys[j]).expect("account key")
}

pub fn client(layout: &ClusterLayout, j: usize) -> Client {
    Client::connect(&layout.client_addrs(), account_key(layout, j), ClientOptions::default()).expect("connect")
}

pub fn operator(layout: &ClusterLayout) -> tally_codec::PublicKey {
    tally_codec::PublicKey::from_hex(&layout.operator_public).expect("operator key")
}
