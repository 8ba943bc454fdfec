//! The vocabulary of a SentencePiece model file (LLaMA's `tokenizer.model`, ChatGLM-6B's
//! `ice_text.model`): a protobuf `ModelProto` whose field 1 repeats
//! `SentencePiece { string piece = 1; float score = 2; Type type = 3; }`, a piece's id being its
//! place. Only the pieces are read; every length is checked against the bytes, so a damaged or
//! hostile file is an error, never a panic or a huge allocation.

/// The most bytes a model file may have; real ones are a few MB.
pub(crate) const MAX_LEN: u64 = 64 << 20;

/// The pieces of a serialised `ModelProto`, in id order.
pub(crate) fn pieces(bytes: &[u8]) -> Result<Vec<String>, String> {
    let mut pieces = Vec::new();
    let mut reader = Reader { bytes, at: 0 };
    while let Some((field, value)) = reader.field()? {
        if let (1, Value::Bytes(message)) = (field, value) {
            pieces.push(piece(message)?);
        }
    }
    Ok(pieces)
}

/// The `piece` string of one serialised `SentencePiece`.
fn piece(bytes: &[u8]) -> Result<String, String> {
    let mut reader = Reader { bytes, at: 0 };
    let mut piece = None;
    while let Some((field, value)) = reader.field()? {
        if let (1, Value::Bytes(text)) = (field, value) {
            piece = Some(
                String::from_utf8(text.to_vec()).map_err(|_| "a piece is not UTF-8".to_owned())?,
            );
        }
    }
    piece.ok_or_else(|| "a piece has no text".to_owned())
}

enum Value<'a> {
    Scalar,
    Bytes(&'a [u8]),
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// The next field number and value, or `None` at the end.
    fn field(&mut self) -> Result<Option<(u64, Value<'a>)>, String> {
        if self.at == self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => {
                self.varint()?;
                Value::Scalar
            }
            1 => {
                self.take(8)?;
                Value::Scalar
            }
            2 => {
                let len = usize::try_from(self.varint()?)
                    .map_err(|_| "a length does not fit in memory".to_owned())?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Scalar
            }
            wire => return Err(format!("unsupported protobuf wire type {wire}")),
        };
        Ok(Some((key >> 3, value)))
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.at)
                .ok_or_else(|| "the file ends inside a number".to_owned())?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a number is longer than 10 bytes".into())
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| "a field runs past the end of the file".to_owned())?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut n: u64, out: &mut Vec<u8>) {
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }

    fn bytes_field(field: u64, data: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(data.len() as u64, out);
        out.extend_from_slice(data);
    }

    /// A `ModelProto` with `pieces`, each with a score and a type, between other fields.
    fn model(pieces: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in pieces {
            let mut message = Vec::new();
            bytes_field(1, piece.as_bytes(), &mut message);
            varint(2 << 3 | 5, &mut message);
            message.extend_from_slice(&(-1.5f32).to_le_bytes());
            varint(3 << 3, &mut message);
            varint(1, &mut message);
            bytes_field(1, &message, &mut out);
        }
        // trainer_spec (2) and normalizer_spec (3), skipped.
        bytes_field(2, &[8, 150, 1], &mut out);
        bytes_field(3, b"\x0a\x04nmt1", &mut out);
        out
    }

    #[test]
    fn pieces_come_in_id_order() {
        let bytes = model(&["<unk>", "<s>", "\u{2581}the", "好"]);
        assert_eq!(
            pieces(&bytes).unwrap(),
            ["<unk>", "<s>", "\u{2581}the", "好"]
        );
    }

    #[test]
    fn damaged_files_are_errors() {
        let bytes = model(&["<unk>", "a"]);
        for cut in 1..bytes.len() {
            // Every prefix either parses (a cut between fields) or is an error: never a panic.
            let _ = pieces(&bytes[..cut]);
        }
        assert!(pieces(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert!(pieces(&[0x0b]).is_err(), "group wire types are refused");
        assert!(pieces(&[0x80; 11]).is_err());
    }
}
