//! TLS for every tally link: mutual TLS between replicas, server-authenticated TLS for clients,
//! both anchored in one private CA per cluster.
//!
//! ```text
//!  cluster CA (ca.pem, ca.key: made by `tally cluster init`, kept by the admin)
//!     └── node-N cert  SANs: node-N.tally   (its identity on peer links)
//!                            cluster.tally  (what clients check: "a replica of this cluster")
//!                            its client and peer hosts (for openssl s_client and browsers)
//!
//!  peer link    A ──TLS 1.3, both sides present node certs──▶ B    B checks "node-<claimed id>.tally"
//!  client link  client ──TLS, server cert checked against the CA──▶ replica
//!               (a follower relaying to the leader presents its node cert; the leader then
//!                counts it as a peer, not against the anonymous connection limits)
//! ```
//!
//! [`Stream`] wraps a TCP socket, plain or TLS, into one handle that a reader thread and a writer
//! thread can share: the TLS state sits behind a mutex held only for in-memory work, never
//! across socket I/O, and one write lock keeps encrypted records in order on the wire.

use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The name every replica's certificate carries; clients check servers against it.
pub const CLUSTER_SERVER_NAME: &str = "cluster.tally";
/// Common name of a cluster CA. Fixed, so the CA can re-issue from its key alone.
const CA_COMMON_NAME: &str = "tally cluster CA";
/// Bytes read from the socket at once while a TLS stream needs more records.
const TLS_READ_CHUNK_BYTES: usize = 64 * 1024;
/// First byte of every TLS record carrying a handshake (a ClientHello starts with it).
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A node's identity name on peer links.
pub fn node_server_name(node_id: u64) -> String {
    format!("node-{node_id}.tally")
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("{path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("certificate generation: {0}")]
    Generate(String),
}

/// The three files a replica needs: the cluster CA and its own certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
///
/// # Errors
/// [`TlsError::File`] or [`TlsError::Pem`] naming the file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::File { path: path.into(), source })?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    let certs = certs.map_err(|e| TlsError::Pem { path: path.into(), what: format!("bad PEM: {e:?}") })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.into(), what: "no certificate in the file".into() });
    }
    Ok(certs)
}

/// Reads the private key of a PEM file.
///
/// # Errors
/// [`TlsError::File`] or [`TlsError::Pem`] naming the file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::File { path: path.into(), source })?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| TlsError::Pem { path: path.into(), what: format!("no usable private key: {e:?}") })
}

/// A root store holding the cluster CA alone.
///
/// # Errors
/// When the file can't be read or holds no usable CA certificate.
pub fn ca_roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| TlsError::Pem { path: ca.into(), what: format!("not a CA certificate: {e}") })?;
    }
    Ok(Arc::new(roots))
}

/// Who may connect to a server port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Peer port: a node certificate from the cluster CA is required.
    Required,
    /// Client port: anyone, but a node certificate (a relaying follower) is checked and noted.
    Optional,
}

/// The server side of a replica's port.
///
/// # Errors
/// Unreadable files or a key that does not match the certificate.
pub fn server_config(files: &TlsFiles, auth: ClientAuth) -> Result<Arc<ServerConfig>, TlsError> {
    let roots = ca_roots(&files.ca)?;
    let builder = WebPkiClientVerifier::builder_with_provider(roots, provider());
    let builder = if auth == ClientAuth::Optional { builder.allow_unauthenticated() } else { builder };
    let verifier = builder.build().map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| TlsError::Config(format!("{}: {e}", files.cert.display())))?;
    Ok(Arc::new(cfg))
}

