//! Classification figures: confusion matrix, accuracy, per-class precision/recall/F1, macro-F1.

use std::fmt;

use serde::Serialize;

/// Counts of (true class, predicted class) over a fixed class list. Predictions outside the
/// list (e.g. "unknown") are counted in an extra last column.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfusionMatrix {
    pub classes: Vec<String>,
    /// `counts[truth][predicted]`; the last column is "other" (predictions outside `classes`).
    pub counts: Vec<Vec<u64>>,
}

/// Precision, recall and F1 of one class.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClassScores {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
}

impl ConfusionMatrix {
    pub fn new(classes: &[String]) -> ConfusionMatrix {
        let n = classes.len();
        ConfusionMatrix {
            classes: classes.to_vec(),
            counts: vec![vec![0; n + 1]; n],
        }
    }

    /// Adds one frame; a truth outside the class list is ignored and reported as `false`.
    pub fn add(&mut self, truth: &str, predicted: &str) -> bool {
        let Some(t) = self.classes.iter().position(|c| c == truth) else {
            return false;
        };
        let p = self
            .classes
            .iter()
            .position(|c| c == predicted)
            .unwrap_or(self.classes.len());
        self.counts[t][p] += 1;
        true
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    pub fn accuracy(&self) -> f64 {
        let right: u64 = (0..self.classes.len()).map(|i| self.counts[i][i]).sum();
        ratio(right, self.total())
    }

    pub fn scores(&self, class: usize) -> ClassScores {
        let tp = self.counts[class][class];
        let support: u64 = self.counts[class].iter().sum();
        let predicted: u64 = self.counts.iter().map(|row| row[class]).sum();
        let precision = ratio(tp, predicted);
        let recall = ratio(tp, support);
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        ClassScores {
            precision,
            recall,
            f1,
            support,
        }
    }

    /// Mean F1 over the classes that have frames.
    pub fn macro_f1(&self) -> f64 {
        let f1s: Vec<f64> = (0..self.classes.len())
            .map(|i| self.scores(i))
            .filter(|s| s.support > 0)
            .map(|s| s.f1)
            .collect();
        if f1s.is_empty() {
            0.0
        } else {
            f1s.iter().sum::<f64>() / f1s.len() as f64
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

impl fmt::Display for ConfusionMatrix {
    /// A text table: rows are the truth, columns the prediction, then recall/precision/F1.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .classes
            .iter()
            .map(|c| c.len())
            .max()
            .unwrap_or(5)
            .max(7);
        write!(f, "{:>width$} |", "truth \\ predicted")?;
        for c in &self.classes {
            write!(f, " {c:>width$}")?;
        }
        writeln!(f, " {:>width$} | recall  precision  F1", "other")?;
        for (i, c) in self.classes.iter().enumerate() {
            write!(f, "{c:>width$} |", width = width.max(17))?;
            for n in &self.counts[i] {
                write!(f, " {n:>width$}")?;
            }
            let s = self.scores(i);
            writeln!(f, " | {:>6.3}  {:>9.3}  {:.3}", s.recall, s.precision, s.f1)?;
        }
        write!(
            f,
            "accuracy {:.4} ({} frames), macro-F1 {:.4}",
            self.accuracy(),
            self.total(),
            self.macro_f1()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_by_hand() {
        let classes: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let mut m = ConfusionMatrix::new(&classes);
        // a: 3 right, 1 called b; b: 2 right, 1 unknown.
        for (t, p) in [
            ("a", "a"),
            ("a", "a"),
            ("a", "a"),
            ("a", "b"),
            ("b", "b"),
            ("b", "b"),
            ("b", "unknown"),
        ] {
            assert!(m.add(t, p));
        }
        assert!(!m.add("zzz", "a"));
        assert_eq!(m.counts, vec![vec![3, 1, 0], vec![0, 2, 1]]);
        assert!((m.accuracy() - 5.0 / 7.0).abs() < 1e-12);
        let a = m.scores(0);
        assert_eq!((a.precision, a.recall), (1.0, 0.75));
        let b = m.scores(1);
        assert!((b.precision - 2.0 / 3.0).abs() < 1e-12 && (b.recall - 2.0 / 3.0).abs() < 1e-12);
        let f1a = 2.0 * 0.75 / 1.75;
        assert!((m.macro_f1() - (f1a + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert!(m.to_string().contains("accuracy 0.7143 (7 frames)"));
    }
}
