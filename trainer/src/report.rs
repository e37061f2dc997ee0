//! The evaluation report: `report.json`, PNG plots (`plotters`) and `report.html` beside them.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use serde::Serialize;
use weld_core::fsutil::write_atomic;
use weld_core::metrics::ConfusionMatrix;

/// Figures of one way of deciding (the model alone, the rules alone, the hybrid policy).
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_class: Vec<ClassRow>,
    pub confusion: ConfusionMatrix,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassRow {
    pub class: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
}

impl Scores {
    pub fn of(cm: ConfusionMatrix) -> Scores {
        let per_class = cm
            .classes
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let s = cm.scores(i);
                ClassRow {
                    class: c.clone(),
                    precision: s.precision,
                    recall: s.recall,
                    f1: s.f1,
                    support: s.support,
                }
            })
            .collect();
        Scores {
            accuracy: cm.accuracy(),
            macro_f1: cm.macro_f1(),
            per_class,
            confusion: cm,
        }
    }
}

/// The hybrid policy's figures: its scores, how often it asked the model, and how good the
/// answers it gave as confident were.
#[derive(Debug, Clone, Serialize)]
pub struct HybridScores {
    pub scores: Scores,
    /// Share of frames the rules passed to the model.
    pub share_to_model: f64,
    /// Share of frames whose final answer is confident.
    pub confident_share: f64,
    /// Accuracy over the confident answers.
    pub confident_accuracy: f64,
}

/// Everything `eval` measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub created: String,
    pub model: String,
    pub model_version: String,
    pub backend: String,
    pub dataset: String,
    pub dataset_version: String,
    pub part: String,
    pub frames: usize,
    /// Frames that could not be read or judged, with why.
    pub failed: Vec<String>,
    pub model_only: Scores,
    /// The rules and the hybrid policy, when they apply to this dataset.
    pub rules: Option<Scores>,
    pub hybrid: Option<HybridScores>,
    /// Why the rules and hybrid figures are missing, when they are.
    pub rules_note: Option<String>,
    /// Mean model latency per frame on this machine (preprocessing excluded), ms.
    pub model_ms_mean: f64,
}

/// Writes `report.json`, the plots and `report.html` into `out`; `curves` are the training
/// run's per-epoch metrics (`metrics.jsonl` lines), when the model has them.
pub fn write(report: &Report, curves: &[serde_json::Value], out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut json = serde_json::to_string_pretty(report)?;
    json.push('\n');
    write_atomic(&out.join("report.json"), json.as_bytes())?;
    confusion_png(
        &report.model_only.confusion,
        "Model alone",
        &out.join("confusion_model.png"),
    )?;
    if let Some(h) = &report.hybrid {
        confusion_png(
            &h.scores.confusion,
            "Hybrid policy (rules, then the model)",
            &out.join("confusion_hybrid.png"),
        )?;
    }
    let has_curves = curves.len() >= 2;
    if has_curves {
        curves_png(curves, &out.join("curves.png"))?;
    }
    write_atomic(
        &out.join("report.html"),
        html(report, has_curves).as_bytes(),
    )?;
    Ok(())
}

fn draw_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

/// A confusion matrix as a heat map: rows are the truth, columns the prediction, each cell
/// its count, shaded by the share of its row.
pub fn confusion_png(cm: &ConfusionMatrix, title: &str, path: &Path) -> Result<()> {
    let k = cm.classes.len();
    let other = cm.counts.iter().any(|r| r.last().copied().unwrap_or(0) > 0);
    let cols = k + usize::from(other);
    let cell = 64i32;
    let (left, top) = (170i32, 70i32);
    let w = (left + cell * cols as i32 + 30) as u32;
    let h = (top + cell * k as i32 + 150) as u32;
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let font = |size: i32| ("sans-serif", size).into_font();
    root.draw(&Text::new(title.to_string(), (10, 10), font(20)))
        .map_err(draw_err)?;
    root.draw(&Text::new(
        format!(
            "accuracy {:.1}%, macro-F1 {:.3}, {} frames",
            100.0 * cm.accuracy(),
            cm.macro_f1(),
            cm.total()
        ),
        (10, 36),
        font(14),
    ))
    .map_err(draw_err)?;
    let names: Vec<&str> = cm
        .classes
        .iter()
        .map(String::as_str)
        .chain(other.then_some("other"))
        .collect();
    for (t, row) in cm.counts.iter().enumerate() {
        let total: u64 = row.iter().sum();
        let y = top + cell * t as i32;
        root.draw(&Text::new(
            cm.classes[t].clone(),
            (10, y + cell / 2 - 7),
            font(14),
        ))
        .map_err(draw_err)?;
        for (p, &n) in row.iter().take(cols).enumerate() {
            let x = left + cell * p as i32;
            let share = if total > 0 {
                n as f64 / total as f64
            } else {
                0.0
            };
            let shade = (255.0 * (1.0 - 0.85 * share)) as u8;
            let colour = if p == t {
                RGBColor(shade, 255 - (255 - shade) / 3, shade)
            } else {
                RGBColor(255, shade, shade)
            };
            root.draw(&Rectangle::new(
                [(x, y), (x + cell - 2, y + cell - 2)],
                colour.filled(),
            ))
            .map_err(draw_err)?;
            root.draw(&Text::new(
                n.to_string(),
                (x + cell / 2 - 8, y + cell / 2 - 8),
                font(16),
            ))
            .map_err(draw_err)?;
        }
    }
    let yl = top + cell * k as i32 + 8;
    for (p, name) in names.iter().enumerate() {
        let x = left + cell * p as i32 + 4;
        let label = Text::new(
            name.to_string(),
            (x + 10, yl),
            font(13).transform(FontTransform::Rotate90),
        );
        root.draw(&label).map_err(draw_err)?;
    }
    root.draw(&Text::new(
        "rows: truth, columns: predicted".to_string(),
        (10, h as i32 - 22),
        font(12),
    ))
    .map_err(draw_err)?;
    root.present().map_err(draw_err)?;
    Ok(())
}

