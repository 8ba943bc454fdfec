//! Half-open layer ranges as recipes write them: `"4"`, `"0..4"`, `"16.."`, `"..8"`.
use std::fmt;
use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LayerRange {
    pub start: usize,
    /// `None` means "to the last layer".
    pub end: Option<usize>,
}

impl LayerRange {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let number = |s: &str| -> Result<usize, String> {
            s.trim()
                .parse()
                .map_err(|_| format!("`{}` is not a layer number", s.trim()))
        };
        let range = match text.split_once("..") {
            None => {
                let n = number(text)?;
                let end = n
                    .checked_add(1)
                    .ok_or_else(|| format!("`{n}` is past any model's last layer"))?;
                LayerRange {
                    start: n,
                    end: Some(end),
                }
            }
            Some((start, end)) => {
                if end.starts_with('=') {
                    return Err("inclusive ranges (`..=`) are not supported; ranges are half-open, write `a..b+1`".into());
                }
                let start = if start.trim().is_empty() {
                    0
                } else {
                    number(start)?
                };
                let end = if end.trim().is_empty() {
                    None
                } else {
                    Some(number(end)?)
                };
                LayerRange { start, end }
            }
        };
        if let Some(end) = range.end {
            if end <= range.start {
                return Err(format!(
                    "the range is empty: it starts at {} and ends before {end}",
                    range.start
                ));
            }
        }
        Ok(range)
    }

    /// The range within a model of `layers` layers, or why it does not fit.
    pub fn resolve(&self, layers: usize) -> Result<Range<usize>, String> {
        let end = self.end.unwrap_or(layers);
        if self.start >= layers || end > layers {
            return Err(format!(
                "the base model has {layers} layers (0..{layers}), so `{self}` reaches past its last layer"
            ));
        }
        Ok(self.start..end)
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.end {
            Some(end) if self.start.checked_add(1) == Some(end) => write!(f, "{}", self.start),
            Some(end) => write!(f, "{}..{end}", self.start),
            None => write!(f, "{}..", self.start),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_recipes_use() {
        assert_eq!(
            LayerRange::parse("3").unwrap(),
            LayerRange {
                start: 3,
                end: Some(4)
            }
        );
        assert_eq!(
            LayerRange::parse("0..4").unwrap(),
            LayerRange {
                start: 0,
                end: Some(4)
            }
        );
        assert_eq!(
            LayerRange::parse("16..").unwrap(),
            LayerRange {
                start: 16,
                end: None
            }
        );
        assert_eq!(
            LayerRange::parse("..8").unwrap(),
            LayerRange {
                start: 0,
                end: Some(8)
            }
        );
    }

    #[test]
    fn rejects_empty_and_malformed_ranges() {
        assert!(LayerRange::parse("8..4").is_err());
        assert!(LayerRange::parse("4..4").is_err());
        assert!(LayerRange::parse("a..4").is_err());
        assert!(LayerRange::parse("0..=4").is_err());
        assert!(LayerRange::parse(&usize::MAX.to_string()).is_err());
    }

    #[test]
    fn resolves_against_the_layer_count() {
        assert_eq!(LayerRange::parse("2..").unwrap().resolve(4).unwrap(), 2..4);
        assert!(LayerRange::parse("2..6").unwrap().resolve(4).is_err());
        assert!(LayerRange::parse("4..").unwrap().resolve(4).is_err());
    }
}
