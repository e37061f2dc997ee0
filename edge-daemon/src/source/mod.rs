//! Frame sources, chosen by name in [`open`] (the one registry): adding a source is one new
//! file and one line there.
//!
//! A source is a blocking iterator of frames run on the capture thread. It paces itself (a
//! camera by its own clock, `synthetic` and `replay` by their configured fps) and reports a
//! lost camera as [`SourceError::Disconnected`]; the capture loop retries with [`Backoff`]
//! instead of stopping the daemon.


use thiserror::Error;
use weld_core::Frame;

/// What a source hands back when asked for the next frame.
#[derive(Debug)]
pub enum Next {
    /// A frame (its `seq` and `ts` set by the source).
    Frame(Box<Frame>),
    /// The source is finished (a replay that does not loop).
    End,
}

#[derive(Debug, Error)]
pub enum SourceError {
    /// The camera went away or stopped answering; worth retrying.
    #[error("camera disconnected: {0}")]
    Disconnected(String),
    /// The source cannot work as configured; retrying will not help.
    #[error("{0}")]
    Fatal(String),
}

/// A frame source. `next_frame` blocks until the next frame is due.
pub trait Source: Send {
    /// Short name for logs and status (`synthetic`, `replay`, `v4l`, `realsense`).
    fn name(&self) -> &'static str;
    fn next_frame(&mut self) -> Result<Next, SourceError>;
}
