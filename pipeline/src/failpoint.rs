//! Failpoints for tests of the real binaries: a broken invariant planted on purpose.
//!
//! Only in builds with debug assertions (what `cargo test` runs); release builds compile every
//! failpoint to nothing. A failpoint fires when the file named by `TALLY_FAILPOINT_DIR/<name>`
//! exists: the thread that reaches it first claims the file (rename) and panics. A test creates
//! the file when it wants the fault, so it hits whichever replica runs that code at that moment
//! (for `replica-thread`, the leader: it fires where the replica thread hands submissions to the core).

/// Panics if the test armed failpoint `name` (debug builds only).
#[cfg(debug_assertions)]
pub fn hit(name: &str) {
    static DIR: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let Some(dir) = DIR.get_or_init(|| std::env::var_os("TALLY_FAILPOINT_DIR").map(Into::into)) else { return };
    let armed = dir.join(name);
    let claimed = dir.join(format!("{name}.fired-{}", std::process::id()));
    if std::fs::rename(&armed, &claimed).is_ok() {
        panic!("failpoint {name} fired (planted by a test)");
    }
}

/// Release builds: no failpoints.
#[cfg(not(debug_assertions))]
pub fn hit(_name: &str) {}

/// True once, for the first thread of any replica that reaches it after a test armed failpoint
/// `name` (the file is claimed); for faults that are not panics (debug builds only).
#[cfg(debug_assertions)]
pub fn claim(name: &str) -> bool {
    let Some(dir) = std::env::var_os("TALLY_FAILPOINT_DIR").map(std::path::PathBuf::from) else { return false };
    let claimed = dir.join(format!("{name}.fired-{}", std::process::id()));
    std::fs::rename(dir.join(name), claimed).is_ok()
}

/// Release builds: no failpoints.
#[cfg(not(debug_assertions))]
pub fn claim(_name: &str) -> bool {
    false
}

/// Whether a test armed the behavioural failpoint `name` (a planted bug that stays on while its
/// file exists; debug builds only). The file is looked up once per process.
#[cfg(debug_assertions)]
pub fn enabled(name: &'static str) -> bool {
    static ARMED: parking_lot::Mutex<Vec<(&'static str, bool)>> = parking_lot::Mutex::new(Vec::new());
    let mut armed = ARMED.lock();
    if let Some((_, on)) = armed.iter().find(|(n, _)| *n == name) {
        return *on;
    }
    let on = std::env::var_os("TALLY_FAILPOINT_DIR").is_some_and(|d| std::path::Path::new(&d).join(name).exists());
    if on {
        tracing::error!(failpoint = name, "a planted bug is switched on in this replica (tests only)");
    }
    armed.push((name, on));
    on
}

/// Release builds: no failpoints.
#[cfg(not(debug_assertions))]
pub fn enabled(_name: &'static str) -> bool {
    false
}
