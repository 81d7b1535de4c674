//! The Fréchet distance between two sets of features, each summarised by its mean and
//! covariance (the FID formula of Heusel et al. 2017, as pytorch-fid's
//! `calculate_frechet_distance` computes it, in f64):
//!
//! ```text
//! d² = |μ1 - μ2|² + tr(Σ1) + tr(Σ2) - 2 tr(sqrtm(Σ1 Σ2))
//! ```
//!
//! pytorch-fid takes `sqrtm(Σ1 Σ2)` with scipy's general (Schur) matrix square root. Its trace
//! is computed here without it: Σ1 Σ2 is similar to the symmetric positive semi-definite
//! `sqrt(Σ1) Σ2 sqrt(Σ1)`, so the trace is the sum of the square roots of that matrix's
//! eigenvalues (clamped at 0, as rounding can make tiny ones negative). Both symmetric
//! eigenproblems are solved with the cyclic Jacobi method, which is accurate to the last bits
//! for the ≤ 256-dimensional features used here.

use crate::{bail, Result};

/// The mean and covariance of a set of feature vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStatistics {
    /// Width of the feature vectors.
    pub dim: usize,
    /// How many feature vectors the statistics come from.
    pub count: usize,
    /// The mean feature vector.
    pub mean: Vec<f64>,
    /// `dim × dim`, row-major: the unbiased covariance (divided by `count - 1`), as `np.cov`.
    pub covariance: Vec<f64>,
}

impl FeatureStatistics {
    /// The statistics of `features`: `count` rows of `dim` values, row-major.
    pub fn from_features(features: &[f64], dim: usize) -> Result<Self> {
        if dim == 0 || !features.len().is_multiple_of(dim) {
            bail!("{} feature values do not make rows of {dim}", features.len());
        }
        let count = features.len() / dim;
        if count < 2 {
            bail!("a covariance needs at least 2 feature vectors, got {count}");
        }
        if let Some(bad) = features.iter().find(|v| !v.is_finite()) {
            bail!("the features hold a value that is not finite ({bad})");
        }
        let mut mean = vec![0f64; dim];
        for row in features.chunks_exact(dim) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v;
            }
        }
        mean.iter_mut().for_each(|m| *m /= count as f64);
        // Two passes (centre, then multiply), as np.cov does.
        let mut covariance = vec![0f64; dim * dim];
        let mut centred = vec![0f64; dim];
        for row in features.chunks_exact(dim) {
            for ((c, &v), &m) in centred.iter_mut().zip(row).zip(&mean) {
                *c = v - m;
            }
            for i in 0..dim {
                let ci = centred[i];
                let out = &mut covariance[i * dim..(i + 1) * dim];
                for (o, &cj) in out.iter_mut().zip(&centred).skip(i) {
                    *o += ci * cj;
                }
            }
        }
        for i in 0..dim {
            for j in i..dim {
                let value = covariance[i * dim + j] / (count - 1) as f64;
                covariance[i * dim + j] = value;
                covariance[j * dim + i] = value;
            }
        }
        Ok(Self { dim, count, mean, covariance })
    }
}

/// The squared Fréchet distance between the Gaussians of `a` and `b` (what FID reports).
pub fn frechet_distance(a: &FeatureStatistics, b: &FeatureStatistics) -> Result<f64> {
    if a.dim != b.dim {
        bail!("cannot compare features of {} and {} dimensions", a.dim, b.dim);
    }
    let n = a.dim;
    let mean_term: f64 = a.mean.iter().zip(&b.mean).map(|(x, y)| (x - y) * (x - y)).sum();
    let trace = |m: &[f64]| (0..n).map(|i| m[i * n + i]).sum::<f64>();
    let sqrt_a = symmetric_sqrt(&a.covariance, n);
    let product = multiply(&multiply(&sqrt_a, &b.covariance, n), &sqrt_a, n);
    let (eigenvalues, _) = symmetric_eigen(&symmetrised(&product, n), n);
    let trace_sqrt: f64 = eigenvalues.iter().map(|&l| l.max(0.0).sqrt()).sum();
    Ok(mean_term + trace(&a.covariance) + trace(&b.covariance) - 2.0 * trace_sqrt)
}

/// The square root of a symmetric positive semi-definite matrix: `V diag(sqrt(λ)) Vᵀ`, with
/// negative eigenvalues (rounding) taken as 0.
pub fn symmetric_sqrt(matrix: &[f64], n: usize) -> Vec<f64> {
    let (eigenvalues, eigenvectors) = symmetric_eigen(&symmetrised(matrix, n), n);
    let roots: Vec<f64> = eigenvalues.iter().map(|&l| l.max(0.0).sqrt()).collect();
    let mut result = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            let value: f64 = (0..n).map(|k| eigenvectors[i * n + k] * roots[k] * eigenvectors[j * n + k]).sum();
            result[i * n + j] = value;
            result[j * n + i] = value;
        }
    }
    result
}

