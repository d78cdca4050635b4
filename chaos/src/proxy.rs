//! A fault-injecting TCP proxy for peer links: partitions without root or namespaces.
//!
//! Each replica's peers are configured to dial the proxy's listen address instead of the real
//! peer port; the proxy forwards bytes both ways unless its link is cut. Cutting closes live
//! connections and refuses new ones, which is what a partition looks like to Raft.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One forwarding link: `listen` → `target`.
pub struct Link {
    pub listen: String,
    cut: Arc<AtomicBool>,
    /// Added to every chunk forwarded (milliseconds).
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    live: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Link {
    /// Starts forwarding from `listen` to `target`.
    ///
    /// # Errors
    /// When `listen` can't be bound.
    pub fn start(listen: &str, target: &str) -> std::io::Result<Link> {
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let listen = listener.local_addr()?.to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (c, l, s, target, d) = (cut.clone(), live.clone(), stop.clone(), target.to_string(), delay_ms.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                let Ok((inbound, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                if c.load(Ordering::Acquire) {
                    let _ = inbound.shutdown(Shutdown::Both);
                    continue;
                }
                let _ = inbound.set_nonblocking(false);
                let Ok(outbound) = TcpStream::connect_timeout(
                    &target.parse().unwrap_or_else(|_| ([127, 0, 0, 1], 9).into()),
                    Duration::from_millis(500),
                ) else {
                    continue;
                };
                let pair = [inbound, outbound];
                if let Ok(mut g) = l.lock() {
                    for s in &pair {
                        if let Ok(c) = s.try_clone() {
                            g.push(c);
                        }
                    }
                }
                pump(&pair[0], &pair[1], d.clone());
                pump(&pair[1], &pair[0], d.clone());
            }
        });
        Ok(Link { listen, cut, delay_ms, live, stop })
    }

    /// Cuts the link: live connections close, new ones are refused.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        if let Ok(mut g) = self.live.lock() {
            for s in g.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// Heals a cut and removes any added delay.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::Release);
        self.delay_ms.store(0, Ordering::Release);
    }

    /// Delays every chunk forwarded from now on by `ms` (a slow or congested link).
    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::Release);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.cut();
    }
}

fn pump(from: &TcpStream, to: &TcpStream, delay_ms: Arc<std::sync::atomic::AtomicU64>) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else { return };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let d = delay_ms.load(Ordering::Acquire);
                    if d > 0 {
                        std::thread::sleep(Duration::from_millis(d));
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
