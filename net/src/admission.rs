//! Admission control for a listening port: who may hold a connection, and who goes when it is
//! full.
//!
//! ```text
//!  accept ─▶ handshaking (≤ handshakes_max; when full the OLDEST handshake is cut: a slow drip
//!            │            loses its slot to a peer that completes in milliseconds)
//!            ▼ TLS and hello done
//!          established ─ a node of this cluster (mutual TLS): own pool, ≤ nodes_max
//!                      └ anyone else: ≤ connections_max in all, ≤ connections_per_ip_max per
//!                        address; when full, the least recently active connection that has been
//!                        idle for evict_idle_after_ms is cut, else the newcomer is refused
//! ```
//! Activity is a completed frame, not a byte: a slowloris that never finishes a frame is as idle
//! as a silent socket. Threads and memory per port are bounded by these numbers, and a flood of
//! one kind cannot take the slots of the cluster's own replicas.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The limits of one port. See the module docs for what each protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Connections still in the TLS or hello handshake.
    pub handshakes_max: usize,
    /// Established connections of clients (not replicas of this cluster).
    pub connections_max: usize,
    /// Established client connections from one IP address.
    pub connections_per_ip_max: usize,
    /// Established connections of authenticated replicas of this cluster.
    pub nodes_max: usize,
    /// A connection idle this long may be cut to make room for a newcomer.
    pub evict_idle_after_ms: u64,
}

impl AdmissionLimits {
    /// The client port's defaults. 1,024 connections is two threads each, ~2,050 threads at most
    /// (a few MB of resident stack); 256 per address lets a flood from one host fill a quarter.
    pub const CLIENT_PORT: AdmissionLimits = AdmissionLimits {
        handshakes_max: 256,
        connections_max: 1024,
        connections_per_ip_max: 256,
        nodes_max: 64,
        evict_idle_after_ms: 2_000,
    };
    /// The peer port: only replicas get past the handshake (mutual TLS), so the pools are small.
    pub const PEER_PORT: AdmissionLimits = AdmissionLimits {
        handshakes_max: 32,
        connections_max: 0,
        connections_per_ip_max: 0,
        nodes_max: 64,
        evict_idle_after_ms: 2_000,
    };
}

/// Why a connection was not admitted or was cut.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    #[error("too many connections (limit {limit}); retry later")]
    TooManyConnections { limit: usize },
    #[error("too many connections from {ip} (limit {limit}); retry later")]
    TooManyFromAddress { ip: IpAddr, limit: usize },
    #[error("too many replica connections (limit {limit})")]
    TooManyNodes { limit: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Handshake,
    Client,
    Node,
}

struct Entry {
    ip: IpAddr,
    stage: Stage,
    opened: Instant,
    last_active: Instant,
    sock: TcpStream,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    entries: HashMap<u64, Entry>,
    evicted_total: u64,
}

impl Table {
    fn count(&self, f: impl Fn(&Entry) -> bool) -> usize {
        self.entries.values().filter(|e| f(e)).count()
    }

    /// Cuts the entry that `pick` ranks lowest among those `eligible`; false when none is.
    fn evict(&mut self, eligible: impl Fn(&Entry) -> bool, rank: impl Fn(&Entry) -> Instant) -> bool {
        let victim = self.entries.iter().filter(|(_, e)| eligible(e)).min_by_key(|(_, e)| rank(e)).map(|(id, _)| *id);
        let Some(id) = victim else { return false };
        if let Some(e) = self.entries.remove(&id) {
            // Its thread sees the socket close and ends; its guard then finds the entry gone.
            let _ = e.sock.shutdown(Shutdown::Both);
            self.evicted_total += 1;
        }
        true
    }
}

/// One port's connection table.
pub struct Admission {
    limits: AdmissionLimits,
    table: Mutex<Table>,
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Arc<Admission> {
        Arc::new(Admission { limits, table: Mutex::new(Table::default()) })
    }

    pub fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    /// Registers a just-accepted socket as handshaking. When the handshake pool is full, the
    /// oldest handshake is cut to make room, so a slow drip can't hold the port.
    ///
    /// # Errors
    /// When the socket can't be cloned (out of descriptors).
    pub fn admit(self: &Arc<Self>, sock: &TcpStream) -> std::io::Result<Admitted> {
        let ip = sock.peer_addr()?.ip();
        let clone = sock.try_clone()?;
        let now = Instant::now();
        let mut t = self.table.lock();
        while t.count(|e| e.stage == Stage::Handshake) >= self.limits.handshakes_max.max(1) {
            if !t.evict(|e| e.stage == Stage::Handshake, |e| e.opened) {
                break;
            }
        }
        let id = t.next_id;
        t.next_id += 1;
        t.entries.insert(id, Entry { ip, stage: Stage::Handshake, opened: now, last_active: now, sock: clone });
        Ok(Admitted { table: self.clone(), id, ip })
    }

    /// Connections per stage: (handshaking, clients, nodes).
    pub fn counts(&self) -> (usize, usize, usize) {
        let t = self.table.lock();
        (
            t.count(|e| e.stage == Stage::Handshake),
            t.count(|e| e.stage == Stage::Client),
            t.count(|e| e.stage == Stage::Node),
        )
    }

    /// Connections cut to make room since the port opened.
    pub fn evicted_total(&self) -> u64 {
        self.table.lock().evicted_total
    }
}

/// A registered connection; dropping it frees its slot.
pub struct Admitted {
    table: Arc<Admission>,
    id: u64,
    ip: IpAddr,
}