/// The client side: trusts the cluster CA only; presents `identity` (a node's cert and key)
/// when given.
///
/// # Errors
/// Unreadable files or a key that does not match the certificate.
pub fn client_config(ca: &Path, identity: Option<&TlsFiles>) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = ca_roots(ca)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let cfg = match identity {
        Some(f) => builder
            .with_client_auth_cert(load_certs(&f.cert)?, load_key(&f.key)?)
            .map_err(|e| TlsError::Config(format!("{}: {e}", f.cert.display())))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// PEM text of a certificate and its private key.
#[derive(Debug, Clone)]
pub struct CertPem {
    pub cert: String,
    pub key: String,
}

fn ca_params() -> Result<rcgen::CertificateParams, TlsError> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| TlsError::Generate(e.to_string()))?;
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.distinguished_name.push(rcgen::DnType::CommonName, CA_COMMON_NAME);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    Ok(p)
}

/// A new cluster CA.
///
/// # Errors
/// When key generation fails.
pub fn generate_ca() -> Result<CertPem, TlsError> {
    let key = rcgen::KeyPair::generate().map_err(|e| TlsError::Generate(e.to_string()))?;
    let cert = ca_params()?.self_signed(&key).map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok(CertPem { cert: cert.pem(), key: key.serialize_pem() })
}

/// Issues node `node_id`'s certificate from the CA's key. `hosts` are the host parts of its
/// addresses (IPs or DNS names), added as extra names for tools such as `openssl s_client`.
///
/// # Errors
/// A CA key that does not parse, or a host that is not a valid name.
pub fn issue_node_cert(ca_key_pem: &str, node_id: u64, hosts: &[String]) -> Result<CertPem, TlsError> {
    let ca_key = rcgen::KeyPair::from_pem(ca_key_pem).map_err(|e| TlsError::Generate(format!("CA key: {e}")))?;
    // Re-made from the same name and key: what a verifier compares (issuer name, signature) is
    // identical to the stored CA certificate.
    let ca = ca_params()?.self_signed(&ca_key).map_err(|e| TlsError::Generate(e.to_string()))?;
    let mut names = vec![node_server_name(node_id), CLUSTER_SERVER_NAME.to_string()];
    for h in hosts {
        if !h.is_empty() && !names.contains(h) {
            names.push(h.clone());
        }
    }
    let mut p = rcgen::CertificateParams::new(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    p.distinguished_name.push(rcgen::DnType::CommonName, node_server_name(node_id));
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().map_err(|e| TlsError::Generate(e.to_string()))?;
    let cert = p.signed_by(&key, &ca, &ca_key).map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok(CertPem { cert: cert.pem(), key: key.serialize_pem() })
}

/// Whether `cert` (already verified against the cluster CA by the handshake) names node
/// `node_id`.
pub fn cert_names_node(cert: &CertificateDer<'_>, node_id: u64) -> bool {
    let Ok(parsed) = rustls::server::ParsedCertificate::try_from(cert) else { return false };
    let Ok(name) = ServerName::try_from(node_server_name(node_id)) else { return false };
    rustls::client::verify_server_name(&parsed, &name).is_ok()
}

/// The host part of `HOST:PORT` (brackets of an IPv6 literal removed).
pub fn host_of(addr: &str) -> String {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']').to_string()
}

/// How a client reaches a replica's client port.
#[derive(Clone)]
pub enum Dial {
    /// No TLS: only for the loopback quick start or an explicit `--insecure-plaintext`.
    Plain,
    /// TLS, checking the server's certificate for `server_name` against the cluster CA.
    Tls { config: Arc<ClientConfig>, server_name: String },
}

impl std::fmt::Debug for Dial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dial::Plain => f.write_str("Dial::Plain"),
            Dial::Tls { server_name, .. } => write!(f, "Dial::Tls({server_name})"),
        }
    }
}

impl Dial {
    /// TLS to any replica of the cluster whose CA is in `ca` (what clients use).
    ///
    /// # Errors
    /// An unreadable CA file.
    pub fn cluster(ca: &Path) -> Result<Dial, TlsError> {
        Ok(Dial::Tls { config: client_config(ca, None)?, server_name: CLUSTER_SERVER_NAME.into() })
    }