/// `(M + Mᵀ) / 2`: a product that is symmetric in exact arithmetic, made so exactly.
fn symmetrised(matrix: &[f64], n: usize) -> Vec<f64> {
    let mut result = matrix.to_vec();
    for i in 0..n {
        for j in i + 1..n {
            let value = 0.5 * (matrix[i * n + j] + matrix[j * n + i]);
            result[i * n + j] = value;
            result[j * n + i] = value;
        }
    }
    result
}

/// `A B` for `n × n` row-major matrices.
fn multiply(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut result = vec![0f64; n * n];
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            if aik == 0.0 {
                continue;
            }
            let row = &b[k * n..(k + 1) * n];
            for (r, &bkj) in result[i * n..(i + 1) * n].iter_mut().zip(row) {
                *r += aik * bkj;
            }
        }
    }
    result
}

/// The eigenvalues and eigenvectors of a symmetric `n × n` matrix (row-major) by the cyclic
/// Jacobi method: plane rotations, each zeroing one off-diagonal pair, swept over all pairs
/// until the off-diagonal part is negligible. Returns the eigenvalues (unsorted) and the
/// eigenvectors as the columns of a row-major matrix (`A = V diag(λ) Vᵀ`).
pub fn symmetric_eigen(matrix: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = matrix.to_vec();
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for sweep in 0..100 {
        let off_diagonal: f64 = (0..n).map(|i| (0..n).filter(|&j| j != i).map(|j| a[i * n + j].abs()).sum::<f64>()).sum();
        if off_diagonal == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                // After a few sweeps, an element too small to change either diagonal element
                // it couples is set to zero rather than rotated away (Numerical Recipes'
                // `jacobi`): this is what lets the sweeps end with an exactly diagonal matrix.
                let negligible = 100.0 * apq.abs();
                if sweep > 3 && a[p * n + p].abs() + negligible == a[p * n + p].abs() && a[q * n + q].abs() + negligible == a[q * n + q].abs() {
                    a[p * n + q] = 0.0;
                    a[q * n + p] = 0.0;
                    continue;
                }
                if apq == 0.0 {
                    continue;
                }
                // The rotation angle that zeroes a[p][q]: t = tan(angle), the smaller root of
                // t² + 2θt - 1 = 0 (the rotation by at most 45°, for stability).
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // A ← Jᵀ A J with J the identity but J[p][p] = J[q][q] = c, J[p][q] = s,
                // J[q][p] = -s: first the columns p and q, then the rows.
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                a[p * n + q] = 0.0;
                a[q * n + p] = 0.0;
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eigen_decomposition_reconstructs_the_matrix() {
        let n = 5;
        let base: Vec<f64> = (0..n * n).map(|i| ((i * 7919) % 13) as f64 - 6.0).collect();
        let mut matrix = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                matrix[i * n + j] = base[i * n + j] + base[j * n + i];
            }
        }
        let (values, vectors) = symmetric_eigen(&matrix, n);
        for i in 0..n {
            for j in 0..n {
                let rebuilt: f64 = (0..n).map(|k| vectors[i * n + k] * values[k] * vectors[j * n + k]).sum();
                assert!((rebuilt - matrix[i * n + j]).abs() < 1e-12, "({i},{j}): {rebuilt} vs {}", matrix[i * n + j]);
                let dot: f64 = (0..n).map(|k| vectors[k * n + i] * vectors[k * n + j]).sum();
                assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn identical_sets_are_at_distance_zero_and_a_shift_costs_its_square() {
        let dim = 3;
        let features: Vec<f64> = (0..60).map(|i| ((i * 37) % 11) as f64 * 0.3 + (i % dim) as f64).collect();
        let a = FeatureStatistics::from_features(&features, dim).unwrap();
        assert!(frechet_distance(&a, &a).unwrap().abs() < 1e-12);
        let shifted: Vec<f64> = features.iter().enumerate().map(|(i, v)| v + [1.0, -2.0, 0.5][i % dim]).collect();
        let b = FeatureStatistics::from_features(&shifted, dim).unwrap();
        let distance = frechet_distance(&a, &b).unwrap();
        assert!((distance - 5.25).abs() < 1e-12, "{distance}");
    }

    #[test]
    fn refuses_bad_feature_sets() {
        assert!(FeatureStatistics::from_features(&[1.0, 2.0, 3.0], 2).is_err());
        assert!(FeatureStatistics::from_features(&[1.0, 2.0], 2).is_err());
        assert!(FeatureStatistics::from_features(&[1.0, f64::NAN, 3.0, 4.0], 2).is_err());
        let a = FeatureStatistics::from_features(&[1.0, 2.0, 3.0, 5.0], 2).unwrap();
        let b = FeatureStatistics::from_features(&[1.0, 2.0, 3.0], 1).unwrap();
        assert!(frechet_distance(&a, &b).is_err());
    }
}
