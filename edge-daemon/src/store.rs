//! The sled store: results history with retention, and captured uncertain frames.
