//! Shared helpers live in `it/`; this library is empty on purpose so the package can hold the end-to-end test binary.
