//! Commands on `…/cmd/<name>`: parsed, authorised and applied here, apart from the MQTT client,
//! so every rule is unit-tested. A command is a JSON object with the shared token
//! (`[mqtt.commands]`), an optional `request_id` echoed in the reply, and its own fields:
//!
//! | command | fields | effect |
//! | --- | --- | --- |
//! | `capture` | `frames`: 1..=10000 | keep the next N frames in the capture store, whatever their result |
//! | `thresholds` | `rules_confident_at`, `model_confident_at`: (0, 1], at least one | swap the hybrid thresholds (until restart; the config file keeps them for good) |
//! | `deploy` | `url` (`http://`), `sha256` (of the bundle file) | fetch the bundle, check its sha256, install and run it as `POST /api/v1/models` does; the reply comes when the device has decided (a refusal says why, and the model stays) |
//!
//! Every failure is an error reply and changes nothing: a retained command (it would run again
//! on every reconnect), a payload that is not a JSON object, a missing or wrong token (or no
//! token configured: commands are then off), an unknown command, unknown or invalid fields.
//! Empty payloads are ignored: they are how a retained message is deleted.
//!
//! Retained commands: MQTT 3.1.1 marks a message retained only when a broker delivers it from
//! its store (on subscribe), not when it forwards it live. So a command found retained on
//! connect is refused, and one published with the retain flag while the device is connected
//! runs once; either way the client deletes the retained copy after every command, so none
//! ever runs again on a reconnect.

use std::sync::atomic::Ordering;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq;
use weld_core::messages::{CommandReply, MESSAGE_VERSION};

use super::config::Secret;
use crate::pipeline::Shared;
use crate::policy::{change_thresholds, present_threshold};

