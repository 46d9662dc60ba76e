//! cellvm cell.
