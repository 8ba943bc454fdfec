//! The safetensors header reader against the `safetensors` crate: it must never panic, accept
//! only files the crate accepts, and read them as the crate does. It may refuse more, where
//! `stricter_than_the_crate` says so (a tensor named twice, which the crate reads as the last).
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelforge::fuzzing::{safetensors_header, HeaderTensor};
use safetensors::SafeTensors;

fuzz_target!(|bytes: &[u8]| {
    let ours = safetensors_header(bytes);
    let theirs = SafeTensors::read_metadata(bytes);
    match (ours, theirs) {
        (Ok((json_len, tensors)), Ok((their_len, metadata))) => {
            assert_eq!(json_len, their_len as u64);
            let mut expected: Vec<HeaderTensor> = metadata
                .tensors()
                .into_iter()
                .map(|(name, info)| HeaderTensor {
                    name,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    data_offsets: (info.data_offsets.0 as u64, info.data_offsets.1 as u64),
                })
                .collect();
            expected.sort_by(|a, b| a.name.cmp(&b.name));
            assert_eq!(tensors, expected);
        }
        (Ok(_), Err(err)) => panic!("accepted a file the safetensors crate refuses: {err}"),
        (Err(rejection), Ok(_)) => assert!(
            rejection.stricter_than_the_crate,
            "refused a file the safetensors crate reads: {}",
            rejection.message
        ),
        (Err(rejection), Err(_)) => assert!(!rejection.message.is_empty()),
    }
});