/// Most frames one `capture` command may ask for (at 60 fps, almost 3 minutes).
pub const MAX_CAPTURE_FRAMES: u64 = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Capture {
    frames: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetThresholds {
    #[serde(default, deserialize_with = "present_threshold")]
    rules_confident_at: Option<f64>,
    #[serde(default, deserialize_with = "present_threshold")]
    model_confident_at: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Deploy {
    url: String,
    sha256: String,
}

/// A failed command: the reply's `error` code and `detail`.
struct Refusal(&'static str, String);

/// What a command message asks for once it is parsed and authorised.
#[derive(Debug)]
pub enum Handled {
    /// Done (or refused): publish this reply.
    Reply(CommandReply),
    /// A bundle to fetch and install, which takes seconds: run [`deploy`] off the MQTT task and
    /// publish its reply.
    Deploy(DeployJob),
}

/// A checked `deploy` command.
#[derive(Debug, Clone)]
pub struct DeployJob {
    pub request_id: Option<String>,
    pub url: String,
    pub sha256: String,
}

/// What `run` decided.
enum Action {
    Done(Value),
    Deploy { url: String, sha256: String },
}

/// Handles one message on a command topic; `None` when there is nothing to answer (an empty
/// payload). `token` is the configured command token.
pub fn handle(
    name: &str,
    payload: &[u8],
    retained: bool,
    token: Option<&Secret>,
    shared: &Shared,
) -> Option<Handled> {
    if payload.is_empty() {
        return None;
    }
    let mut request_id = None;
    let outcome = run(name, payload, retained, token, shared, &mut request_id);
    Some(match outcome {
        Ok(Action::Deploy { url, sha256 }) => Handled::Deploy(DeployJob {
            request_id,
            url,
            sha256,
        }),
        Ok(Action::Done(v)) => Handled::Reply(reply(name, request_id, Ok(v))),
        Err(r) => Handled::Reply(reply(name, request_id, Err(r))),
    })
}

fn reply(name: &str, request_id: Option<String>, outcome: Result<Value, Refusal>) -> CommandReply {
    let (ok, result, error, detail) = match outcome {
        Ok(result) => (true, Some(result), None, None),
        Err(Refusal(code, detail)) => {
            tracing::warn!(command = name, error = code, %detail, "command refused");
            (false, None, Some(code.to_string()), Some(detail))
        }
    };
    CommandReply {
        v: MESSAGE_VERSION,
        command: name.to_string(),
        request_id,
        ok,
        result,
        error,
        detail,
    }
}

/// How long fetching a bundle may take.
const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Fetches the bundle of `job`, checks its sha256 and installs and runs it (blocking: seconds).
pub fn deploy(job: DeployJob, deployer: &crate::deploy::Deployer) -> CommandReply {
    let outcome = fetch_and_install(&job, deployer);
    reply("deploy", job.request_id, outcome)
}

/// The reply to a `deploy` in a process that installs no models.
pub fn not_installing(job: DeployJob) -> CommandReply {
    reply(
        "deploy",
        job.request_id,
        Err(Refusal(
            "unsupported",
            "this process installs no models; the current model stays".into(),
        )),
    )
}

fn fetch_and_install(
    job: &DeployJob,
    deployer: &crate::deploy::Deployer,
) -> Result<Value, Refusal> {
    let upload = crate::deploy::UploadFile::new(deployer.models().upload_path());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(FETCH_TIMEOUT))
        .build()
        .into();
    let max = deployer.max_bundle_bytes();
    let fetch_err =
        |e: &dyn std::fmt::Display| Refusal("fetch_failed", format!("{}: {e}", job.url));
    let mut response = agent.get(&job.url).call().map_err(|e| fetch_err(&e))?;
    let bytes = response
        .body_mut()
        .with_config()
        .limit(max)
        .read_to_vec()
        .map_err(|e| {
            fetch_err(&format!(
                "{e} (at most deploy.max_bundle_bytes = {max} bytes)"
            ))
        })?;
    let sha = weld_core::bundle::sha256_hex(&bytes);
    if !sha.eq_ignore_ascii_case(&job.sha256) {
        return Err(Refusal(
            "sha256_mismatch",
            format!(
                "{} has sha256 {sha}, the command says {}; nothing was installed",
                job.url, job.sha256
            ),
        ));
    }
    std::fs::write(upload.path(), &bytes)
        .map_err(|e| Refusal("internal", format!("cannot store the bundle: {e}")))?;
    drop(bytes);
    let path = upload.keep();
    let installed = deployer
        .install(&path, true)
        .map_err(|e| Refusal(e.code(), e.to_string()))?;
    serde_json::to_value(&installed).map_err(|e| Refusal("internal", e.to_string()))
}

fn run(
    name: &str,
    payload: &[u8],
    retained: bool,
    token: Option<&Secret>,
    shared: &Shared,
    request_id: &mut Option<String>,
) -> Result<Action, Refusal> {
    if retained {
        return Err(Refusal(
            "retained",
            "commands must not be retained (a retained command would run again on every \
             reconnect); publish it without the retain flag"
                .into(),
        ));
    }
    let mut fields: Map<String, Value> = match serde_json::from_slice(payload) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return Err(Refusal(
                "malformed",
                "the payload must be a JSON object".into(),
            ));
        }
        Err(e) => {
            return Err(Refusal(
                "malformed",
                format!("the payload is not JSON: {e}"),
            ));
        }
    };
    *request_id = match fields.remove("request_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => {
            return Err(Refusal(
                "malformed",
                "request_id must be a string or a number".into(),
            ));
        }
    };
    authorize(fields.remove("token"), token)?;
    match name {
        "capture" => {
            let c: Capture = params(fields)?;
            if !(1..=MAX_CAPTURE_FRAMES).contains(&c.frames) {
                return Err(Refusal(
                    "invalid",
                    format!("frames = {}: must be 1..={MAX_CAPTURE_FRAMES}", c.frames),
                ));
            }
            let before = shared.capture_next.fetch_add(c.frames, Ordering::Relaxed);
            tracing::info!(
                frames = c.frames,
                "capture command: keeping the next frames"
            );
            Ok(Action::Done(json!({ "frames_pending": before + c.frames })))
        }
        "thresholds" => {
            let t: SetThresholds = params(fields)?;
            let thresholds = change_thresholds(
                &shared.policy,
                t.rules_confident_at,
                t.model_confident_at,
                "thresholds",
            )
            .map_err(|e| Refusal("invalid", e))?;
            tracing::info!(?thresholds, "thresholds command: policy thresholds changed");
            Ok(Action::Done(json!({
                "rules_confident_at": thresholds.rules_confident_at,
                "model_confident_at": thresholds.model_confident_at,
                "persisted": false,
            })))
        }
        "deploy" => {
            let d: Deploy = params(fields)?;
            if d.url.starts_with("https://") {
                return Err(Refusal(
                    "invalid",
                    format!(
                        "url {:?}: this build fetches bundles over http:// only (the device \
                         trusts the sha256 and the bundle's signature, not the transport); \
                         or upload it with POST /api/v1/models",
                        d.url
                    ),
                ));
            }
            if !d.url.starts_with("http://") {
                return Err(Refusal(
                    "invalid",
                    format!("url {:?}: must be an http:// URL", d.url),
                ));
            }
            if d.sha256.len() != 64 || !d.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Refusal(
                    "invalid",
                    "sha256 must be 64 hexadecimal characters".into(),
                ));
            }
            Ok(Action::Deploy {
                url: d.url,
                sha256: d.sha256.to_ascii_lowercase(),
            })
        }
        other => Err(Refusal(
            "unknown_command",
            format!("no command {other:?}; commands are capture, thresholds, deploy"),
        )),
    }
}

