//! Attacks on a replica's operator surfaces: the metrics port (an endless request line, many
//! slow connections), the log (floods of refused commands and bad frames) and admin replays.
//! Each runs against a real `tallyd` and checks what an operator relies on: health checks keep
//! being answered, memory and log size stay bounded, a captured command is not run twice.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Resident memory of process `pid`, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// `GET path` on `addr` with a hard deadline on connect, write and read: `None` when any step
/// takes longer than `within`.
fn http_get_within(addr: &str, path: &str, within: Duration) -> Option<(u16, String)> {
    let sock: std::net::SocketAddr = addr.parse().ok()?;
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&sock, within).ok()?;
    s.set_read_timeout(Some(within)).ok()?;
    s.set_write_timeout(Some(within)).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    if started.elapsed() > within {
        return None;
    }
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.split_whitespace().nth(1)?.parse().ok()?, body.to_string()))
}

/// One connection that sends a request line without end, as fast as the server reads it.
fn endless_line(addr: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let Ok(mut s) = TcpStream::connect(&addr) else { return 0 };
        let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
        let chunk = vec![b'A'; 64 * 1024];
        let mut sent = s.write(b"GET /").unwrap_or(0) as u64;
        while !stop.load(Ordering::Acquire) {
            match s.write(&chunk) {
                Ok(n) => sent += n as u64,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                // Cut by the server: reconnect and start again.
                Err(_) => match TcpStream::connect(&addr) {
                    Ok(again) => {
                        s = again;
                        let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                },
            }
        }
        sent
    })
}

/// `n` connections that open a request and send one byte of a header every 300 ms, reopening
/// whatever the server cuts.
fn slow_clients(addr: String, n: usize, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let open = |addr: &str| {
            let mut s = TcpStream::connect(addr).ok()?;
            s.write_all(b"GET /health/live HTTP/1.1\r\nX-Slow: ").ok()?;
            Some(s)
        };
        let mut socks: Vec<Option<TcpStream>> = (0..n).map(|_| open(&addr)).collect();
        while !stop.load(Ordering::Acquire) {
            for s in &mut socks {
                if s.as_mut().is_none_or(|c| c.write_all(b"x").is_err()) {
                    *s = open(&addr);
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    })
}

/// An endless request line and 200 slow connections on the metrics port: every health check
/// beside them is answered within a second, and the replica's memory does not grow.
#[test]
fn a_hostile_metrics_client_never_delays_a_health_check() {
    let (_dir, layout) = init_cluster(1, 1);
    let nodes = start_all(&layout);
    let metrics = layout.configs[0].metrics_listen.clone().expect("cluster init sets metrics_listen");
    assert_eq!(http_get_within(&metrics, "/health/live", Duration::from_secs(5)).map(|r| r.0), Some(200));
    let rss_before = rss_bytes(nodes[0].pid());

    let stop = Arc::new(AtomicBool::new(false));
    let slow = slow_clients(metrics.clone(), 200, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let flood = endless_line(metrics.clone(), stop.clone());
    let mut answered = 0;
    let mut rss_max = rss_before;
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let t = Instant::now();
        let r = http_get_within(&metrics, "/health/live", Duration::from_secs(1));
        let took = t.elapsed();
        rss_max = rss_max.max(rss_bytes(nodes[0].pid()));
        if r.as_ref().map(|r| r.0) != Some(200) {
            stop.store(true, Ordering::Release);
            panic!("a health check beside the attack got {r:?} after {took:?} (RSS {rss_before} -> {rss_max})");
        }
        answered += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Release);
    let sent = flood.join().expect("flood thread");
    slow.join().expect("slow clients");
    assert!(sent > 64 * 1024 * 1024, "the endless line offered only {sent} bytes: not an attack");
    let (code, body) = http_get_within(&metrics, "/metrics", Duration::from_secs(2)).expect("metrics after");
    assert!(code == 200 && body.contains("tally_term"), "{code}: {body}");
    let grown = rss_max.saturating_sub(rss_before);
    println!("{answered} health checks answered; {sent} bytes offered; RSS {rss_before} -> max {rss_max}");
    assert!(grown < 64 * 1024 * 1024, "RSS grew by {grown} bytes under the attack ({rss_before} -> {rss_max})");
}

/// Sends `n` admin commands signed by a stranger's key on `conn`, 200 in flight at a time;
/// every one must be refused.
fn refused_admin_flood(conn: &tally_client::Connection, cluster: tally_codec::ClusterId, n: usize) {
    let stranger = tally_client::keyfile::generate_key();
    let mut left = n;
    while left > 0 {
        let round = left.min(200);
        left -= round;
        let pending: Vec<_> = (0..round)
            .map(|_| {
                let op = tally_codec::admin::AdminOp::ClusterRemove { node_id: 3 };
                let cmd = tally_client::client::sign_admin(&stranger, cluster, op);
                conn.send(tally_codec::wire::ClientMessage::Admin(cmd)).expect("send admin")
            })
            .collect();
        for p in pending {
            match p.wait(Duration::from_secs(10)).expect("reply") {
                tally_codec::wire::ServerMessage::Error(e) => {
                    assert_eq!(e.code, tally_codec::ErrorCode::NotAuthorized, "{e:?}")
                }
                other => panic!("a stranger's admin command was answered {other:?}"),
            }
        }
    }
}

/// Frames that do not decode, on a TLS connection of their own; the replies are drained.
fn bad_frame_flood(addr: &str, dial: &tally_net::Dial, n: usize) {
    let tcp = TcpStream::connect(addr).expect("connect");
    let stream = dial.open(tcp, Instant::now() + Duration::from_secs(5)).expect("TLS");
    let mut reader = stream.clone();
    let drain = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut got = 0usize;
        while got < n && matches!(tally_codec::wire::read_frame(&mut reader, &mut buf, 1 << 20), Ok(true)) {
            got += 1;
        }
        got
    });
    let mut w = std::io::BufWriter::new(stream.clone());
    for i in 0..n {
        tally_codec::wire::write_frame(&mut w, &[0xff; 16]).expect("write a bad frame");
        if i % 100 == 99 {
            w.flush().expect("flush");
            // The server allows 256 frames in flight per connection.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    w.flush().expect("flush");
    assert!(drain.join().expect("drain") >= n / 2, "the bad frames were not answered");
    stream.shutdown();
}

/// Connections to the peer port that send bytes that are no TLS handshake.
fn peer_port_junk(addr: &str, n: usize) {
    for _ in 0..n {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n");
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.read(&mut [0u8; 64]);
        }
    }
}

