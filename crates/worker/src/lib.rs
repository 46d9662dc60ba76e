//! cellvm worker.
