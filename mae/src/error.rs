//! The one error type of `mae`: every way a configuration, an input, a weights file or a backend
//! can fail, typed so callers can react and printed so users know what to fix.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

pub use crate::backend::BackendError;
pub use crate::config::ConfigError;
pub use crate::weights::WeightsError;

/// Any failure of `mae`.
#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// An invalid configuration or training setting.
    Config(ConfigError),
    /// An input of the wrong shape (images, noise, features).
    Shape {
        what: &'static str,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// Input values that cannot be used (NaN noise, ...).
    Input(String),
    /// A weights or checkpoint file that cannot be used.
    Weights(WeightsError),
    /// The compute backend failed.
    Backend(BackendError),
    /// The loss became NaN or infinite.
    NonFiniteLoss { step: u64, loss: f32 },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(e) => write!(f, "{e}"),
            Error::Shape {
                what,
                expected,
                got,
            } => write!(f, "{what}: expected shape {expected:?}, got {got:?}"),
            Error::Input(msg) => write!(f, "invalid input: {msg}"),
            Error::Weights(e) => write!(f, "{e}"),
            Error::Backend(e) => write!(f, "backend: {e}"),
            Error::NonFiniteLoss { step, loss } => {
                write!(f, "loss is {loss} at step {step}: training diverged")
            }
        }
    }
}

impl core::error::Error for Error {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Error::Config(e) => Some(e),
            Error::Weights(e) => Some(e),
            Error::Backend(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config(e)
    }
}
impl From<BackendError> for Error {
    fn from(e: BackendError) -> Self {
        Error::Backend(e)
    }
}
impl From<WeightsError> for Error {
    fn from(e: WeightsError) -> Self {
        Error::Weights(e)
    }
}

/// Result with [`Error`].
pub type Result<T> = core::result::Result<T, Error>;

/// `loss` when it is finite, else [`Error::NonFiniteLoss`] at update `step`: a run stops there,
/// before a backward would spread the NaN into the weights.
pub(crate) fn finite_loss(loss: f32, step: u64) -> Result<f32> {
    if loss.is_finite() {
        Ok(loss)
    } else {
        Err(Error::NonFiniteLoss { step, loss })
    }
}
