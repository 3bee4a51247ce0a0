//! Shared pieces of the example programs: the data pipeline (synthetic images, image folders,
//! CIFAR-10, MNIST, augmentation, a multi-threaded loader), atomic checkpoint files, and the
//! choice of backend. The programs in `src/bin` show how to embed `mae` in an application.
pub mod backends;
pub mod checkpoint;
pub mod data;
pub mod features;
pub mod flops;
pub mod metrics;
pub mod models;
pub mod parallel;
pub mod picture;
pub mod probe;
pub mod progress;
pub mod recipe;
pub mod reconstruct;
/// The synthetic images, also at their former path.
pub use data::synthetic;
