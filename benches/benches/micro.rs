//! Micro benchmarks of the per-request costs: codec, Merkle, signature checks, store writes and
//! batch apply. `cargo bench -p tally-benches` runs them all in a few minutes; add a filter to run
//! one group (`cargo bench -p tally-benches -- merkle`). Results and their comparison with the
//! reference figures (each operation's expected cost on an idle machine) are in benches/README.md.
//!
//! Each benchmark keeps its sample count and measurement time short: the point is a ratio to
//! the reference figures taken in one run, not a publication-grade distribution.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion, Throughput};
use ed25519_dalek::{Signature, Signer, VerifyingKey};
use std::hint::black_box;
use std::time::{Duration, Instant};
use tally_benches::{accounts, batch_entry, execute_transfers, ids, leaves, transfers, CLUSTER, NOW_MS};
use tally_codec::merkle::{verify_proof, Tree};
use tally_codec::{encode, SignedRequest, Tables};
use tally_store::{LogEntry, Store, Wal, WalOptions};

/// Requests in a stage-4 batch in these benchmarks (the reference figures are for 10k-leaf trees
/// and 10k-put WriteBatches).
const BATCH_REQUESTS: usize = 10_000;
/// Signatures per verify benchmark (the reference figures are for batches of 1024).
const VERIFY_SIGS: usize = 1024;
/// Accounts the fixture transfers move money between; also the write-set size of a batch.
const ACCOUNTS: usize = 4096;

fn quick<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));
    g
}

fn codec(c: &mut Criterion) {
    let keys = accounts(ACCOUNTS);
    let one = transfers(&keys, 1).remove(0);
    let bytes = one.encode();
    let entry = batch_entry(transfers(&keys, BATCH_REQUESTS));

    let mut g = quick(c, "codec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_transfer", |b| b.iter(|| black_box(&one).encode()));
    g.bench_function("decode_transfer", |b| {
        b.iter(|| SignedRequest::decode(black_box(&bytes)).expect("fixture decodes"))
    });
    g.throughput(Throughput::Elements(BATCH_REQUESTS as u64));
    g.bench_function("encode_batch_entry_10k", |b| b.iter(|| encode(black_box(&entry))));
    g.finish();
}

