//! The safetensors header: an 8-byte little-endian length, then that many bytes of JSON that
//! give each tensor's dtype, shape and byte range in the data that follows. It is checked here
//! by the `safetensors` crate's rules (the `safetensors_header` fuzz target holds the two
//! together), but each fault names the tensor and the bytes at fault, where the crate says
//! "invalid offset" or "file not fully covered".
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

use safetensors::Dtype;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

/// The longest header the `safetensors` crate reads (100 MB); a longer one is a damaged or
/// hostile file, never a model.
pub(crate) const MAX_HEADER_LEN: u64 = 100_000_000;

/// The bytes before the header: its length.
pub(crate) const LEN_BYTES: u64 = 8;

/// One tensor as the header describes it; `start..end` is relative to the data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

/// What can be wrong with a header. The display is the part of the message after "`path` is
/// not a valid safetensors file: ".
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum HeaderError {
    #[error("it is {len} bytes long, too short for the 8-byte header length that starts every safetensors file")]
    TooShort { len: u64 },

    #[error("its header length field says `{claimed}` bytes, more than the 100 MB a safetensors header may have")]
    TooLarge { claimed: u64 },

    #[error("its header length field says `{claimed}` bytes, but only {available} bytes follow it: the file is truncated or not a safetensors file")]
    BeyondFile { claimed: u64, available: u64 },

    #[error("its header is not UTF-8 text (invalid byte at offset {at} of the header)")]
    NotUtf8 { at: usize },

    #[error("its header is not valid JSON: {message}")]
    NotJson { message: String },

    #[error("its header is not a JSON object of tensors: {message}")]
    NotAnObject { message: String },

    #[error("its `__metadata__` is not an object of strings: {message}")]
    BadMetadata { message: String },

    #[error("the tensor `{name}` is named twice in the header")]
    Duplicate { name: String },

    #[error("the header entry for `{name}` is not a tensor description: {message}")]
    BadEntry { name: String, message: String },

    #[error("the tensor `{name}` has the dtype `{dtype}`, which safetensors does not know")]
    UnknownDtype { name: String, dtype: String },

    #[error(
        "the shape of the tensor `{name}`, `{shape:?}`, has more elements than memory can address"
    )]
    ShapeOverflow { name: String, shape: Vec<usize> },

    #[error(
        "the tensor `{name}` ({dtype}, shape `{shape:?}`) does not fill a whole number of bytes"
    )]
    PartialByte {
        name: String,
        dtype: Dtype,
        shape: Vec<usize>,
    },

    #[error(
        "the tensor `{name}` has data_offsets `[{start}, {end}]`, which end before they start"
    )]
    Reversed { name: String, start: u64, end: u64 },

    #[error("the tensor `{name}` is {dtype} of shape `{shape:?}`, {size} bytes, but its data_offsets `[{start}, {end}]` span {} bytes", end - start)]
    SizeMismatch {
        name: String,
        dtype: Dtype,
        shape: Vec<usize>,
        size: u64,
        start: u64,
        end: u64,
    },

    #[error("the data of `{name}` (bytes {start}..{end}) overlaps the data of `{previous}` (bytes {previous_start}..{previous_end})")]
    Overlap {
        name: String,
        start: u64,
        end: u64,
        previous: String,
        previous_start: u64,
        previous_end: u64,
    },

    #[error("bytes {from}..{to} of its data belong to no tensor (the next tensor, `{name}`, starts at {to})")]
    Gap { from: u64, to: u64, name: String },

    #[error("the data of `{name}` (bytes {start}..{end}) runs past the end of the file, which holds {data_len} bytes of tensor data")]
    OutOfBounds {
        name: String,
        start: u64,
        end: u64,
        data_len: u64,
    },

    #[error("its last {trailing} bytes belong to no tensor (the tensors end at byte {end} of {data_len} bytes of data)")]
    Trailing {
        trailing: u64,
        end: u64,
        data_len: u64,
    },
}

