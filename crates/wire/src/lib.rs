//! Wire types shared by every part of cellvm.
//!
//! - [`frame`]: the binary framing of the host <-> guest agent channel.
//! - [`agent`]: the messages carried in those frames.
//! - [`api`]: the JSON bodies of the public HTTP API (OpenComputer
//!   compatible) and of the internal cell <-> worker API.
//! - [`cells`]: how a cell registers with the edge.
//!
//! Nothing here does I/O; every part parses into these types at its edge.

pub mod agent;
pub mod api;
pub mod cells;
pub mod frame;
pub mod internal;
pub mod time;
