//! Architecture schemas (`--arch FILE`): any bytes, parsed, checked, asked for widths and places
//! and, when refused, rendered as a person sees the diagnostic; no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = modelforge::fuzzing::arch_schema(bytes);
});