fn merkle(c: &mut Criterion) {
    let keys = accounts(ACCOUNTS);
    let requests = transfers(&keys, BATCH_REQUESTS);
    let request_ids = ids(&requests);
    let (outcomes, _) = execute_transfers(&requests, NOW_MS);
    let leaf_hashes = leaves(&request_ids, &outcomes);
    let tree = Tree::from_leaves(&leaf_hashes);
    let root = tree.root();
    let index = BATCH_REQUESTS / 3;
    let proof = tree.proof(index);

    let mut g = quick(c, "merkle");
    g.throughput(Throughput::Elements(BATCH_REQUESTS as u64));
    g.bench_function("hash_and_build_10k", |b| {
        b.iter(|| Tree::from_leaves(&leaves(black_box(&request_ids), black_box(&outcomes))).root())
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("proof_make", |b| b.iter(|| tree.proof(black_box(index))));
    g.bench_function("proof_verify", |b| {
        b.iter(|| {
            assert!(verify_proof(&root, black_box(index), leaf_hashes[index], BATCH_REQUESTS, black_box(&proof)));
        })
    });
    g.finish();
}

fn verify(c: &mut Criterion) {
    let keys = accounts(ACCOUNTS);
    let requests = transfers(&keys, VERIFY_SIGS);
    let msgs: Vec<Vec<u8>> = requests.iter().map(|r| r.request.signing_bytes()).collect();
    let msg_refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
    let sigs: Vec<Signature> = requests.iter().map(|r| Signature::from_bytes(&r.signature.0)).collect();
    let vks: Vec<VerifyingKey> =
        requests.iter().map(|r| VerifyingKey::from_bytes(&r.request.signer.0).expect("fixture key")).collect();
    let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("rayon pool");
    let threads_default = rayon::current_num_threads();

    let mut g = quick(c, "verify");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign_1_thread", |b| b.iter(|| keys[0].sign(black_box(&msgs[0]))));
    g.throughput(Throughput::Elements(VERIFY_SIGS as u64));
    g.bench_function("verify_batch_1024_1_thread", |b| {
        b.iter(|| ed25519_dalek::verify_batch(black_box(&msg_refs), &sigs, &vks).expect("fixture sigs verify"))
    });
    g.bench_function("verify_strict_1024_1_thread", |b| {
        b.iter(|| {
            for ((m, s), k) in msg_refs.iter().zip(&sigs).zip(&vks) {
                k.verify_strict(black_box(m), s).expect("fixture sig verifies");
            }
        })
    });
    let run = |pool: Option<&rayon::ThreadPool>, reqs: Vec<SignedRequest>| {
        let go = || tally_pipeline::validate::validate_all(reqs, &CLUSTER, NOW_MS);
        let results = match pool {
            Some(p) => p.install(go),
            None => go(),
        };
        assert!(results.iter().all(Result::is_ok), "fixture requests are valid");
        results
    };
    g.bench_function("validate_all_1024_1_thread", |b| {
        b.iter_batched(|| requests.clone(), |reqs| run(Some(&one_thread), reqs), BatchSize::SmallInput)
    });
    g.bench_function(format!("validate_all_1024_rayon_default_{threads_default}_threads"), |b| {
        b.iter_batched(|| requests.clone(), |reqs| run(None, reqs), BatchSize::SmallInput)
    });
    g.finish();
}

fn store(c: &mut Criterion) {
    let keys = accounts(ACCOUNTS);
    let mut entry = batch_entry(transfers(&keys, BATCH_REQUESTS));
    let signature = tally_codec::Signature([9; 64]);

    let mut g = quick(c, "store");
    g.throughput(Throughput::Elements(BATCH_REQUESTS as u64));
    g.bench_function("apply_batch_10k_transfers_leveldb", |b| {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open store");
        let genesis: Vec<_> = keys
            .iter()
            .map(|k| (tally_codec::PublicKey(k.verifying_key().to_bytes()), tally_benches::BALANCE))
            .collect();
        store.init_genesis(&genesis).expect("genesis");
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Chain the next batch onto the store's tip (untimed): the store checks the chain.
                let applied = store.applied();
                entry.header.height = applied.height + 1;
                entry.header.prev_hash = applied.header_hash;
                let start = Instant::now();
                store.apply_batch(applied.index + 1, &entry, &signature).expect("apply");
                total += start.elapsed();
            }
            total
        });
    });

    const ENTRY_BYTES: usize = 1 << 20;
    /// Entries kept before the log is compacted (untimed), so the bench's disk use is bounded.
    const WAL_ENTRIES_KEPT_MAX: u64 = 128;
    g.throughput(Throughput::Bytes(ENTRY_BYTES as u64));
    g.bench_function("wal_append_sync_1MiB", |b| {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::open(dir.path(), WalOptions::default()).expect("open wal");
        let mut log_entry = LogEntry { index: 0, term: 1, data: vec![0xa5; ENTRY_BYTES] };
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let last = wal.last_index();
                if last >= wal.first_index() + WAL_ENTRIES_KEPT_MAX {
                    wal.compact_to(last, 1).expect("compact");
                }
                log_entry.index = last + 1;
                let start = Instant::now();
                wal.append(std::slice::from_ref(&log_entry)).expect("append");
                wal.sync().expect("sync");
                total += start.elapsed();
            }
            total
        });
    });
    g.finish();
}

fn apply(c: &mut Criterion) {
    let keys = accounts(ACCOUNTS);
    let requests = transfers(&keys, BATCH_REQUESTS);
    let (_, writes) = execute_transfers(&requests, NOW_MS);
    let tables = Tables::v1();

    let mut g = quick(c, "apply");
    g.throughput(Throughput::Elements(BATCH_REQUESTS as u64));
    g.bench_function("execute_10k_transfers", |b| b.iter(|| execute_transfers(black_box(&requests), NOW_MS)));
    g.throughput(Throughput::Elements(writes.accounts.len() as u64));
    g.bench_function(format!("to_write_set_{}_accounts", writes.accounts.len()), |b| {
        b.iter(|| black_box(&writes).to_write_set(&tables))
    });
    g.finish();
}

criterion_group!(benches, codec, merkle, verify, store, apply);
criterion_main!(benches);
