//! End-to-end tests across crates, on real data; see `tests/`. This library is empty.
