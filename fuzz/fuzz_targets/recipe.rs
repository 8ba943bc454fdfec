//! Recipes: any bytes, parsed, checked and, when refused, rendered as a person sees the
//! diagnostic; no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = modelforge::fuzzing::recipe(bytes);
});
