//! The host side of one virtual machine.
//!
//! A [`Vm`] is one QEMU process with its own directory holding a
//! copy-on-write overlay over a template image, the QMP monitor socket,
//! the agent socket and the console log. [`AgentClient`] speaks the
//! framed, multiplexed agent protocol over that socket, and
//! [`probe_accel`] decides between KVM and TCG by really booting.
//!
//! ```text
//!  worker ──spawn──> qemu-system-x86_64 (-M microvm)
//!    │                 ├─ virtio-blk   <- overlay.qcow2 -> template.img
//!    ├──── qmp.sock ───┤  (monitor: quit, stop, migrate, block_resize)
//!    └──── agent.sock ─┴─ virtio-serial port "org.cellvm.agent"
//!                           └─> cellvm-agent (PID 1 in the guest)
//! ```
//!
//! QEMU runs in a session of its own and outlives the worker that
//! spawned it (unless [`VmmConfig::die_with_worker`]): a worker that
//! restarts adopts it again with [`Vm::adopt`], watching and signalling
//! it through a pidfd.

mod adopt;
mod agent_client;
mod config;
mod disk;
mod error;
mod grow;
mod migrate;
mod pidfd;
mod probe;
mod process;
mod qmp;
mod snapshot;
mod version;
mod vm;

pub use adopt::{kill_strays, Adopted, Adoptee};
pub use agent_client::{AgentClient, Channel, ChannelSender, ExecOutput};
pub use config::{AccelChoice, VmmConfig};
pub use disk::{create_overlay, flatten_onto, overlay_of_size, repoint};
pub use error::VmmError;
pub use migrate::{valid_psk, Incoming, SendReport};
pub use pidfd::start_time_of as process_start_time;
pub use probe::{probe_accel, probe_accel_cached, PROBE_MARKER};
pub use qmp::Qmp;
pub use snapshot::{reidentify, Snapshot};
pub use version::{qemu_version, QemuVersion};
pub use vm::{Vm, VmSpec};
