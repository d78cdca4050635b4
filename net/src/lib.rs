//! The network edge shared by every tally link: TLS streams anchored in the cluster CA
//! ([`tls`]) and admission control that keeps floods from starving other clients
//! ([`admission`]), and rate-limited log lines for events an outsider can trigger
//! ([`log_limit`]).
#![forbid(unsafe_code)]

pub mod admission;
pub mod log_limit;
pub mod tls;

pub use admission::{Admission, AdmissionLimits, Admitted, Refusal};
pub use tls::{ClientAuth, Dial, Stream, TlsError, TlsFiles};
