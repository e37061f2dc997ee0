//! `[mqtt]` of the daemon's config: the file's form ([`MqttSection`]), checked by
//! [`MqttSection::resolve`] into what the client runs with ([`MqttSettings`]). Secrets (the
//! password, the command token) are read from files or environment variables named in the
//! config, never written in it, and never printed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// MQTT: where results go, and where commands come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSection {
    /// `false` turns MQTT off entirely (no broker, no client).
    pub enabled: bool,
    /// The plant's broker (host name or address). Absent: the daemon starts its embedded broker
    /// (`[mqtt.embedded]`) and publishes there.
    pub host: Option<String>,
    /// Port of the plant's broker; default 1883, or 8883 with `[mqtt.tls]`.
    pub port: Option<u16>,
    /// MQTT client id; default `weld-edge-{device.id}`. Unique per broker: a second client with
    /// the same id disconnects the first.
    pub client_id: Option<String>,
    /// Topic prefix; default `weld/{device.line}/{device.id}`. No wildcards, no leading or
    /// trailing `/`.
    pub topic_prefix: Option<String>,
    /// User name for the broker.
    pub username: Option<String>,
    /// File holding the broker password (first line); needs `username`.
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the broker password; needs `username`.
    pub password_env: Option<String>,
    /// Keep-alive interval in seconds, 5..=600: how soon a dead connection is noticed (and the
    /// broker publishes the last will, after 1.5 times this).
    pub keep_alive_s: u64,
    /// Seconds between `…/stats` messages, 1..=3600.
    pub stats_every_s: u64,
    /// Results sent and not yet acknowledged at most, 1..=1024. More hides the round trip to a
    /// distant broker; fewer means fewer duplicates after a lost connection.
    pub inflight: u16,
    /// TLS to the plant's broker (rustls). Absent: plain TCP.
    pub tls: Option<TlsSection>,
    /// The embedded broker, used when `host` is absent.
    pub embedded: EmbeddedSection,
    /// Who may send commands on `…/cmd/<name>`.
    pub commands: CommandsSection,
}

impl Default for MqttSection {
    fn default() -> Self {
        MqttSection {
            enabled: true,
            host: None,
            port: None,
            client_id: None,
            topic_prefix: None,
            username: None,
            password_file: None,
            password_env: None,
            keep_alive_s: 30,
            stats_every_s: 10,
            inflight: 128,
            tls: None,
            embedded: EmbeddedSection::default(),
            commands: CommandsSection::default(),
        }
    }
}

/// `[mqtt.tls]`: certificates in PEM files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// CA certificate(s) that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// Client certificate (chain) for brokers that ask for one; needs `client_key`.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

/// `[mqtt.embedded]`: the broker the daemon runs itself when no `host` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedSection {
    /// Address it listens on. Default 127.0.0.1 (this board only); `0.0.0.0` opens it to the
    /// network, without authentication: do that only on an isolated line network.
    pub bind: IpAddr,
    /// Port, default 1883; 0 picks a free one (logged), for tests and many daemons on one host.
    pub port: u16,
}

impl Default for EmbeddedSection {
    fn default() -> Self {
        EmbeddedSection {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 1883,
        }
    }
}

/// `[mqtt.commands]`: the shared token a command must carry (`"token"` in its JSON). Without
/// one, every command is refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandsSection {
    /// File holding the token (first line).
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the token.
    pub token_env: Option<String>,
}

/// A secret read from a file or the environment; `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Where the client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerAddr {
    /// The plant's broker.
    External { host: String, port: u16 },
    /// The embedded broker, started by the daemon on this address.
    Embedded(SocketAddr),
}

/// TLS material, read and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM of the CA certificate(s).
    pub ca_pem: Vec<u8>,
    /// PEM of the client certificate chain and of its key.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

/// The MQTT settings the client runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttSettings {
    pub broker: BrokerAddr,
    pub client_id: String,
    pub topics: Topics,
    pub credentials: Option<(String, Secret)>,
    pub keep_alive: Duration,
    pub stats_every: Duration,
    pub inflight: u16,
    pub tls: Option<TlsSettings>,
    /// `None`: every command is refused.
    pub command_token: Option<Secret>,
}

/// The topics of one device (DESIGN.md "MQTT").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub prefix: String,
}

