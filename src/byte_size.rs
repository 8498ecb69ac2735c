//! Byte sizes with units, for flags such as memory budgets: [`parse_byte_size`] reads
//! `1073741824`, `512MiB`, `1.5 GiB` or `500MB` (a clap value parser).

/// Units by lower-cased name and size in bytes: binary (powers of 1024) and decimal
/// (powers of 1000). Matching ignores case, so `kB` and `KB` are both 1000 bytes.
const UNITS: [(&str, u128); 9] = [
    ("b", 1),
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
];

/// The unit names as the messages spell them.
const UNIT_NAMES: &str = "B, KiB, MiB, GiB, TiB, kB, MB, GB, TB";

/// Digits after the decimal point accepted (enough for any byte count, few enough for
/// exact integer arithmetic).
const MAX_DECIMALS: usize = 24;

/// A byte count: a non-negative number, optionally with decimals, then an optional
/// unit (`B`, `KiB`, `MiB`, `GiB`, `TiB` in powers of 1024; `kB`, `MB`, `GB`, `TB` in
/// powers of 1000; any case), with or without a space between them: `1073741824`,
/// `2GiB`, `1.5 GiB`, `500MB`. A fraction of a byte is dropped (`1.5B` is 1). Usable as
/// `#[arg(value_parser = parse_byte_size)]`.
pub fn parse_byte_size(s: &str) -> Result<usize, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("empty byte size: expected a number of bytes such as 512MiB".into());
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = (&text[..split], text[split..].trim_start());
    if number.is_empty() {
        if unit.starts_with('-') {
            return Err(format!("byte size {s:?} is negative"));
        }
        return Err(format!(
            "byte size {s:?} does not start with a number (expected e.g. 512MiB)"
        ));
    }
    let scale = unit_scale(unit).ok_or_else(|| {
        format!("byte size {s:?} has an unknown unit {unit:?} (known: {UNIT_NAMES})")
    })?;
    let bytes = scaled(number, scale).map_err(|why| format!("byte size {s:?}: {why}"))?;
    usize::try_from(bytes).map_err(|_| format!("byte size {s:?}: {}", too_large()))
}

fn too_large() -> String {
    format!("too large (at most {} bytes)", usize::MAX)
}

/// Bytes per `unit` (empty: bytes), ignoring case.
fn unit_scale(unit: &str) -> Option<u128> {
    if unit.is_empty() {
        return Some(1);
    }
    let lower = unit.to_ascii_lowercase();
    UNITS
        .iter()
        .find(|(name, _)| *name == lower)
        .map(|&(_, scale)| scale)
}

