//! The data directory stays readable by stock LevelDB 1.23 (C++), read here through Debian's
//! python3-plyvel (which links libleveldb 1.23). `.ci/run` installs it; elsewhere the test says
//! it is skipped, and fails under CI if the library is missing.

use std::process::Command;
use tally_codec::WriteOp;
use tally_store::kv::{Kv, LevelKv};

const PY: &str = "/usr/bin/python3";

#[test]
fn stock_leveldb_reads_our_data_directory() {
    let have = Command::new(PY).args(["-c", "import plyvel"]).status().is_ok_and(|s| s.success());
    if !have {
        assert!(std::env::var_os("CI").is_none(), "CI must install python3-plyvel (C++ LevelDB 1.23)");
        eprintln!("skipped: python3-plyvel (C++ LevelDB 1.23) is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("state");
    let mut expected = Vec::new();
    {
        // A small memtable so the data lands in table files as well as the log.
        let mut kv = LevelKv::open_with_write_buffer(&path, 64 * 1024).expect("open");
        for batch in 0..20u32 {
            let ops: Vec<WriteOp> = (0..500u32)
                .map(|i| {
                    let key = format!("k{batch:03}-{i:05}").into_bytes();
                    let value = blake3::hash(&key).as_bytes().repeat(3);
                    expected.push((key.clone(), value.clone()));
                    WriteOp { key, value: Some(value) }
                })
                .collect();
            kv.write(&ops).expect("write");
        }
        kv.write(&[WriteOp { key: b"k000-00000".to_vec(), value: None }]).expect("delete");
        expected.retain(|(k, _)| k != b"k000-00000");
        kv.sync_all().expect("sync");
    }
    expected.sort();
    let mut digest = blake3::Hasher::new();
    for (k, v) in &expected {
        digest.update(&(k.len() as u32).to_le_bytes());
        digest.update(k);
        digest.update(&(v.len() as u32).to_le_bytes());
        digest.update(v);
    }
    let script = "import plyvel, sys\n\
                  db = plyvel.DB(sys.argv[1], create_if_missing=False)\n\
                  n = 0\n\
                  out = bytearray()\n\
                  for k, v in db:\n    \
                      out += len(k).to_bytes(4, 'little') + k + len(v).to_bytes(4, 'little') + v\n    \
                      n += 1\n\
                  sys.stdout.write(str(n) + ' ' + out.hex())\n";
    let o = Command::new(PY).args(["-c", script, path.to_str().expect("utf8")]).output().expect("python");
    assert!(o.status.success(), "stock LevelDB could not open the directory: {}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8(o.stdout).expect("utf8");
    let (n, hexbytes) = stdout.split_once(' ').expect("count and bytes");
    assert_eq!(n.parse::<usize>().expect("count"), expected.len(), "stock LevelDB sees a different number of keys");
    let bytes = hex::decode(hexbytes).expect("hex");
    assert_eq!(blake3::hash(&bytes), digest.finalize(), "stock LevelDB reads different keys or values");
}
