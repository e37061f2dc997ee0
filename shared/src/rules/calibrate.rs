//! Fitting the rules' calibration on labelled frames: a multinomial logistic regression from
//! the evidence features to the five classes, and the confidence gate that reaches a target
//! accuracy. Hand-written: 25 parameters on a few thousand rows need no ML framework, and the
//! fit must run in the trainer without libtorch.

use super::config::Calibration;
use super::{N_FEATURES, probabilities};

/// Fits `bias` and `weights` by full-batch gradient descent on the mean cross-entropy with an
/// L2 penalty `l2` on the weights (not the biases). `labels` are indices 0..5 in the order
/// good, porosity, undercut, spatter, burn_through; classes absent from the data keep a low
/// bias so they are never predicted.
pub fn fit(rows: &[[f32; N_FEATURES]], labels: &[usize], l2: f32) -> Calibration {
    let mut cal = Calibration {
        bias: [0.0; 5],
        weights: [[0.0; N_FEATURES]; 5],
        fitted_on: String::new(),
    };
    let n = rows.len().min(labels.len());
    if n == 0 {
        return cal;
    }
    // Step size for features of order 1 and a convex loss; momentum speeds up the flat valleys.
    let (lr, momentum, iterations) = (0.5f32, 0.9f32, 4000);
    let mut vb = [0.0f32; 5];
    let mut vw = [[0.0f32; N_FEATURES]; 5];
    for _ in 0..iterations {
        let mut gb = [0.0f32; 5];
        let mut gw = [[0.0f32; N_FEATURES]; 5];
        for (x, &y) in rows.iter().zip(labels).take(n) {
            let p = probabilities(&cal, x);
            for k in 0..5 {
                let err = p[k] - if k == y { 1.0 } else { 0.0 };
                gb[k] += err;
                for j in 0..N_FEATURES {
                    gw[k][j] += err * x[j];
                }
            }
        }
        for k in 0..5 {
            vb[k] = momentum * vb[k] - lr * gb[k] / n as f32;
            cal.bias[k] += vb[k];
            for j in 0..N_FEATURES {
                let g = gw[k][j] / n as f32 + l2 * cal.weights[k][j];
                vw[k][j] = momentum * vw[k][j] - lr * g;
                cal.weights[k][j] += vw[k][j];
            }
        }
    }
    // Round so that the written TOML is readable; 1e-3 is far below what matters.
    let r = |v: f32| (v * 1000.0).round() / 1000.0;
    cal.bias = cal.bias.map(r);
    cal.weights = cal.weights.map(|row| row.map(r));
    cal
}

/// The lowest confidence gate at which the decisions at or above it are at least `target`
/// accurate on `(confidence, correct)` pairs, within `[floor, 0.999]`. With no gate reaching the
/// target, 0.999.
pub fn gate_for_accuracy(pairs: &[(f32, bool)], target: f64, floor: f32) -> f32 {
    let mut sorted: Vec<(f32, bool)> = pairs.to_vec();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut right, mut gate) = (0usize, None);
    for (i, &(conf, ok)) in sorted.iter().enumerate() {
        right += usize::from(ok);
        let last_of_tie = sorted.get(i + 1).is_none_or(|next| next.0 < conf);
        if last_of_tie && right as f64 / (i + 1) as f64 >= target {
            gate = Some(conf);
        }
    }
    gate.unwrap_or(0.999).clamp(floor, 0.999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separable_evidence_is_learned() {
        // Class k > 0 shows evidence on feature k-1; good shows none.
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for i in 0..200 {
            let k = i % 5;
            let mut x = [0.05 * (i % 3) as f32; N_FEATURES];
            x[4] = 0.3;
            if k > 0 {
                x[k - 1] = 1.0 + 0.1 * (i % 7) as f32;
            }
            rows.push(x);
            labels.push(k);
        }
        let cal = fit(&rows, &labels, 1e-3);
        for (x, &y) in rows.iter().zip(&labels) {
            let p = probabilities(&cal, x);
            let best = (0..5).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
            assert_eq!(best, y, "{x:?} -> {p:?}");
            assert!(p[y] > 0.8, "{x:?} -> {p:?}");
        }
    }

    #[test]
    fn gate_is_the_lowest_that_keeps_the_target() {
        let pairs = [
            (0.99, true),
            (0.95, true),
            (0.9, false),
            (0.8, true),
            (0.7, false),
        ];
        // >= 0.95: 2/2; >= 0.9: 2/3; >= 0.8: 3/4; >= 0.7: 3/5.
        assert_eq!(gate_for_accuracy(&pairs, 0.99, 0.5), 0.95);
        assert_eq!(gate_for_accuracy(&pairs, 0.75, 0.5), 0.8);
        assert_eq!(gate_for_accuracy(&pairs, 0.5, 0.5), 0.7);
        assert_eq!(gate_for_accuracy(&[(0.6, false)], 0.9, 0.5), 0.999);
    }
}
