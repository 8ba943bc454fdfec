//! PEFT's adapter_config.json as modelforge reads it: any bytes, no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = modelforge::fuzzing::adapter_config(bytes);
});
