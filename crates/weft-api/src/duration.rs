//! Durations as users write them in YAML and on the command line: `250ms`, `2s`, `1m`.
use std::time::Duration;

/// Parses `<number><unit>` with unit `ms`, `s`, `m` or `h`, in whole milliseconds (what
/// durations are written back as, so a value means the same on every hop).
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("duration {s:?} has no unit; write e.g. \"500ms\", \"2s\" or \"1m\""))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("duration {s:?} does not start with a number"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("duration {s:?} has unknown unit {unit:?}; use ms, s, m or h")),
    };
    let ms = secs * 1000.0;
    if !ms.is_finite() || ms > 1e15 {
        return Err(format!("duration {s:?} is too long"));
    }
    if (ms - ms.round()).abs() > 1e-6 {
        return Err(format!("duration {s:?} is not a whole number of milliseconds"));
    }
    Ok(Duration::from_millis(ms.round() as u64))
}

/// Serde adapter for `Duration` fields written as strings (`with = "crate::duration"`).
pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    parse(&s).map_err(serde::de::Error::custom)
}

/// Serde adapter for `Option<Duration>` fields written as strings.
pub mod opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| super::parse(&s).map_err(serde::de::Error::custom)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("1m").unwrap(), Duration::from_secs(60));
        assert!(parse("5").unwrap_err().contains("no unit"));
        assert!(parse("5d").unwrap_err().contains("unknown unit"));
        // Found by the yaml fuzz target: 0.6 ms was written back as "0ms".
        assert!(parse("0.6ms").unwrap_err().contains("whole number of milliseconds"));
        assert!(parse("0.0006s").unwrap_err().contains("whole number of milliseconds"));
        assert_eq!(parse("0.001s").unwrap(), Duration::from_millis(1));
        // Used to panic (Duration::from_secs_f64 of an infinite number).
        assert!(parse(&format!("{}h", "9".repeat(400))).unwrap_err().contains("too long"));
    }
}
