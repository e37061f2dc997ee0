//! A child process's output, collected in the background so its pipe never fills (shared by
//! the daemon and browser fixtures; also included by weld-trainer's browser test).
#![allow(clippy::unwrap_used, dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Mutex};

/// Collects a child's output lines in the background.
pub fn collect(pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut s = sink.lock().unwrap();
            s.push_str(&strip_ansi(&line));
            s.push('\n');
        }
    });
    log
}

/// `NO_COLOR` is not honoured everywhere: drop ANSI escape sequences (ESC [ ... final byte in
/// @..~).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
