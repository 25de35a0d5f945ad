//! End-to-end tests across the workspace's crates live in `tests/tests/`; this library is
//! empty and exists so Cargo has a package to hang them on.