/// Thousands of refused admin commands, bad frames and junk on the peer port: the replica's log
/// grows by a bounded number of lines per kind (the rest counted in
/// `tally_log_suppressed_total`), not a line per attempt.
#[test]
fn an_attack_flood_writes_a_bounded_log() {
    let (_dir, layout) = init_cluster(3, 1);
    let nodes = start_all(&layout);
    let (leader, status) = wait_leader(&nodes, Duration::from_secs(20));
    let addr = layout.client_addrs()[leader].clone();
    let dial = layout.dial().expect("CA");
    std::thread::sleep(Duration::from_millis(500));
    let log_before = std::fs::metadata(&nodes[leader].log).map_or(0, |m| m.len());

    let admin_threads: Vec<_> = (0..4)
        .map(|_| {
            let (addr, dial) = (addr.clone(), dial.clone());
            std::thread::spawn(move || {
                let conn =
                    tally_client::Connection::connect_with(&addr, &dial, Duration::from_secs(5)).expect("connect");
                refused_admin_flood(&conn, status.cluster_id, 2_500);
            })
        })
        .collect();
    bad_frame_flood(&addr, &dial, 5_000);
    peer_port_junk(&layout.configs[leader].peer_listen, 300);
    for t in admin_threads {
        t.join().expect("admin flood");
    }
    std::thread::sleep(Duration::from_millis(500));

    let text = nodes[leader].log_text();
    let grown = text.len() as u64 - log_before;
    let attack_log = &text[log_before as usize..];
    let refused_lines = attack_log.lines().filter(|l| l.contains("admin command refused")).count();
    println!("the flood grew the log by {grown} bytes, {} lines", attack_log.lines().count());
    let metrics = layout.configs[leader].metrics_listen.clone().expect("metrics address");
    let (_, body) = http_get_within(&metrics, "/metrics", Duration::from_secs(2)).expect("metrics");
    let junk_suppressed = metric_value(&body, "tally_log_suppressed_total{kind=\"peer_tls\"}").unwrap_or(0.0);
    assert!(junk_suppressed >= 250.0, "junk on the peer port, suppressed lines: {junk_suppressed}\n{attack_log}");
    let suppressed = metric_value(&body, "tally_log_suppressed_total{kind=\"admin_refused\"}").unwrap_or(0.0);
    assert!(
        refused_lines <= tally_net::log_limit::LINES_PER_WINDOW_MAX as usize,
        "{refused_lines} lines for refused admin commands:\n{attack_log}"
    );
    assert!(suppressed >= 9_000.0, "suppressed admin lines counted: {suppressed}\n{body}");
    // Three kinds were hit (admin_refused, bad_frame, peer_tls); one more kind's worth is room
    // for the replica's own lines meanwhile.
    let bound = 4 * tally_net::log_limit::KIND_BYTES_PER_MIN_MAX as u64;
    assert!(grown < bound, "10,000 refused commands, 5,000 bad frames and 300 junk peers wrote {grown} bytes of log");
}