    /// TLS as node `files` (a follower relaying to the leader presents its certificate).
    ///
    /// # Errors
    /// Unreadable files.
    pub fn as_node(files: &TlsFiles) -> Result<Dial, TlsError> {
        Ok(Dial::Tls { config: client_config(&files.ca, Some(files))?, server_name: CLUSTER_SERVER_NAME.into() })
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Dial::Tls { .. })
    }

    /// Wraps a connected socket, finishing any handshake by `deadline`.
    ///
    /// # Errors
    /// A failed or late handshake; a server that is not of this cluster.
    pub fn open(&self, sock: TcpStream, deadline: Instant) -> io::Result<Stream> {
        match self {
            Dial::Plain => Ok(Stream::plain(sock)),
            Dial::Tls { config, server_name } => Stream::connect(sock, config.clone(), server_name, deadline),
        }
    }
}

/// Whether `addr` (`HOST:PORT`) is a loopback address: the only place plaintext is allowed
/// without an explicit opt-in (the single-replica quick start).
pub fn is_loopback(addr: &str) -> bool {
    let host = host_of(addr);
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[allow(clippy::large_enum_variant)] // one per connection, behind an Arc
enum Inner {
    Plain(TcpStream),
    Tls {
        sock: TcpStream,
        conn: Mutex<rustls::Connection>,
        write_lock: Mutex<()>,
        /// Bytes read from the socket that rustls has not taken yet (it takes at most what its
        /// buffers hold; the rest must wait here, never be dropped).
        incoming: Mutex<Vec<u8>>,
    },
}

/// One connection, plain or TLS, shareable between a reader and a writer thread (clone it).
#[derive(Clone)]
pub struct Stream(Arc<Inner>);

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_tls() { "Stream(tls)" } else { "Stream(plain)" })
    }
}

impl Stream {
    pub fn plain(sock: TcpStream) -> Stream {
        Stream(Arc::new(Inner::Plain(sock)))
    }

    /// Accepts a TLS client on `sock`, finishing the handshake by `deadline` whatever pace the
    /// peer sends at (a slow drip is cut off at the deadline).
    ///
    /// # Errors
    /// A failed or late handshake.
    pub fn accept(sock: TcpStream, cfg: Arc<ServerConfig>, deadline: Instant) -> io::Result<Stream> {
        let conn = rustls::ServerConnection::new(cfg).map_err(io::Error::other)?;
        Self::handshake(sock, rustls::Connection::Server(conn), deadline)
    }

    /// Connects as a TLS client, checking the server's certificate for `server_name`.
    ///
    /// # Errors
    /// A failed or late handshake, or a server without a valid certificate for the name.
    pub fn connect(
        sock: TcpStream,
        cfg: Arc<ClientConfig>,
        server_name: &str,
        deadline: Instant,
    ) -> io::Result<Stream> {
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let conn = rustls::ClientConnection::new(cfg, name).map_err(io::Error::other)?;
        Self::handshake(sock, rustls::Connection::Client(conn), deadline)
    }

