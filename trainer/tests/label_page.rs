//! The labelling page in a real browser: `weld-trainer label` on a synthetic dataset with the
//! built-in model, and Debian's headless Chromium driven over the DevTools protocol (the
//! fixture weld-edge's dashboard test uses). Labels frames with the keyboard and checks that
//! the files moved, that the change log names each move, that undo moves a frame back, and
//! that no script error happened. Prints the keystroke-to-next-frame times and saves a
//! screenshot to `target/label.png`.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

#[path = "../../edge-daemon/tests/common/browser.rs"]
mod browser;
#[path = "../../edge-daemon/tests/common/output.rs"]
mod output;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use browser::{Browser, Cdp, wait_for, when};
use serde_json::{Value, json};

/// The label server, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn press(tab: &mut Cdp, key: &str) {
    let (code, vk, text) = match key {
        "Enter" => ("Enter".to_string(), 13, "\r".to_string()),
        k => (format!("Key{}", k.to_uppercase()), 0, k.to_string()),
    };
    let code = if key.chars().all(|c| c.is_ascii_digit()) {
        format!("Digit{key}")
    } else {
        code
    };
    tab.call(
        "Input.dispatchKeyEvent",
        json!({"type": "keyDown", "key": key, "code": code, "text": text,
               "windowsVirtualKeyCode": vk}),
    );
    tab.call(
        "Input.dispatchKeyEvent",
        json!({"type": "keyUp", "key": key, "code": code, "windowsVirtualKeyCode": vk}),
    );
}

/// The frame on show and how many timings the page has taken.
fn shown(tab: &mut Cdp) -> Value {
    tab.eval(
        r#"(() => {
            const $ = (id) => document.getElementById(id);
            // Navigation may not have reached the page yet.
            if (!$("frame-id") || !$("rgb") || !$("undo")) return { loading: document.URL };
            return {
                id: $("frame-id").textContent,
                img: $("rgb").naturalWidth,
                timings: (window.labelTimings || []).length,
                undo: $("undo").textContent,
            };
        })()"#,
    )
}

fn log_lines(root: &Path) -> Vec<Value> {
    std::fs::read_to_string(root.join("changes.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn frames_are_labelled_with_the_keyboard_and_the_files_move() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    let bin = env!("CARGO_BIN_EXE_weld-trainer");
    let ok = Command::new(bin)
        .args(["dataset", "synth", "--out", ds.to_str().unwrap()])
        .args(["--per-class", "2", "--size", "1280x720"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    // The second frame of each class becomes a capture without a label.
    std::fs::create_dir_all(ds.join("unlabeled")).unwrap();
    for c in ["good", "porosity", "undercut", "spatter", "burn_through"] {
        for f in [
            format!("{c}-s1-00001.png"),
            format!("{c}-s1-00001.depth.png"),
        ] {
            std::fs::rename(ds.join(c).join(&f), ds.join("unlabeled").join(&f)).unwrap();
        }
    }
    let mut child = Command::new(bin)
        .args([
            "label",
            ds.to_str().unwrap(),
            "--model",
            "builtin",
            "--port",
            "0",
        ])
        .args(["--user", "tester"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = output::collect(child.stdout.take().unwrap());
    let err = output::collect(child.stderr.take().unwrap());
    let _server = Server(child);
    let url = wait_for("the labelling page's address", || {
        let o = out.lock().unwrap().clone();
        match o.split_once("labelling page: ") {
            Some((_, rest)) => Ok(rest.split_whitespace().next().unwrap().to_string()),
            None => Err(format!("{o}{}", err.lock().unwrap())),
        }
    });

    let browser = Browser::start();
    let mut tab = browser.tab();
    tab.call("Runtime.enable", json!({}));
    tab.call("Log.enable", json!({}));
    tab.call("Page.navigate", json!({ "url": url }));
    let first = wait_for("the first unlabelled frame", || {
        let s = shown(&mut tab);
        when(
            s["img"] == 1280
                && s["id"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("unlabeled/")),
            s.clone(),
            || s.to_string(),
        )
    });
    let first_id = first["id"].as_str().unwrap().to_string();
    let first_stem = first_id.trim_start_matches("unlabeled/").to_string();

    // 2 picks porosity, Enter saves it and shows the next frame.
    press(&mut tab, "2");
    press(&mut tab, "Enter");
    let second = wait_for("the next frame after Enter", || {
        let s = shown(&mut tab);
        when(
            s["id"] != first_id.as_str() && s["timings"] == 1,
            s.clone(),
            || s.to_string(),
        )
    });
    assert!(
        ds.join("porosity")
            .join(format!("{first_stem}.png"))
            .exists()
    );
    assert!(
        ds.join("porosity")
            .join(format!("{first_stem}.depth.png"))
            .exists()
    );
    assert!(
        !ds.join("unlabeled")
            .join(format!("{first_stem}.png"))
            .exists()
    );

    // S skips; Enter with nothing picked accepts the model's pre-label.
    let second_id = second["id"].as_str().unwrap().to_string();
    press(&mut tab, "s");
    let third = wait_for("the frame after a skip", || {
        let s = shown(&mut tab);
        when(
            s["id"] != second_id.as_str() && s["timings"] == 2,
            s.clone(),
            || s.to_string(),
        )
    });
    let third_id = third["id"].as_str().unwrap().to_string();
    let prelabel = tab.eval(r#"document.getElementById("prelabel").textContent"#);
    let model_class = prelabel
        .as_str()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    press(&mut tab, "Enter");
    wait_for("the frame after accepting the pre-label", || {
        let s = shown(&mut tab);
        when(
            s["id"] != third_id.as_str() && s["timings"] == 3,
            s.clone(),
            || s.to_string(),
        )
    });
    let third_stem = third_id.trim_start_matches("unlabeled/");
    assert!(
        ds.join(&model_class)
            .join(format!("{third_stem}.png"))
            .exists(),
        "{model_class}"
    );

    let log = log_lines(&ds);
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(
        (
            log[0]["stem"].as_str(),
            log[0]["to"].as_str(),
            log[0]["user"].as_str()
        ),
        (Some(first_stem.as_str()), Some("porosity"), Some("tester"))
    );
    assert_eq!(log[1]["to"], model_class.as_str());

    // U undoes the last change: the frame goes back to unlabeled/.
    press(&mut tab, "u");
    wait_for("the undo", || {
        let moved_back = ds
            .join("unlabeled")
            .join(format!("{third_stem}.png"))
            .exists();
        let s = shown(&mut tab);
        when(moved_back && s["undo"] == "Undo (1)", (), || s.to_string())
    });
    let log = log_lines(&ds);
    assert_eq!(log.len(), 3);
    assert_eq!(log[2]["action"], "undo");

    let timings = tab.eval("window.labelTimings");
    eprintln!("keystroke to next frame (ms, 1280x720 RGB + depth): {timings}");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    tab.screenshot(&target.join("label.png"));
    assert!(
        tab.page_errors.is_empty(),
        "errors on the page: {:#?}\nbrowser:\n{}",
        tab.page_errors,
        browser.log()
    );
}