impl Topics {
    pub fn result(&self) -> String {
        format!("{}/result", self.prefix)
    }
    pub fn status(&self) -> String {
        format!("{}/status", self.prefix)
    }
    pub fn stats(&self) -> String {
        format!("{}/stats", self.prefix)
    }
    /// The subscription for every command.
    pub fn commands(&self) -> String {
        format!("{}/cmd/+", self.prefix)
    }
    /// The command name when `topic` is a command topic (`{prefix}/cmd/{name}`).
    pub fn command_name<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/cmd/")
            .filter(|n| !n.is_empty() && !n.contains('/'))
    }
    pub fn reply(&self, command: &str) -> String {
        format!("{}/cmd/{command}/reply", self.prefix)
    }
}

const KEEP_ALIVE_S: std::ops::RangeInclusive<u64> = 5..=600;
const STATS_EVERY_S: std::ops::RangeInclusive<u64> = 1..=3600;
const INFLIGHT: std::ops::RangeInclusive<u16> = 1..=1024;

impl MqttSection {
    /// Checks every value, reads the secrets and certificates, and lists every problem (each
    /// naming its `mqtt.` key). `Ok(None)` when MQTT is off.
    pub fn resolve(&self, device: &str, line: &str) -> Result<Option<MqttSettings>, Vec<String>> {
        if !self.enabled {
            return Ok(None);
        }
        let mut problems = Vec::new();
        let broker = match &self.host {
            Some(h) if h.trim().is_empty() || h.contains(char::is_whitespace) => {
                problems.push(format!("mqtt.host = {h:?}: not a host name or address"));
                None
            }
            Some(h) => Some(BrokerAddr::External {
                host: h.clone(),
                port: self
                    .port
                    .unwrap_or(if self.tls.is_some() { 8883 } else { 1883 }),
            }),
            None => {
                if self.port.is_some() {
                    problems.push(
                        "mqtt.port is set without mqtt.host; the embedded broker's port is \
                         mqtt.embedded.port"
                            .into(),
                    );
                }
                if self.tls.is_some() {
                    problems.push(
                        "mqtt.tls needs mqtt.host: the embedded broker speaks plain MQTT".into(),
                    );
                }
                Some(BrokerAddr::Embedded(SocketAddr::new(
                    self.embedded.bind,
                    self.embedded.port,
                )))
            }
        };
        if self.port == Some(0) {
            problems.push("mqtt.port must not be 0".into());
        }
        // The defaults derive from device.id and device.line, which are checked (and reported)
        // with the device section; only values written here are checked here.
        let client_id = match &self.client_id {
            Some(id) => {
                if id.is_empty()
                    || id.len() > 128
                    || !id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                {
                    problems.push(format!(
                        "mqtt.client_id = {id:?}: use 1-128 letters, digits, '-', '_' or '.'"
                    ));
                }
                id.clone()
            }
            None => format!("weld-edge-{device}"),
        };
        let prefix = match &self.topic_prefix {
            Some(p) => {
                if let Some(why) = topic_prefix_problem(p) {
                    problems.push(format!("mqtt.topic_prefix = {p:?}: {why}"));
                }
                p.clone()
            }
            None => format!("weld/{line}/{device}"),
        };
        let password = read_secret(
            "mqtt.password",
            self.password_file.as_deref(),
            self.password_env.as_deref(),
            &mut problems,
        );
        let credentials = match (&self.username, password) {
            (Some(u), Some(p)) => Some((u.clone(), p)),
            (Some(u), None) => Some((u.clone(), Secret::new(""))),
            (None, Some(_)) => {
                problems.push("mqtt.password_file/password_env needs mqtt.username".into());
                None
            }
            (None, None) => None,
        };
        for (key, v, range) in [
            ("keep_alive_s", self.keep_alive_s, KEEP_ALIVE_S),
            ("stats_every_s", self.stats_every_s, STATS_EVERY_S),
        ] {
            if !range.contains(&v) {
                problems.push(format!(
                    "mqtt.{key} = {v}: must be {}..={}",
                    range.start(),
                    range.end()
                ));
            }
        }
        if !INFLIGHT.contains(&self.inflight) {
            problems.push(format!(
                "mqtt.inflight = {}: must be {}..={}",
                self.inflight,
                INFLIGHT.start(),
                INFLIGHT.end()
            ));
        }
        let tls = self
            .tls
            .as_ref()
            .and_then(|t| tls_settings(t, &mut problems));
        let command_token = read_secret(
            "mqtt.commands.token",
            self.commands.token_file.as_deref(),
            self.commands.token_env.as_deref(),
            &mut problems,
        );
        if command_token
            .as_ref()
            .is_some_and(|t| t.expose().len() < MIN_TOKEN_LEN)
        {
            problems.push(format!(
                "mqtt.commands token is shorter than {MIN_TOKEN_LEN} characters; use a long \
                 random one (e.g. `openssl rand -hex 32`)"
            ));
        }
        match (problems.is_empty(), broker) {
            (true, Some(broker)) => Ok(Some(MqttSettings {
                broker,
                client_id,
                topics: Topics { prefix },
                credentials,
                keep_alive: Duration::from_secs(self.keep_alive_s),
                stats_every: Duration::from_secs(self.stats_every_s),
                inflight: self.inflight,
                tls,
                command_token,
            })),
            _ => Err(problems),
        }
    }
}