    fn handshake(sock: TcpStream, mut conn: rustls::Connection, deadline: Instant) -> io::Result<Stream> {
        let saved = sock.read_timeout()?;
        let mut s = &sock;
        while conn.is_handshaking() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake took too long"));
            }
            sock.set_read_timeout(Some(left.min(Duration::from_millis(500))))?;
            sock.set_write_timeout(Some(left.max(Duration::from_millis(10))))?;
            match conn.complete_io(&mut s) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e),
            }
        }
        // Flush what the handshake left (TLS 1.3 session tickets).
        while conn.wants_write() {
            conn.write_tls(&mut s)?;
        }
        sock.set_read_timeout(saved)?;
        Ok(Stream(Arc::new(Inner::Tls {
            sock,
            conn: Mutex::new(conn),
            write_lock: Mutex::new(()),
            incoming: Mutex::new(Vec::new()),
        })))
    }

    pub fn is_tls(&self) -> bool {
        matches!(*self.0, Inner::Tls { .. })
    }

    /// The socket underneath, for timeouts and addresses.
    pub fn tcp(&self) -> &TcpStream {
        match &*self.0 {
            Inner::Plain(s) | Inner::Tls { sock: s, .. } => s,
        }
    }

    /// The certificate the peer presented, if any (already verified against the CA).
    pub fn peer_certificate(&self) -> Option<CertificateDer<'static>> {
        match &*self.0 {
            Inner::Plain(_) => None,
            Inner::Tls { conn, .. } => conn.lock().peer_certificates().and_then(|c| c.first().cloned()),
        }
    }

    /// Whether the peer authenticated as node `node_id` with a certificate of the cluster CA.
    pub fn peer_is_node(&self, node_id: u64) -> bool {
        self.peer_certificate().is_some_and(|c| cert_names_node(&c, node_id))
    }

    /// Whether the peer presented any node certificate of the cluster CA.
    pub fn peer_is_cluster_node(&self) -> bool {
        self.peer_certificate().is_some()
    }

    pub fn shutdown(&self) {
        if let Inner::Tls { conn, .. } = &*self.0 {
            conn.lock().send_close_notify();
            let _ = self.flush_tls();
        }
        let _ = self.tcp().shutdown(Shutdown::Both);
    }

    /// Sends every pending encrypted record, in order.
    fn flush_tls(&self) -> io::Result<()> {
        let Inner::Tls { sock, conn, write_lock, .. } = &*self.0 else { return Ok(()) };
        let _order = write_lock.lock();
        loop {
            let mut out = Vec::new();
            {
                let mut c = conn.lock();
                while c.wants_write() {
                    c.write_tls(&mut out)?;
                }
            }
            if out.is_empty() {
                return Ok(());
            }
            (&*sock).write_all(&out)?;
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (sock, conn, incoming) = match &*self.0 {
            Inner::Plain(s) => return (&*s).read(buf),
            Inner::Tls { sock, conn, incoming, .. } => (sock, conn, incoming),
        };
        let mut eof = false;
        loop {
            let wants_write = {
                let mut c = conn.lock();
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                let mut pending = incoming.lock();
                if pending.is_empty() && !eof {
                    None
                } else {
                    // Feed what rustls will take now; keep the rest for the next round.
                    let mut rest: &[u8] = &pending;
                    let taken = c.read_tls(&mut rest)?;
                    pending.drain(..taken);
                    let processed = c.process_new_packets();
                    let wants = c.wants_write();
                    if let Err(e) = processed {
                        drop(c);
                        let _ = self.flush_tls(); // the alert, so the peer learns why
                        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")));
                    }
                    if eof && pending.is_empty() {
                        // End of stream: the reader now reports a clean close or a truncation.
                        return c.reader().read(buf);
                    }
                    Some(wants)
                }
            };
            match wants_write {
                Some(true) => self.flush_tls()?,
                Some(false) => {}
                None => {
                    // Only this reader touches `incoming`, so it may hold it across the read; the
                    // buffer's capacity is reused from read to read.
                    let mut pending = incoming.lock();
                    let have = pending.len();
                    pending.resize(have + TLS_READ_CHUNK_BYTES, 0);
                    let read = (&*sock).read(&mut pending[have..]);
                    pending.truncate(have + *read.as_ref().unwrap_or(&0));
                    if read? == 0 {
                        eof = true;
                        drop(pending);
                        let _ = conn.lock().read_tls(&mut &[][..]);
                    }
                }
            }
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &*self.0 {
            Inner::Plain(s) => (&*s).write(buf),
            Inner::Tls { conn, .. } => {
                let n = conn.lock().writer().write(buf)?;
                self.flush_tls()?;
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &*self.0 {
            Inner::Plain(s) => (&*s).flush(),
            Inner::Tls { .. } => self.flush_tls(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    struct Pki {
        _dir: tempfile::TempDir,
        ca: PathBuf,
        nodes: Vec<TlsFiles>,
    }

    /// A CA and node certs 1..=n; `stranger` is a node 1 cert from another CA.
    fn pki(n: u64) -> (Pki, TlsFiles) {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = generate_ca().expect("ca");
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, &ca.cert).expect("write");
        let mut nodes = Vec::new();
        for id in 1..=n {
            let c = issue_node_cert(&ca.key, id, &["127.0.0.1".into()]).expect("issue");
            let (cert, key) = (dir.path().join(format!("n{id}.pem")), dir.path().join(format!("n{id}.key")));
            std::fs::write(&cert, c.cert).expect("write");
            std::fs::write(&key, c.key).expect("write");
            nodes.push(TlsFiles { ca: ca_path.clone(), cert, key });
        }
        let other = generate_ca().expect("ca2");
        let s = issue_node_cert(&other.key, 1, &[]).expect("issue");
        let (cert, key) = (dir.path().join("s.pem"), dir.path().join("s.key"));
        std::fs::write(&cert, s.cert).expect("write");
        std::fs::write(&key, s.key).expect("write");
        let stranger = TlsFiles { ca: dir.path().join("s-ca.pem"), cert, key };
        std::fs::write(&stranger.ca, other.cert).expect("write");
        (Pki { _dir: dir, ca: ca_path, nodes }, stranger)
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// Runs one accept on a thread; returns the server's result once the client is done.
    fn serve_once(cfg: Arc<ServerConfig>) -> (String, std::thread::JoinHandle<io::Result<Stream>>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            let mut st = Stream::accept(s, cfg, deadline())?;
            let mut buf = [0u8; 5];
            st.read_exact(&mut buf)?;
            st.write_all(&buf)?;
            st.flush()?;
            Ok(st)
        });
        (addr, t)
    }

    #[test]
    fn mutual_tls_round_trip_and_identity() {
        let (pki, _) = pki(2);
        let server = server_config(&pki.nodes[1], ClientAuth::Required).expect("server");
        let (addr, t) = serve_once(server);
        let client = client_config(&pki.ca, Some(&pki.nodes[0])).expect("client");
        let mut c = Stream::connect(TcpStream::connect(&addr).expect("tcp"), client, &node_server_name(2), deadline())
            .expect("handshake");
        c.write_all(b"hello").expect("write");
        c.flush().expect("flush");
        let mut back = [0u8; 5];
        c.read_exact(&mut back).expect("read");
        assert_eq!(&back, b"hello");
        let s = t.join().expect("join").expect("server side");
        assert!(s.peer_is_node(1), "the server sees node 1's identity");
        assert!(!s.peer_is_node(2), "and not another node's");
        assert!(c.peer_is_node(2));
    }

    #[test]
    fn a_stranger_without_a_cluster_cert_is_refused_by_the_peer_port() {
        let (pki, stranger) = pki(2);
        let server = server_config(&pki.nodes[1], ClientAuth::Required).expect("server");
        // No client certificate at all.
        let (addr, t) = serve_once(server.clone());
        let anon = client_config(&pki.ca, None).expect("client");
        let c = Stream::connect(TcpStream::connect(&addr).expect("tcp"), anon, &node_server_name(2), deadline());
        if let Ok(mut c) = c {
            // TLS 1.3: the client may finish first; the server's refusal arrives on first use.
            let _ = c.write_all(b"hello").and_then(|()| c.flush());
            let mut b = [0u8; 5];
            assert!(c.read_exact(&mut b).is_err());
        }
        assert!(t.join().expect("join").is_err(), "server refuses a client without a certificate");
        // A certificate from another CA.
        let (addr, t) = serve_once(server);
        let other = client_config(&pki.ca, Some(&stranger)).expect("client");
        let c = Stream::connect(TcpStream::connect(&addr).expect("tcp"), other, &node_server_name(2), deadline());
        if let Ok(mut c) = c {
            let _ = c.write_all(b"hello").and_then(|()| c.flush());
            let mut b = [0u8; 5];
            assert!(c.read_exact(&mut b).is_err());
        }
        assert!(t.join().expect("join").is_err(), "server refuses a certificate from another CA");
    }

    #[test]
    fn client_refuses_a_server_of_another_cluster_or_the_wrong_node() {
        let (pki, stranger) = pki(2);
        let client = client_config(&pki.ca, None).expect("client");
        let foreign = server_config(&stranger, ClientAuth::Optional).expect("server");
        let (addr, _t) = serve_once(foreign);
        let r =
            Stream::connect(TcpStream::connect(&addr).expect("tcp"), client.clone(), CLUSTER_SERVER_NAME, deadline());
        assert!(r.is_err(), "a server with a certificate of another CA is refused");
        // Node 1's certificate does not pass for node 2.
        let n1 = server_config(&pki.nodes[0], ClientAuth::Optional).expect("server");
        let (addr, _t) = serve_once(n1);
        let r = Stream::connect(TcpStream::connect(&addr).expect("tcp"), client, &node_server_name(2), deadline());
        assert!(r.is_err(), "node 1 cannot pose as node 2");
    }

    #[test]
    fn a_slow_handshake_is_cut_at_the_deadline() {
        let (pki, _) = pki(1);
        let server = server_config(&pki.nodes[0], ClientAuth::Optional).expect("server");
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            let started = Instant::now();
            let r = Stream::accept(s, server, Instant::now() + Duration::from_millis(800));
            (r.is_err(), started.elapsed())
        });
        let mut c = TcpStream::connect(addr).expect("tcp");
        for _ in 0..20 {
            if c.write_all(&[TLS_HANDSHAKE_RECORD]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let (failed, took) = t.join().expect("join");
        assert!(failed);
        assert!(took < Duration::from_millis(1_500), "cut at the deadline, took {took:?}");
    }

    /// Regression: a socket read can hold more than rustls takes at once; none of it may be lost.
    #[test]
    fn megabytes_cross_intact_in_both_directions() {
        let (pki, _) = pki(2);
        let server = server_config(&pki.nodes[1], ClientAuth::Optional).expect("server");
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let expect = data.clone();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            let mut st = Stream::accept(s, server, deadline()).expect("accept tls");
            let mut got = vec![0u8; expect.len()];
            st.read_exact(&mut got).expect("read all");
            assert!(got == expect, "bytes arrived intact");
            st.write_all(&got).expect("echo");
            st.flush().expect("flush");
        });
        let client = client_config(&pki.ca, None).expect("client");
        let mut c = Stream::connect(TcpStream::connect(addr).expect("tcp"), client, CLUSTER_SERVER_NAME, deadline())
            .expect("handshake");
        let writer = c.clone();
        let data2 = data.clone();
        let w = std::thread::spawn(move || {
            let mut w = writer;
            w.write_all(&data2).expect("write");
            w.flush().expect("flush");
        });
        let mut back = vec![0u8; data.len()];
        c.read_exact(&mut back).expect("read echo");
        assert!(back == data);
        w.join().expect("writer");
        t.join().expect("server");
    }

    #[test]
    fn host_of_strips_port_and_brackets() {
        assert!(is_loopback("127.0.0.1:7001") && is_loopback("[::1]:1") && is_loopback("localhost:1"));
        assert!(!is_loopback("10.0.0.1:7001") && !is_loopback("node1:7001"));
        assert_eq!(host_of("127.0.0.1:7001"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7001"), "::1");
        assert_eq!(host_of("node1:7001"), "node1");
    }
}
