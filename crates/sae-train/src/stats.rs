//! Statistics for comparing runs over seeds: mean, sample standard deviation, Student-t
//! confidence intervals, and Welch's and the paired t-test. Plain implementations with the
//! Student-t distribution from the regularised incomplete beta function (Lentz's continued
//! fraction), tested against published table values.

/// Mean and sample standard deviation (n − 1; 0 for fewer than two values).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, 9 terms; ~1e-15 relative).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let sum = G[1..].iter().enumerate().fold(G[0], |s, (i, g)| s + g / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// The regularised incomplete beta function I_x(a, b).
fn incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front = (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    // The continued fraction converges fast for x < (a + 1) / (a + b + 2); use symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(x, a, b) / a
    } else {
        1.0 - front * beta_fraction(1.0 - x, b, a) / b
    }
}

/// The continued fraction of the incomplete beta function (modified Lentz).
fn beta_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (mut c, mut d) = (1.0, 1.0 - (a + b) * x / (a + 1.0));
    d = 1.0 / if d.abs() < TINY { TINY } else { d };
    let mut h = d;
    for m in 1..300 {
        let m = m as f64;
        for numerator in [
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
        ] {
            d = 1.0 + numerator * d;
            d = 1.0 / if d.abs() < TINY { TINY } else { d };
            c = 1.0 + numerator / c;
            c = if c.abs() < TINY { TINY } else { c };
            h *= d * c;
        }
        if (d * c - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// P(T ≤ t) for Student's t with `df` degrees of freedom (df may be fractional, as Welch's).
pub fn student_t_cdf(t: f64, df: f64) -> f64 {
    let tail = 0.5 * incomplete_beta(df / (df + t * t), df / 2.0, 0.5);
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The quantile of Student's t: the `t` with P(T ≤ t) = `p` (bisection on the CDF).
pub fn student_t_quantile(p: f64, df: f64) -> f64 {
    let (mut lo, mut hi) = (-1e3, 1e3);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if student_t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// A mean with its 95 % confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// The mean (or mean difference).
    pub mean: f64,
    /// Half-width of the 95 % interval (NaN when it cannot be estimated).
    pub half_width: f64,
    /// Two-sided p-value of "the true value is 0" (for differences; NaN otherwise).
    pub p_value: f64,
}

impl Estimate {
    /// Lower and upper end of the interval.
    pub fn interval(&self) -> (f64, f64) {
        (self.mean - self.half_width, self.mean + self.half_width)
    }
}

/// The mean of `v` with a Student-t 95 % interval.
pub fn mean_interval(v: &[f64]) -> Estimate {
    let (mean, std) = mean_std(v);
    let n = v.len() as f64;
    let half_width = if v.len() > 1 { student_t_quantile(0.975, n - 1.0) * std / n.sqrt() } else { f64::NAN };
    Estimate { mean, half_width, p_value: f64::NAN }
}

/// `values` as the reports print them over seeds: "mean ± sample std [95 % interval]", two
/// decimals; the mean alone for one value (no spread to tell).
pub fn mean_spread_text(values: &[f64]) -> String {
    let (mean, std) = mean_std(values);
    if values.len() < 2 {
        return format!("{mean:.2}");
    }
    let (lo, hi) = mean_interval(values).interval();
    format!("{mean:.2} ± {std:.2} [{lo:.2}, {hi:.2}]")
}

/// The difference of means `a − b` with Welch's t-test (unequal variances, Welch–Satterthwaite
/// degrees of freedom): 95 % interval and two-sided p-value.
pub fn welch(a: &[f64], b: &[f64]) -> Estimate {
    let ((ma, sa), (mb, sb)) = (mean_std(a), mean_std(b));
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let mean = ma - mb;
    if a.len() < 2 || b.len() < 2 {
        return Estimate { mean, half_width: f64::NAN, p_value: f64::NAN };
    }
    let (va, vb) = (sa * sa / na, sb * sb / nb);
    let se = (va + vb).sqrt();
    if se == 0.0 {
        return Estimate { mean, half_width: 0.0, p_value: if mean == 0.0 { 1.0 } else { 0.0 } };
    }
    let df = (va + vb).powi(2) / (va * va / (na - 1.0) + vb * vb / (nb - 1.0));
    let t = mean / se;
    Estimate { mean, half_width: student_t_quantile(0.975, df) * se, p_value: 2.0 * student_t_cdf(-t.abs(), df) }
}

/// The mean of the differences `a[i] − b[i]` (the same seed's runs) with the paired t-test.
pub fn paired(a: &[f64], b: &[f64]) -> Estimate {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let (mean, std) = mean_std(&d);
    let n = d.len() as f64;
    if d.len() < 2 {
        return Estimate { mean, half_width: f64::NAN, p_value: f64::NAN };
    }
    let se = std / n.sqrt();
    if se == 0.0 {
        return Estimate { mean, half_width: 0.0, p_value: if mean == 0.0 { 1.0 } else { 0.0 } };
    }
    let t = mean / se;
    Estimate {
        mean,
        half_width: student_t_quantile(0.975, n - 1.0) * se,
        p_value: 2.0 * student_t_cdf(-t.abs(), n - 1.0),
    }
}

/// What a comparison says about "a > b" at the 5 % level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The interval lies above 0.
    Supported,
    /// The interval lies below 0.
    Contradicted,
    /// The interval contains 0, or there are too few runs to tell.
    NotResolved,
}

impl Verdict {
    /// The verdict of a difference estimate.
    pub fn of(e: &Estimate) -> Self {
        let (lo, hi) = e.interval();
        if lo > 0.0 {
            Verdict::Supported
        } else if hi < 0.0 {
            Verdict::Contradicted
        } else {
            Verdict::NotResolved
        }
    }

    /// In words.
    pub fn words(self) -> &'static str {
        match self {
            Verdict::Supported => "supported",
            Verdict::Contradicted => "contradicted",
            Verdict::NotResolved => "not resolved",
        }
    }
}

/// Seeds needed for a paired comparison (same seeds for both models) to detect a gap `delta`
/// with 80 % power at the 5 % level, given the standard deviation `sd` of the per-seed
/// differences (normal approximation, `(z₀.₉₇₅ + z₀.₈)²·sd²/δ²`, rounded up, at least 2).
pub fn seeds_needed_paired(delta: f64, sd: f64) -> usize {
    let z = Z_TWO_SIDED_5_POWER_80;
    ((z * z * sd * sd / (delta * delta)).ceil() as usize).max(2)
}

/// z₀.₉₇₅ + z₀.₈: a two-sided test at the 5 % level with 80 % power.
const Z_TWO_SIDED_5_POWER_80: f64 = 1.959_963_984_540_054 + 0.841_621_233_572_914_3;

/// The smallest gap a paired comparison over `seeds` seeds detects with 80 % power at the 5 %
/// level, given the standard deviation `sd` of the per-seed differences (the normal
/// approximation of [`seeds_needed_paired`], solved for the gap).
pub fn smallest_gap_paired(sd: f64, seeds: usize) -> f64 {
    Z_TWO_SIDED_5_POWER_80 * sd / (seeds.max(1) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn student_t_matches_table_values() {
        // Two-sided 95 % critical values: df 1 → 12.706, 4 → 2.776, 10 → 2.228, 30 → 2.042.
        for (df, t) in [(1.0, 12.706_204_736), (4.0, 2.776_445_105), (10.0, 2.228_138_852), (30.0, 2.042_272_456)] {
            let q = student_t_quantile(0.975, df);
            assert!((q - t).abs() < 1e-6, "df {df}: {q} vs {t}");
        }
        // P(T ≤ 2) with 10 df = 0.963306 (two-sided p 0.07339).
        assert!((student_t_cdf(2.0, 10.0) - 0.963_305_982).abs() < 1e-8);
        assert!((student_t_cdf(-2.0, 10.0) - 0.036_694_018).abs() < 1e-8);
        assert_eq!(student_t_cdf(0.0, 3.0), 0.5);
        // ln Γ(5) = ln 24.
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-12);
    }

    /// 2.801585 · 0.95 / √5 = 2.661506 / 2.236068 = 1.190262; and the seeds that
    /// `seeds_needed_paired` asks for resolve the gap asked for, one seed fewer does not.
    #[test]
    fn the_smallest_gap_inverts_the_seeds_needed() {
        assert!((smallest_gap_paired(0.95, 5) - 1.190_262).abs() < 1e-6);
        for sd in [0.3, 0.95, 1.63, 5.91] {
            for delta in [0.5, 1.0, 2.0] {
                let n = seeds_needed_paired(delta, sd);
                assert!(smallest_gap_paired(sd, n) <= delta + 1e-12, "sd {sd}, delta {delta}: {n} seeds");
                if n > 2 {
                    assert!(smallest_gap_paired(sd, n - 1) > delta, "sd {sd}, delta {delta}: {n} seeds");
                }
            }
        }
    }

    #[test]
    fn intervals_and_tests_match_hand_computation() {
        // 1, 2, 3, 4, 5: mean 3, sd √2.5, 95 % half-width 2.776445·√2.5/√5 = 1.963243.
        let e = mean_interval(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!((e.mean - 3.0).abs() < 1e-12 && (e.half_width - 1.963_243_4).abs() < 1e-6, "{e:?}");
        // Welch: a = 1..5, b = 2,4,6,8,10: means 3 and 6, variances 2.5 and 10; se = √(0.5 + 2)
        // = 1.581139, t = −1.897367, df = 2.5² / (0.25/4 + 4/4) = 5.882353; p = 0.10736 (R's
        // t.test gives p-value = 0.1074, df = 5.8824).
        let w = welch(&[1.0, 2.0, 3.0, 4.0, 5.0], &[2.0, 4.0, 6.0, 8.0, 10.0]);
        assert!((w.mean + 3.0).abs() < 1e-12);
        assert!((w.p_value - 0.1074).abs() < 5e-4, "{w:?}");
        assert_eq!(Verdict::of(&w), Verdict::NotResolved);
        // Paired: differences 1, 2, 3, 2, 2: mean 2, sd √0.5, t = 2/(√0.5/√5) = 6.3246, df 4,
        // p = 0.003198.
        let p = paired(&[3.0, 4.0, 6.0, 5.0, 7.0], &[2.0, 2.0, 3.0, 3.0, 5.0]);
        assert!((p.mean - 2.0).abs() < 1e-12 && (p.p_value - 0.003_198).abs() < 1e-5, "{p:?}");
        assert_eq!(Verdict::of(&p), Verdict::Supported);
        assert_eq!(Verdict::of(&paired(&[2.0, 2.0, 3.0, 3.0, 5.0], &[3.0, 4.0, 6.0, 5.0, 7.0])), Verdict::Contradicted);
        // One seed: no interval, not resolved.
        assert_eq!(Verdict::of(&welch(&[70.0], &[69.0])), Verdict::NotResolved);
        // Paired, sd of the differences 1: 2.801585² = 7.85 → 8; sd 2, gap 1 → 31.4 → 32.
        assert_eq!(seeds_needed_paired(1.0, 1.0), 8);
        assert_eq!(seeds_needed_paired(1.0, 2.0), 32);
    }
}
