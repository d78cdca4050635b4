//! Failpoints for tests of the real binaries: a broken invariant planted on purpose.
//!
//! Only in builds with debug assertions (what `cargo test` runs); release builds compile every
//! failpoint to nothing. A failpoint fires when the file named by `TALLY_FAILPOINT_DIR/<name>`
//! exists: the thread that reaches it first claims the file (rename) and panics. A test creates
//! the file when it wants the fault, so it hits whichever replica runs that code at that moment
//! (for `sequencer`, the leader).

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