impl HeaderError {
    /// What to do about it.
    pub fn help(&self) -> &'static str {
        use HeaderError::*;
        match self {
            TooShort { .. } | BeyondFile { .. } | OutOfBounds { .. } => {
                "the file is truncated, perhaps by an interrupted download or copy; download or export it again"
            }
            TooLarge { .. } | NotUtf8 { .. } | NotJson { .. } | NotAnObject { .. } => {
                "this is not a safetensors file, or its start is damaged; download or export it again"
            }
            UnknownDtype { .. } => {
                "the file was written with a dtype this build of modelforge cannot read; export it in F32, F16 or BF16"
            }
            _ => "the file's header and its data disagree, so the file is damaged; download or export it again",
        }
    }

    /// Whether this is a fault the `safetensors` crate lets through: it keeps the last of two
    /// tensors with one name, and reads a dtype written as `{"F32": null}`.
    pub fn stricter_than_the_crate(&self) -> bool {
        matches!(self, HeaderError::Duplicate { .. })
            || matches!(self, HeaderError::BadEntry { message, .. } if message.starts_with("`dtype`"))
    }
}

/// The length of the JSON header, from the first bytes of a file of `file_len` bytes.
pub(crate) fn json_len(prefix: &[u8], file_len: u64) -> Result<u64, HeaderError> {
    let Some(bytes) = prefix.get(..LEN_BYTES as usize) else {
        return Err(HeaderError::TooShort { len: file_len });
    };
    let mut len = [0u8; LEN_BYTES as usize];
    len.copy_from_slice(bytes);
    let claimed = u64::from_le_bytes(len);
    if claimed > MAX_HEADER_LEN {
        return Err(HeaderError::TooLarge { claimed });
    }
    let available = file_len.saturating_sub(LEN_BYTES);
    if claimed > available {
        return Err(HeaderError::BeyondFile { claimed, available });
    }
    Ok(claimed)
}

/// Parses and checks the JSON header, given the length of the data section that follows it.
/// The tensors come back in the order of their data.
pub(crate) fn entries(json: &[u8], data_len: u64) -> Result<Vec<Entry>, HeaderError> {
    let text = std::str::from_utf8(json).map_err(|e| HeaderError::NotUtf8 {
        at: e.valid_up_to(),
    })?;
    let fault = RefCell::new(None);
    let current = RefCell::new(None);
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let parsed = deserializer
        .deserialize_map(HeaderVisitor {
            fault: &fault,
            current: &current,
        })
        .and_then(|entries| deserializer.end().map(|()| entries));
    let mut entries = match (parsed, fault.into_inner(), current.into_inner()) {
        (Ok(entries), _, _) => entries,
        (Err(err), _, _) if err.is_syntax() || err.is_eof() => {
            return Err(HeaderError::NotJson {
                message: err.to_string(),
            })
        }
        (Err(_), Some(fault), _) => return Err(fault),
        (Err(err), None, Some(name)) if name == "__metadata__" => {
            return Err(HeaderError::BadMetadata {
                message: err.to_string(),
            })
        }
        (Err(err), None, Some(name)) => {
            return Err(HeaderError::BadEntry {
                name,
                message: err.to_string(),
            })
        }
        (Err(err), None, None) => {
            return Err(HeaderError::NotAnObject {
                message: err.to_string(),
            })
        }
    };

    // The crate's order: by data offsets.
    entries.sort_by_key(|e| (e.start, e.end));
    let mut covered = 0u64;
    let mut previous: Option<&Entry> = None;
    for entry in &entries {
        if entry.end > data_len {
            return Err(HeaderError::OutOfBounds {
                name: entry.name.clone(),
                start: entry.start,
                end: entry.end,
                data_len,
            });
        }
        if entry.start < covered {
            // `covered` is only ever past 0 once a tensor has been seen.
            let (previous, previous_start, previous_end) = previous
                .map(|p| (p.name.clone(), p.start, p.end))
                .unwrap_or_default();
            return Err(HeaderError::Overlap {
                name: entry.name.clone(),
                start: entry.start,
                end: entry.end,
                previous,
                previous_start,
                previous_end,
            });
        }
        if entry.start > covered {
            return Err(HeaderError::Gap {
                from: covered,
                to: entry.start,
                name: entry.name.clone(),
            });
        }
        covered = entry.end;
        previous = Some(entry);
    }
    if covered != data_len {
        return Err(HeaderError::Trailing {
            trailing: data_len - covered,
            end: covered,
            data_len,
        });
    }
    Ok(entries)
}

