//! raft-rs logs through `slog`; this drain forwards its records to `tracing` (target `raft`),
//! with the key-value pairs appended to the message.

use std::fmt::Write as _;

/// An `slog` drain that writes to `tracing`.
pub struct TracingDrain;

/// Key-value text, cut at [`KV_TEXT_BYTES_MAX`]: raft-rs logs whole messages at debug level,
/// and the Debug text of a snapshot message is its data, byte by byte. Formatting stops at the
/// bound instead of rendering gigabytes (it held the raft thread for seconds, long enough for
/// an election).
struct KvText(String);

const KV_TEXT_BYTES_MAX: usize = 2048;

impl std::fmt::Write for KvText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = KV_TEXT_BYTES_MAX.saturating_sub(self.0.len());
        if s.len() <= room {
            self.0.push_str(s);
            return Ok(());
        }
        let mut cut = room;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        self.0.push_str(&s[..cut]);
        self.0.push('…');
        Err(std::fmt::Error)
    }
}

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        if self.0.len() < KV_TEXT_BYTES_MAX {
            let _ = write!(self, " {key}={val}");
        }
        Ok(())
    }
}

fn enabled(level: slog::Level) -> bool {
    match level {
        slog::Level::Critical | slog::Level::Error => tracing::enabled!(target: "raft", tracing::Level::ERROR),
        slog::Level::Warning => tracing::enabled!(target: "raft", tracing::Level::WARN),
        slog::Level::Info => tracing::enabled!(target: "raft", tracing::Level::INFO),
        slog::Level::Debug => tracing::enabled!(target: "raft", tracing::Level::DEBUG),
        slog::Level::Trace => tracing::enabled!(target: "raft", tracing::Level::TRACE),
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        // Nothing is formatted for a level nobody reads.
        if !enabled(record.level()) {
            return Ok(());
        }
        let mut kv = KvText(String::new());
        let _ = slog::KV::serialize(&record.kv(), record, &mut kv);
        let _ = slog::KV::serialize(values, record, &mut kv);
        let msg = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Debug => tracing::debug!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Trace => tracing::trace!(target: "raft", "{msg}{}", kv.0),
        }
        Ok(())
    }
}

/// A root logger for one raft node.
pub fn logger(node_id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!("raft_id" => node_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use slog::Serializer as _;

    #[test]
    fn huge_values_are_cut_not_rendered() {
        let mut kv = KvText(String::new());
        let big = vec![7u8; 10_000_000];
        kv.emit_arguments("msg", &format_args!("{big:?}")).expect("emit");
        assert!(kv.0.len() <= KV_TEXT_BYTES_MAX + '…'.len_utf8(), "{} bytes", kv.0.len());
        assert!(kv.0.starts_with(" msg=[7, 7"));
        kv.emit_arguments("more", &format_args!("x")).expect("emit");
        assert!(!kv.0.contains("more"), "nothing after the bound");
    }
}