/// A captured admin command sent again within its validity: the replica that took it answers
/// `Duplicate` (before, a `ClusterRemove` was answered `Done` twice and an `AuditPage` served
/// twice). A fresh signature of the same operation is a new command and is taken.
#[test]
fn a_replayed_admin_command_is_refused_as_a_duplicate() {
    use tally_codec::admin::{AdminOp, AuditTable};
    use tally_codec::wire::{ClientMessage, ServerMessage};
    let (_dir, layout) = init_cluster(3, 1);
    let nodes = start_all(&layout);
    let (leader, status) = wait_leader(&nodes, Duration::from_secs(20));
    let admin = layout.admin_key().expect("admin key");
    let dial = layout.dial().expect("CA");
    let conn_to = |i: usize| {
        tally_client::Connection::connect_with(&layout.client_addrs()[i], &dial, Duration::from_secs(5))
            .expect("connect")
    };
    let is_duplicate =
        |m: &ServerMessage| matches!(m, ServerMessage::Error(e) if e.code == tally_codec::ErrorCode::Duplicate);

    // A membership command (a node that is not a member: the leader has nothing to do and says Done).
    let remove = tally_client::client::sign_admin(&admin, status.cluster_id, AdminOp::ClusterRemove { node_id: 9 });
    let leader_conn = conn_to(leader);
    let first = leader_conn.call(ClientMessage::Admin(remove.clone())).expect("first");
    assert_eq!(first, ServerMessage::Done);
    let again = leader_conn.call(ClientMessage::Admin(remove.clone())).expect("replay");
    assert!(is_duplicate(&again), "a replayed ClusterRemove was answered {again:?}");
    // From another connection too: the memory is the replica's, not the connection's.
    let again = conn_to(leader).call(ClientMessage::Admin(remove)).expect("replay");
    assert!(is_duplicate(&again), "a replayed ClusterRemove was answered {again:?}");

    // A scan page, on a follower.
    let follower = (leader + 1) % 3;
    let op = AdminOp::AuditPage { table: AuditTable::Accounts, after: None, limit: 10 };
    let page = tally_client::client::sign_admin(&admin, status.cluster_id, op.clone());
    let conn = conn_to(follower);
    let first = conn.call(ClientMessage::Admin(page.clone())).expect("page");
    assert!(matches!(first, ServerMessage::AuditPage(_)), "{first:?}");
    let again = conn.call(ClientMessage::Admin(page)).expect("replay");
    assert!(is_duplicate(&again), "a replayed AuditPage was answered {again:?}");
    let fresh = tally_client::client::sign_admin(&admin, status.cluster_id, op);
    let served = conn.call(ClientMessage::Admin(fresh)).expect("fresh page");
    assert!(matches!(served, ServerMessage::AuditPage(_)), "a freshly signed page: {served:?}");

    // The CLI signs each attempt afresh, so its own retries are never duplicates.
    let c = client(&layout, 0);
    c.cluster_remove(&admin, 9).expect("cluster remove of a non-member");
    c.cluster_remove(&admin, 9).expect("the same operation, signed again");
}