impl Admitted {
    /// The handshake is done: moves the connection to its pool, `node` when the peer
    /// authenticated as a replica of this cluster.
    ///
    /// # Errors
    /// [`Refusal`] when the pool is full and nobody idle enough can be cut.
    pub fn establish(&self, node: bool) -> Result<(), Refusal> {
        let l = self.table.limits;
        let grace = Duration::from_millis(l.evict_idle_after_ms);
        let now = Instant::now();
        let mut t = self.table.table.lock();
        let me = self.id;
        let idle = move |e: &Entry| now.saturating_duration_since(e.last_active) >= grace;
        if node {
            if t.count(|e| e.stage == Stage::Node) >= l.nodes_max {
                return Err(Refusal::TooManyNodes { limit: l.nodes_max });
            }
        } else {
            let ip = self.ip;
            let from_ip = |e: &Entry| e.stage == Stage::Client && e.ip == ip;
            if t.count(from_ip) >= l.connections_per_ip_max
                && !t.evict(move |e| from_ip(e) && idle(e), |e| e.last_active)
            {
                return Err(Refusal::TooManyFromAddress { ip, limit: l.connections_per_ip_max });
            }
            let client = |e: &Entry| e.stage == Stage::Client;
            if t.count(client) >= l.connections_max && !t.evict(move |e| client(e) && idle(e), |e| e.last_active) {
                return Err(Refusal::TooManyConnections { limit: l.connections_max });
            }
        }
        match t.entries.get_mut(&me) {
            Some(e) => {
                e.stage = if node { Stage::Node } else { Stage::Client };
                e.last_active = now;
                Ok(())
            }
            // Cut while handshaking.
            None => Err(Refusal::TooManyConnections { limit: l.handshakes_max }),
        }
    }

    /// A frame completed on this connection.
    pub fn touch(&self) {
        if let Some(e) = self.table.table.lock().entries.get_mut(&self.id) {
            e.last_active = Instant::now();
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.table.table.lock().entries.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        (c, s)
    }

    fn limits(per_ip: usize, total: usize, grace_ms: u64) -> AdmissionLimits {
        AdmissionLimits {
            handshakes_max: 2,
            connections_max: total,
            connections_per_ip_max: per_ip,
            nodes_max: 1,
            evict_idle_after_ms: grace_ms,
        }
    }

    fn is_closed(c: &mut TcpStream) -> bool {
        c.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        let mut b = [0u8; 1];
        matches!(c.read(&mut b), Ok(0) | Err(_))
    }

    #[test]
    fn the_oldest_handshake_is_cut_when_the_pool_is_full() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = Admission::new(limits(8, 8, 0));
        let (mut c1, s1) = pair(&l);
        let (_c2, s2) = pair(&l);
        let (_c3, s3) = pair(&l);
        let g1 = a.admit(&s1).expect("admit");
        let _g2 = a.admit(&s2).expect("admit");
        let _g3 = a.admit(&s3).expect("admit");
        assert_eq!(a.counts().0, 2, "the pool stays at its limit");
        assert!(is_closed(&mut c1), "the first (oldest) handshake was cut");
        assert!(g1.establish(false).is_err(), "a cut connection can't establish");
        assert_eq!(a.evicted_total(), 1);
    }

    #[test]
    fn per_address_limit_refuses_when_nobody_is_idle_and_evicts_the_idlest_otherwise() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let busy = Admission::new(limits(2, 8, 60_000));
        let mut guards = Vec::new();
        let mut socks = Vec::new();
        for i in 0..3 {
            let (c, s) = pair(&l);
            let g = busy.admit(&s).expect("admit");
            let r = g.establish(false);
            if i < 2 {
                assert!(r.is_ok());
            } else {
                assert!(matches!(r, Err(Refusal::TooManyFromAddress { limit: 2, .. })), "{r:?}");
            }
            socks.push((c, s));
            guards.push(g);
        }

        let idle = Admission::new(limits(2, 8, 0));
        let (mut c1, s1) = pair(&l);
        let (mut c2, s2) = pair(&l);
        let (_c3, s3) = pair(&l);
        let (g1, g2) = (idle.admit(&s1).expect("a"), idle.admit(&s2).expect("a"));
        g1.establish(false).expect("one");
        g2.establish(false).expect("two");
        std::thread::sleep(Duration::from_millis(5));
        g1.touch(); // g1 just completed a frame; g2 is the idlest
        let g3 = idle.admit(&s3).expect("a");
        g3.establish(false).expect("room is made");
        assert!(is_closed(&mut c2), "the least recently active connection was cut");
        c1.set_read_timeout(Some(Duration::from_millis(100))).expect("t");
        let mut b = [0u8; 1];
        assert!(
            matches!(c1.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
            "the active one stays"
        );
    }

    #[test]
    fn replicas_have_their_own_pool() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = Admission::new(limits(1, 1, 60_000));
        let (_c1, s1) = pair(&l);
        let (_c2, s2) = pair(&l);
        let (_c3, s3) = pair(&l);
        let g1 = a.admit(&s1).expect("a");
        g1.establish(false).expect("client fills the client pool");
        let g2 = a.admit(&s2).expect("a");
        g2.establish(true).expect("a replica still gets in");
        let g3 = a.admit(&s3).expect("a");
        assert!(matches!(g3.establish(true), Err(Refusal::TooManyNodes { limit: 1 })));
        drop(g1);
        assert_eq!(a.counts(), (1, 0, 1));
    }
}
