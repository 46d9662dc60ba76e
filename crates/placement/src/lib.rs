//! cellvm placement.
