//! The vocabulary of a SentencePiece model file (LLaMA's `tokenizer.model`, ChatGLM-6B's
//! `ice_text.model`): a protobuf `ModelProto` whose field 1 repeats
//! `SentencePiece { string piece = 1; float score = 2; Type type = 3; }`, a piece's id being its
//! place. Every length is checked against the bytes, so a damaged or hostile file is an error,
//! never a panic or a huge allocation.

/// The most bytes a model file may have; real ones are a few MB.
pub(crate) const MAX_LEN: u64 = 64 << 20;

/// The pieces of a serialised `ModelProto`, in id order.
pub(crate) fn pieces(bytes: &[u8]) -> Result<Vec<String>, String> {
    Ok(scored_pieces(bytes)?.into_iter().map(|p| p.text).collect())
}

/// One piece of the vocabulary.
pub(crate) struct Piece {
    pub text: String,
    pub score: f32,
    /// SentencePiece's `Type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte (what llama.cpp's token types number too).
    pub kind: u32,
}

/// The pieces of a serialised `ModelProto` with their scores and types, in id order.
pub(crate) fn scored_pieces(bytes: &[u8]) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut reader = Reader { bytes, at: 0 };
    while let Some((field, value)) = reader.field()? {
        if let (1, Value::Bytes(message)) = (field, value) {
            pieces.push(piece(message)?);
        }
    }
    Ok(pieces)
}

/// One serialised `SentencePiece`.
fn piece(bytes: &[u8]) -> Result<Piece, String> {
    let mut reader = Reader { bytes, at: 0 };
    let (mut text, mut score, mut kind) = (None, 0f32, 1u32);
    while let Some((field, value)) = reader.field()? {
        match (field, value) {
            (1, Value::Bytes(raw)) => {
                text = Some(
                    String::from_utf8(raw.to_vec())
                        .map_err(|_| "a piece is not UTF-8".to_owned())?,
                );
            }
            (2, Value::Fixed32(bits)) => score = f32::from_bits(bits),
            (3, Value::Varint(n)) => kind = u32::try_from(n).unwrap_or(1),
            _ => {}
        }
    }
    let text = text.ok_or_else(|| "a piece has no text".to_owned())?;
    Ok(Piece { text, score, kind })
}

enum Value<'a> {
    Varint(u64),
    Fixed32(u32),
    Fixed64,
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
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?)
                    .map_err(|_| "a length does not fit in memory".to_owned())?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                let raw = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
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
    fn pieces_keep_their_score_and_type() {
        let pieces = scored_pieces(&model(&["<unk>", "a"])).unwrap();
        assert_eq!((pieces[1].score, pieces[1].kind), (-1.5, 1));
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