/// Checks the command's token against the configured one in constant time.
fn authorize(given: Option<Value>, expected: Option<&Secret>) -> Result<(), Refusal> {
    let Some(expected) = expected else {
        return Err(Refusal(
            "unauthorized",
            "commands are off on this device: no [mqtt.commands] token is configured".into(),
        ));
    };
    match given {
        Some(Value::String(t)) if bool::from(t.as_bytes().ct_eq(expected.expose().as_bytes())) => {
            Ok(())
        }
        Some(_) => Err(Refusal("unauthorized", "wrong token".into())),
        None => Err(Refusal(
            "unauthorized",
            "the command has no \"token\"".into(),
        )),
    }
}

fn params<T: DeserializeOwned>(fields: Map<String, Value>) -> Result<T, Refusal> {
    serde_json::from_value(Value::Object(fields)).map_err(|e| Refusal("malformed", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Policy, PolicyKind, Thresholds};
    use std::sync::Arc;

    const TOKEN: &str = "0123456789abcdef-token";

    fn shared() -> Arc<Shared> {
        Shared::new(
            Policy {
                kind: PolicyKind::Hybrid,
                thresholds: Thresholds {
                    rules_confident_at: 0.9,
                    model_confident_at: 0.8,
                },
            },
            None,
        )
    }

    fn send(sh: &Shared, name: &str, payload: &str) -> CommandReply {
        match handle(
            name,
            payload.as_bytes(),
            false,
            Some(&Secret::new(TOKEN)),
            sh,
        ) {
            Some(Handled::Reply(r)) => r,
            Some(Handled::Deploy(job)) => panic!("a deploy job where a reply was due: {job:?}"),
            None => panic!("no reply"),
        }
    }

    #[test]
    fn capture_adds_frames_and_echoes_the_request_id() {
        let sh = shared();
        let r = send(
            &sh,
            "capture",
            &format!(r#"{{"token":"{TOKEN}","frames":5,"request_id":7}}"#),
        );
        assert!(r.ok, "{r:?}");
        assert_eq!(r.request_id.as_deref(), Some("7"));
        assert_eq!(r.result.unwrap()["frames_pending"], 5);
        send(
            &sh,
            "capture",
            &format!(r#"{{"token":"{TOKEN}","frames":3}}"#),
        );
        assert_eq!(sh.capture_next.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn thresholds_change_only_when_valid() {
        let sh = shared();
        let r = send(
            &sh,
            "thresholds",
            &format!(r#"{{"token":"{TOKEN}","rules_confident_at":0.95}}"#),
        );
        assert!(r.ok, "{r:?}");
        let p = sh.policy.load();
        assert_eq!(p.thresholds.rules_confident_at, 0.95);
        assert_eq!(p.thresholds.model_confident_at, 0.8);

        for bad in [
            r#""model_confident_at":1.5"#,
            r#""rules_confident_at":0"#,
            r#""rules_confident_at":"high""#,
            r#""rules_confident":0.5"#,
            r#""request_id":"x""#,
            // null is not "unchanged", beside a valid value or alone
            r#""rules_confident_at":null,"model_confident_at":0.9"#,
            // above 1 as sent, though it rounds to 1.0 as an f32; above 0 but rounds to 0
            r#""rules_confident_at":1.0000000000000002"#,
            r#""rules_confident_at":1e-300"#,
        ] {
            let r = send(
                &sh,
                "thresholds",
                &format!(r#"{{"token":"{TOKEN}",{bad}}}"#),
            );
            assert!(!r.ok, "{bad} was accepted");
            assert!(
                matches!(r.error.as_deref(), Some("invalid" | "malformed")),
                "{bad}: {r:?}"
            );
        }
        assert_eq!(sh.policy.load().thresholds.rules_confident_at, 0.95);
    }

    #[test]
    fn unauthorized_malformed_retained_and_unknown_change_nothing() {
        let sh = shared();
        let ok_capture = format!(r#"{{"token":"{TOKEN}","frames":5}}"#);
        let cases: [(&str, String, bool, Option<Secret>, &str); 7] = [
            (
                "capture",
                r#"{"token":"wrong","frames":5}"#.into(),
                false,
                Some(Secret::new(TOKEN)),
                "unauthorized",
            ),
            (
                "capture",
                r#"{"frames":5}"#.into(),
                false,
                Some(Secret::new(TOKEN)),
                "unauthorized",
            ),
            ("capture", ok_capture.clone(), false, None, "unauthorized"),
            (
                "capture",
                ok_capture.clone(),
                true,
                Some(Secret::new(TOKEN)),
                "retained",
            ),
            (
                "capture",
                "{not json".into(),
                false,
                Some(Secret::new(TOKEN)),
                "malformed",
            ),
            (
                "capture",
                "[1,2]".into(),
                false,
                Some(Secret::new(TOKEN)),
                "malformed",
            ),
            (
                "reboot",
                ok_capture.clone(),
                false,
                Some(Secret::new(TOKEN)),
                "unknown_command",
            ),
        ];
        for (name, payload, retained, token, code) in cases {
            let Some(Handled::Reply(r)) =
                handle(name, payload.as_bytes(), retained, token.as_ref(), &sh)
            else {
                panic!("{name} {payload}: no reply");
            };
            assert!(!r.ok);
            assert_eq!(r.error.as_deref(), Some(code), "{name} {payload}: {r:?}");
            assert!(r.detail.is_some());
        }
        let r = send(
            &sh,
            "capture",
            &format!(r#"{{"token":"{TOKEN}","frames":0}}"#),
        );
        assert_eq!(r.error.as_deref(), Some("invalid"));
        assert_eq!(sh.capture_next.load(Ordering::Relaxed), 0);
        assert_eq!(*sh.policy.load().as_ref(), *shared().policy.load().as_ref());
    }

    #[test]
    fn deploy_is_validated_then_handed_on_and_empty_payloads_are_ignored() {
        let sh = shared();
        for url in ["ftp://x", "https://models.local/m.tar"] {
            let r = send(
                &sh,
                "deploy",
                &format!(
                    r#"{{"token":"{TOKEN}","url":"{url}","sha256":"{}"}}"#,
                    "a".repeat(64)
                ),
            );
            assert_eq!(r.error.as_deref(), Some("invalid"), "{url}: {r:?}");
        }
        let r = send(
            &sh,
            "deploy",
            &format!(r#"{{"token":"{TOKEN}","url":"http://x/m.tar","sha256":"00"}}"#),
        );
        assert_eq!(r.error.as_deref(), Some("invalid"));
        let payload = format!(
            r#"{{"token":"{TOKEN}","url":"http://models.local/m.tar","sha256":"{}","request_id":"d1"}}"#,
            "A".repeat(64)
        );
        let Some(Handled::Deploy(job)) = handle(
            "deploy",
            payload.as_bytes(),
            false,
            Some(&Secret::new(TOKEN)),
            &sh,
        ) else {
            panic!("a checked deploy is handed on");
        };
        assert_eq!(job.url, "http://models.local/m.tar");
        assert_eq!(job.sha256, "a".repeat(64));
        assert_eq!(job.request_id.as_deref(), Some("d1"));
        assert!(handle("capture", b"", false, Some(&Secret::new(TOKEN)), &sh).is_none());
    }
}
