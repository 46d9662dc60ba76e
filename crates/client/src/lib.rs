//! cellvm client.
