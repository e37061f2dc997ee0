//! A real Mosquitto broker for tests: started on a free loopback port with its own config and
//! persistence directory, stopped cleanly (SIGTERM, so it saves its persistent sessions) and
//! restarted on the same port. Killed when dropped. `tests/run.sh` installs mosquitto.
#![allow(clippy::unwrap_used, dead_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) mosquitto on 127.0.0.1.
pub struct Mosquitto {
    pub port: u16,
    dir: PathBuf,
    extra: String,
    child: Option<Child>,
}

/// A free TCP port on 127.0.0.1 (the listener is closed before returning).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Mosquitto {
    /// Starts mosquitto on a free port, its files under `dir`, with persistence on (queued
    /// messages for persistent sessions survive a clean restart). `extra` is appended to the
    /// listener's config (e.g. TLS lines).
    pub fn start(dir: &Path) -> Mosquitto {
        Mosquitto::start_with(dir, "")
    }

    pub fn start_with(dir: &Path, extra: &str) -> Mosquitto {
        std::fs::create_dir_all(dir).unwrap();
        let mut m = Mosquitto {
            port: free_port(),
            dir: dir.to_path_buf(),
            extra: extra.to_string(),
            child: None,
        };
        // The free port can be taken again before mosquitto binds it (by another test's
        // client, as its local port): then mosquitto exits, and a new port is tried.
        for _ in 0..5 {
            if m.launch() {
                return m;
            }
            m.port = free_port();
        }
        panic!(
            "mosquitto could not listen on 5 free ports; log: {}",
            m.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Starts mosquitto on `self.port` and waits until it listens; false when it exited
    /// instead (the port was taken).
    fn launch(&mut self) -> bool {
        let conf = self.dir.join("mosquitto.conf");
        let mut f = std::fs::File::create(&conf).unwrap();
        // `user root`: started as root (CI containers), mosquitto otherwise switches to the
        // `mosquitto` user, which cannot write the log and persistence files in a private
        // tempdir nor read TLS keys there. As any other user the line has no effect.
        write!(
            f,
            "listener {port} 127.0.0.1\nuser root\nallow_anonymous true\npersistence true\n\
             persistence_location {dir}/\nautosave_interval 0\nmax_queued_messages 0\n\
             max_inflight_messages 0\nlog_dest file {dir}/mosquitto.log\n{extra}\n",
            port = self.port,
            dir = self.dir.display(),
            extra = self.extra,
        )
        .unwrap();
        // mosquitto appends to its log: only what this start writes says it is running.
        let log_from = self.log().len();
        let bin = which("mosquitto");
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            // Ready when it has said so in its log (after opening its listener) and the port
            // answers; a connection to itself (local port = the port asked for, nothing
            // listening) is not mosquitto.
            if self
                .log()
                .get(log_from..)
                .is_some_and(|l| l.contains(" running"))
                && TcpStream::connect(self.addr())
                    .is_ok_and(|s| s.local_addr().ok() != s.peer_addr().ok())
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "mosquitto did not listen on {} (log: {})",
                self.addr(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        true
    }

    /// Stops it like a service manager does (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = super::daemon::signal(&c, "-TERM");
            let t = Instant::now();
            while c.try_wait().unwrap().is_none() {
                if t.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Starts it again on the same port (after [`Mosquitto::stop`]).
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.launch(),
            "mosquitto could not listen again on {}; log: {}",
            self.addr(),
            self.log()
        );
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The path of a program installed by `tests/run.sh`; a missing one fails the test with the
/// reason.
pub fn which(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is not installed: run tests/run.sh (it installs mosquitto)");
}