/// A command token shorter than this is refused: it would be guessable.
const MIN_TOKEN_LEN: usize = 16;

/// Why `prefix` cannot be a topic prefix, if it cannot.
fn topic_prefix_problem(prefix: &str) -> Option<&'static str> {
    if prefix.is_empty() {
        Some("must not be empty")
    } else if prefix.contains(['+', '#']) {
        Some("must not contain the wildcards '+' or '#'")
    } else if prefix.starts_with('/') || prefix.ends_with('/') || prefix.contains("//") {
        Some("no leading, trailing or doubled '/'")
    } else if prefix.starts_with('$') {
        Some("topics starting with '$' are the broker's own")
    } else if prefix.contains(char::is_control) || prefix.len() > 200 {
        Some("at most 200 printable characters")
    } else {
        None
    }
}

/// A secret from `file` (its first line) or the environment variable `env`; problems name
/// `key` (`mqtt.password`: reported as `mqtt.password_file` / `mqtt.password_env`).
pub(crate) fn read_secret(
    key: &str,
    file: Option<&Path>,
    env: Option<&str>,
    problems: &mut Vec<String>,
) -> Option<Secret> {
    match (file, env) {
        (Some(_), Some(_)) => {
            problems.push(format!(
                "{key}: set either a file or an environment variable, not both"
            ));
            None
        }
        (Some(path), None) => match std::fs::read_to_string(path) {
            Ok(text) => match text.lines().next().map(str::trim) {
                Some(s) if !s.is_empty() => Some(Secret::new(s)),
                _ => {
                    problems.push(format!("{key} file {}: is empty", path.display()));
                    None
                }
            },
            Err(e) => {
                problems.push(format!("{key} file {}: {e}", path.display()));
                None
            }
        },
        (None, Some(var)) => match std::env::var(var) {
            Ok(s) if !s.trim().is_empty() => Some(Secret::new(s.trim())),
            Ok(_) => {
                problems.push(format!("{key}: environment variable {var} is empty"));
                None
            }
            Err(_) => {
                problems.push(format!("{key}: environment variable {var} is not set"));
                None
            }
        },
        (None, None) => None,
    }
}

