//! cellvm guest agent.
