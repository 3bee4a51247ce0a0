//! Shared pieces of the example programs: synthetic images, atomic checkpoint files, and the
//! choice of backend. The programs in `src/bin` show how to embed `mae` in an application.
pub mod backends;
pub mod checkpoint;
pub mod flops;
pub mod metrics;
pub mod models;
pub mod picture;
pub mod progress;
pub mod recipe;
pub mod reconstruct;
pub mod synthetic;
