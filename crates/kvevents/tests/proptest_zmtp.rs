//! Property tests of the ZMTP codec: arbitrary bytes never panic and never make the decoder
//! ask for more than its caps; encoded messages and commands decode to themselves however
//! the bytes are split; the caps hold for any input.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

use bytes::{Bytes, BytesMut};
use llmsched_kvevents::zmtp::{
    Command, Decoded, Decoder, ErrorReason, Limits, encode_command, encode_message, parse_greeting,
};
use proptest::prelude::*;

fn small_limits() -> Limits {
    Limits {
        max_frame_bytes: 4096,
        max_message_bytes: 8192,
        max_frames: 8,
        max_command_bytes: 1024,
        ..Limits::default()
    }
}

/// Feeds `bytes` to a decoder in chunks of the given sizes (cycled); returns the decoded
/// items and the error that stopped decoding, if any. Checks on the way that the decoder
/// never asks for more than one capped frame.
fn feed(bytes: &[u8], chunks: &[usize], limits: &Limits) -> (Vec<Decoded>, Option<ErrorReason>) {
    let mut d = Decoder::new(limits);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let cap = 9 + limits.max_frame_bytes.max(limits.max_command_bytes);
    let mut pos = 0;
    let mut i = 0;
    while pos < bytes.len() {
        let n = chunks[i % chunks.len()].max(1).min(bytes.len() - pos);
        i += 1;
        buf.extend_from_slice(&bytes[pos..pos + n]);
        pos += n;
        loop {
            assert!(
                d.wanted(&buf) <= cap,
                "wanted {} > cap {cap}",
                d.wanted(&buf)
            );
            match d.decode(&mut buf) {
                Ok(Some(x)) => out.push(x),
                Ok(None) => break,
                Err(e) => return (out, Some(e.reason)),
            }
        }
    }
    (out, None)
}

#[derive(Debug, Clone)]
enum Item {
    Message(Vec<Vec<u8>>),
    Command(Vec<u8>, Vec<u8>),
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        // Frames up to 600 bytes: both the short (≤ 255) and the long form.
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..600), 1..6)
            .prop_map(Item::Message),
        (
            prop::collection::vec(any::<u8>(), 1..20),
            prop::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(n, d)| Item::Command(n, d)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic_nor_exceed_caps(
        bytes in prop::collection::vec(any::<u8>(), 0..4096),
        chunks in prop::collection::vec(1usize..300, 1..8),
    ) {
        let limits = small_limits();
        let (items, _) = feed(&bytes, &chunks, &limits);
        // Whatever decoded fits the caps and came from the input.
        let mut total = 0;
        for it in &items {
            if let Decoded::Message(frames) = it {
                prop_assert!(!frames.is_empty() && frames.len() <= limits.max_frames);
                let size: usize = frames.iter().map(Bytes::len).sum();
                prop_assert!(size <= limits.max_message_bytes);
                prop_assert!(frames.iter().all(|f| f.len() <= limits.max_frame_bytes));
                total += size;
            }
        }
        prop_assert!(total <= bytes.len());
    }

    #[test]
    fn hostile_headers_are_errors_for_any_size(
        size in any::<u64>(),
        flags in 0u8..8,
    ) {
        let limits = small_limits();
        let mut bytes = vec![flags | 0x02];
        bytes.extend_from_slice(&size.to_be_bytes());
        let (items, err) = feed(&bytes, &[bytes.len()], &limits);
        let command = flags & 0x04 != 0;
        let cap = if command { limits.max_command_bytes } else { limits.max_frame_bytes } as u64;
        if command && flags & 0x01 != 0 {
            prop_assert_eq!(err, Some(ErrorReason::Protocol));
        } else if size > cap {
            prop_assert!(matches!(
                err,
                Some(ErrorReason::FrameTooLarge | ErrorReason::CommandTooLarge | ErrorReason::MessageTooLarge)
            ));
        } else {
            // A plausible header: waiting for the body (or done, for an empty frame).
            prop_assert!(err.is_none() || err == Some(ErrorReason::Protocol));
            prop_assert!(items.len() <= 1);
        }
    }

    #[test]
    fn encode_then_decode_round_trips_in_any_chunking(
        items in prop::collection::vec(item(), 1..12),
        chunks in prop::collection::vec(1usize..700, 1..8),
    ) {
        let limits = Limits::default();
        let mut bytes = BytesMut::new();
        for it in &items {
            match it {
                Item::Message(frames) => encode_message(frames, &mut bytes),
                Item::Command(name, data) => encode_command(name, data, &mut bytes),
            }
        }
        let (got, err) = feed(&bytes, &chunks, &limits);
        prop_assert_eq!(err, None);
        let want: Vec<Decoded> = items
            .iter()
            .map(|it| match it {
                Item::Message(frames) => {
                    Decoded::Message(frames.iter().map(|f| Bytes::copy_from_slice(f)).collect())
                }
                Item::Command(name, data) => Decoded::Command(Command {
                    name: Bytes::copy_from_slice(name),
                    data: Bytes::copy_from_slice(data),
                }),
            })
            .collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn frame_count_and_message_caps_hold(
        frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..2000), 1..20),
    ) {
        let limits = small_limits();
        let mut bytes = BytesMut::new();
        encode_message(&frames, &mut bytes);
        let (got, err) = feed(&bytes, &[977], &limits);
        let total: usize = frames.iter().map(Vec::len).sum();
        let biggest = frames.iter().map(Vec::len).max().unwrap_or(0);
        if frames.len() <= limits.max_frames
            && total <= limits.max_message_bytes
            && biggest <= limits.max_frame_bytes
        {
            prop_assert_eq!(err, None);
            prop_assert_eq!(got.len(), 1);
        } else {
            prop_assert!(got.is_empty());
            prop_assert!(matches!(
                err,
                Some(ErrorReason::TooManyFrames | ErrorReason::MessageTooLarge | ErrorReason::FrameTooLarge)
            ));
        }
    }

    #[test]
    fn arbitrary_greetings_never_panic(g in prop::collection::vec(any::<u8>(), 0..80)) {
        let _ = parse_greeting(&g);
    }
}
