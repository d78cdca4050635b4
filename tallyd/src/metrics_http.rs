//! A minimal HTTP endpoint for Prometheus: `GET /metrics` returns the text exposition.

use metrics_exporter_prometheus::PrometheusHandle;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

/// Serves `/metrics` on `addr` from a background thread.
///
/// # Errors
/// When the address can't be bound.
pub fn serve(addr: &str, handle: PrometheusHandle) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
                let mut line = String::new();
                let Ok(read) = stream.try_clone() else { continue };
                let mut r = BufReader::new(read);
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let (status, body) = if line.starts_with("GET /metrics") {
                    ("200 OK", handle.render())
                } else {
                    ("404 Not Found", "try GET /metrics\n".to_string())
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}