/// `number` (digits, at most one `.`) times `scale`, rounded down to whole bytes, in
/// exact integer arithmetic.
fn scaled(number: &str, scale: u128) -> Result<u128, String> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if fraction.contains('.') {
        return Err(format!("{number:?} is not a number"));
    }
    if whole.is_empty() && fraction.is_empty() {
        return Err("no digits in the number".into());
    }
    if fraction.len() > MAX_DECIMALS {
        return Err(format!("more than {MAX_DECIMALS} decimal places"));
    }
    let whole_bytes = if whole.is_empty() {
        0
    } else {
        let n: u128 = whole.parse().map_err(|_| too_large())?;
        n.checked_mul(scale).ok_or_else(too_large)?
    };
    let fraction_bytes = if fraction.is_empty() {
        0
    } else {
        // Below 10^24 times at most 2^40 (about 1.1e12): well within u128.
        let digits: u128 = fraction
            .parse()
            .map_err(|_| format!("{number:?} is not a number"))?;
        digits * scale / 10u128.pow(fraction.len() as u32)
    };
    whole_bytes
        .checked_add(fraction_bytes)
        .ok_or_else(too_large)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> usize {
        parse_byte_size(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn err(s: &str) -> String {
        match parse_byte_size(s) {
            Ok(n) => panic!("{s:?} parsed as {n}"),
            Err(e) => e,
        }
    }

    #[test]
    fn plain_numbers_are_bytes() {
        assert_eq!(ok("0"), 0);
        assert_eq!(ok("1073741824"), 1 << 30);
        assert_eq!(ok("123B"), 123);
        assert_eq!(ok("123b"), 123);
        assert_eq!(ok("007"), 7);
    }

    #[test]
    fn binary_units_are_powers_of_1024() {
        assert_eq!(ok("64KiB"), 64 << 10);
        assert_eq!(ok("512MiB"), 512 << 20);
        assert_eq!(ok("2GiB"), 2 << 30);
        assert_eq!(ok("1TiB"), 1 << 40);
        // Any case.
        assert_eq!(ok("2gib"), 2 << 30);
        assert_eq!(ok("2GIB"), 2 << 30);
        assert_eq!(ok("64kib"), 64 << 10);
    }

    #[test]
    fn decimal_units_are_powers_of_1000() {
        assert_eq!(ok("10kB"), 10_000);
        assert_eq!(ok("10KB"), 10_000);
        assert_eq!(ok("10kb"), 10_000);
        assert_eq!(ok("500MB"), 500_000_000);
        assert_eq!(ok("1.5GB"), 1_500_000_000);
        assert_eq!(ok("1TB"), 1_000_000_000_000);
    }

    #[test]
    fn decimals_are_exact_and_round_down() {
        assert_eq!(ok("1.5GiB"), 3 << 29);
        assert_eq!(ok("0.5KiB"), 512);
        assert_eq!(ok(".5KiB"), 512);
        assert_eq!(ok("2.KiB"), 2048);
        assert_eq!(ok("1.5B"), 1);
        assert_eq!(ok("0.001kB"), 1);
        assert_eq!(ok("0.0001kB"), 0);
        // 0.1 KiB is 102.4 bytes.
        assert_eq!(ok("0.1KiB"), 102);
        assert_eq!(ok("1.999999999999999999999999KiB"), 2047);
        // Exact where a float would not be: 2^53 + 1 bytes.
        assert_eq!(ok("9007199254740993"), 9_007_199_254_740_993);
    }

    #[test]
    fn whitespace_around_and_between_is_allowed() {
        assert_eq!(ok("  2GiB  "), 2 << 30);
        assert_eq!(ok("2 GiB"), 2 << 30);
        assert_eq!(ok("1.5\tMB"), 1_500_000);
        assert_eq!(ok(" 42 "), 42);
        assert_eq!(ok("42 B"), 42);
    }

    #[test]
    fn empty_or_numberless_sizes_are_errors() {
        assert!(err("").contains("empty"));
        assert!(err("   ").contains("empty"));
        assert!(err("GiB").contains("does not start with a number"));
        assert!(err(".GiB").contains("no digits"));
        assert!(err("NaN").contains("does not start with a number"));
        assert!(err("inf").contains("does not start with a number"));
    }

    #[test]
    fn negative_sizes_are_errors() {
        assert!(err("-1").contains("negative"));
        assert!(err("-1.5GiB").contains("negative"));
        assert!(err(" -0").contains("negative"));
    }

    #[test]
    fn unknown_units_are_errors_naming_the_unit() {
        let e = err("2G");
        assert!(e.contains("unknown unit \"G\"") && e.contains("GiB"), "{e}");
        assert!(err("2 gigabytes").contains("\"gigabytes\""));
        assert!(err("2PiB").contains("\"PiB\""));
        assert!(err("1e9").contains("unknown unit \"e9\""));
        assert!(err("2GiB extra").contains("unknown unit \"GiB extra\""));
    }

    #[test]
    fn malformed_numbers_are_errors() {
        assert!(err("1.2.3MB").contains("not a number"));
        let e = err(&format!("0.{}1KiB", "0".repeat(MAX_DECIMALS)));
        assert!(e.contains("decimal places"), "{e}");
    }

    #[test]
    fn sizes_beyond_usize_are_errors() {
        let max = usize::MAX.to_string();
        assert_eq!(ok(&max), usize::MAX);
        let e = err(&format!("{}0", max));
        assert!(e.contains("too large"), "{e}");
        assert!(err(&format!("{}TiB", usize::MAX)).contains("too large"));
        assert!(err(&"9".repeat(60)).contains("too large"));
        assert!(err(&format!("{}.5TiB", "9".repeat(40))).contains("too large"));
    }

    #[test]
    fn works_as_a_clap_value_parser() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[arg(long, value_parser = parse_byte_size)]
            memory: usize,
        }
        let cli = Cli::try_parse_from(["x", "--memory", "1.5GiB"]).unwrap();
        assert_eq!(cli.memory, 3 << 29);
        let e = Cli::try_parse_from(["x", "--memory", "2G"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown unit"), "{e}");
    }
}