/// A whole safetensors file held in memory: its JSON length and tensors. (Files on disk are read
/// piecewise by `SafetensorsFile::open`; this serves tests and fuzzing.)
pub(crate) fn parse(bytes: &[u8]) -> Result<(u64, Vec<Entry>), HeaderError> {
    let file_len = bytes.len() as u64;
    let json_len = json_len(bytes, file_len)?;
    let start = LEN_BYTES as usize;
    // `json_len` checked that the header lies within the bytes.
    let json = bytes
        .get(start..start + json_len as usize)
        .ok_or(HeaderError::BeyondFile {
            claimed: json_len,
            available: file_len.saturating_sub(LEN_BYTES),
        })?;
    let entries = entries(json, file_len - LEN_BYTES - json_len)?;
    Ok((json_len, entries))
}

/// Reads the header object one entry at a time, so that a fault can name its tensor and a
/// large header is never held twice. serde's errors are strings, so the visitor leaves a fault
/// of its own in `fault`, and the name of the entry being read in `current`.
struct HeaderVisitor<'a> {
    fault: &'a RefCell<Option<HeaderError>>,
    current: &'a RefCell<Option<String>>,
}

/// A tensor's entry as written; unknown keys are ignored, as the crate ignores them.
#[derive(Deserialize)]
struct RawInfo {
    dtype: Value,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

impl<'de> Visitor<'de> for HeaderVisitor<'_> {
    type Value = Vec<Entry>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object that maps tensor names to their dtype, shape and data_offsets")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<Entry>, A::Error> {
        let mut entries = Vec::new();
        let mut names = HashSet::new();
        let fail = |fault: HeaderError| {
            let message = fault.to_string();
            *self.fault.borrow_mut() = Some(fault);
            de::Error::custom(message)
        };
        while let Some(name) = map.next_key::<String>()? {
            if !names.insert(name.clone()) {
                return Err(fail(HeaderError::Duplicate { name }));
            }
            *self.current.borrow_mut() = Some(name.clone());
            if name == "__metadata__" {
                // Free-form strings (`format = pt`); modelforge writes its own.
                let _: Option<std::collections::HashMap<String, String>> = map.next_value()?;
            } else {
                let raw: RawInfo = map.next_value()?;
                entries.push(entry(name, raw).map_err(fail)?);
            }
            *self.current.borrow_mut() = None;
        }
        Ok(entries)
    }
}

