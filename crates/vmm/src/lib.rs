//! cellvm vmm.
