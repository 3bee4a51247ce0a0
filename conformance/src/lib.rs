//! Conformance of every `mae` backend: golden files made by the official PyTorch model, an f64
//! oracle of every op, and the selection of backends to test.
pub mod backends;
pub mod golden;
pub mod oracle;
