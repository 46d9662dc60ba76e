//! cellvm edge.
