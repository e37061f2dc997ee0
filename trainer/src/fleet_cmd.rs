//! `weld-trainer push` and `weld-trainer devices status`: the command-line side of
//! [`crate::fleet`] (progress, tables, exit codes).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use weld_core::bundle::Bundle;

use crate::cli::PushArgs;
use crate::fleet::{self, Fleet, MAX_CONCURRENCY, PushOptions};

/// `weld-trainer push BUNDLE --devices FLEET`.
pub fn push(a: &PushArgs) -> Result<ExitCode> {
    if !(1..=MAX_CONCURRENCY).contains(&a.concurrency) {
        anyhow::bail!(
            "--concurrency {}: must be 1..={MAX_CONCURRENCY}",
            a.concurrency
        );
    }
    if !(0.0..=1.0).contains(&a.min_agreement) {
        anyhow::bail!("--min-agreement {}: must be 0..=1", a.min_agreement);
    }
    let fleet = Fleet::load(&a.devices)?;
    // Read and parse it here so that a file that is no bundle fails once, not on every device;
    // the signature and the model are the devices' to check, against their own trusted keys.
    let bytes =
        std::fs::read(&a.bundle).with_context(|| format!("reading {}", a.bundle.display()))?;
    let parsed = Bundle::from_reader(&bytes[..])
        .with_context(|| format!("{} is not a usable bundle", a.bundle.display()))?;
    let version = parsed.manifest.version.clone();
    drop(parsed);
    let bar = ProgressBar::new(fleet.devices.len() as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} devices {msg}",
    ) {
        bar.set_style(style);
    }
    bar.set_message(format!("{} {version}", a.bundle.display()));
    let opts = PushOptions {
        activate: !a.no_activate,
        concurrency: a.concurrency,
        canary: a.canary.map(Duration::from_secs),
        min_agreement: a.min_agreement,
    };
    if let (Some(s), Some(first)) = (a.canary, fleet.devices.first()) {
        bar.println(format!(
            "canary: {} first, the bundle in shadow there for {s} s",
            first.name
        ));
    }
    let report = fleet::push(
        &fleet,
        &a.bundle.display().to_string(),
        &bytes,
        &version,
        &opts,
        &|r| {
            bar.inc(1);
            if !r.ok {
                bar.println(format!(
                    "{}: {}: {}",
                    r.device,
                    r.outcome,
                    r.error.as_deref().unwrap_or("")
                ));
            }
        },
    );
    bar.finish_and_clear();
    for d in &report.devices {
        println!(
            "{:<20} {:<18} {:>6.2} s  {}",
            d.device,
            d.outcome,
            d.seconds,
            d.error
                .clone()
                .or_else(|| d.backend.as_ref().map(|b| format!("checked on {b}")))
                .unwrap_or_default()
        );
    }
    if let Some(c) = &report.canary {
        println!("canary: {c}");
    }
    let failed = report.failed();
    println!(
        "{version}: {} of {} devices took it in {:.1} s",
        report.devices.len() - failed,
        report.devices.len(),
        report.seconds
    );
    if let Some(p) = &a.report {
        write_json(p, &report)?;
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `weld-trainer devices status --devices FLEET`.
pub fn status(devices: &Path, json: bool) -> Result<ExitCode> {
    let fleet = Fleet::load(devices)?;
    let all = fleet::status(&fleet);
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        println!(
            "{:<20} {:<12} {:<28} {:>6} {:>8}  {:<12} reasons",
            "device", "state", "model", "fps", "dropped", "camera"
        );
        for s in &all {
            println!(
                "{:<20} {:<12} {:<28} {:>6} {:>8}  {:<12} {}",
                s.device,
                s.state,
                s.model.as_deref().unwrap_or("-"),
                s.fps.map_or("-".into(), |f| format!("{f:.1}")),
                s.dropped.map_or("-".into(), |d| d.to_string()),
                s.camera.as_deref().unwrap_or("-"),
                s.reasons.join("; ")
            );
        }
    }
    let unreachable = all.iter().filter(|s| s.state == "unreachable").count();
    Ok(if unreachable == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `weld-trainer dataset pull --devices FLEET --out DATASET`.
pub fn pull(devices: &Path, dataset: &Path) -> Result<ExitCode> {
    let fleet = Fleet::load(devices)?;
    // Only into a dataset: the frames must land where `label` and training look for them.
    let spec = weld_core::dataset::DatasetSpec::load(dataset)
        .with_context(|| format!("{} is not a dataset", dataset.display()))?;
    let unlabeled = dataset.join(weld_core::dataset::UNLABELED);
    std::fs::create_dir_all(&unlabeled)
        .with_context(|| format!("creating {}", unlabeled.display()))?;
    let reports = fleet::pull(&fleet, &unlabeled, spec.depth_unit_mm);
    let mut failed = 0;
    for r in &reports {
        println!(
            "{:<20} {:>5} new {:>5} already there  {}",
            r.device,
            r.new,
            r.skipped,
            r.error.as_deref().unwrap_or("")
        );
        failed += usize::from(r.error.is_some());
    }
    let new: usize = reports.iter().map(|r| r.new).sum();
    println!(
        "{new} new frames in {} from {} devices",
        unlabeled.display(),
        reports.len() - failed
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}