/// Checks one tensor's entry on its own: dtype, shape and size.
fn entry(name: String, raw: RawInfo) -> Result<Entry, HeaderError> {
    let dtype = match raw.dtype {
        Value::String(text) => match serde_json::from_value::<Dtype>(Value::String(text.clone())) {
            Ok(dtype) => dtype,
            Err(_) => return Err(HeaderError::UnknownDtype { name, dtype: text }),
        },
        other => {
            return Err(HeaderError::BadEntry {
                name,
                message: format!("`dtype` is `{other}`, not a dtype name such as \"F32\""),
            })
        }
    };
    let (start, end) = raw.data_offsets;
    let shape = raw.shape;
    let bits = shape
        .iter()
        .try_fold(1usize, |n, d| n.checked_mul(*d))
        .and_then(|n| n.checked_mul(dtype.bitsize()));
    let Some(bits) = bits else {
        return Err(HeaderError::ShapeOverflow { name, shape });
    };
    if bits % 8 != 0 {
        return Err(HeaderError::PartialByte { name, dtype, shape });
    }
    if end < start {
        return Err(HeaderError::Reversed { name, start, end });
    }
    let size = (bits / 8) as u64;
    if end - start != size {
        return Err(HeaderError::SizeMismatch {
            name,
            dtype,
            shape,
            size,
            start,
            end,
        });
    }
    Ok(Entry {
        name,
        dtype,
        shape,
        start,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file: the JSON header, then `data_len` zero bytes.
    fn file(json: &str, data_len: usize) -> Vec<u8> {
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        bytes
    }

    fn fault(json: &str, data_len: usize) -> HeaderError {
        parse(&file(json, data_len)).unwrap_err()
    }

    const TWO: &str = r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;

    #[test]
    fn reads_what_the_crate_writes() {
        let data = [0u8; 8];
        let view = safetensors::tensor::TensorView::new(Dtype::F16, vec![2, 2], &data).unwrap();
        let bytes = safetensors::serialize([("w", view)], None).unwrap();
        let (_, entries) = parse(&bytes).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(
            (entries[0].dtype, &entries[0].shape[..], entries[0].end),
            (Dtype::F16, &[2, 2][..], 8)
        );
    }

    #[test]
    fn tensors_come_in_data_order() {
        let (_, entries) = parse(&file(TWO, 16)).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn lengths_are_checked_before_anything_is_read() {
        assert_eq!(parse(&[1, 2, 3]), Err(HeaderError::TooShort { len: 3 }));
        let mut huge = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(matches!(parse(&huge), Err(HeaderError::TooLarge { .. })));
        let mut long = 100u64.to_le_bytes().to_vec();
        long.extend_from_slice(b"{}");
        assert_eq!(
            parse(&long),
            Err(HeaderError::BeyondFile {
                claimed: 100,
                available: 2
            })
        );
    }

    #[test]
    fn each_fault_names_its_tensor() {
        assert!(matches!(
            fault("[1, 2]", 0),
            HeaderError::NotAnObject { .. }
        ));
        assert!(matches!(fault("{\"a\": ", 0), HeaderError::NotJson { .. }));
        assert!(matches!(
            fault(r#"{"a":{"dtype":"Q7","shape":[],"data_offsets":[0,1]}}"#, 1),
            HeaderError::UnknownDtype { .. }
        ));
        assert!(matches!(
            fault(
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                8
            ),
            HeaderError::SizeMismatch { size: 12, .. }
        ));
        assert!(matches!(
            fault(&TWO.replace("[8,16]", "[4,12]"), 16),
            HeaderError::Overlap { .. }
        ));
        assert!(matches!(
            fault(&TWO.replace("[0,8]", "[24,32]"), 32),
            HeaderError::Gap { from: 0, to: 8, .. }
        ));
        assert!(matches!(fault(TWO, 12), HeaderError::OutOfBounds { .. }));
        assert!(matches!(
            fault(TWO, 20),
            HeaderError::Trailing { trailing: 4, .. }
        ));
        assert!(matches!(
            fault(&TWO.replace("\"b\"", "\"a\""), 16),
            HeaderError::Duplicate { .. }
        ));
        assert!(matches!(
            fault(
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#,
                0
            ),
            HeaderError::ShapeOverflow { .. }
        ));
        assert!(matches!(
            fault(
                r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
                2
            ),
            HeaderError::PartialByte { .. }
        ));
        assert!(matches!(
            fault(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
                4
            ),
            HeaderError::Reversed { .. }
        ));
        assert!(matches!(
            fault(r#"{"__metadata__":{"format":1}}"#, 0),
            HeaderError::BadMetadata { .. }
        ));
    }

    #[test]
    fn an_empty_header_holds_no_tensors() {
        assert_eq!(parse(&file("{}", 0)), Ok((2, Vec::new())));
        assert_eq!(parse(&file("{}  ", 0)).map(|(_, e)| e.len()), Ok(0));
    }
}
