//! kill -9 of a real `tallyd` in the middle of a stream of writes, twice: every acknowledged
//! request survives exactly once with the result it was acknowledged with, and receipts issued
//! before the crash still verify.

mod common;

use common::*;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tally_client::{Client, ClientOptions};
use tally_codec::wire::SubmitReply;
use tally_codec::{Operation, PublicKey, Receipt, RequestId};

fn writer(client: Client, acked: Arc<Mutex<HashMap<RequestId, Receipt>>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        let reqs: Vec<_> = (0..64)
            .map(|_| {
                let to = PublicKey(tally_client::keyfile::generate_key().verifying_key().to_bytes());
                client.sign(Operation::Transfer { to, amount: 1 }).expect("sign")
            })
            .collect();
        let Ok(replies) = client.submit(reqs) else { continue };
        let mut a = acked.lock();
        for r in replies {
            if let SubmitReply::Committed { receipt, .. } = r {
                a.insert(receipt.request_id(), *receipt);
            }
        }
    }
}

fn wait_caught_up(addr: &str) {
    let conn = tally_client::Connection::connect_with(addr, &dial_for(addr), Duration::from_secs(2)).expect("connect");
    for _ in 0..200 {
        if let Ok(tally_codec::wire::ServerMessage::Status(s)) = conn.call(tally_codec::wire::ClientMessage::Status) {
            if s.applied_height == s.committed_height {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("store never caught up with the log");
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let (_dir, layout) = init_cluster(1, 1);
    let operator = operator(&layout);
    let mut nodes = start_all(&layout);
    let acked: Arc<Mutex<HashMap<RequestId, Receipt>>> = Arc::default();
    let opts = opts_for(
        &layout.client_addrs(),
        ClientOptions {
            retry_total: Duration::from_secs(1),
            call_timeout: Duration::from_secs(2),
            ..ClientOptions::default()
        },
    );

    for round in 0..2 {
        let stop = Arc::new(AtomicBool::new(false));
        let c = Client::connect(&layout.client_addrs(), account_key(&layout, 0), opts.clone()).expect("connect");
        let w = {
            let (a, s) = (acked.clone(), stop.clone());
            std::thread::spawn(move || writer(c, a, s))
        };
        std::thread::sleep(Duration::from_millis(2500));
        let before = acked.lock().len();
        nodes[0].kill9();
        stop.store(true, Ordering::Release);
        w.join().expect("writer");
        assert!(before > 0, "round {round}: nothing was acknowledged before the kill");
        nodes = start_all(&layout);
    }

    // Every acknowledged request is there, with the receipt it was acknowledged with.
    let client = client(&layout, 0);
    let acked = acked.lock().clone();
    for (id, receipt) in &acked {
        receipt.verify(&operator).expect("a receipt issued before the crash still verifies");
        let stored = client
            .receipt_at(*id, receipt.header.height)
            .expect("receipt call")
            .expect("acknowledged request is present");
        assert_eq!(&stored, receipt, "same result, same batch, same signature");
    }
    wait_caught_up(&nodes[0].addr);
    // A graceful stop (SIGTERM) syncs the store; the log replay after each kill -9 above is what
    // rebuilt it.
    nodes[0].terminate();

    // Read the whole history straight from the data directory: the chain is unbroken, every
    // header's signature verifies, each id appears once, and no money was created.
    let store = tally_store::state::Store::open(std::path::Path::new(&layout.configs[0].data_dir)).expect("open store");
    let applied = store.applied();
    let mut ids = HashSet::new();
    let mut prev = tally_codec::Digest::ZERO;
    for h in 1..=applied.height {
        let rec = store.batch(h).expect("read").expect("every height is stored");
        assert_eq!(rec.header.prev_hash, prev, "chain broken at {h}");
        rec.header.verify(&operator, &rec.signature).expect("header signature");
        prev = rec.header.hash();
        let body = store.batch_body(&rec).expect("body");
        for r in &body.requests {
            assert!(ids.insert(r.id()), "request executed twice");
        }
    }
    assert_eq!(prev, applied.header_hash);
    for (id, r) in &acked {
        assert!(
            ids.contains(id),
            "acknowledged request at height {} missing; store applied {}",
            r.header.height,
            applied.height
        );
    }
    let tables = *store.tables();
    use tally_store::kv::Kv;
    let total: u64 = store
        .kv()
        .scan_prefix(&tables.accounts.0, usize::MAX)
        .expect("scan")
        .iter()
        .map(|(_, v)| tally_codec::decode::<u64>(v, 8).expect("balance"))
        .sum();
    assert_eq!(total, 1_000_000_000, "the sum of balances never changes");
    eprintln!(
        "acknowledged {} requests over 2 kills; history holds {} at height {}",
        acked.len(),
        ids.len(),
        applied.height
    );
}
