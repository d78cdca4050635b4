//! rusty-leveldb after a torn log tail (what kill -9 leaves, since it buffers its log in user
//! space): writes made after recovery must survive the next reopen.

use tally_codec::WriteOp;
use tally_store::kv::{Kv, LevelKv};

fn put(kv: &mut LevelKv, i: u32) {
    kv.write(&[WriteOp { key: format!("k{i:06}").into_bytes(), value: Some(vec![7u8; 100]) }]).expect("write");
}

#[test]
fn writes_after_recovering_a_torn_log_survive_reopen() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("db");
    {
        let mut kv = LevelKv::open(&path).expect("open");
        for i in 0..1000 {
            put(&mut kv, i);
        }
        kv.sync_all().expect("sync");
    }
    // Tear the tail of the newest log file, as a crash mid-write would.
    let mut logs: Vec<_> = std::fs::read_dir(&path)
        .expect("ls")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    let log = logs.last().expect("a log file").clone();
    let len = std::fs::metadata(&log).expect("meta").len();
    let f = std::fs::OpenOptions::new().write(true).open(&log).expect("open log");
    f.set_len(len - 37).expect("truncate");
    drop(f);
    {
        let mut kv = LevelKv::open(&path).expect("reopen after tear");
        for i in 1000..2000 {
            put(&mut kv, i);
        }
        kv.sync_all().expect("sync");
    }
    let kv = LevelKv::open(&path).expect("reopen");
    let missing: Vec<u32> =
        (1000..2000).filter(|i| kv.get(format!("k{i:06}").as_bytes()).expect("get").is_none()).collect();
    assert!(missing.is_empty(), "{} writes made after recovery were lost, first {:?}", missing.len(), missing.first());
}
