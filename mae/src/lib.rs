//! # mae: Masked Autoencoders in Rust
//!
//! The model of He et al., "Masked Autoencoders Are Scalable Vision Learners" (2021), computed
//! exactly as the official PyTorch code computes it, generic over a compute [`Backend`].
//! This crate is `no_std` + `alloc`: it holds the configuration, the backend trait, the model's
//! forward and hand-written backward, the loss, AdamW and its schedule, and safetensors weights
//! under the official names. Backends (CPU, CUDA, wgpu) live in their own crates.
//!
//! See `docs/architecture.md` in the repository for the data flow of one training step.
#![no_std]

extern crate alloc;

pub mod backend;
pub mod config;
pub mod embed;
pub mod error;
pub mod finetune;
pub mod init;
pub mod masking;
pub mod model;
pub mod optim;
pub mod params;
pub mod pos_embed;
pub mod rng;
pub mod train;
pub mod weights;

pub use backend::{Backend, BackendError};
pub use config::{Config, ConfigError};
pub use error::{Error, Result};
