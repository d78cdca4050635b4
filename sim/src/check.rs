//! Checkers of DESIGN.md §7's invariants over a [`crate::history::RunRecord`].
