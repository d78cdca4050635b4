//! The whole-cluster simulator (DESIGN.md §8): the real replica core ([`tally_core::Replica`]),
//! several replicas and their clients in one thread, with the network, disks and clocks driven
//! from one seed.
#![forbid(unsafe_code)]

pub mod check;
pub mod history;
