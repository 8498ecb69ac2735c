//! Seeded large samples against the distributions' parameters. Tolerances are several
//! standard errors wide at these sample sizes, and the seeds are fixed, so the tests
//! are deterministic.
use super::*;

fn mean_cv(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt() / mean)
}

fn gaps(a: Arrivals, n: usize, seed: u64) -> Vec<f64> {
    let mut rng = Xoshiro256::from_seed(seed);
    (0..n).map(|_| a.next_gap(&mut rng)).collect()
}

#[test]
fn poisson_gaps_have_the_rate_and_cv_one() {
    // 200k exponential gaps: standard error of the mean 0.22%, of the CV about 0.3%.
    let (mean, cv) = mean_cv(&gaps(Arrivals::new(5.0, 1.0).unwrap(), 200_000, 1));
    assert!((mean - 0.2).abs() < 0.2 * 0.01, "mean {mean}");
    assert!((cv - 1.0).abs() < 0.02, "cv {cv}");
}

#[test]
fn gamma_gaps_have_the_rate_and_the_requested_cv() {
    for (cv_want, tol) in [(0.5, 0.02), (2.0, 0.06), (3.0, 0.12)] {
        let a = Arrivals::new(8.0, cv_want).unwrap();
        assert!(matches!(a, Arrivals::Gamma { .. }));
        let (mean, cv) = mean_cv(&gaps(a, 400_000, 2));
        assert!(
            (mean - 0.125).abs() < 0.125 * 0.02,
            "cv {cv_want}: mean {mean}"
        );
        assert!(
            (cv - cv_want).abs() < tol * cv_want,
            "cv {cv_want}: got {cv}"
        );
    }
    assert!(Arrivals::new(0.0, 1.0).is_err());
    assert!(Arrivals::new(1.0, f64::NAN).is_err());
}

/// Pearson's chi-square statistic of `counts` against probabilities `p`.
fn chi_square(counts: &[usize], p: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    counts
        .iter()
        .zip(p)
        .map(|(&c, &p)| {
            let e = p * n as f64;
            (c as f64 - e).powi(2) / e
        })
        .sum()
}

fn counts(pop: Popularity, n: usize, draws: usize, seed: u64) -> Vec<usize> {
    let mut rng = Xoshiro256::from_seed(seed);
    let mut picker = pop.sampler(n);
    let mut c = vec![0; n];
    for _ in 0..draws {
        c[picker.pick(&mut rng)] += 1;
    }
    c
}

/// The 0.999 quantile of chi-square with 9 degrees of freedom.
const CHI2_9DF_999: f64 = 27.88;

#[test]
fn popularity_samplers_match_their_distributions() {
    let n = 10;
    let uniform = vec![0.1; n];
    let zipf: Vec<f64> = {
        let w: Vec<f64> = (1..=n).map(|i| 1.0 / i as f64).collect();
        let t: f64 = w.iter().sum();
        w.iter().map(|x| x / t).collect()
    };
    // P(floor(X n) = i) = ((i+1)/n)^a - (i/n)^a for X ~ power(a).
    let power = |a: f64| -> Vec<f64> {
        (0..n)
            .map(|i| ((i + 1) as f64 / n as f64).powf(a) - (i as f64 / n as f64).powf(a))
            .collect()
    };
    let cases = [
        (Popularity::Uniform, uniform),
        (Popularity::Zipf { s: 1.0 }, zipf),
        (Popularity::PowerLaw { alpha: 0.5 }, power(0.5)),
        (Popularity::PowerLaw { alpha: 1.0 }, power(1.0)),
    ];
    for (pop, p) in cases {
        let c = counts(pop, n, 100_000, 3);
        let x2 = chi_square(&c, &p);
        assert!(x2 < CHI2_9DF_999, "{pop:?}: chi-square {x2} for {c:?}");
    }
    // Power law 0.5 is skewed: adapter 0 gets sqrt(0.1) = 31.6% of requests.
    let c = counts(Popularity::PowerLaw { alpha: 0.5 }, n, 100_000, 4);
    assert!((c[0] as f64 / 1e5 - 0.316).abs() < 0.01, "{c:?}");
}

#[test]
fn distinct_and_identical_are_exact() {
    let mut rng = Xoshiro256::from_seed(5);
    let mut d = Popularity::Distinct.sampler(3);
    let got: Vec<usize> = (0..7).map(|_| d.pick(&mut rng)).collect();
    assert_eq!(got, vec![0, 1, 2, 0, 1, 2, 0]);
    let mut i = Popularity::Identical.sampler(3);
    assert!((0..10).all(|_| i.pick(&mut rng) == 0));
}

#[test]
fn popularity_specs_parse() {
    assert_eq!(Popularity::parse("uniform").unwrap(), Popularity::Uniform);
    assert_eq!(
        Popularity::parse("powerlaw:0.8").unwrap(),
        Popularity::PowerLaw { alpha: 0.8 }
    );
    assert_eq!(
        Popularity::parse("zipf:1.2").unwrap(),
        Popularity::Zipf { s: 1.2 }
    );
    assert_eq!(Popularity::parse("distinct").unwrap(), Popularity::Distinct);
    for bad in ["", "zipf", "zipf:-1", "powerlaw:x", "pareto:2"] {
        assert!(Popularity::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn lengths_parse_and_sample_within_their_laws() {
    let mut rng = Xoshiro256::from_seed(6);
    assert_eq!(Length::parse("128").unwrap().sample(&mut rng), 128);
    let u = Length::parse("10-20").unwrap();
    let xs: Vec<usize> = (0..50_000).map(|_| u.sample(&mut rng)).collect();
    assert!(xs.iter().all(|x| (10..=20).contains(x)));
    assert!(xs.contains(&10) && xs.contains(&20));
    let mean = xs.iter().sum::<usize>() as f64 / xs.len() as f64;
    assert!((mean - 15.0).abs() < 0.05, "{mean}");
    let l = Length::parse("lognormal:200,0.5").unwrap();
    let xs: Vec<f64> = (0..200_000).map(|_| l.sample(&mut rng) as f64).collect();
    let (mean, cv) = mean_cv(&xs);
    // exp(N(mu, 0.5)) has CV sqrt(exp(0.25) - 1) = 0.533.
    assert!((mean - 200.0).abs() < 200.0 * 0.01, "{mean}");
    assert!((cv - 0.533).abs() < 0.02, "{cv}");
    for bad in ["0", "20-10", "x", "lognormal:0,1", "lognormal:5"] {
        assert!(Length::parse(bad).is_err(), "{bad:?}");
    }
}
