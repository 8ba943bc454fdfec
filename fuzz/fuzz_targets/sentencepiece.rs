//! A SentencePiece model file's pieces as alignment reads them: any bytes, no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = modelforge::fuzzing::sentencepiece(bytes);
});