/// One line per series, with a legend, over the epochs `1..=last`.
type Series = (&'static str, RGBColor, Vec<(u32, f64)>);

fn line_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    y_max: f64,
    last: u32,
    series: Vec<Series>,
    legend: SeriesLabelPosition,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d(1u32..last.max(2), 0f64..y_max)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .draw()
        .map_err(draw_err)?;
    for (name, colour, points) in series {
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(draw_err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

/// Training curves: losses on the left, accuracy and validation macro-F1 on the right.
pub fn curves_png(epochs: &[serde_json::Value], path: &Path) -> Result<()> {
    let get = |key: &str| -> Vec<(u32, f64)> {
        epochs
            .iter()
            .filter_map(|m| Some((m["epoch"].as_u64()? as u32, m[key].as_f64()?)))
            .collect()
    };
    let root = BitMapBackend::new(path, (1000, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let (l, r) = root.split_horizontally(500);
    let last = epochs.len() as u32;
    let loss = vec![
        ("train", BLUE, get("train_loss")),
        ("validation", RED, get("val_loss")),
    ];
    let max_loss = loss
        .iter()
        .flat_map(|(_, _, points)| points)
        .map(|p| p.1)
        .fold(0.0f64, f64::max)
        .max(1e-3);
    line_chart(
        &l,
        "Loss",
        max_loss * 1.05,
        last,
        loss,
        SeriesLabelPosition::MiddleRight,
    )?;
    let accuracy = vec![
        ("train accuracy", BLUE, get("train_accuracy")),
        ("validation accuracy", RED, get("val_accuracy")),
        ("validation macro-F1", GREEN, get("val_macro_f1")),
    ];
    line_chart(
        &r,
        "Accuracy",
        1.0,
        last,
        accuracy,
        SeriesLabelPosition::LowerRight,
    )?;
    root.present().map_err(draw_err)?;
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn scores_table(s: &Scores) -> String {
    let mut t = String::from(
        "<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>\
         <th>frames</th></tr>",
    );
    for r in &s.per_class {
        let _ = write!(
            t,
            "<tr><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td></tr>",
            esc(&r.class),
            r.precision,
            r.recall,
            r.f1,
            r.support
        );
    }
    let _ = write!(
        t,
        "<tr class=\"sum\"><td>accuracy {:.1}%</td><td colspan=\"3\">macro-F1 {:.3}</td>\
         <td>{}</td></tr></table>",
        100.0 * s.accuracy,
        s.macro_f1,
        s.confusion.total()
    );
    t
}

fn html(r: &Report, curves: bool) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Evaluation of {}</title><style>\
         body{{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}}\
         table{{border-collapse:collapse;margin:0.5em 0 1.5em}}\
         td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}\
         td:first-child,th:first-child{{text-align:left}} tr.sum td{{font-weight:bold}}\
         .note{{color:#a40}} img{{max-width:100%;border:1px solid #eee}}</style></head><body>",
        esc(&r.model)
    );
    let _ = write!(
        h,
        "<h1>Evaluation</h1><table>\
         <tr><td>model</td><td>{}</td></tr><tr><td>version</td><td>{}</td></tr>\
         <tr><td>backend</td><td>{}</td></tr><tr><td>dataset</td><td>{}</td></tr>\
         <tr><td>dataset version</td><td>{}</td></tr><tr><td>frames</td><td>{} ({})</td></tr>\
         <tr><td>model latency</td><td>{:.2} ms per frame</td></tr>\
         <tr><td>created</td><td>{}</td></tr></table>",
        esc(&r.model),
        esc(&r.model_version),
        esc(&r.backend),
        esc(&r.dataset),
        esc(&r.dataset_version),
        r.frames,
        esc(&r.part),
        r.model_ms_mean,
        esc(&r.created)
    );
    if !r.failed.is_empty() {
        let _ = write!(
            h,
            "<p class=\"note\">{} frames could not be judged:</p><ul>",
            r.failed.len()
        );
        for f in r.failed.iter().take(20) {
            let _ = write!(h, "<li>{}</li>", esc(f));
        }
        h.push_str("</ul>");
    }
    if curves {
        h.push_str("<h2>Training</h2><img src=\"curves.png\" alt=\"training curves\">");
    }
    let _ = write!(
        h,
        "<h2>Model alone</h2>{}<img src=\"confusion_model.png\" alt=\"confusion matrix of \
         the model\">",
        scores_table(&r.model_only)
    );
    if let Some(hy) = &r.hybrid {
        let _ = write!(
            h,
            "<h2>Hybrid policy</h2><p>The rules decide when they are confident; the model \
             decides the rest. Sent to the model: <b>{:.1}%</b> of frames. Confident answers: \
             {:.1}% of frames, {:.2}% of them right.</p>{}\
             <img src=\"confusion_hybrid.png\" alt=\"confusion matrix of the hybrid policy\">",
            100.0 * hy.share_to_model,
            100.0 * hy.confident_share,
            100.0 * hy.confident_accuracy,
            scores_table(&hy.scores)
        );
    }
    if let Some(rules) = &r.rules {
        let _ = write!(h, "<h2>Rules alone</h2>{}", scores_table(rules));
    }
    if let Some(n) = &r.rules_note {
        let _ = write!(h, "<p class=\"note\">Rules and hybrid: {}</p>", esc(n));
    }
    h.push_str("</body></html>\n");
    h
}