fn tls_settings(t: &TlsSection, problems: &mut Vec<String>) -> Option<TlsSettings> {
    let mut read = |key: &str, path: &Path| match std::fs::read(path) {
        Ok(b) => Some(b),
        Err(e) => {
            problems.push(format!(
                "mqtt.tls.{key} = {:?}: {e}",
                path.display().to_string()
            ));
            None
        }
    };
    let ca = read("ca_file", &t.ca_file);
    let client = match (&t.client_cert, &t.client_key) {
        (Some(c), Some(k)) => match (read("client_cert", c), read("client_key", k)) {
            (Some(c), Some(k)) => Some(Some((c, k))),
            _ => None,
        },
        (None, None) => Some(None),
        _ => {
            problems.push("mqtt.tls: client_cert and client_key go together".into());
            None
        }
    };
    let settings = TlsSettings {
        ca_pem: ca?,
        client: client?,
    };
    // Parse now, so a wrong file is a config problem at start, not a reconnect loop.
    if let Err(e) = super::tls::client_config(&settings) {
        problems.push(format!("mqtt.tls: {e}"));
        return None;
    }
    Some(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_embedded_broker_and_designs_topics() {
        let s = MqttSection::default()
            .resolve("rdk-07", "L2")
            .unwrap()
            .unwrap();
        assert_eq!(
            s.broker,
            BrokerAddr::Embedded("127.0.0.1:1883".parse().unwrap())
        );
        assert_eq!(s.topics.result(), "weld/L2/rdk-07/result");
        assert_eq!(s.topics.commands(), "weld/L2/rdk-07/cmd/+");
        assert_eq!(s.client_id, "weld-edge-rdk-07");
        assert!(s.command_token.is_none());
    }

    #[test]
    fn disabled_is_none() {
        let s = MqttSection {
            enabled: false,
            ..MqttSection::default()
        };
        assert_eq!(s.resolve("d", "l").unwrap(), None);
    }

    #[test]
    fn command_names_come_from_the_devices_own_topics() {
        let t = Topics {
            prefix: "weld/L2/rdk-07".into(),
        };
        assert_eq!(
            t.command_name("weld/L2/rdk-07/cmd/capture"),
            Some("capture")
        );
        assert_eq!(t.command_name("weld/L2/rdk-07/cmd/capture/reply"), None);
        assert_eq!(t.command_name("weld/L2/rdk-07/cmd/"), None);
        assert_eq!(t.command_name("weld/L2/rdk-08/cmd/capture"), None);
        assert_eq!(t.command_name("weld/L2/rdk-07/result"), None);
    }

    #[test]
    fn every_problem_is_listed_with_its_key() {
        let text = r#"
            port = 0
            topic_prefix = "weld/#"
            client_id = "a b"
            password_env = "WELD_TEST_SURELY_UNSET_VARIABLE"
            keep_alive_s = 1
            stats_every_s = 0
            inflight = 0
            [tls]
            ca_file = "/nonexistent/ca.pem"
            [commands]
            token_env = "WELD_TEST_SURELY_UNSET_VARIABLE"
        "#;
        let s: MqttSection = toml::from_str(text).unwrap();
        let p = s.resolve("d", "l").unwrap_err();
        for key in [
            "mqtt.port is set without mqtt.host",
            "mqtt.tls needs mqtt.host",
            "must not be 0",
            "mqtt.client_id",
            "mqtt.topic_prefix",
            "mqtt.password: environment variable WELD_TEST_SURELY_UNSET_VARIABLE is not set",
            "mqtt.keep_alive_s",
            "mqtt.stats_every_s",
            "mqtt.inflight",
            "mqtt.tls.ca_file",
            "mqtt.commands.token: environment variable",
        ] {
            assert!(
                p.iter().any(|l| l.contains(key)),
                "{key} missing from {p:#?}"
            );
        }
    }

    #[test]
    fn secrets_come_from_files_and_never_show_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let s = MqttSection {
            host: Some("broker.local".into()),
            username: Some("line2".into()),
            password_file: Some(token.clone()),
            commands: CommandsSection {
                token_file: Some(token),
                token_env: None,
            },
            ..MqttSection::default()
        };
        let r = s.resolve("d", "l").unwrap().unwrap();
        assert_eq!(
            r.command_token.as_ref().map(Secret::expose),
            Some("0123456789abcdef0123")
        );
        assert_eq!(
            r.broker,
            BrokerAddr::External {
                host: "broker.local".into(),
                port: 1883
            }
        );
        assert!(!format!("{r:?}").contains("0123456789"));

        let weak = MqttSection {
            commands: CommandsSection {
                token_file: Some(short),
                token_env: None,
            },
            ..MqttSection::default()
        };
        let p = weak.resolve("d", "l").unwrap_err();
        assert!(p[0].contains("shorter than 16"), "{p:?}");
    }

    #[test]
    fn prefixes_with_wildcards_or_bad_slashes_are_refused() {
        for bad in ["", "a/+/b", "a/#", "/a", "a/", "a//b", "$SYS/x"] {
            assert!(topic_prefix_problem(bad).is_some(), "{bad:?}");
        }
        assert_eq!(topic_prefix_problem("plant3/weld/L2/rdk-07"), None);
    }
}
