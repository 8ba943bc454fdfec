//! Why the engine could not compute a node. The engine is its own process: its errors reach the
//! build as text on standard error (and a non-finite result as a reply), so they say what was
//! found in words, and name the node or input.
use std::fmt;

use modelforge_core::digest::NodeKey;

#[derive(Debug)]
pub enum EngineError {
    /// Reading an input or writing a cache object failed.
    Io(std::io::Error),
    /// LibTorch refused an operation (an SVD that did not converge, a device out of memory).
    Torch(tch::TchError),
    /// The inputs of a node do not fit each other or the tensor: the job is inconsistent.
    Shape(String),
    /// A node this one reads is not in the cache, or its object was damaged (and evicted).
    Missing { node: NodeKey, damaged: bool },
    /// The result holds NaN or infinity at this element, and the job asked for finite results.
    NonFinite { index: u64, what: &'static str },
    /// The device asked for cannot be used.
    Device(String),
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::Io(e) => write!(f, "{e}"),
            EngineError::Torch(e) => write!(f, "LibTorch: {e}"),
            EngineError::Shape(what) | EngineError::Device(what) => f.write_str(what),
            EngineError::Missing {
                node,
                damaged: false,
            } => write!(f, "the node {} is missing from the cache", node.hex()),
            EngineError::Missing {
                node,
                damaged: true,
            } => write!(
                f,
                "the node {} was damaged in the cache and has been evicted; build again",
                node.hex()
            ),
            EngineError::NonFinite { index, what } => {
                write!(f, "the result holds {what} at element {index}")
            }
        }
    }
}

impl std::error::Error for EngineError {}

impl From<std::io::Error> for EngineError {
    fn from(e: std::io::Error) -> Self {
        EngineError::Io(e)
    }
}

impl From<tch::TchError> for EngineError {
    fn from(e: tch::TchError) -> Self {
        EngineError::Torch(e)
    }
}

/// A node whose inputs do not fit: `shape!("… {x} …")`.
macro_rules! shape {
    ($($arg:tt)*) => {
        $crate::error::EngineError::Shape(format!($($arg)*))
    };
}
pub(crate) use shape;
